"""DeepSpeed compatibility (installed as `ztune.runtime.compat`): the engine members, `initialize` arguments
and command-line flags that DeepSpeed scripts use, DeepSpeed's learning-rate schedules and optimizer semantics,
each with DeepSpeed's meaning. Importing this package imports nothing heavy; each module documents its sources."""
