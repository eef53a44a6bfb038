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
import torch


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


class DsCpuAdamFormula(torch.optim.Optimizer):
    """DeepSpeed's CPU Adam step (deepspeed/ops/csrc/includes/cpu_adam.h, Step_AVX) as torch ops, for the
    bias_correction=False reference only: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; adamw: p += -lr wd p;
    p += -lr / bc1 * m / (sqrt(v) * bc2 + eps), with bc1 = 1 - b1^t, bc2 = 1 / sqrt(1 - b2^t), or both 1."""

    def __init__(self, params, *, lr, weight_decay, bias_correction, adamw_mode=True, betas=(0.9, 0.999),
                 eps=1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))
        self.bias_correction, self.adamw_mode = bias_correction, adamw_mode

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                bc1 = 1 - b1**t if self.bias_correction else 1.0
                bc2 = 1 / (1 - b2**t) ** 0.5 if self.bias_correction else 1.0
                g = p.grad
                if group["weight_decay"] > 0 and not self.adamw_mode:
                    g = g + p * group["weight_decay"]
                state["m"].mul_(b1).add_(g, alpha=1 - b1)
                state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                if group["weight_decay"] > 0 and self.adamw_mode:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
                p.add_(state["m"] / (state["v"].sqrt() * bc2 + group["eps"]), alpha=-group["lr"] / bc1)
        return None
