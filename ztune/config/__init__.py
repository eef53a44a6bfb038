"""The training config: schema (typed dataclass tree), strict loading, DeepSpeed JSON import/export."""

from ztune.config.deepspeed import from_deepspeed, to_deepspeed
from ztune.config.deepspeed_auto import AutoContext
from ztune.config.io import CONFIG_ENV, LoadedConfig, from_dict, load, load_detailed, save, to_dict
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
from ztune.config.validate import DEEPSPEED_BATCH_KEYS, ZTUNE_BATCH_KEYS, BatchKeys, resolve_batch

__all__ = [
    "CONFIG_ENV",
    "DEEPSPEED_BATCH_KEYS",
    "ZTUNE_BATCH_KEYS",
    "ActivationConfig",
    "AutoContext",
    "BatchConfig",
    "BatchKeys",
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
    "LoadedConfig",
    "load",
    "load_detailed",
    "resolve_batch",
    "save",
    "to_deepspeed",
    "to_dict",
]
