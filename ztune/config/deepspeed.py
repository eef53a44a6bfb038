"""DeepSpeed JSON <-> TrainConfig, for the keys both share.

Key names follow DeepSpeed's config documentation (deepspeed.ai/docs/config-json). DeepSpeed keys that
are tuning knobs ztune sets itself (overlap_comm, contiguous_gradients, ...) are accepted and reported as
ignored; any other key is an error, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ztune.config.schema import (
    ActivationConfig,
    BatchConfig,
    Compression,
    CompressionConfig,
    LossScaleConfig,
    Offload,
    OptimizerConfig,
    OptimizerType,
    Precision,
    SchedulerConfig,
    TrainConfig,
    ZeroConfig,
)
from ztune.config.validate import build, check, check_loss_scaling
from ztune.errors import ConfigError

# Top-level keys whose presence marks a document as DeepSpeed JSON.
DEEPSPEED_MARKERS = frozenset(
    {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "zero_optimization",
        "fp16",
        "bf16",
    }
)
_IGNORED_TOP = frozenset(
    {
        "steps_per_print",
        "wall_clock_breakdown",
        "zero_allow_untested_optimizer",
        "prescale_gradients",
        "gradient_predivide_factor",
        "dump_state",
        "activation_checkpointing",
        "tensorboard",
        "wandb",
        "csv_monitor",
        "flops_profiler",
        "comms_logger",
        "communication_data_type",
        "memory_breakdown",
        "zero_force_ds_cpu_optimizer",
    }
)
_IGNORED_ZERO = frozenset(
    {
        "overlap_comm",
        "contiguous_gradients",
        "reduce_scatter",
        "allgather_partitions",
        "round_robin_gradients",
        "sub_group_size",
        "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold",
        "stage3_max_live_parameters",
        "stage3_max_reuse_distance",
        "stage3_gather_16bit_weights_on_model_save",
        "stage3_gather_fp16_weights_on_model_save",
        "elastic_checkpoint",
        "load_from_fp32_weights",
        "ignore_unused_parameters",
        "cpu_offload",
        "zero_hpz_partition_size",
        "zero_quantized_weights",
        "zero_quantized_gradients",
        "mics_shard_size",
    }
)
_IGNORED_OFFLOAD = frozenset({"pin_memory", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu", "fast_init"})
_IGNORED_FP16 = frozenset({"auto_cast", "immediate_grad_update"})
# fp16 keys with DeepSpeed's meaning, read into TrainConfig.loss_scaling (runtime/precision.py).
_LOSS_SCALE_KEYS = frozenset(
    {"loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale",
     "consecutive_hysteresis"}
)
_OPTIMIZERS = {
    "adamw": (OptimizerType.ADAMW, Compression.NONE),
    "adam": (OptimizerType.ADAM, Compression.NONE),
    "sgd": (OptimizerType.SGD, Compression.NONE),
    # 1-bit Adam (Tang et al. 2021) is DeepSpeed's compressed-communication Adam.
    "onebitadam": (OptimizerType.ADAM, Compression.ONEBIT),
}
_OPTIMIZER_PARAMS = {"lr", "betas", "eps", "weight_decay", "momentum", "bias_correction", "adam_w_mode"}
# torch_adam / fused / cuda_aware / comm_backend_name pick an implementation, not the math.
_IGNORED_OPTIMIZER_PARAMS = {"torch_adam", "freeze_step", "cuda_aware", "comm_backend_name", "fused"}
# Options ztune's optimizers do not implement: accepted (and listed as ignored) only at their "off" value.
_OFF_OPTIMIZER_PARAMS = {"amsgrad": False, "nesterov": False, "dampening": 0}


def is_deepspeed(doc: dict) -> bool:
    return any(k in DEEPSPEED_MARKERS for k in doc)


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def _offload(block: Any, key: str, ignored: list[str]) -> Offload:
    block = _mapping(block, key)
    for k in block:
        if k == "device":
            continue
        if k in _IGNORED_OFFLOAD:
            ignored.append(f"{key}.{k}")
            continue
        raise ConfigError(f"unknown key '{key}.{k}'; allowed here: device, " + ", ".join(sorted(_IGNORED_OFFLOAD)))
    device = block.get("device", "none")
    if device == "nvme":
        raise ConfigError(f"{key}.device: nvme offload is not supported by ztune; use cpu or none")
    if device not in ("cpu", "none", None):
        raise ConfigError(f"{key}.device: got {device!r}; allowed: cpu, none")
    return Offload.CPU if device == "cpu" else Offload.NONE


def from_deepspeed(doc: dict) -> tuple[TrainConfig, list[str]]:
    """Convert a DeepSpeed config dict. Returns the config and the DeepSpeed keys that were ignored."""
    ignored: list[str] = []
    zero: dict[str, Any] = {}
    batch: dict[str, Any] = {}
    top: dict[str, Any] = {}
    # DeepSpeed's optimizers default to no weight decay (FusedAdam / DeepSpeedCPUAdam weight_decay=0.0).
    opt: dict[str, Any] = {"weight_decay": 0.0}
    loss_scaling: dict[str, Any] = {}
    scheduler: dict[str, Any] = {}
    compression = Compression.NONE
    precision = Precision.FP32
    for key, value in doc.items():
        if key == "train_batch_size":
            batch["global"] = value
        elif key == "train_micro_batch_size_per_gpu":
            batch["micro"] = value
        elif key == "gradient_accumulation_steps":
            batch["grad_accum"] = value
        elif key == "gradient_clipping":
            top["gradient_clipping"] = value
        elif key in ("bf16", "fp16"):
            block = _mapping(value, key)
            for k in block:
                if key == "fp16" and k in _LOSS_SCALE_KEYS:
                    loss_scaling[k] = block[k]
                    continue
                if k != "enabled" and not (key == "fp16" and k in _IGNORED_FP16):
                    raise ConfigError(f"unknown key '{key}.{k}'; allowed here: enabled")
                if k != "enabled":
                    ignored.append(f"{key}.{k}")
            enabled = block.get("enabled", False)
            if enabled not in (True, False, "auto"):
                raise ConfigError(f"{key}.enabled: expected true or false, got {enabled!r}")
            if enabled is True:
                if precision is not Precision.FP32:
                    raise ConfigError("bf16.enabled and fp16.enabled are both true; enable one of them")
                precision = Precision.BF16 if key == "bf16" else Precision.FP16
        elif key == "zero_optimization":
            for k, v in _mapping(value, key).items():
                if k == "stage":
                    zero["stage"] = v
                elif k == "offload_optimizer":
                    zero["offload_optimizer"] = _offload(v, f"{key}.{k}", ignored).value
                elif k == "offload_param":
                    zero["offload_params"] = _offload(v, f"{key}.{k}", ignored).value
                elif k == "reduce_bucket_size":
                    zero["reduce_bucket_numel"] = v
                elif k == "allgather_bucket_size":
                    zero["allgather_bucket_numel"] = v
                elif k in _IGNORED_ZERO:
                    ignored.append(f"{key}.{k}")
                else:
                    raise ConfigError(
                        f"unknown key '{key}.{k}'; allowed here: stage, offload_optimizer, offload_param, "
                        "reduce_bucket_size, allgather_bucket_size (and DeepSpeed's tuning knobs, ignored)"
                    )
        elif key == "optimizer":
            block = _mapping(value, key)
            for k in block:
                if k not in ("type", "params"):
                    raise ConfigError(f"unknown key 'optimizer.{k}'; allowed here: type, params")
            name = str(block.get("type", "AdamW"))
            if name.lower() not in _OPTIMIZERS:
                raise ConfigError(f"optimizer.type: got {name!r}; allowed: AdamW, Adam, SGD, OneBitAdam")
            opt_type, compression = _OPTIMIZERS[name.lower()]
            opt["type"] = opt_type.value
            adam_w_mode = True  # DeepSpeed's default (runtime/config.py ADAM_W_MODE_DEFAULT)
            for k, v in _mapping(block.get("params", {}), "optimizer.params").items():
                if k == "adam_w_mode" and name.lower() in ("adam", "adamw"):
                    if not isinstance(v, bool):
                        raise ConfigError(f"optimizer.params.adam_w_mode: expected true or false, got {v!r}")
                    adam_w_mode = v
                elif k == "adam_w_mode" or (k == "bias_correction" and opt_type is OptimizerType.SGD):
                    raise ConfigError(f"optimizer.params.{k}: not a parameter of {name}; remove it")
                elif k in _OPTIMIZER_PARAMS:
                    opt[k] = v
                elif k in _IGNORED_OPTIMIZER_PARAMS:
                    ignored.append(f"optimizer.params.{k}")
                elif k in _OFF_OPTIMIZER_PARAMS:
                    off = _OFF_OPTIMIZER_PARAMS[k]
                    if v != off or isinstance(v, bool) != isinstance(off, bool):
                        raise ConfigError(f"optimizer.params.{k}: {v!r} is not supported by ztune; remove it "
                                          f"or set it to {str(off).lower()}")
                    ignored.append(f"optimizer.params.{k}")
                else:
                    raise ConfigError(
                        f"unknown key 'optimizer.params.{k}'; allowed here: " + ", ".join(sorted(_OPTIMIZER_PARAMS))
                    )
            # DeepSpeed: "Adam" decouples weight decay (AdamW) unless adam_w_mode is false; "AdamW" always does.
            if name.lower() == "adam" and adam_w_mode:
                opt["type"] = OptimizerType.ADAMW.value
        elif key == "scheduler":
            block = _mapping(value, key)
            for k in block:
                if k not in ("type", "params"):
                    raise ConfigError(f"unknown key 'scheduler.{k}'; allowed here: type, params")
            scheduler = {"type": block.get("type"), "params": _mapping(block.get("params", {}), "scheduler.params")}
        elif key in _IGNORED_TOP:
            ignored.append(key)
        else:
            known = sorted(DEEPSPEED_MARKERS | {"optimizer", "gradient_clipping", "scheduler"})
            raise ConfigError(f"unknown DeepSpeed key '{key}'; ztune reads: " + ", ".join(known))
    if "global" in batch and "micro" not in batch and "grad_accum" not in batch:
        # DeepSpeed's default micro batch is derived; ztune needs one, so take 1 and derive accumulation.
        batch["micro"] = 1
    loss_scale_cfg = build(LossScaleConfig, loss_scaling, prefix="fp16.")
    check_loss_scaling(loss_scale_cfg, prefix="fp16.")
    cfg = TrainConfig(
        zero=build(ZeroConfig, zero, prefix="zero_optimization."),
        precision=precision,
        batch=build(BatchConfig, batch, prefix="batch."),
        optimizer=build(OptimizerConfig, opt, prefix="optimizer."),
        compression=CompressionConfig(method=compression),
        activations=ActivationConfig(),
        loss_scaling=loss_scale_cfg,
        scheduler=build(SchedulerConfig, scheduler, prefix="scheduler."),
        **{k: build_scalar(k, v) for k, v in top.items()},
    )
    return check(cfg), ignored


def build_scalar(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


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
    o = cfg.optimizer
    params: dict[str, Any] = {"lr": o.lr, "weight_decay": o.weight_decay}
    if o.type is OptimizerType.SGD:
        params["momentum"] = o.momentum
    else:
        params.update(betas=list(o.betas), eps=o.eps, bias_correction=o.bias_correction)
        if o.type is OptimizerType.ADAM:
            params["adam_w_mode"] = False  # DeepSpeed's Adam is AdamW unless told otherwise
    opt_type = o.type.value
    if cfg.compression.method is Compression.ONEBIT and o.type is OptimizerType.ADAM:
        opt_type = "OneBitAdam"
    doc: dict[str, Any] = {}
    if cfg.batch.global_ is not None:
        doc["train_batch_size"] = cfg.batch.global_
    doc["train_micro_batch_size_per_gpu"] = cfg.batch.micro
    if cfg.batch.grad_accum is not None:
        doc["gradient_accumulation_steps"] = cfg.batch.grad_accum
    doc["gradient_clipping"] = cfg.gradient_clipping
    doc["bf16"] = {"enabled": cfg.precision is Precision.BF16}
    doc["fp16"] = {"enabled": cfg.precision is Precision.FP16,
                   **{f.name: getattr(cfg.loss_scaling, f.name) for f in dataclasses.fields(LossScaleConfig)}}
    doc["zero_optimization"] = zero
    doc["optimizer"] = {"type": opt_type, "params": params}
    if cfg.scheduler.type is not None:
        doc["scheduler"] = {"type": cfg.scheduler.type, "params": dict(cfg.scheduler.params)}
    return doc
