"""The ztune training config: a tree of frozen dataclasses.

YAML form (every key optional; unknown keys are an error):

    zero: {stage: 2, offload_optimizer: none, offload_params: none,
           reduce_bucket_numel: 25000000, allgather_bucket_numel: 25000000, prefetch_units: 1}
    precision: bf16            # bf16 | fp16 | fp32
    batch: {micro: 4, grad_accum: 8, global: 256}
    seq_len: 2048
    activations: {checkpointing: full, every: 1, offload: none}   # none | selective | full
    compression: {method: none, topk_ratio: 0.01}                 # none | bf16 | int8 | onebit | topk
    optimizer: {type: AdamW, lr: 3.0e-4, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1, momentum: 0.0}
    gradient_clipping: 1.0     # 0 disables
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


class OptimizerType(str, enum.Enum):
    ADAMW = "AdamW"
    ADAM = "Adam"
    SGD = "SGD"


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


@dataclass(frozen=True)
class BatchConfig:
    micro: int = 1
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
class OptimizerConfig:
    type: OptimizerType = OptimizerType.ADAMW
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    momentum: float = 0.0


@dataclass(frozen=True)
class CheckpointConfig:
    """Saved training state (engine.save_checkpoint, docs/checkpoints.md); not activation checkpointing."""

    # After each complete save, keep the newest K tags in the save directory and delete older ones; 0 keeps all.
    keep_last: int = 0


@dataclass(frozen=True)
class TrainConfig:
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    precision: Precision = Precision.BF16
    batch: BatchConfig = field(default_factory=BatchConfig)
    seq_len: int = 2048
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    gradient_clipping: float = 0.0
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def grad_accum_for(self, world_size: int) -> int:
        """Micro-steps per optimizer step on `world_size` data-parallel ranks."""
        from ztune.config.validate import resolve_batch

        return resolve_batch(self.batch, world_size).grad_accum  # type: ignore[return-value]

    def global_batch_for(self, world_size: int) -> int:
        from ztune.config.validate import resolve_batch

        return resolve_batch(self.batch, world_size).global_  # type: ignore[return-value]
