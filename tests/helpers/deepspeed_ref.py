"""DeepSpeed 0.19.8 as a reference in tests, on CPU, without its C++ shared-memory op.

`import_deepspeed()` sets DS_ACCELERATOR=cpu before the import (DeepSpeed picks its accelerator at import) and
replaces deepspeed.comm.torch.build_shm_op with a no-op: DeepSpeed's gloo backend JIT-compiles that op in
init_distributed (it serves inference all-reduce only; training collectives go through torch.distributed),
and the build can take minutes and leave a stale lock. Importing the config class alone never builds it.
`ds_batch(doc, world_size)` runs DeepSpeed's own batch derivation (DeepSpeedConfig) for a world size, with no
process group: DeepSpeedConfig asks deepspeed.comm for rank and world size, which is patched for the call.
"""

from __future__ import annotations

import logging
import os
import sys
from unittest import mock


def import_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def ds_batch(doc: dict, world_size: int) -> tuple[int, int, int] | str:
    """DeepSpeed's (train_batch_size, micro, accumulation) for `doc` on `world_size` ranks, or "error"."""
    import_deepspeed()
    import deepspeed.runtime.config as ds_config

    with mock.patch.object(ds_config.dist, "get_rank", lambda *a, **k: 0), \
            mock.patch.object(ds_config.dist, "get_world_size", lambda *a, **k: world_size):
        try:
            cfg = ds_config.DeepSpeedConfig(dict(doc))
        except (AssertionError, ValueError, ZeroDivisionError):
            return "error"
    return cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps
