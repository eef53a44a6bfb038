"""DeepSpeed compatibility: DeepSpeed's learning-rate schedules and optimizer semantics (installed as
`ztune.runtime.compat`). Importing this package imports nothing heavy; each module documents its sources."""
