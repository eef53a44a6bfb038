"""ztune: launcher and autotuner for sharded data-parallel training.

The runtime entry points are imported lazily so that `ztune estimate` never pays for importing torch:
`initialize` (DeepSpeed's signature; `initialize_engine` is the same function), `init_distributed` and
`add_config_arguments`, which a DeepSpeed script reaches through `import ztune as deepspeed`.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "add_config_arguments", "init_distributed", "initialize", "initialize_engine",
           "load_pretrained", "zero_init"]

_LAZY = {
    "initialize": "ztune.runtime.initialize",
    "initialize_engine": "ztune.runtime.initialize",
    "init_distributed": "ztune.runtime.initialize",
    "add_config_arguments": "ztune.runtime.compat.args",
    "zero_init": "ztune.runtime.construct.materialize",
    "load_pretrained": "ztune.runtime.construct.pretrained",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ztune' has no attribute {name!r}")
