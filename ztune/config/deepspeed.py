"""DeepSpeed JSON <-> TrainConfig, for the keys both share.

Key names follow DeepSpeed's config documentation (deepspeed.ai/docs/config-json). What ztune does with each
key is in the table of deepspeed_keys.py: read with DeepSpeed's meaning, accepted and reported as ignored
(tuning knobs ztune sets itself: overlap_comm, contiguous_gradients, ...), or rejected naming the key; an
unknown key is an error, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ztune.config.deepspeed_auto import AutoContext, resolve_auto
from ztune.config.deepspeed_keys import (
    ALIASES,
    BOOL,
    BOOL_OR_NULL,
    IGNORED,
    KEYS,
    MAPPING,
    NEUTRAL,
    OPEN_BLOCKS,
    REJECTED,
    STRING,
    KeyRule,
    children,
    rule,
)
from ztune.config.deepspeed_kinds import check_kind
from ztune.config.schema import (
    ActivationConfig,
    BatchConfig,
    Compression,
    CompressionConfig,
    LogDirMonitor,
    LossScaleConfig,
    MonitorConfig,
    Offload,
    OptimizerConfig,
    OptimizerType,
    Precision,
    SchedulerConfig,
    TrainConfig,
    WandbMonitor,
    ZeroConfig,
)
from ztune.config.validate import _convert, build, check, check_loss_scaling
from ztune.errors import ConfigError, describe, shown_key

# The top-level keys of each schema. A key only DeepSpeed has marks a document as DeepSpeed JSON, one only ztune
# YAML has marks it as ztune's; optimizer, scheduler, gradient_clipping and checkpoint are in both.
YAML_TOP_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
DEEPSPEED_TOP_KEYS = frozenset(k.split(".")[0] for k in KEYS) | frozenset(ALIASES)
DEEPSPEED_MARKERS = DEEPSPEED_TOP_KEYS - YAML_TOP_KEYS
_YAML_MARKERS = YAML_TOP_KEYS - DEEPSPEED_TOP_KEYS
_BATCH_FIELDS = {"train_batch_size": "global", "train_micro_batch_size_per_gpu": "micro",
                 "gradient_accumulation_steps": "grad_accum"}
# fp16 keys with DeepSpeed's meaning, read into TrainConfig.loss_scaling (runtime/precision.py).
_DYNAMIC_SCALE_KEYS = ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale",
                       "consecutive_hysteresis")
_LOSS_SCALE_KEYS = frozenset({"loss_scale", *_DYNAMIC_SCALE_KEYS})
_OPTIMIZERS = {
    "adamw": (OptimizerType.ADAMW, Compression.NONE),
    "adam": (OptimizerType.ADAM, Compression.NONE),
    "sgd": (OptimizerType.SGD, Compression.NONE),
    # 1-bit Adam (Tang et al. 2021): DeepSpeed's OnebitAdam (deepspeed/runtime/fp16/onebit/adam.py until its
    # removal; DeepSpeed 0.19.8 no longer ships it). runtime/onebit_adam.py; its wire format is compression onebit.
    "onebitadam": (OptimizerType.ONEBIT_ADAM, Compression.ONEBIT),
}
_OPTIMIZER_PARAMS = {"lr", "betas", "eps", "weight_decay", "momentum", "bias_correction", "adam_w_mode",
                     "freeze_step"}
# The params each optimizer type takes. DeepSpeed passes the params block to the optimizer's constructor as
# keyword arguments (engine.py _configure_basic_optimizer), which raises TypeError for any other name: Adam and
# AdamW build FusedAdam / DeepSpeedCPUAdam (adam_w_mode, torch_adam popped first; fused goes to torch's Adam with
# torch_adam), SGD torch.optim.SGD, OneBitAdam its OnebitAdam. So a param of another type is refused by its
# presence, whatever its value.
_ADAM_FAMILY = frozenset({"lr", "betas", "eps", "weight_decay", "bias_correction", "amsgrad"})
_PARAMS_OF_TYPE = {
    "adam": _ADAM_FAMILY | {"adam_w_mode", "torch_adam", "fused"},
    "adamw": _ADAM_FAMILY | {"adam_w_mode", "torch_adam", "fused"},
    "sgd": frozenset({"lr", "momentum", "dampening", "weight_decay", "nesterov", "fused"}),
    "onebitadam": _ADAM_FAMILY | {"freeze_step", "eps_inside_sqrt", "cuda_aware", "comm_backend_name"},
}
# Implementation choices, not the math, with the reason each is ignored (docs/deepspeed-migration.md).
# Each with the type its optimizer's constructor takes (checked, as that constructor would).
_IGNORED_OPTIMIZER_PARAMS = {
    "fused": (BOOL_OR_NULL, "picks DeepSpeed's Adam kernel; ztune picks its own"),
    "cuda_aware": (BOOL, "OneBitAdam: whether MPI may send CUDA buffers; ztune's exchange goes through its own "
                         "collective wrapper (gloo or NCCL)"),
    "comm_backend_name": (STRING, "OneBitAdam: DeepSpeed's nccl/mpi/hccl backend for the compressed exchange; "
                                  "ztune's goes through the engine's process group"),
}
# torch_adam picks torch's class, which DeepSpeed builds without a weight_decay (engine.py,
# get_optimizer_configuration): torch.optim.AdamW's default 0.01 then applies instead of DeepSpeed's 0.0.
TORCH_ADAMW_WEIGHT_DECAY_DEFAULT = 0.01
TORCH_ADAM_NOTE = ("true: torch's Adam/AdamW; its math is ztune's, but a decoupled (AdamW) optimizer without "
                   "weight_decay then decays at torch.optim.AdamW's default 0.01 instead of 0.0, as in DeepSpeed")
# Options ztune's optimizers do not implement: accepted (and listed as ignored) only at their "off" value.
_OFF_OPTIMIZER_PARAMS = {"amsgrad": False, "nesterov": False, "dampening": 0, "eps_inside_sqrt": False}
# ztune's names in cross-key check messages -> the DeepSpeed key the user wrote.
_DS_NAMES = {"zero.offload_optimizer": "zero_optimization.offload_optimizer",
             "zero.offload_params": "zero_optimization.offload_param", "zero.stage": "zero_optimization.stage",
             "zero.quantized_weights": "zero_optimization.zero_quantized_weights",
             "zero.hpz_partition_size": "zero_optimization.zero_hpz_partition_size",
             "zero.quantized_gradients": "zero_optimization.zero_quantized_gradients",
             "batch.micro": "train_micro_batch_size_per_gpu", "batch.grad_accum": "gradient_accumulation_steps",
             "batch.global": "train_batch_size",
             "optimizer.lr": "optimizer.params.lr", "optimizer.eps": "optimizer.params.eps",
             "optimizer.betas": "optimizer.params.betas", "optimizer.weight_decay": "optimizer.params.weight_decay",
             "optimizer.momentum": "optimizer.params.momentum", "optimizer.freeze_step": "optimizer.params.freeze_step",
             "activations.": "ztune.activations.",
             "loss_scaling.": "fp16."}


def is_deepspeed(doc: dict, *, json_file: bool = False) -> bool:
    """Whether `doc` is a DeepSpeed config: it has a key only DeepSpeed configs have (any of them, not only the
    batch keys). A document with keys of both schemas is an error naming one of each. One with neither (only
    shared or unknown keys) is DeepSpeed's when it comes from a .json file (`json_file`), else ztune's."""
    ours = [k for k in doc if k in _YAML_MARKERS]
    theirs = [k for k in doc if k in DEEPSPEED_MARKERS]
    if ours and theirs:
        raise ConfigError(f"the config mixes DeepSpeed keys ({', '.join(map(str, theirs))}) with ztune YAML keys "
                          f"({', '.join(map(str, ours))}); write it in one schema: DeepSpeed JSON "
                          "(docs/deepspeed-migration.md) or ztune YAML")
    return bool(theirs) or (json_file and not ours)


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {describe(value)}")
    return value


def _number(tp: type, value: Any, key: str, *, allow_zero: bool = False) -> Any:
    out = _convert(tp, value, key)
    if out < 0 or (out == 0 and not allow_zero):
        raise ConfigError(f"{key}: got {describe(value)}; must be {'>= 0' if allow_zero else '> 0'}")
    return out


def _check_rule_kind(r: KeyRule, value: Any, user_key: str, *, unread: bool = False) -> None:
    """The value's type, against DeepSpeed's for the key (deepspeed_kinds.py): strictly where ztune reads the
    value, as DeepSpeed reads it where ztune does not (an ignored key, or `unread`: a disabled block's). "auto"
    stays on ignored keys (deepspeed_auto.py), as DeepSpeed drops it before validating (config_utils.py), but not
    on a block: the Trainer fills values, never blocks, and DeepSpeed's readers refuse "auto" for flops_profiler,
    comms_logger, checkpoint, aio, ..."""
    if r.kind is None:
        return
    if not (r.status == IGNORED and value == "auto" and not r.kind.startswith(MAPPING)):
        check_kind(r.kind, value, user_key, lax=unread or r.status == IGNORED, choices=r.choices)


def _apply_rules(block: dict, prefix: str, *, handled: set[str], ignored: list[str], canonical: str | None = None
                 ) -> None:
    """Check the keys of `block` (at user path `prefix`) that the caller did not handle against the table
    (deepspeed_keys.py): list the ignored ones, raise on rejected or unknown ones."""
    canonical = canonical or prefix
    for k, v in block.items():
        if k in handled:
            continue
        _apply_rule(f"{canonical}.{k}" if canonical else str(k), f"{prefix}.{k}" if prefix else str(k), v,
                    ignored=ignored, parent=canonical, name=str(k))


def _apply_rule(key: str, user_key: str, value: Any, *, ignored: list[str], parent: str, name: str) -> None:
    """`name`: the key itself, as written (the last part of `user_key`)."""
    r = None if "." in name else rule(key)  # the table's keys are dotted paths; a key with a '.' is none of them
    if r is None:
        if "." in name:
            nested = "..."
            for part in reversed(name.split(".")):
                nested = f'{{"{part}": {nested}}}'
            raise ConfigError(f"unknown key '{shown_key(user_key)}': DeepSpeed config keys are nested, not dotted; "
                              f"write {shown_key(nested)}")
        if parent in OPEN_BLOCKS:
            return  # DeepSpeed skips it as well; its block is listed as ignored (deepspeed_keys.OPEN_BLOCKS)
        if parent:
            raise ConfigError(f"unknown key '{shown_key(user_key)}'; allowed here: " + ", ".join(children(parent)))
        raise ConfigError(f"unknown DeepSpeed key '{shown_key(user_key)}'; the keys ztune knows are listed in "
                          "docs/deepspeed-migration.md")
    _check_rule_kind(r, value, user_key)
    if r.status == IGNORED and isinstance(value, dict) and children(key):
        # an ignored block (flops_profiler, checkpoint, ...): its keys are checked against the table too; the
        # block as a whole is what is listed
        _apply_rules(value, user_key, handled=set(), ignored=[], canonical=key)
    # a disabled block of a feature ztune lacks builds nothing in DeepSpeed either; one DeepSpeed removed, it refuses
    disabled = isinstance(value, dict) and value.get("enabled") is False and not r.removed
    if r.status == IGNORED or (r.status == NEUTRAL and value == r.neutral) or (r.status == REJECTED and disabled):
        ignored.append(user_key)
    elif r.status in (NEUTRAL, REJECTED):
        fix = f"set it to {json.dumps(r.neutral)} or remove it" if r.status == NEUTRAL else "remove it"
        raise ConfigError(f"{user_key}: {r.note}; {fix}")
    else:  # a supported key that its block's parser does not read: a bug in this module, not in the config
        raise ConfigError(f"{user_key}: not read by ztune's DeepSpeed importer")  # pragma: no cover


def _offload(block: Any, key: str, ignored: list[str]) -> Offload:
    block = _mapping(block, key)
    canonical = "zero_optimization." + key.split(".")[-1]
    _apply_rules(block, key, handled={"device"}, ignored=ignored, canonical=canonical)
    device = block.get("device", "none")
    if device == "nvme":
        raise ConfigError(f"{key}.device: nvme offload is not supported by ztune; use cpu or none")
    if device not in ("cpu", "none", None):
        raise ConfigError(f"{key}.device: got {describe(device)}; allowed: cpu, none")
    return Offload.CPU if device == "cpu" else Offload.NONE


def _zero(block: Any, ignored: list[str]) -> dict[str, Any]:
    """zero_optimization -> ZeroConfig keyword arguments."""
    key = "zero_optimization"
    block = _mapping(block, key)
    stage = _convert(int, block.get("stage", 0), f"{key}.stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{key}.stage: got {stage}; allowed: 0, 1, 2, 3")
    zero: dict[str, Any] = {"stage": stage}
    devices = {}
    for new, legacy, field in (("offload_optimizer", "cpu_offload", "offload_optimizer"),
                               ("offload_param", "cpu_offload_param", "offload_params")):
        device, written = Offload.NONE, None
        if block.get(new) is not None:
            device, written = _offload(block[new], f"{key}.{new}", ignored), new
        if legacy in block and _convert(bool, block[legacy], f"{key}.{legacy}"):
            if written is not None:  # DeepSpeed refuses a deprecated key next to its replacement too
                raise ConfigError(f"{key}.{legacy} and {key}.{new} are both set; keep {key}.{new}")
            device, written = Offload.CPU, legacy
        # DeepSpeed reads offload_optimizer at stages 1-3 and offload_param at stage 3 only.
        used = stage >= 1 if new == "offload_optimizer" else stage == 3
        if device is Offload.CPU and not used:
            ignored.append(f"{key}.{written}")
            device = Offload.NONE
        devices[field] = device
    zero.update(devices)
    for ds_key, field in (("reduce_bucket_size", "reduce_bucket_numel"),
                          ("allgather_bucket_size", "allgather_bucket_numel")):
        if ds_key in block:
            zero[field] = _number(int, block[ds_key], f"{key}.{ds_key}")
    # ZeRO++ (runtime/zeropp.py). DeepSpeed reads both keys in its stage-3 code only (runtime/zero/stage3.py,
    # partition_parameters.py), so at stages 0-2 they are listed as ignored; hpZ is on for a size > 1
    # (0 and 1: off; the pydantic field is ge=0, runtime/zero/config.py).
    for ds_key, field in (("zero_quantized_weights", "quantized_weights"),
                          ("zero_quantized_gradients", "quantized_gradients")):
        if ds_key in block:
            if _convert(bool, block[ds_key], f"{key}.{ds_key}") and stage == 3:
                zero[field] = True
            else:
                ignored.append(f"{key}.{ds_key}")
    if "zero_hpz_partition_size" in block:
        hpz = _convert(int, block["zero_hpz_partition_size"], f"{key}.zero_hpz_partition_size")
        if hpz < 0:
            raise ConfigError(f"{key}.zero_hpz_partition_size: got {hpz}; must be >= 0 (1 = off)")
        if hpz > 1 and stage == 3:
            zero["hpz_partition_size"] = hpz
        else:
            ignored.append(f"{key}.zero_hpz_partition_size")
    handled = {"stage", "offload_optimizer", "offload_param", "cpu_offload", "cpu_offload_param",
               "reduce_bucket_size", "allgather_bucket_size", "zero_quantized_weights", "zero_hpz_partition_size",
               "zero_quantized_gradients"}
    _apply_rules(block, key, handled=handled, ignored=ignored)
    return zero


def _precision_enabled(value: Any, key: str, ignored: list[str], *, loss_scaling: dict[str, Any],
                       top: dict[str, Any]) -> bool:
    """An fp16 / bf16 (or bfloat16) block: whether it is enabled. An enabled fp16 block's loss-scale keys go
    into `loss_scaling` (DeepSpeed's meaning, runtime/precision.py); an enabled bf16 block's check_grad_overflow
    (DeepSpeed's default: true, precision_config.py) into top["check_grad_overflow"]; its other keys go through
    the table."""
    block = _mapping(value, key)
    enabled = block.get("enabled", False)
    if enabled not in (True, False):
        raise ConfigError(f"{key}.enabled: expected true, false or \"auto\", got {describe(enabled)}")
    canonical = ALIASES.get(key, key)
    if enabled:
        handled = {"enabled"}
        if canonical == "fp16":
            handled |= _LOSS_SCALE_KEYS
            loss_scaling.update({k: v for k, v in block.items() if k in _LOSS_SCALE_KEYS})
            if _convert(float, block.get("loss_scale", 0), f"{key}.loss_scale") > 0:
                # A static scale: DeepSpeed builds no dynamic scaler, so its settings have no effect (they are
                # still type- and range-checked with the rest of loss_scaling).
                ignored.extend(f"{key}.{k}" for k in block if k in _DYNAMIC_SCALE_KEYS)
        else:
            handled.add("check_grad_overflow")
            check = block.get("check_grad_overflow", DS_BF16_CHECK_GRAD_OVERFLOW_DEFAULT)
            if not isinstance(check, bool):
                raise ConfigError(f"{key}.check_grad_overflow: expected true or false, got {describe(check)}")
            top["check_grad_overflow"] = check
        _apply_rules(block, key, handled=handled, ignored=ignored, canonical=canonical)
    else:  # a disabled block's settings have no effect (DeepSpeed reads none of them): known keys are ignored
        for k, v in block.items():
            if k != "enabled":
                r = None if "." in str(k) else rule(f"{canonical}.{k}")
                if r is None:
                    raise ConfigError(f"unknown key '{shown_key(f'{key}.{k}')}'; allowed here: "
                                      + ", ".join(children(canonical)))
                _check_rule_kind(r, v, f"{key}.{k}", unread=True)
                ignored.append(f"{key}.{k}")
    return enabled


def _ztune_block(value: Any) -> ActivationConfig:
    """The "ztune" extension block of a DeepSpeed config: ztune settings DeepSpeed has no key for."""
    block = _mapping(value, "ztune")
    for k in block:
        if k != "activations":
            raise ConfigError(f"unknown key '{shown_key(f'ztune.{k}')}'; allowed here: activations")
    acts = build(ActivationConfig, _mapping(block.get("activations", {}), "ztune.activations"),
                 prefix="ztune.activations.")
    _number(int, acts.every, "ztune.activations.every")
    return acts


def _activation_checkpointing(value: Any, ignored: list[str]) -> None:
    block = _mapping(value, "activation_checkpointing")
    _apply_rules(block, "activation_checkpointing", handled=set(), ignored=ignored)
    if not block:
        ignored.append("activation_checkpointing")


_MONITOR_BLOCKS = {"csv_monitor": LogDirMonitor, "tensorboard": LogDirMonitor, "wandb": WandbMonitor}


def _monitor_block(key: str, value: Any, ignored: list[str]) -> LogDirMonitor | WandbMonitor:
    """A DeepSpeed monitor block (runtime/compat/monitor.py), its keys and types as DeepSpeed's pydantic model
    checks them; a disabled block writes nothing and is listed as ignored."""
    block = build(_MONITOR_BLOCKS[key], _mapping(value, key), prefix=f"{key}.")
    if not block.enabled:
        ignored.append(key)
    return block


def _batch(given: dict[str, Any], *, from_caller: bool = False) -> BatchConfig:
    """The batch keys as given (each > 0); cross-checks that need the world size are in resolve_batch.
    from_caller: the caller sets the batch itself (AutoContext.batch_from_caller), so neither size may be given."""
    values = {field: _number(int, given[k], k) for k, field in _BATCH_FIELDS.items() if k in given}
    total, micro, accum = values.get("global"), values.get("micro"), values.get("grad_accum")
    if total is None and micro is None and from_caller:
        return BatchConfig(micro=None, grad_accum=accum, global_=None)
    if total is None and micro is None:
        raise ConfigError("set train_batch_size or train_micro_batch_size_per_gpu: DeepSpeed needs at least one "
                          "of them to know the batch size (ztune estimate also takes --micro-batch or --global-batch)")
    if total is not None and micro is not None and accum is not None and total % (micro * accum):
        raise ConfigError(f"train_batch_size {total} is not a multiple of train_micro_batch_size_per_gpu {micro} x "
                          f"gradient_accumulation_steps {accum}, so no world size fits")
    return BatchConfig(micro=micro, grad_accum=accum, global_=total)


def renamed_for_deepspeed(exc: ConfigError) -> ConfigError:
    """`exc` with ztune's key names (validate.check's messages) replaced by the DeepSpeed keys the user wrote."""
    text = str(exc)
    for ours, theirs in _DS_NAMES.items():
        text = text.replace(ours, theirs)
    return ConfigError(text)


DS_GRADIENT_CLIPPING_DEFAULT = 1.0
# DeepSpeed 0.19.8 precision_config.py DeepSpeedBF16Config.check_grad_overflow: skip non-finite bf16 steps
DS_BF16_CHECK_GRAD_OVERFLOW_DEFAULT = True


def from_deepspeed(doc: dict, *, context: AutoContext | None = None) -> tuple[TrainConfig, list[str]]:
    """Convert a DeepSpeed config dict. Returns the config and the DeepSpeed keys that were ignored (as written).

    `context` (the model's hidden size and dtype) resolves "auto" values (deepspeed_auto.py). Every key
    is read as deepspeed_keys.KEYS says; errors name the key as the user wrote it."""
    doc = resolve_auto(doc, context=context)
    ignored: list[str] = []
    zero: dict[str, Any] = {}
    # DeepSpeed 0.19.8 clips at global norm 1.0 when the key is absent (runtime/constants.py,
    # GRADIENT_CLIPPING_DEFAULT = 1.0); 0 turns clipping off.
    top: dict[str, Any] = {"gradient_clipping": DS_GRADIENT_CLIPPING_DEFAULT}
    # DeepSpeed's optimizers default to no weight decay (FusedAdam / DeepSpeedCPUAdam weight_decay=0.0).
    opt: dict[str, Any] = {"weight_decay": 0.0}
    loss_scaling: dict[str, Any] = {}
    scheduler: dict[str, Any] = {}
    activations = ActivationConfig()
    monitor: dict[str, Any] = {}
    compression = Compression.NONE
    precision = Precision.FP32
    comm_dtype: Any = None
    if "bf16" in doc and "bfloat16" in doc:
        # DeepSpeed reads "bfloat16" only when "bf16" is absent (precision_config.get_bfloat16_config), so the
        # older block would be dropped without a word.
        raise ConfigError("bf16 and bfloat16 (bf16's older name) are both given; DeepSpeed reads only bf16: keep "
                          "one of them")
    for key, value in doc.items():
        if not isinstance(key, str):
            raise ConfigError(f"{describe(key)}: keys must be strings")
        if key in _BATCH_FIELDS:
            continue
        elif key == "gradient_clipping":
            top["gradient_clipping"] = _number(float, value, key, allow_zero=True)
        elif ALIASES.get(key, key) in ("bf16", "fp16"):
            if _precision_enabled(value, key, ignored, loss_scaling=loss_scaling, top=top):
                if precision is not Precision.FP32:
                    raise ConfigError("bf16.enabled and fp16.enabled are both true; enable one of them")
                precision = Precision.BF16 if ALIASES.get(key, key) == "bf16" else Precision.FP16
        elif key == "zero_optimization":
            zero = _zero(value, ignored)
        elif key == "activation_checkpointing":
            _activation_checkpointing(value, ignored)
        elif key in _MONITOR_BLOCKS:
            monitor[key] = _monitor_block(key, value, ignored)
        elif key == "ztune":
            activations = _ztune_block(value)
        elif key == "optimizer":
            block = _mapping(value, key)
            for k in block:
                if k not in ("type", "params"):
                    raise ConfigError(f"unknown key '{shown_key(f'optimizer.{k}')}'; allowed here: type, params")
            name = str(block.get("type", "AdamW"))
            if name.lower() not in _OPTIMIZERS:
                raise ConfigError(f"optimizer.type: got {describe(name)}; allowed: AdamW, Adam, SGD, OneBitAdam")
            opt_type, compression = _OPTIMIZERS[name.lower()]
            opt["type"] = opt_type.value
            adam_w_mode = True  # DeepSpeed's default (runtime/config.py ADAM_W_MODE_DEFAULT)
            params_block = _mapping(block.get("params", {}), "optimizer.params")
            for k, v in params_block.items():
                if k == "adam_w_mode" and name.lower() in ("adam", "adamw"):
                    if not isinstance(v, bool):
                        raise ConfigError(f"optimizer.params.adam_w_mode: expected true or false, got {describe(v)}")
                    adam_w_mode = v
                elif k == "max_grad_norm":  # DeepSpeed's engine raises for it too (_configure_basic_optimizer)
                    raise ConfigError("optimizer.params.max_grad_norm: not supported as an optimizer parameter; "
                                      "use the top-level gradient_clipping key")
                elif k not in _PARAMS_OF_TYPE[name.lower()]:
                    if any(k in params for params in _PARAMS_OF_TYPE.values()):
                        raise ConfigError(f"optimizer.params.{k}: {name} has no {k}; remove it")
                    raise ConfigError(f"unknown key '{shown_key(f'optimizer.params.{k}')}'; allowed for {name}: "
                                      + ", ".join(sorted(_PARAMS_OF_TYPE[name.lower()])))
                elif k in _OPTIMIZER_PARAMS:
                    opt[k] = v
                elif k == "torch_adam":
                    if not isinstance(v, bool):
                        raise ConfigError(f"optimizer.params.torch_adam: expected true or false, got {describe(v)}")
                elif k in _IGNORED_OPTIMIZER_PARAMS:
                    check_kind(_IGNORED_OPTIMIZER_PARAMS[k][0], v, f"optimizer.params.{k}", lax=True)
                    ignored.append(f"optimizer.params.{k}")
                else:  # _OFF_OPTIMIZER_PARAMS (every name the types take is in one of these tables)
                    off = _OFF_OPTIMIZER_PARAMS[k]
                    _convert(bool if isinstance(off, bool) else float, v, f"optimizer.params.{k}")
                    if v != off:
                        raise ConfigError(f"optimizer.params.{k}: {describe(v)} is not supported by ztune; remove it "
                                          f"or set it to {str(off).lower()}")
                    ignored.append(f"optimizer.params.{k}")
            # DeepSpeed: "Adam" decouples weight decay (AdamW) unless adam_w_mode is false; "AdamW" always does.
            # (OneBitAdam's weight decay is decoupled too: it adds weight_decay x p to the update.)
            if name.lower() == "adam" and adam_w_mode:
                opt["type"] = OptimizerType.ADAMW.value
            if params_block.get("torch_adam") is True and "weight_decay" not in params_block \
                    and opt["type"] == OptimizerType.ADAMW.value:
                opt["weight_decay"] = TORCH_ADAMW_WEIGHT_DECAY_DEFAULT
        elif key == "communication_data_type":
            comm_dtype = value
        elif key == "scheduler":
            block = _mapping(value, key)
            for k in block:
                if k not in ("type", "params"):
                    raise ConfigError(f"unknown key '{shown_key(f'scheduler.{k}')}'; allowed here: type, params")
            scheduler = {"type": block.get("type"), "params": _mapping(block.get("params", {}), "scheduler.params")}
        else:
            _apply_rule(ALIASES.get(key, key), key, value, ignored=ignored, parent="", name=key)
    compression = _communication_data_type(comm_dtype, precision=precision, compression=compression)
    if opt.get("type") == OptimizerType.ONEBIT_ADAM.value and "gradient_clipping" not in doc:
        # DeepSpeed's absent-key default (1.0) cannot apply: after freeze_step no rank has the global gradient
        # norm (validate.py rejects clipping with OneBitAdam). Off, and listed once with the ignored keys.
        top["gradient_clipping"] = 0.0
        ignored.append("gradient_clipping (DeepSpeed's default 1.0; OneBitAdam has no global gradient norm)")
    try:
        loss_scale_cfg = build(LossScaleConfig, loss_scaling, prefix="fp16.")
        check_loss_scaling(loss_scale_cfg, prefix="fp16.")
        cfg = TrainConfig(
            zero=ZeroConfig(**zero),
            precision=precision,
            batch=_batch(doc, from_caller=context is not None and context.batch_from_caller),
            optimizer=build(OptimizerConfig, opt, prefix="optimizer.params."),
            compression=CompressionConfig(method=compression),
            activations=activations,
            loss_scaling=loss_scale_cfg,
            scheduler=build(SchedulerConfig, scheduler, prefix="scheduler."),
            monitor=MonitorConfig(**monitor),
            **top,
        )
        return check(cfg), ignored
    except ConfigError as exc:
        raise renamed_for_deepspeed(exc) from None


def _communication_data_type(value: Any, *, precision: Precision, compression: Compression) -> Compression:
    """DeepSpeed's communication_data_type (runtime/config.py get_communication_data_type: fp16, bf16 or fp32,
    any case; null = decided by the precision): the dtype gradients are cast to for their reduction. ztune reduces
    in the compute dtype, so the compute dtype's own name is honoured as it stands, and bf16 under fp32 training
    is compression.method bf16 (a bf16 copy reduced, cast back); anything else would change the reduction's
    precision without ztune doing it, so it is refused. Returns the compression method."""
    if value is None:
        return compression
    name = value.lower() if isinstance(value, str) else value
    if name not in ("fp16", "bf16", "fp32"):
        raise ConfigError(f"communication_data_type: got {describe(value)}; allowed: fp16, bf16, fp32 (as in "
                          "DeepSpeed)")
    if name == precision.value:
        return compression
    if name == "bf16" and precision is Precision.FP32:
        if compression is not Compression.NONE:
            raise ConfigError(f"communication_data_type: bf16 would reduce the gradients in bf16, but the optimizer "
                              f"already compresses them ({compression.value}); remove one of them")
        return Compression.BF16
    also = " or, under fp32, in bf16" if precision is Precision.FP32 else ""
    fix = f"{precision.value} or bf16" if precision is Precision.FP32 else precision.value
    raise ConfigError(f"communication_data_type: {name} under {precision.value} training is not supported: ztune "
                      f"reduces gradients in the compute dtype ({precision.value}){also}; remove it or set it to {fix}")


def to_deepspeed(cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON for the keys DeepSpeed shares with ztune."""
    z = cfg.zero
    zero: dict[str, Any] = {
        "stage": z.stage,
        "reduce_bucket_size": z.reduce_bucket_numel,
        "allgather_bucket_size": z.allgather_bucket_numel,
    }
    if z.stage > 0:
        zero["offload_optimizer"] = {"device": z.offload_optimizer.value}
    if z.stage == 3:
        zero["offload_param"] = {"device": z.offload_params.value}
        zero["zero_quantized_weights"] = z.quantized_weights
        zero["zero_hpz_partition_size"] = z.hpz_partition_size
        zero["zero_quantized_gradients"] = z.quantized_gradients
    o = cfg.optimizer
    params: dict[str, Any] = {"lr": o.lr, "weight_decay": o.weight_decay}
    if o.type is OptimizerType.SGD:
        params["momentum"] = o.momentum
    else:
        params.update(betas=list(o.betas), eps=o.eps, bias_correction=o.bias_correction)
        if o.type is OptimizerType.ADAM:
            params["adam_w_mode"] = False  # DeepSpeed's Adam is AdamW unless told otherwise
        if o.type is OptimizerType.ONEBIT_ADAM:
            params["freeze_step"] = o.freeze_step
            if o.step_bound:  # DeepSpeed's OnebitAdam would train without it: never dropped silently
                raise ConfigError("optimizer.step_bound: true has no DeepSpeed equivalent (OnebitAdam has no bound "
                                  "on its compression-stage step); set it to false to export a DeepSpeed config")
            if o.onebit_scale != "mean":
                raise ConfigError(f"optimizer.onebit_scale: {o.onebit_scale} has no DeepSpeed equivalent (OnebitAdam's "
                                  "scale is one per worker buffer); set it to mean to export a DeepSpeed config")
            if o.local_momentum:
                raise ConfigError("optimizer.local_momentum: true has no DeepSpeed equivalent (OnebitAdam replaces "
                                  "each rank's momentum by the exchanged one); set it to false to export a DeepSpeed "
                                  "config")
    opt_type = o.type.value
    doc: dict[str, Any] = {}
    if cfg.batch.global_ is not None:
        doc["train_batch_size"] = cfg.batch.global_
    if cfg.batch.micro is not None:
        doc["train_micro_batch_size_per_gpu"] = cfg.batch.micro
    if cfg.batch.grad_accum is not None:
        doc["gradient_accumulation_steps"] = cfg.batch.grad_accum
    doc["gradient_clipping"] = cfg.gradient_clipping
    doc["bf16"] = {"enabled": cfg.precision is Precision.BF16}
    if cfg.precision is Precision.BF16:
        doc["bf16"]["check_grad_overflow"] = cfg.check_grad_overflow
    elif cfg.check_grad_overflow and cfg.precision is Precision.FP32 and cfg.gradient_clipping <= 0:
        raise ConfigError("check_grad_overflow: true under fp32 without gradient_clipping has no DeepSpeed "
                          "equivalent (DeepSpeed checks only bf16 and fp16 steps); set it to false to export")
    doc["fp16"] = {"enabled": cfg.precision is Precision.FP16,
                   **{f.name: getattr(cfg.loss_scaling, f.name) for f in dataclasses.fields(LossScaleConfig)}}
    method = cfg.compression.method
    if method is Compression.BF16 and cfg.precision is Precision.FP32:
        doc["communication_data_type"] = "bf16"  # DeepSpeed's cast-before-reduce, read back as compression bf16
    elif method not in (Compression.NONE, Compression.BF16) and o.type is not OptimizerType.ONEBIT_ADAM:
        raise ConfigError(f"compression.method: {method.value} has no DeepSpeed equivalent (DeepSpeed compresses "
                          "gradients only inside OnebitAdam); set it to none to export a DeepSpeed config")
    doc["zero_optimization"] = zero
    doc["optimizer"] = {"type": opt_type, "params": params}
    if cfg.scheduler.type is not None:
        doc["scheduler"] = {"type": cfg.scheduler.type, "params": dict(cfg.scheduler.params)}
    for key in _MONITOR_BLOCKS:
        block = getattr(cfg.monitor, key)
        if block != type(block)():
            doc[key] = dataclasses.asdict(block)
    return doc
