"""Model and hardware profiles: load a `ModelSpec` from a shipped profile name, a profile YAML, a Hugging
Face config.json or a bare parameter count ("70B"), and a `Hardware` from a name or a YAML file.

Shipped profiles live in the package `ztune.profiles_data` (directories models/ and hardware/). Nothing
here imports torch: `ztune estimate` loads a model and a cluster in milliseconds. Every bad input raises
one `ProfileError` whose one-line message says what is wrong and where names come from.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from ztune.errors import ProfileError, describe, kind_of, shown_json
from ztune.inputs import MAX_RANKS_PER_HOST, MAX_SEQ, StrictYamlLoader, ascii_number, check_plain, shown
from ztune.specs import Architecture, Hardware, ModelSpec, count_params

# The C loader parses a profile ~10x faster than the pure-Python one; both give the same data.
_PACKAGE = "ztune.profiles_data"
_SUPPORTED_HF_TYPES = ("gpt2", "llama", "mistral", "mixtral", "qwen2")

_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelSpec)}
_HARDWARE_FIELDS = {f.name: f for f in dataclasses.fields(Hardware)}
# Fields a file may leave out: `name` defaults to the file's stem, `source` to its path.
_OPTIONAL = {"name", "source"}
# Hardware fields where 0 (their default) means "not known": the cost model then uses a generic value.
_ZERO_MEANS_UNKNOWN = ("cpu_cores", "nics_per_node", "train_flops_efficiency", "optimizer_step_elements_per_s",
                       "onebit_step_elements_per_s", "inter_node_cpu_s_per_byte", "intra_node_cpu_s_per_byte",
                       "inter_node_reduce_cpu_s_per_byte", "inter_node_cpu_s_per_step", "intra_node_cpu_s_per_step",
                       "cpu_contention",
                       *(f.name for f in dataclasses.fields(Hardware) if f.name.startswith(("codec_", "runtime_"))))


# The least a rate field may be: far below any real device (a CPU core does ~1e10 FLOP/s, 1 Mbit/s is 1.25e5 B/s),
# so a value under it is a unit slip (TFLOP/s or GB/s written as a bare number), and a step time from it would
# overflow.
_RATE_FLOORS = (
    *((n, 1e6, "write FLOP/s, e.g. 989e12 for 989 TFLOP/s") for n in ("peak_flops_bf16", "peak_flops_fp32")),
    *((f.name, 1e5, "write bytes/s, e.g. 25e9 for 25 GB/s") for f in dataclasses.fields(Hardware)
      if f.name.endswith("_bw_bytes_per_s")),
    *((f.name, 1e3, "write elements/s, e.g. 2e8, or 0 for unknown") for f in dataclasses.fields(Hardware)
      if f.name.endswith("_elements_per_s")),
)

# The most a size may be: each far above any real device or model, so that a value beyond it is a typo or a unit
# slip (1e15 for 15), refused here instead of steering the estimate or the tuner with nonsense.
_HARDWARE_CEILINGS = (
    # The hostfile's slots per host share this bound (inputs.MAX_RANKS_PER_HOST).
    ("gpus_per_node", MAX_RANKS_PER_HOST, "it counts the ranks of one host (its GPUs, or one per CPU core)"),
    ("nics_per_node", MAX_RANKS_PER_HOST, "it counts the NICs of one host"),
    ("cpu_cores", 1 << 16, "it counts the cores of one host (the largest have a few thousand)"),
    # 1 PiB: GPUs hold <= 288 GB (B300), the largest hosts 32 TiB of RAM.
    ("gpu_memory_bytes", 1 << 50, "write bytes, e.g. 80e9 for 80 GB"),
    ("host_memory_bytes", 1 << 50, "write bytes, e.g. 2e12 for 2 TB"),
    # 1e17 FLOP/s is 40x a B200's dense bf16 peak (2.25e15).
    *((n, 1e17, "write FLOP/s, e.g. 989e12 for 989 TFLOP/s") for n in ("peak_flops_bf16", "peak_flops_fp32")),
    # 100 TB/s is 12x HBM3e (8 TB/s), 50x NVLink 5 (1.8 TB/s per GPU).
    *((f.name, 1e14, "write bytes/s, e.g. 25e9 for 25 GB/s") for f in dataclasses.fields(Hardware)
      if f.name.endswith("_bw_bytes_per_s")),
    # A collective step takes microseconds; a second is a unit slip (5 for 5 us).
    *((n, 1.0, "write seconds, e.g. 5e-6 for 5 us") for n in ("intra_node_latency_s", "inter_node_latency_s")),
)
# The most a model dimension may be, each at least 10x the largest published model's (Llama 3.1 405B: hidden 16384,
# 126 layers, 128 heads, FFN 53248; vocabularies <= 262144; MoE <= 384 experts). max_seq_len shares --seq's bound
# (contexts reach 10M tokens).
_TENFOLD = "at least 10x any published model's"
_MODEL_CEILINGS = (
    *((key, ceiling, _TENFOLD) for key, ceiling in (
        ("vocab_size", 1 << 24), ("hidden_size", 1 << 18), ("intermediate_size", 1 << 20), ("num_layers", 1 << 14),
        ("num_heads", 1 << 14), ("num_kv_heads", 1 << 14), ("head_dim", 1 << 14), ("num_experts", 1 << 14))),
    ("max_seq_len", MAX_SEQ, "the bound of --seq"),
)
# The most parameters a model may have: the range `--params` covers (model_from_params).
MAX_PARAMS = 1e15


# ---------------------------------------------------------------------------------------------- lookup
def _profile_dir(kind: str) -> Path:
    # The package's directory from its import spec (importlib.resources.files would import zipfile,
    # tempfile and friends: a third of `ztune estimate`'s import time). The data ships as plain files.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ProfileError(f"the shipped profiles ({_PACKAGE}) are not installed; reinstall ztune")
    return Path(next(iter(spec.submodule_search_locations))) / kind


def _names(kind: str) -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _profile_dir(kind).iterdir() if p.name.endswith(".yaml"))


def list_models() -> list[str]:
    """Names of the shipped model profiles, sorted."""
    return _names("models")


def list_hardware() -> list[str]:
    """Names of the shipped hardware profiles, sorted."""
    return _names("hardware")


def _looks_like_path(ref: str) -> bool:
    # A bare word is always a profile name, even if a file of that name happens to be in the cwd.
    return "/" in ref or "\\" in ref or ref.endswith((".yaml", ".yml", ".json"))


def _unknown(kind: str, folder: str, ref: str, names: list[str], how: str) -> ProfileError:
    close = difflib.get_close_matches(ref.lower(), names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return ProfileError(
        f"unknown {kind} profile {ref!r}; {hint}shipped profiles: {', '.join(names)} "
        f"(ztune/profiles_data/{folder}/); {how}"
    )


def _read_text(path: Path, what: str) -> str:
    """The file's UTF-8 text through ztune.inputs.read_text, as configs are read: at most 16 MiB (a device such
    as /dev/zero, or a wrong huge file, is one line, not a MemoryError), a directory or a missing file named."""
    from ztune.inputs import read_text

    return read_text(path, error=ProfileError, what=what)


def _parse_yaml(text: str, origin: str) -> dict:
    try:
        data = yaml.load(text, Loader=StrictYamlLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ProfileError(f"{origin}: YAML syntax error{where}: {problem}") from None
    except (RecursionError, ValueError, OverflowError, TypeError) as exc:  # e.g. a date like 2024-02-30
        raise ProfileError(f"{origin}: unusable YAML: {str(exc)[:120] or exc.__class__.__name__}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{origin}: expected a mapping of field: value, got {kind_of(data)}")
    return check_plain(data, error=ProfileError, where=origin)


# ------------------------------------------------------------------------------------------ validation
def _field_type(field: dataclasses.Field) -> str:
    # specs.py uses `from __future__ import annotations`, so types are strings such as "int | None".
    return str(field.type).replace(" ", "")


def _convert(value: Any, type_name: str, key: str, origin: str) -> Any:
    if type_name.endswith("|None"):
        return None if value is None else _convert(value, type_name[: -len("|None")], key, origin)
    if type_name == "str":
        if not isinstance(value, str):
            raise ProfileError(f"{origin}: {key}: expected a string, got {describe(value)}")
        return value
    if type_name == "bool":
        if not isinstance(value, bool):
            raise ProfileError(f"{origin}: {key}: expected true or false, got {describe(value)}")
        return value
    if type_name == "Architecture":
        allowed = [a.value for a in Architecture]
        if not isinstance(value, str) or value.lower() not in allowed:
            raise ProfileError(f"{origin}: {key}: got {describe(value)}; allowed: {', '.join(allowed)}")
        return Architecture(value.lower())
    # Numbers. YAML 1.1 reads `989e12` (no dot, unsigned exponent) as a string: accept it as a number, written in
    # ASCII only (inputs.ascii_number: float() would also read '８' as 8, or ' 8 ').
    number = value
    if isinstance(value, str):
        converted = ascii_number(value, yaml_grouping=True)
        if converted is None and not value.isascii():
            raise ProfileError(f"{origin}: {key}: {shown(value)} is not a number; write it in ASCII digits 0-9")
        number = value if converted is None else converted
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise ProfileError(f"{origin}: {key}: expected a number, got {describe(value)}")
    if type_name == "int":
        if number != int(number):
            raise ProfileError(f"{origin}: {key}: expected an integer, got {describe(value)}")
        return int(number)
    return float(number)


def _build(cls: type, fields: dict[str, dataclasses.Field], data: dict, *, origin: str, stem: str) -> Any:
    """Strictly build `cls` from `data`: unknown, missing and mistyped fields are errors."""
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ProfileError(
                f"{origin}: unknown field {key!r}{hint}; allowed: {', '.join(fields)}"
            )
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in data:
            if name == "name":
                values[name] = stem
            elif name == "source":
                values[name] = origin
            elif field.default is dataclasses.MISSING:
                raise ProfileError(f"{origin}: missing field {name!r}")
            continue
        values[name] = _convert(data[name], _field_type(field), name, origin)
    return cls(**values)


def _check_model(m: ModelSpec, origin: str) -> ModelSpec:
    sizes = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
             "max_seq_len", "num_experts", "top_k", "head_dim")
    for key in sizes:
        value = getattr(m, key)
        if value is not None and value <= 0:
            raise ProfileError(f"{origin}: {key} must be a positive integer, got {value}")
    for key, ceiling, why in _MODEL_CEILINGS:
        value = getattr(m, key)
        if value is not None and value > ceiling:
            raise ProfileError(f"{origin}: {key} is {value:,}, above {ceiling:,} ({why}); check the value")
    if m.head_dim is None and m.hidden_size % m.num_heads:
        raise ProfileError(
            f"{origin}: hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}; "
            "fix one, or set head_dim"
        )
    if m.num_heads % m.num_kv_heads:
        raise ProfileError(
            f"{origin}: num_heads {m.num_heads} is not divisible by num_kv_heads {m.num_kv_heads}"
        )
    if m.architecture is Architecture.GPT2:
        if m.num_kv_heads != m.num_heads or m.head_dim is not None:
            raise ProfileError(f"{origin}: gpt2 has num_kv_heads == num_heads and no head_dim")
    if m.is_moe != (m.architecture is Architecture.MIXTRAL):
        raise ProfileError(
            f"{origin}: num_experts {m.num_experts} with architecture {m.architecture.value}; "
            "use architecture mixtral with num_experts >= 2 for a mixture of experts"
        )
    if m.top_k > m.num_experts:
        raise ProfileError(f"{origin}: top_k {m.top_k} exceeds num_experts {m.num_experts}")
    total = count_params(m).total
    if total > MAX_PARAMS:
        raise ProfileError(f"{origin}: the shape has {total:.3g} parameters, above {MAX_PARAMS:g} (1000T, the range "
                           "of --params); check num_layers, hidden_size, intermediate_size and num_experts")
    return m


def _check_hardware(hw: Hardware, origin: str) -> Hardware:
    for name in _HARDWARE_FIELDS:
        value = getattr(hw, name)
        if isinstance(value, (int, float)) and name not in _ZERO_MEANS_UNKNOWN and value <= 0:
            raise ProfileError(f"{origin}: {name} must be positive, got {value}")
    for name in _ZERO_MEANS_UNKNOWN:
        if getattr(hw, name) < 0:
            raise ProfileError(f"{origin}: {name} must be >= 0 (0 = unknown), got {getattr(hw, name)}")
    for name, floor, how in _RATE_FLOORS:  # rates so small the step time overflows: a unit slip, not hardware
        value = getattr(hw, name)
        if value > 0 and value < floor:
            raise ProfileError(f"{origin}: {name} is {value:g}, under {floor:g}; {how}")
    for name, ceiling, how in _HARDWARE_CEILINGS:
        value = getattr(hw, name)
        if value > ceiling:
            raise ProfileError(f"{origin}: {name} is {value:g}, above the {ceiling:g} allowed; {how}")
    if hw.train_flops_efficiency > 1:
        raise ProfileError(f"{origin}: train_flops_efficiency is a fraction of peak_flops_bf16, got "
                           f"{hw.train_flops_efficiency}; write e.g. 0.45 for 45%")
    return hw


# ------------------------------------------------------------------------------------------ HF import
def _hf_int(data: dict, key: str, origin: str, default: Any = dataclasses.MISSING) -> Any:
    """The integer at `key` of a config.json (`default` when absent or null). transformers' config classes take
    the JSON type as it stands and refuse another (5.x: "expected int, got str"; 4.x kept "4" and failed later in
    range()), so a string, a boolean or a float there (4.0 included) is a broken file, refused here too."""
    value = data.get(key)
    if value is None:
        if default is not dataclasses.MISSING:
            return default
        if key in data:
            raise ProfileError(f"{origin}: {key}: expected an integer, got null")
        raise ProfileError(f"{origin}: config.json has no {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        hint = ""
        if isinstance(value, str) and ascii_number(value.strip()) is not None:
            hint = " (a string: write the number without quotes)"
        elif isinstance(value, float) and value == int(value):
            hint = f" (a float: write {int(value)})"
        elif isinstance(value, bool):
            hint = " (a boolean: write the number)"
        raise ProfileError(f"{origin}: {key}: expected an integer, got {shown_json(value)}{hint}")
    return value


def _hf_bool(data: dict, key: str, origin: str, default: bool) -> bool:
    """The flag at `key` of a config.json (`default` when absent): JSON true or false only, as transformers 5.x
    takes it (4.x read the string "false" as true)."""
    value = data.get(key, default)
    if not isinstance(value, bool):
        quoted = isinstance(value, str) and value.strip().lower() in ("true", "false")
        hint = " (a string: write true or false without quotes)" if quoted else ""
        raise ProfileError(f"{origin}: {key}: expected true or false, got {shown_json(value)}{hint}")
    return value


# ModelSpec fields -> the config.json keys they come from, per model_type family: errors name what the user's file
# says (an HF config has tie_word_embeddings, not tied_embeddings; GPT-2's n_layer, not num_layers).
_HF_KEYS = {
    "gpt2": {"hidden_size": "n_embd", "num_heads": "n_head", "num_kv_heads": "n_head", "num_layers": "n_layer",
             "intermediate_size": "n_inner", "max_seq_len": "n_positions", "tied_embeddings": "tie_word_embeddings"},
    "llama": {"num_heads": "num_attention_heads", "num_layers": "num_hidden_layers",
              "num_kv_heads": "num_key_value_heads", "max_seq_len": "max_position_embeddings",
              "tied_embeddings": "tie_word_embeddings", "num_experts": "num_local_experts",
              "top_k": "num_experts_per_tok"},
}


def _hf_model(fields: dict, *, origin: str, name: str, family: str) -> ModelSpec:
    """_model_from_dict on an import, its errors naming the config.json keys (_HF_KEYS)."""
    try:
        return _model_from_dict(fields, origin=origin, stem=name)
    except ProfileError as exc:
        text = str(exc)
        prefix = f"{origin}: "
        head, rest = (prefix, text[len(prefix):]) if text.startswith(prefix) else ("", text)
        keys = _HF_KEYS[family]
        rest = re.sub(r"\b(" + "|".join(map(re.escape, keys)) + r")\b", lambda m: keys[m.group(1)], rest)
        raise ProfileError(head + rest) from None


def _from_hf_config(data: dict, *, origin: str, name: str) -> ModelSpec:
    """Map a Hugging Face config.json (as a dict) to ModelSpec fields, then validate like a profile."""
    model_type = data.get("model_type")
    if model_type not in _SUPPORTED_HF_TYPES:
        raise ProfileError(
            f"{origin}: unsupported model_type {model_type!r}; supported: {', '.join(_SUPPORTED_HF_TYPES)}"
        )
    source = f"HF config.json {origin}"
    if model_type == "gpt2":
        hidden = _hf_int(data, "n_embd", origin)
        heads = _hf_int(data, "n_head", origin)
        fields = dict(
            name=name, source=source, architecture="gpt2", vocab_size=_hf_int(data, "vocab_size", origin),
            hidden_size=hidden, num_layers=_hf_int(data, "n_layer", origin), num_heads=heads,
            num_kv_heads=heads, intermediate_size=_hf_int(data, "n_inner", origin, 4 * hidden),  # GPT2MLP: null = 4h
            max_seq_len=_hf_int(data, "n_positions", origin),
            tied_embeddings=_hf_bool(data, "tie_word_embeddings", origin, True),
            attention_bias=True, attention_out_bias=True,
        )
        return _hf_model(fields, origin=origin, name=name, family="gpt2")
    if _hf_bool(data, "mlp_bias", origin, False):
        raise ProfileError(f"{origin}: mlp_bias true is not supported (ztune counts SwiGLU without bias)")
    hidden = _hf_int(data, "hidden_size", origin)
    heads = _hf_int(data, "num_attention_heads", origin)
    head_dim = _hf_int(data, "head_dim", origin, None)
    if heads > 0 and head_dim == hidden // heads:
        head_dim = None  # the default: keep profiles and imports comparable
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False  # Qwen2Attention: bias on q/k/v, none on o_proj
    elif model_type == "llama":
        qkv_bias = out_bias = _hf_bool(data, "attention_bias", origin, False)  # LlamaAttention: one flag for all four
    else:
        qkv_bias = out_bias = False
    fields = dict(
        name=name, source=source, architecture="mixtral" if model_type == "mixtral" else "llama",
        vocab_size=_hf_int(data, "vocab_size", origin), hidden_size=hidden,
        num_layers=_hf_int(data, "num_hidden_layers", origin), num_heads=heads,
        num_kv_heads=_hf_int(data, "num_key_value_heads", origin, heads),
        intermediate_size=_hf_int(data, "intermediate_size", origin),
        max_seq_len=_hf_int(data, "max_position_embeddings", origin),
        tied_embeddings=_hf_bool(data, "tie_word_embeddings", origin, False),
        attention_bias=qkv_bias, attention_out_bias=out_bias, head_dim=head_dim,
    )
    if model_type == "mixtral":
        # MixtralConfig defaults when the keys are absent.
        fields["num_experts"] = _hf_int(data, "num_local_experts", origin, 8)
        fields["top_k"] = _hf_int(data, "num_experts_per_tok", origin, 2)
    return _hf_model(fields, origin=origin, name=name, family="llama")


def _model_from_dict(data: dict, *, origin: str, stem: str) -> ModelSpec:
    spec = _build(ModelSpec, _MODEL_FIELDS, data, origin=origin, stem=stem)
    return _check_model(spec, origin)


# ---------------------------------------------------------------------------------------- public API
def load_model(ref: str) -> ModelSpec:
    """A model from a shipped profile name (`llama-2-70b`), a profile YAML path, or a Hugging Face
    config.json path (model_type gpt2, llama, mistral, mixtral or qwen2)."""
    ref = str(ref)
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        text = _read_text(path, "model profile")
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ProfileError(f"{path}: JSON syntax error at line {exc.lineno}: {exc.msg}") from None
            except (RecursionError, ValueError):  # nesting, or an integer of thousands of digits
                raise ProfileError(f"{path}: unusable JSON (nested too deeply or an absurd number)") from None
            check_plain(data, error=ProfileError, where=str(path))  # NaN / Infinity, by key
            if not isinstance(data, dict):
                raise ProfileError(f"{path}: expected a JSON object (a Hugging Face config.json), got {kind_of(data)}")
            # A config.json is named after the directory (the repo) that holds it.
            name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
            return _from_hf_config(data, origin=str(path), name=name)
        return _model_from_dict(_parse_yaml(text, str(path)), origin=str(path), stem=path.stem)
    names = list_models()
    key = ref.lower()
    if key not in names:
        how = "or pass a YAML path, a Hugging Face config.json, or --params 70B"
        raise _unknown("model", "models", ref, names, how)
    origin = f"profile {key}"
    text = (_profile_dir("models") / f"{key}.yaml").read_text(encoding="utf-8")
    return _model_from_dict(_parse_yaml(text, origin), origin=origin, stem=key)


def load_hardware(ref: str) -> Hardware:
    """A node type from a shipped hardware profile name (`dgx-h100`) or a hardware YAML path."""
    ref = str(ref)
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        data = _parse_yaml(_read_text(path, "hardware profile"), str(path))
        origin, stem = str(path), path.stem
    else:
        names = list_hardware()
        key = ref.lower()
        if key not in names:
            raise _unknown("hardware", "hardware", ref, names, "or pass a hardware YAML path (see `ztune probe`)")
        origin, stem = f"profile {key}", key
        data = _parse_yaml((_profile_dir("hardware") / f"{key}.yaml").read_text(encoding="utf-8"), origin)
    return _check_hardware(_build(Hardware, _HARDWARE_FIELDS, data, origin=origin, stem=stem), origin)


# ---------------------------------------------------------------------------------- --params 70B
# ASCII only: without re.ASCII, \d takes any Unicode digit and float() reads it ("７0B" was 70B).
_PARAMS_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmbgt]?)\s*$", re.IGNORECASE | re.ASCII)
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_GENERIC_VOCAB = 32000  # Llama / Llama-2 tokenizer
_GENERIC_HEAD_SIZE = 128
# Llama's width/depth: 4096/32 = 5120/40 = 128, 8192/80 = 102, 16384/126 = 130 (Touvron et al. 2023;
# Llama 3 paper table 3). The search prefers shapes near 128.
_GENERIC_ASPECT = 128
# Llama-2 uses grouped-query attention with 8 K/V heads from 34B/70B up; smaller models use full MHA.
_GQA_FROM_PARAMS = 30e9
_GQA_KV_HEADS = 8
_FIT_WEIGHT = 10.0


def _generic_shape(hidden: int, layers: int, *, gqa: bool) -> tuple[int, int, int, int]:
    heads = hidden // _GENERIC_HEAD_SIZE
    kv_heads = _GQA_KV_HEADS if gqa else heads
    # Llama's SwiGLU width is ~8/3 h (keeps MLP FLOPs equal to a 4h GeLU MLP), rounded to 256.
    intermediate = max(256, round(8 * hidden / 3 / 256) * 256)
    return heads, kv_heads, intermediate, layers


def model_from_params(text: str) -> ModelSpec:
    """A generic Llama-style decoder whose parameter count is within 3% of `text`
    ("70B", "7b", "1.5B", "350M"): hidden a multiple of 128, depth near hidden/128, vocab 32000."""
    match = _PARAMS_RE.match(str(text))
    if not match:
        raise ProfileError(
            f"bad --params value {shown(str(text))}: write a parameter count such as 70B, 7b, 1.5B or 350M (ASCII "
            "digits)"
        )
    target = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if not 10e6 <= target <= MAX_PARAMS:
        raise ProfileError(
            f"--params {text}: generic shapes cover 10M to 1000T parameters (vocab 32000 alone is 8M)"
        )
    gqa = target >= _GQA_FROM_PARAMS
    best: tuple[float, int, int] | None = None  # (score, hidden, layers)
    for hidden in range(_GENERIC_HEAD_SIZE, 65536 + 1, _GENERIC_HEAD_SIZE):
        heads = hidden // _GENERIC_HEAD_SIZE
        if gqa and heads % _GQA_KV_HEADS:
            continue
        one = _generic_spec(hidden, 1, gqa=gqa, text="", target=target)
        two = _generic_spec(hidden, 2, gqa=gqa, text="", target=target)
        per_layer = count_params(two).total - count_params(one).total
        fixed = count_params(one).total - per_layer
        layers = max(1, round((target - fixed) / per_layer))
        error = abs(fixed + layers * per_layer - target) / target
        if error > 0.03:
            continue
        # Llama-like depth first; a 1% miss costs as much as a 10% change of width/depth.
        score = abs(math.log(hidden / layers / _GENERIC_ASPECT)) + _FIT_WEIGHT * error
        candidate = (score, hidden, layers)
        if best is None or candidate < best:
            best = candidate
    if best is None:
        raise ProfileError(f"--params {text}: no generic Llama-style shape within 3%; use a model profile")
    return _generic_spec(best[1], best[2], gqa=gqa, text=str(text).strip(), target=target)


def _generic_spec(hidden: int, layers: int, *, gqa: bool, text: str, target: float) -> ModelSpec:
    heads, kv_heads, intermediate, layers = _generic_shape(hidden, layers, gqa=gqa)
    label = re.sub(r"\s+", "", text).upper() if text else f"{target:.0f}"
    return ModelSpec(
        name=f"generic-{label}", architecture=Architecture.LLAMA, vocab_size=_GENERIC_VOCAB,
        hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        intermediate_size=intermediate, max_seq_len=4096, tied_embeddings=False,
        source=f"derived from --params {label} (generic Llama-style shape)",
    )
