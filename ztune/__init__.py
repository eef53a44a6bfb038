"""ztune: launcher and autotuner for sharded data-parallel training.

`ztune.initialize` is imported lazily so that `ztune estimate` never pays for importing torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "initialize", "load_pretrained", "zero_init"]


def __getattr__(name: str):
    if name == "initialize":
        from ztune.runtime.initialize import initialize

        return initialize
    if name == "zero_init":
        from ztune.runtime.construct.materialize import zero_init

        return zero_init
    if name == "load_pretrained":
        from ztune.runtime.construct.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'ztune' has no attribute {name!r}")
