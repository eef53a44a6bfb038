"""The ztune training config: a tree of frozen dataclasses.

YAML form (every key optional; unknown keys are an error):

    zero: {stage: 2, offload_optimizer: none, offload_params: none,
           reduce_bucket_numel: 25000000, allgather_bucket_numel: 25000000, prefetch_units: 1,
           quantized_weights: false, hpz_partition_size: 1, quantized_gradients: false}  # ZeRO++, stage 3
    precision: bf16            # bf16 | fp16 | fp32
    batch: {micro: 4, grad_accum: 8, global: 256}
    seq_len: 2048
    activations: {checkpointing: full, every: 1, offload: none}   # none | selective | full
    compression: {method: none, topk_ratio: 0.01}                 # none | bf16 | int8 | onebit | topk
    comm: {hierarchical: auto}  # auto | true | false: two-level collectives on multi-host CPU (gloo) jobs
    optimizer: {type: AdamW, lr: 3.0e-4, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1, momentum: 0.0,
                bias_correction: true}    # type: AdamW | Adam | SGD | OneBitAdam (+ freeze_step: 1000)
    gradient_clipping: 1.0     # 0 disables
    loss_scaling: {loss_scale: 0, initial_scale_power: 16, loss_scale_window: 1000, hysteresis: 2,
                   consecutive_hysteresis: false, min_loss_scale: 1}      # fp16 only; DeepSpeed's fp16 keys
    scheduler: {type: WarmupLR, params: {warmup_max_lr: 3.0e-4, warmup_num_steps: 100}}  # DeepSpeed's
    checkpoint: {keep_last: 0} # saved training state (engine.save_checkpoint): newest tags kept, 0 = all
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Offload(str, enum.Enum):
    NONE = "none"
    CPU = "cpu"


class Precision(str, enum.Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def bytes(self) -> int:
        return 4 if self is Precision.FP32 else 2


class Checkpointing(str, enum.Enum):
    NONE = "none"
    SELECTIVE = "selective"  # recompute the attention core only (Korthikanti et al. 2022)
    FULL = "full"  # keep each checkpointed block's input only


class Compression(str, enum.Enum):
    NONE = "none"
    BF16 = "bf16"
    INT8 = "int8"
    ONEBIT = "onebit"
    TOPK = "topk"


class Hierarchical(str, enum.Enum):
    """comm.hierarchical: two-level collectives (runtime/comm/hierarchical.py). auto: on where the job spans
    several hosts with more than one rank each and the ranks use gloo; true: the same, and an error where
    that cannot be (NCCL groups, one host); false: flat collectives everywhere."""

    AUTO = "auto"
    ON = "true"
    OFF = "false"


class OptimizerType(str, enum.Enum):
    ADAMW = "AdamW"
    ADAM = "Adam"
    SGD = "SGD"
    # 1-bit Adam (Tang et al. 2021): Adam for freeze_step warm-up steps, then frozen variance and 1-bit
    # compressed momentum (runtime/onebit_adam.py). ZeRO stage 0 only; compression.method onebit.
    ONEBIT_ADAM = "OneBitAdam"


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = 0
    offload_optimizer: Offload = Offload.NONE
    offload_params: Offload = Offload.NONE
    # Elements per gradient-reduction bucket (DeepSpeed's reduce_bucket_size is also in elements).
    reduce_bucket_numel: int = 25_000_000
    # Elements per parameter all-gather bucket (stage 1/2 param refresh; stage 3 gathers per unit).
    allgather_bucket_numel: int = 25_000_000
    # Stage 3: how many module units ahead to gather.
    prefetch_units: int = 1
    # Stage 3, ZeRO++ (Wang et al. 2023; runtime/zeropp.py): qwZ, the forward all-gather sends block-quantized
    # int8 weights (DeepSpeed's zero_quantized_weights); hpZ, a secondary partition over groups of this many
    # ranks inside a host serves the backward all-gather (zero_hpz_partition_size; 1 = off); qgZ, the
    # gradient reduce-scatter as int4 all-to-alls inside, then across hosts (zero_quantized_gradients).
    quantized_weights: bool = False
    hpz_partition_size: int = 1
    quantized_gradients: bool = False


@dataclass(frozen=True)
class BatchConfig:
    # None: derive from global and grad_accum for the world size (DeepSpeed's rule, validate.resolve_batch).
    micro: int | None = 1
    grad_accum: int | None = None
    # Samples per optimizer step over all ranks; must equal micro * grad_accum * world_size.
    global_: int | None = None


@dataclass(frozen=True)
class ActivationConfig:
    checkpointing: Checkpointing = Checkpointing.NONE
    # Checkpoint every k-th block (1 = every block).
    every: int = 1
    offload: Offload = Offload.NONE


@dataclass(frozen=True)
class CompressionConfig:
    method: Compression = Compression.NONE
    # Fraction of gradient elements sent by top-k.
    topk_ratio: float = 0.01


@dataclass(frozen=True)
class CommConfig:
    """How collectives move: the result is the same whichever way (parity within fp32 rounding)."""

    hierarchical: Hierarchical = Hierarchical.AUTO


@dataclass(frozen=True)
class OptimizerConfig:
    type: OptimizerType = OptimizerType.ADAMW
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    momentum: float = 0.0
    # False: Adam without the 1 - beta**step corrections (DeepSpeed's Adam `bias_correction`).
    bias_correction: bool = True
    # OneBitAdam only: full-precision Adam steps before the variance is frozen and the momentum goes 1-bit
    # (DeepSpeed's OneBitAdam `freeze_step`, same default).
    freeze_step: int = 100_000
    # OneBitAdam only, ztune's own (not a DeepSpeed key): after freeze_step, clamp each element's step to Adam's
    # bound lr (1 - b1) / sqrt(1 - b2) (runtime/onebit_adam.py, equation (9)). False: Tang et al.'s update.
    step_bound: bool = False
    # OneBitAdam only, ztune's own (not a DeepSpeed key): after freeze_step, each rank keeps its own momentum of its
    # own gradients and the 1-bit exchange averages it for the update only (runtime/onebit_adam.py, equation (4')).
    # False: Tang et al.'s algorithm, where the exchanged momentum replaces every rank's.
    local_momentum: bool = False
    # OneBitAdam only, ztune's own: the 1-bit code's scale per 128-element block, "mean" (mean |x|, Tang et al.'s
    # and Seide et al.'s) or "rms" (||x|| / sqrt(128): the block's norm, DeepSpeed's OnebitAdam's kind of scale).
    onebit_scale: str = "mean"


@dataclass(frozen=True)
class LossScaleConfig:
    """fp16 loss scaling, with the meaning and defaults of DeepSpeed's `fp16` block (runtime/precision.py)."""

    loss_scale: float = 0.0  # 0: dynamic; > 0: this static scale
    initial_scale_power: int = 16  # dynamic: start at 2 ** this
    loss_scale_window: int = 1000  # dynamic: clean steps between raises
    hysteresis: int = 2  # dynamic: overflows tolerated before the scale is lowered
    consecutive_hysteresis: bool = False  # dynamic: refill the hysteresis after every clean step
    min_loss_scale: float = 1.0  # dynamic: floor; an overflow at the floor is an error


