"""ztune's sharded data-parallel runtime (installed as `ztune.runtime`)."""
