"""ztune's sharded data-parallel runtime (installed as `ztune.runtime`)."""

__all__ = ["initialize"]


def __getattr__(name: str):
    # Lazy, so importing a runtime submodule does not pull in the engine. Importing the submodule
    # `initialize` binds the package attribute to that module; rebind it to the function.
    if name == "initialize":
        from ztune.runtime.initialize import initialize

        globals()["initialize"] = initialize
        return initialize
    raise AttributeError(f"module 'ztune.runtime' has no attribute {name!r}")
