"""DeepSpeed compatibility: the engine members, `initialize` arguments and command-line flags that DeepSpeed
scripts use, with DeepSpeed's meanings (installed as `ztune.runtime.compat`)."""
