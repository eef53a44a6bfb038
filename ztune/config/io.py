"""Loading and saving configs: ztune YAML, DeepSpeed JSON, plain dicts, or a TrainConfig."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from pathlib import Path
from typing import Any

import yaml

from ztune.config.deepspeed import from_deepspeed, is_deepspeed, to_deepspeed
from ztune.config.deepspeed_auto import AutoContext
from ztune.config.schema import TrainConfig
from ztune.config.validate import (
    _FIELD_KEYS,
    DEEPSPEED_BATCH_KEYS,
    ZTUNE_BATCH_KEYS,
    BatchKeys,
    build,
    check,
)
from ztune.errors import ConfigError, kind_of
from ztune.inputs import check_plain, parse_json, parse_yaml, read_text

# Environment variable through which `ztune launch` / `ztune autotune` hand a config file to a script.
CONFIG_ENV = "ZTUNE_CONFIG"


@dataclasses.dataclass(frozen=True)
class LoadedConfig:
    """A loaded config with what loading it found: the DeepSpeed keys it ignored (as the user wrote them) and
    whether it was DeepSpeed JSON (error messages then name DeepSpeed's keys)."""

    config: TrainConfig
    ignored: tuple[str, ...] = ()
    deepspeed: bool = False

    @property
    def batch_keys(self) -> BatchKeys:
        return DEEPSPEED_BATCH_KEYS if self.deepspeed else ZTUNE_BATCH_KEYS


def _from_doc(doc: Any, context: AutoContext | None, *, json_file: bool = False) -> LoadedConfig:
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config: expected a mapping of config keys at the top level, got "
                          f"{kind_of(doc)}; write key: value settings (ztune YAML or DeepSpeed JSON)")
    check_plain(doc, error=ConfigError, where="config")  # no NaN, Infinity or absurd number reaches a key
    if is_deepspeed(doc, json_file=json_file):
        cfg, ignored = from_deepspeed(doc, context=context)
        return LoadedConfig(cfg, tuple(ignored), deepspeed=True)
    return LoadedConfig(check(build(TrainConfig, doc)))


def from_dict(doc: Any) -> TrainConfig:
    """A TrainConfig from a parsed document: ztune form, or DeepSpeed form (detected by its keys)."""
    return _from_doc(doc, None).config


def load(source: str | os.PathLike | dict | TrainConfig | None) -> TrainConfig:
    """Load a config from a TrainConfig, a dict, a YAML/JSON file path, or None (defaults)."""
    return load_detailed(source).config


def load_detailed(source: str | os.PathLike | dict | TrainConfig | None, *,
                  context: AutoContext | None = None) -> LoadedConfig:
    """`load`, also returning the ignored DeepSpeed keys; `context` resolves DeepSpeed "auto" values."""
    if isinstance(source, TrainConfig):
        return LoadedConfig(check(source))
    if source is None or isinstance(source, dict):
        return _from_doc(source, context)
    path = Path(source)
    text = read_text(path, error=ConfigError, what="config file")
    if not text.strip():  # a JSON reader would call it invalid, a YAML one read null
        raise _empty(path)
    # Parsed strictly (ztune/inputs.py): NaN, Infinity and absurd numbers are refused here, by key.
    parse = parse_json if path.suffix == ".json" else parse_yaml
    try:
        doc = parse(text, error=ConfigError, where=f"config file {str(path)!r}")
    except ConfigError as exc:
        if parse is parse_json and " is not valid JSON at " in str(exc):
            # DeepSpeed reads its JSON with hjson (runtime/config.py), so its configs may hold what JSON does not.
            raise ConfigError(f"{exc} (ztune reads strict JSON: no comments, trailing commas or unquoted keys, "
                              "which DeepSpeed's hjson reader allows)") from None
        raise
    if doc is None:  # only comments, `null` or `---`: no settings, which is no config either
        raise _empty(path)
    try:
        return _from_doc(doc, context, json_file=path.suffix == ".json")
    except ConfigError as exc:
        raise ConfigError(f"{path.name}: {exc}") from None


def _empty(path: Path) -> ConfigError:
    return ConfigError(f"config file {str(path)!r} holds no settings (it is empty or null); write the config in "
                       "it, or leave the config out to use ztune's defaults")


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {_FIELD_KEYS.get(f.name, f.name): _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def to_dict(cfg: TrainConfig) -> dict:
    """The ztune YAML form of `cfg` as plain data (round-trips through `from_dict`)."""
    return _plain(cfg)


def save(cfg: TrainConfig, path: str | os.PathLike, *, fmt: str = "yaml", header: str = "") -> Path:
    """Write `cfg` as ztune YAML (fmt='yaml') or DeepSpeed JSON (fmt='deepspeed'), atomically (a reader sees
    the old file or the whole new one). `header` (YAML only) heads the file as '# ' comment lines."""
    path = Path(path)
    if fmt == "yaml":
        comments = "".join(f"# {line}\n" for line in header.splitlines())
        text = comments + yaml.safe_dump(to_dict(cfg), sort_keys=False)
    elif fmt == "deepspeed":
        text = json.dumps(to_deepspeed(cfg), indent=2) + "\n"
    else:
        raise ConfigError(f"unknown config format {fmt!r}; allowed: yaml, deepspeed")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
