"""Strict conversion of plain data (parsed YAML/JSON) into the TrainConfig tree, and the checks that
span several keys. Every failure is one `ConfigError` naming the key, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any

from ztune.config.schema import (
    BatchConfig,
    Compression,
    LossScaleConfig,
    Offload,
    OptimizerConfig,
    OptimizerType,
    TrainConfig,
)
from ztune.errors import ConfigError, describe, shown_key
from ztune.inputs import MAX_BATCH, MAX_SEQ

# YAML keys that differ from the Python field name (`global` is a keyword).
_KEY_ALIASES = {"global": "global_"}
_FIELD_KEYS = {v: k for k, v in _KEY_ALIASES.items()}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {describe(value)}")
        return build(tp, value, prefix=key + ".")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            # (YAML's true / false arrive as bools: an enum may spell its members "true" / "false")
            if isinstance(value, (str, bool)) and str(value).lower() == str(member.value).lower():
                return member
        if tp is Offload and value in (None, False):
            return Offload.NONE
        raise ConfigError(f"{key}: got {describe(value)}; allowed: {', '.join(str(m.value) for m in tp)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {describe(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not math.isfinite(value)) or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {describe(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {describe(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: expected a finite number, got {describe(value)}")
        return float(value)
    if tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping with string keys, got {describe(value)}")
        return dict(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {describe(value)}")
        return value
    raise ConfigError(f"{key}: unsupported value {describe(value)}")  # pragma: no cover


def build(cls: type, data: dict, *, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for raw_key, value in data.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{prefix}{describe(raw_key)}: keys must be strings")
        name = _KEY_ALIASES.get(raw_key, raw_key)
        if name not in names:
            allowed = ", ".join(sorted(_FIELD_KEYS.get(n, n) for n in names))
            raise ConfigError(f"unknown key '{shown_key(prefix + raw_key)}'; allowed here: {allowed}")
        kwargs[name] = _convert(hints[name], value, prefix + raw_key)
    return cls(**kwargs)


def _check_positive(key: str, value: float | int | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: got {value}; must be {bound}")


def check(cfg: TrainConfig) -> TrainConfig:
    """Cross-key checks that do not depend on the world size."""
    z = cfg.zero
    if z.stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero.stage: got {z.stage}; allowed: 0, 1, 2, 3")
    if z.offload_params is Offload.CPU and z.stage != 3:
        raise ConfigError(
            f"zero.offload_params: cpu needs zero.stage 3 (got stage {z.stage}); "
            "set zero.stage: 3 or offload_params: none"
        )
    if z.offload_optimizer is Offload.CPU and z.stage == 0:
        raise ConfigError(
            "zero.offload_optimizer: cpu needs zero.stage 1, 2 or 3 (got stage 0); "
            "raise the stage or set offload_optimizer: none"
        )
    for key, value in (
        ("zero.reduce_bucket_numel", z.reduce_bucket_numel),
        ("zero.allgather_bucket_numel", z.allgather_bucket_numel),
        ("batch.micro", cfg.batch.micro),
        ("batch.grad_accum", cfg.batch.grad_accum),
        ("batch.global", cfg.batch.global_),
        ("seq_len", cfg.seq_len),
        ("activations.every", cfg.activations.every),
        ("optimizer.lr", cfg.optimizer.lr),
        ("optimizer.eps", cfg.optimizer.eps),
    ):
        _check_positive(key, value)
    for key, value, most in (("batch.micro", cfg.batch.micro, MAX_BATCH),
                             ("batch.grad_accum", cfg.batch.grad_accum, MAX_BATCH),
                             ("batch.global", cfg.batch.global_, MAX_BATCH), ("seq_len", cfg.seq_len, MAX_SEQ)):
        if value is not None and value > most:
            raise ConfigError(f"{key}: got {value}; at most {most} (is it a typo?)")
    _check_positive("zero.prefetch_units", z.prefetch_units, allow_zero=True)
    _check_positive("zero.hpz_partition_size", z.hpz_partition_size)
    for key, on in (("zero.quantized_weights", z.quantized_weights),
                    ("zero.hpz_partition_size", z.hpz_partition_size > 1),
                    ("zero.quantized_gradients", z.quantized_gradients)):
        if on and z.stage != 3:  # ZeRO++ changes stage 3's parameter gathers (runtime/zeropp.py)
            raise ConfigError(f"{key}: ZeRO++ needs zero.stage 3 (got stage {z.stage}); set zero.stage: 3 or "
                              "turn it off")
    if (z.quantized_weights or z.hpz_partition_size > 1) and z.offload_params is Offload.CPU:
        # runtime/zeropp.py's gathers read the device shard (check_zeropp refuses it on the ranks too)
        key = "zero.quantized_weights" if z.quantized_weights else "zero.hpz_partition_size"
        raise ConfigError(f"{key}: ZeRO++ does not combine with zero.offload_params: cpu (the quantized and "
                          "secondary gathers read the device shard); turn one of them off")
    _check_positive("gradient_clipping", cfg.gradient_clipping, allow_zero=True)
    _check_positive("optimizer.weight_decay", cfg.optimizer.weight_decay, allow_zero=True)
    _check_positive("optimizer.momentum", cfg.optimizer.momentum, allow_zero=True)
    _check_positive("checkpoint.keep_last", cfg.checkpoint.keep_last, allow_zero=True)
    for i, beta in enumerate(cfg.optimizer.betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"optimizer.betas[{i}]: got {beta}; must be in [0, 1)")
    if z.quantized_gradients and cfg.compression.method is not Compression.NONE:
        other = ("optimizer.type OneBitAdam (its 1-bit momentum exchange)" if cfg.optimizer.type is
                 OptimizerType.ONEBIT_ADAM else f"compression.method {cfg.compression.method.value}")
        raise ConfigError(f"zero.quantized_gradients: ZeRO++ qgZ quantizes the gradient exchange itself; it does "
                          f"not combine with {other}: turn one off")
    if not 0.0 < cfg.compression.topk_ratio <= 1.0:
        raise ConfigError(f"compression.topk_ratio: got {cfg.compression.topk_ratio}; must be in (0, 1]")
    if cfg.optimizer.type is OptimizerType.SGD and cfg.zero.offload_optimizer is Offload.CPU:
        raise ConfigError("optimizer.type: SGD with zero.offload_optimizer: cpu is not supported; use AdamW")
    _check_optimizer_fields(cfg.optimizer)
    if cfg.optimizer.type is OptimizerType.ONEBIT_ADAM:
        cfg = _check_onebit_adam(cfg)
    check_loss_scaling(cfg.loss_scaling, prefix="loss_scaling.")
    from ztune.runtime.compat.lr_schedules import check_scheduler  # torch-free

    check_scheduler(cfg.scheduler.type, cfg.scheduler.params)
    b = cfg.batch
    if b.global_ is not None and b.grad_accum is not None and b.micro is not None \
            and b.global_ % (b.micro * b.grad_accum):
        raise ConfigError(
            f"batch: global {b.global_} is not a multiple of micro {b.micro} x grad_accum {b.grad_accum}"
        )
    return cfg


def _check_onebit_adam(cfg: TrainConfig) -> TrainConfig:
    """1-bit Adam's limits (runtime/onebit_adam.py). Returns cfg with compression.method onebit (what goes on
    the wire after the warm-up, so the cost model charges 1-bit traffic) when it was left at none."""
    if cfg.zero.stage != 0:
        # Tang et al. 2021, Algorithm 1: every worker keeps the whole momentum (it compresses m_t^(i) over the
        # full vector) and updates every parameter from the all-gathered average, so there is no optimizer
        # state to shard; DeepSpeed refuses it with ZeRO too ("1bit-Adam is not compatible with ZeRO").
        raise ConfigError(f"optimizer.type: OneBitAdam needs zero.stage 0, got zero.stage {cfg.zero.stage} (every "
                          "rank keeps the whole momentum and updates every parameter; DeepSpeed also rejects "
                          "1-bit Adam with ZeRO); set zero.stage: 0 or use AdamW")
    if cfg.gradient_clipping > 0:
        raise ConfigError(f"gradient_clipping: {cfg.gradient_clipping} with OneBitAdam is not supported (after "
                          "freeze_step only the compressed momentum is exchanged, so no rank has the global "
                          "gradient norm); set it to 0")
    if cfg.optimizer.onebit_scale not in ("mean", "rms"):
        raise ConfigError(f"optimizer.onebit_scale: got {describe(cfg.optimizer.onebit_scale)}; must be mean or rms")
    if cfg.optimizer.freeze_step < 1:
        raise ConfigError(f"optimizer.freeze_step: got {cfg.optimizer.freeze_step}; must be >= 1 (the frozen "
                          "variance comes from the full-precision warm-up steps)")
    method = cfg.compression.method.value
    if method not in ("none", "onebit"):
        raise ConfigError(f"compression.method: {method} with OneBitAdam is not supported (1-bit Adam compresses "
                          "the momentum itself); set it to onebit or none")
    from ztune.config.schema import Compression, CompressionConfig

    return dataclasses.replace(cfg, compression=CompressionConfig(method=Compression.ONEBIT,
                                                                  topk_ratio=cfg.compression.topk_ratio))


def _check_optimizer_fields(o: OptimizerConfig) -> None:
    """A hyper-parameter the chosen optimizer has no use for is an error, never silently unused (SGD has no
    betas / eps / bias_correction; Adam and AdamW have no momentum; only OneBitAdam has freeze_step,
    step_bound, local_momentum and onebit_scale)."""
    unused = ("betas", "eps", "bias_correction") if o.type is OptimizerType.SGD else ("momentum",)
    if o.type is not OptimizerType.ONEBIT_ADAM:
        unused += ("freeze_step", "step_bound", "local_momentum", "onebit_scale")
    default = OptimizerConfig()
    for name in unused:
        if getattr(o, name) != getattr(default, name):
            raise ConfigError(f"optimizer.{name}: {o.type.value} has no {name}; remove it")


def check_loss_scaling(ls: LossScaleConfig, *, prefix: str) -> None:
    """The fp16 loss-scale settings DeepSpeed 0.19.8 validates (precision_config.py), plus hysteresis >= 1
    (DeepSpeed accepts 0 and then never lowers the scale). `prefix` names the block as the user wrote it.

    The dynamic scaler's settings are checked under a static scale too (DeepSpeed checks only their types
    then): they have no effect there, and a nonsense value (hysteresis -3) is a mistake worth one line, not a
    setting to carry silently."""
    _check_positive(f"{prefix}loss_scale", ls.loss_scale, allow_zero=True)
    _check_positive(f"{prefix}loss_scale_window", ls.loss_scale_window)
    _check_positive(f"{prefix}min_loss_scale", ls.min_loss_scale)
    _check_positive(f"{prefix}hysteresis", ls.hysteresis)
    if not -126 <= ls.initial_scale_power <= 127:
        raise ConfigError(f"{prefix}initial_scale_power: got {ls.initial_scale_power}; must be in "
                          "[-126, 127] (2 ** power must be a finite float)")


@dataclasses.dataclass(frozen=True)
class BatchKeys:
    """How the three batch sizes are spelled in the user's config, for error messages."""

    global_: str
    micro: str
    grad_accum: str


