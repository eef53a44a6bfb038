"""The training config: schema (typed dataclass tree), strict loading, DeepSpeed JSON import/export.

Names are resolved on first use (PEP 562), so that importing `ztune.config.schema` alone (the cost model,
`ztune estimate`) does not load the YAML / DeepSpeed machinery.
"""

import importlib

# name -> submodule that defines it
_EXPORTS = {
    "from_deepspeed": "deepspeed",
    "to_deepspeed": "deepspeed",
    "CONFIG_ENV": "io",
    "from_dict": "io",
    "load": "io",
    "save": "io",
    "to_dict": "io",
    "ActivationConfig": "schema",
    "BatchConfig": "schema",
    "Checkpointing": "schema",
    "Compression": "schema",
    "CompressionConfig": "schema",
    "Offload": "schema",
    "OptimizerConfig": "schema",
    "OptimizerType": "schema",
    "Precision": "schema",
    "TrainConfig": "schema",
    "ZeroConfig": "schema",
    "resolve_batch": "validate",
    "AutoContext": "deepspeed_auto",
    "LoadedConfig": "io",
    "load_detailed": "io",
    "DEEPSPEED_BATCH_KEYS": "validate",
    "ZTUNE_BATCH_KEYS": "validate",
    "BatchKeys": "validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ztune.config' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ztune.config.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
