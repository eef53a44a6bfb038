"""`"auto"` values in DeepSpeed configs (the Hugging Face Trainer's convention): resolved where ztune can derive
the value, rejected naming the key as the user wrote it where it cannot.

What the Trainer fills in (transformers, integrations/deepspeed.py, HfTrainerDeepSpeedConfig) comes from its
TrainingArguments, which ztune does not see. ztune derives:
- the three batch sizes: "auto" = not given, then DeepSpeed's derivation rules (validate.resolve_batch); an
  error when neither train_batch_size nor train_micro_batch_size_per_gpu is left;
- fp16.enabled / bf16.enabled: on when the model's floating-point parameters already have that dtype;
- zero_optimization.reduce_bucket_size: hidden_size * hidden_size, the Trainer's formula, with the hidden size
  from the model (`model.config.hidden_size`, or the largest of `model.config.hidden_sizes`, or a ztune
  model's `spec.hidden_size`);
- keys that ztune ignores keep their "auto" (it is never read), except a whole block ("flops_profiler": "auto"),
  which deepspeed.py refuses as DeepSpeed's readers do.
Every other "auto" (learning rate, betas, clipping, ...) is an error naming its key, all such keys in one line;
with `batch_from_caller` (ztune estimate's batch flags) the batch keys may all be "auto" or absent.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ztune.config.deepspeed_keys import ALIASES, IGNORED, rule
from ztune.config.schema import Precision
from ztune.errors import ConfigError

AUTO = "auto"
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True)
class AutoContext:
    """What ztune knows when it resolves "auto": the model's hidden size and its parameters' precision (None
    where unknown, e.g. `ztune estimate` without --precision)."""

    hidden_size: int | None = None
    precision: Precision | None = None
    # True where the model is not here but will be when the config is used (`ztune launch` checks a config that
    # ztune.initialize reads on the ranks): the values that need the model are left at their defaults for the
    # check (fp16 / bf16 off, the default bucket size) instead of refused.
    model_later: bool = False
    # True where the caller gives the batch sizes itself (`ztune estimate --micro-batch / --global-batch`), as the
    # Trainer fills them from its arguments: batch keys that are "auto" or absent are left for it.
    batch_from_caller: bool = False


def context_from_model(model: Any) -> AutoContext:
    """The AutoContext of a torch module (Hugging Face or ztune model; anything else gives what it can)."""
    hidden = None
    config = getattr(model, "config", None)
    if config is not None:
        sizes = getattr(config, "hidden_sizes", None)
        hidden = max(sizes) if sizes else getattr(config, "hidden_size", None)
    if hidden is None and getattr(model, "spec", None) is not None:
        hidden = getattr(model.spec, "hidden_size", None)
    precision = None
    params = getattr(model, "parameters", None)
    if callable(params):
        import torch

        dtypes = {p.dtype for p in params() if p.is_floating_point()}
        by_dtype = {torch.float16: Precision.FP16, torch.bfloat16: Precision.BF16}
        precision = by_dtype.get(next(iter(dtypes)), Precision.FP32) if len(dtypes) == 1 else Precision.FP32
    return AutoContext(hidden_size=hidden if isinstance(hidden, int) else None, precision=precision)


# The keys the Hugging Face Trainer fills when they are "auto" (transformers, integrations/deepspeed.py,
# HfTrainerDeepSpeedConfig.trainer_config_process / trainer_config_finalize), from its TrainingArguments or the model.
TRAINER_FILLS = frozenset({
    *_BATCH_KEYS, "gradient_clipping", "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps",
    "optimizer.params.weight_decay", "scheduler.params.warmup_min_lr", "scheduler.params.warmup_max_lr",
    "scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps", "fp16.enabled", "bf16.enabled",
    "zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold"})


def _cannot(key: str, why: str) -> ConfigError:
    return ConfigError(f'{key}: "auto" {why}; set a value')


def _underivable(paths: list[tuple[str, str | None]]) -> ConfigError:
    """One line for every "auto" ztune cannot derive ((path as written, canonical key or None)): the first with
    why, the others named after it, so that a Trainer-written config is fixed in one pass, not one key per run."""
    def why(key: str | None) -> str:
        if key in TRAINER_FILLS:
            return "is filled in by the Hugging Face Trainer from its arguments, which ztune does not see"
        return "is not a value of this key: DeepSpeed takes none here, and the Hugging Face Trainer does not fill it"
    (first, key), rest = paths[0], paths[1:]
    more = f' (also "auto" and not derivable here: {", ".join(p for p, _ in rest)})' if rest else ""
    return ConfigError(f'{first}: "auto" {why(key)}; set a value{more}')


def _find_autos(value: Any, path: str, steps: tuple, found: list[tuple[str, tuple]]) -> None:
    """Every "auto" under `value`: (the key as written, "a.b[0]"; the dict keys and list indexes leading to
    it). The steps, not the text, locate the value: a key may itself hold a '.' ("zero_optimization.stage")."""
    if isinstance(value, dict):
        for k, v in value.items():
            _find_autos(v, f"{path}.{k}" if path else str(k), (*steps, k), found)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _find_autos(v, f"{path}[{i}]", (*steps, i), found)
    elif isinstance(value, str) and value == AUTO:
        found.append((path, steps))


def _canonical(path: str) -> str:
    head, _, rest = path.partition(".")
    head = ALIASES.get(head, head)
    return f"{head}.{rest}" if rest else head


def resolve_auto(doc: dict, *, context: AutoContext | None) -> dict:
    """A copy of DeepSpeed config `doc` with every "auto" resolved or dropped (see the module docstring).

    Raises ConfigError naming every key whose "auto" ztune cannot derive (the first with why)."""
    found: list[tuple[str, tuple]] = []
    _find_autos(doc, "", (), found)
    if not found:
        return doc
    context = context or AutoContext()
    out = copy.deepcopy(doc)
    underivable: list[tuple[str, str | None]] = []
    for path, steps in found:
        if any(isinstance(s, str) and "." in s for s in steps):
            continue  # a dotted key is no DeepSpeed key: the parser rejects it by name (deepspeed.py)
        # Only a value reached through keys alone (no list index) can be a DeepSpeed key ztune derives or ignores.
        key = _canonical(path) if all(isinstance(s, str) for s in steps) else None
        parent = out
        for step in steps[:-1]:
            parent = parent[step]
        last = steps[-1]
        if key in _BATCH_KEYS:
            del parent[last]
        elif key in ("fp16.enabled", "bf16.enabled"):
            if context.precision is None and context.model_later:
                parent[last] = False
            elif context.precision is None:
                raise _cannot(path, "is derived from the model's parameter dtype, which is not known here "
                                    "(ztune.initialize knows it; ztune estimate takes --precision)")
            else:
                parent[last] = context.precision.value == key.split(".")[0]
        elif key == "zero_optimization.reduce_bucket_size":
            if context.hidden_size is None and context.model_later:
                del parent[last]
            elif context.hidden_size is None:
                raise _cannot(path, "is hidden_size * hidden_size, and the model's hidden size is not known here "
                                    "(no model.config.hidden_size)")
            else:
                parent[last] = context.hidden_size * context.hidden_size
        elif key is not None and (r := rule(key)) is not None and r.status == IGNORED:
            continue
        else:
            underivable.append((path, key))
    if underivable:
        raise _underivable(underivable)
    autos = [k for k in _BATCH_KEYS if any(path == k for path, _ in found)]
    if autos and "train_batch_size" not in out and "train_micro_batch_size_per_gpu" not in out \
            and not context.batch_from_caller:
        raise _cannot(autos[0], "cannot be derived: neither train_batch_size nor train_micro_batch_size_per_gpu "
                                "has a value (DeepSpeed needs one of them; ztune estimate also takes --micro-batch "
                                "or --global-batch)")
    return out