@dataclass(frozen=True)
class SchedulerConfig:
    """A DeepSpeed learning-rate schedule (runtime/compat/lr_schedules.py): its class name and keyword
    parameters, checked against the schedule's signature when the config is loaded. type None: no schedule."""

    type: str | None = None
    params: dict = field(default_factory=dict)

    def __hash__(self) -> int:  # keeps TrainConfig hashable; params values may be lists
        return hash((self.type, repr(sorted(self.params.items()))))


@dataclass(frozen=True)
class CheckpointConfig:
    """Saved training state (engine.save_checkpoint, docs/checkpoints.md); not activation checkpointing."""

    # After each complete save, keep the newest K tags in the save directory and delete older ones; 0 keeps all.
    keep_last: int = 0


@dataclass(frozen=True)
class LogDirMonitor:
    """DeepSpeed's `csv_monitor` / `tensorboard` block (deepspeed/monitor/config.py; runtime/compat/monitor.py):
    rank 0 writes under os.path.join(output_path, job_name)."""

    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


@dataclass(frozen=True)
class WandbMonitor:
    """DeepSpeed's `wandb` block (deepspeed/monitor/config.py): wandb.init(project, group, entity=team)."""

    enabled: bool = False
    group: str | None = None
    team: str | None = None
    project: str = "deepspeed"


@dataclass(frozen=True)
class MonitorConfig:
    """DeepSpeed's monitor blocks, written after each optimizer step (runtime/compat/monitor.py)."""

    csv_monitor: LogDirMonitor = field(default_factory=LogDirMonitor)
    tensorboard: LogDirMonitor = field(default_factory=LogDirMonitor)
    wandb: WandbMonitor = field(default_factory=WandbMonitor)


@dataclass(frozen=True)
class TrainConfig:
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    precision: Precision = Precision.BF16
    batch: BatchConfig = field(default_factory=BatchConfig)
    seq_len: int = 2048
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    gradient_clipping: float = 0.0
    # Skip an optimizer step whose gradient norm is not finite (DeepSpeed's bf16.check_grad_overflow, which a
    # DeepSpeed config with bf16 has on by default). fp16 always checks; with gradient_clipping > 0 every precision
    # does (the norm is computed anyway).
    check_grad_overflow: bool = False
    loss_scaling: LossScaleConfig = field(default_factory=LossScaleConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def grad_accum_for(self, world_size: int) -> int:
        """Micro-steps per optimizer step on `world_size` data-parallel ranks."""
        from ztune.config.validate import resolve_batch

        return resolve_batch(self.batch, world_size).grad_accum  # type: ignore[return-value]

    def global_batch_for(self, world_size: int) -> int:
        from ztune.config.validate import resolve_batch

        return resolve_batch(self.batch, world_size).global_  # type: ignore[return-value]
