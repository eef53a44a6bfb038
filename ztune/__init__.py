"""ztune: launcher and autotuner for sharded data-parallel training.

`ztune.initialize` is imported lazily so that `ztune estimate` never pays for importing torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "initialize"]


def __getattr__(name: str):
    if name == "initialize":
        from ztune.runtime.initialize import initialize

        return initialize
    raise AttributeError(f"module 'ztune' has no attribute {name!r}")