ZTUNE_BATCH_KEYS = BatchKeys(global_="batch.global", micro="batch.micro", grad_accum="batch.grad_accum")
DEEPSPEED_BATCH_KEYS = BatchKeys(global_="train_batch_size", micro="train_micro_batch_size_per_gpu",
                                 grad_accum="gradient_accumulation_steps")


# The DeepSpeed keys as users write them, for the layout errors below (the YAML names are zero.quantized_weights,
# zero.hpz_partition_size, zero.quantized_gradients).
QWZ_KEY = "zero_optimization.zero_quantized_weights"
HPZ_KEY = "zero_optimization.zero_hpz_partition_size"
QGZ_KEY = "zero_optimization.zero_quantized_gradients"


def check_zeropp_layout(cfg: TrainConfig, *, world_size: int, ranks_per_node: int) -> None:
    """ConfigError (one line naming the key) for ZeRO++ settings a job of `world_size` ranks, `ranks_per_node` on
    each host, cannot honour (runtime/zeropp.py; torch-free, so the launcher checks it before starting anything).
    ranks_per_node that does not divide world_size: hosts with different numbers of ranks."""
    z = cfg.zero
    uniform = ranks_per_node >= 1 and world_size % ranks_per_node == 0
    if z.quantized_gradients and not uniform:
        raise ConfigError(f"{QGZ_KEY}: qgZ needs the same number of ranks on every host ({ranks_per_node} "
                          f"per host does not divide {world_size} ranks); turn it off")
    if not (z.quantized_weights or z.hpz_partition_size > 1):
        return
    if z.offload_params is Offload.CPU:
        key = QWZ_KEY if z.quantized_weights else HPZ_KEY
        raise ConfigError(f"{key}: ZeRO++ with offload_param (cpu) is not supported: the quantized and "
                          "secondary gathers read the device shard; turn one of them off")
    k = z.hpz_partition_size
    if k > 1:
        per_node = ranks_per_node if uniform else 0
        if per_node < 2:
            raise ConfigError(f"{HPZ_KEY}={k}: hpZ needs several ranks per host (this job has "
                              f"{ranks_per_node} of {world_size} on each); set it to 1")
        if per_node % k:
            raise ConfigError(f"{HPZ_KEY}={k} must divide the ranks per host ({per_node}); use a divisor of "
                              f"{per_node}, or 1 to turn hpZ off")


