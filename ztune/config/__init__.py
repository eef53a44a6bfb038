"""The training config: schema (typed dataclass tree), strict loading, DeepSpeed JSON import/export."""

from ztune.config.deepspeed import from_deepspeed, to_deepspeed
from ztune.config.io import CONFIG_ENV, from_dict, load, save, to_dict
from ztune.config.schema import (
    ActivationConfig,
    BatchConfig,
    Checkpointing,
    Compression,
    CompressionConfig,
    Offload,
    OptimizerConfig,
    OptimizerType,
    Precision,
    TrainConfig,
    ZeroConfig,
)
from ztune.config.validate import resolve_batch

__all__ = [
    "CONFIG_ENV",
    "ActivationConfig",
    "BatchConfig",
    "Checkpointing",
    "Compression",
    "CompressionConfig",
    "Offload",
    "OptimizerConfig",
    "OptimizerType",
    "Precision",
    "TrainConfig",
    "ZeroConfig",
    "from_deepspeed",
    "from_dict",
    "load",
    "resolve_batch",
    "save",
    "to_deepspeed",
    "to_dict",
]
