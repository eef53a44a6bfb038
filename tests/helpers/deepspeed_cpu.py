"""DeepSpeed 0.19.8 as a test reference on a CPU-only machine, without letting it build anything.

`import_deepspeed_cpu()` picks the CPU accelerator before the import (DS_ACCELERATOR=cpu; otherwise DeepSpeed
probes for CUDA) and replaces `deepspeed.comm.torch.build_shm_op`, the JIT build of a C++ shared-memory
all-reduce op that DeepSpeed's CPU comm backend starts at init_distributed (it only serves inference
all-reduce; with a compiler it takes ~30 s and can leave a stale lock, without one it fails). Same recipe
as benchmarks/peers.py `import_deepspeed`. Tests must also avoid DeepSpeed's own FusedAdam and
DeepSpeedCPUAdam (JIT-built ops too): set `"torch_adam": true` in the optimizer params, or pass a client
torch optimizer.
"""

from __future__ import annotations

import logging
import os
import sys

import pytest


def import_deepspeed_cpu():
    """The deepspeed module (skips the test when the test extra is not installed)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is the reference: pip install -e '.[test]'")
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def init_deepspeed_distributed():
    """deepspeed.init_distributed over the gloo group torch.distributed already has (tests/helpers/spawn.py)."""
    deepspeed = import_deepspeed_cpu()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    return deepspeed