def resolve_batch(batch: BatchConfig, world_size: int, *, keys: BatchKeys = ZTUNE_BATCH_KEYS) -> BatchConfig:
    """All three batch sizes for `world_size` data-parallel ranks, derived from the ones given.

    The rules are DeepSpeed 0.19.8's (runtime/config.py, _set_batch_related_parameters and _batch_assertion),
    for every combination: a missing size is derived with floor division from the others (global only:
    accumulation 1, micro = global // world; micro only: accumulation 1); then each must be > 0 and
    global == micro x grad_accum x world. `micro` None means "not given" (DeepSpeed form); ztune YAML
    defaults it to 1. Neither global nor micro given is an error, as in DeepSpeed. Errors name `keys`.
    """
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    micro, accum, total = batch.micro, batch.grad_accum, batch.global_
    if micro is None and total is None:
        raise ConfigError(f"set {keys.global_} or {keys.micro}: neither is given, so the batch size is unknown")
    if total is not None and micro is not None and accum is None:
        per_step = micro * world_size
        if total % per_step:
            raise ConfigError(
                f"{keys.global_} {total} is not divisible by {keys.micro} {micro} x {world_size} ranks = "
                f"{per_step}; change {keys.global_} or {keys.micro}"
            )
        accum = total // per_step
    elif total is not None and micro is None:
        accum = 1 if accum is None else accum
        micro = total // world_size // accum
        if micro < 1:
            raise ConfigError(
                f"{keys.global_} {total} is smaller than {keys.grad_accum} {accum} x {world_size} ranks, so the "
                f"derived {keys.micro} is 0; raise {keys.global_} or set {keys.micro}"
            )
    elif total is None:
        accum = 1 if accum is None else accum
        total = micro * accum * world_size
    if micro * accum * world_size != total and batch.micro is None:  # micro was derived: name what was given
        raise ConfigError(
            f"{keys.global_} {total} is not divisible by {keys.grad_accum} {accum} x {world_size} ranks = "
            f"{accum * world_size}; change {keys.global_} or set {keys.micro}"
        )
    if micro * accum * world_size != total:
        raise ConfigError(
            f"batch sizes do not multiply out: {keys.micro} {micro} x {keys.grad_accum} {accum} x {world_size} "
            f"ranks = {micro * accum * world_size}, but {keys.global_} is {total}"
        )
    return BatchConfig(micro=micro, grad_accum=accum, global_=total)
