"""A single-process reference of 1-bit Adam (Tang et al. 2021, Algorithm 1) over n simulated workers.

It takes every worker's gradient at once and runs equations (1)-(7) of runtime/onebit_adam.py's docstring
with its own bookkeeping of the exchange: per worker, compress each server's piece of m + d (error feedback
d), per server, average the decompressed pieces and compress again (error feedback e). Only the element-wise
update formulas (momentum_, variance_, adam_update_, bias_corrections; unit-tested against torch.optim.AdamW)
and the 1-bit codec's pure functions are shared with the runtime; the collectives, the wire packing and the
error buffers are not.
"""

from __future__ import annotations

import torch

from ztune.cost.comm import ONEBIT_CHUNK_NUMEL
from ztune.runtime.comm.compress import onebit_compress, onebit_decompress
from ztune.runtime.onebit_adam import adam_update_, bias_corrections, momentum_, variance_


def compress_roundtrip(x: torch.Tensor, *, scale: str = "mean") -> torch.Tensor:
    """C[x]: signs times each block's mean |x|, or with scale "rms" its ||x|| / sqrt(block) (the value the
    receiver decodes)."""
    packed, scales = onebit_compress(x, chunk_numel=ONEBIT_CHUNK_NUMEL, scale=scale)
    return onebit_decompress(packed, scales, numel=x.numel(), chunk_numel=ONEBIT_CHUNK_NUMEL)


def exchange(local_m: list[torch.Tensor], worker_err: list[torch.Tensor], server_err: list[torch.Tensor], *,
             worker_feedback: bool = True, server_feedback: bool = True, scale: str = "mean") -> torch.Tensor:
    """Equations (5)-(6) for n workers: the averaged momentum every worker receives. worker_err[i] (numel) and
    server_err[r] (numel / n) are updated in place; *_feedback=False drops that side's error feedback."""
    n = len(local_m)
    piece = local_m[0].numel() // n
    received: list[list[torch.Tensor]] = [[] for _ in range(n)]  # received[r][i]: worker i's piece r
    for i in range(n):
        y = worker_err[i] + local_m[i] if worker_feedback else local_m[i].clone()
        sent = [compress_roundtrip(y[r * piece:(r + 1) * piece], scale=scale) for r in range(n)]
        for r in range(n):
            received[r].append(sent[r])
        if worker_feedback:
            worker_err[i].copy_(y - torch.cat(sent))
    out = []
    for r in range(n):
        total = received[r][0].clone()
        for t in received[r][1:]:
            total += t
        avg = total.div_(n)
        z = server_err[r] + avg if server_feedback else avg
        mb = compress_roundtrip(z, scale=scale)
        if server_feedback:
            server_err[r].copy_(z - mb)
        out.append(mb)
    return torch.cat(out)


class ReferenceOneBitAdam:
    """The whole optimizer over one flat fp32 vector `x` (modified in place) for n workers."""

    def __init__(self, x: torch.Tensor, *, world_size: int, freeze_step: int, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, bias_correction: bool = True, valid_numel: int | None = None,
                 step_bound: bool = False, local_momentum: bool = False, onebit_scale: str = "mean"):
        """valid_numel: elements of x before its padding, whose momentum is held at zero (default: all).
        step_bound: equation (9) after the freeze, written out here (not the runtime's bounded_update_).
        local_momentum: equation (4'), each worker's own momentum of its own gradients (own_m[i]), exchanged for
        the update only. onebit_scale: the code's per-block scale ("mean" or "rms")."""
        self.x, self.n, self.freeze_step = x, world_size, freeze_step
        self.valid_numel = x.numel() if valid_numel is None else valid_numel
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.bias_correction = bias_correction
        self.step_bound = step_bound
        self.local_momentum = local_momentum
        self.onebit_scale = onebit_scale
        self.own_m: list[torch.Tensor] | None = None
        self.m, self.v = torch.zeros_like(x), torch.zeros_like(x)
        self.worker_err = [torch.zeros_like(x) for _ in range(world_size)]
        self.server_err = [torch.zeros(x.numel() // world_size) for _ in range(world_size)]
        self.step_count = 0

    def step(self, grads: list[torch.Tensor], *, mask_zero_variance: bool = True, **feedback) -> None:
        """One step from every worker's own gradient (the warm-up averages them as the all-reduce does).
        mask_zero_variance=False leaves out equation (8) (for the test that shows why it is there)."""
        beta1, beta2 = self.betas
        compress = self.step_count >= self.freeze_step
        self.step_count += 1
        if compress and self.local_momentum:
            if self.own_m is None:  # from the freeze on, each worker's own (the warm-up's m is everyone's)
                self.own_m = [self.m.clone() for _ in grads]
            for own, g in zip(self.own_m, grads, strict=True):
                momentum_(own, g, beta1=beta1)
                own[self.v == 0] = 0
            self.m = exchange([own.clone() for own in self.own_m], self.worker_err, self.server_err,
                              scale=self.onebit_scale, **feedback)
            self.m[self.valid_numel:] = 0
            if mask_zero_variance:
                self.m[self.v == 0] = 0
        elif compress:
            local = [momentum_(self.m.clone(), g, beta1=beta1) for g in grads]
            self.m = exchange(local, self.worker_err, self.server_err, scale=self.onebit_scale, **feedback)
            self.m[self.valid_numel:] = 0
            if mask_zero_variance:  # equation (8): no momentum where the frozen variance is zero
                self.m[self.v == 0] = 0
        else:
            total = grads[0].clone()
            for g in grads[1:]:
                total += g
            avg = total.mul_(1.0 / self.n)
            momentum_(self.m, avg, beta1=beta1)
            variance_(self.v, avg, beta2=beta2)
        c1, c2 = bias_corrections(step=self.step_count, variance_step=min(self.step_count, self.freeze_step),
                                  beta1=beta1, beta2=beta2, enabled=self.bias_correction)
        if compress and self.step_bound:
            bound = max(1.0, (1 - beta1) / (1 - beta2) ** 0.5)  # Kingma & Ba 2015, Section 2.1
            step = (self.m / c1) / ((self.v / c2).sqrt() + self.eps)
            self.x.mul_(1 - self.lr * self.weight_decay).sub_(self.lr * step.clamp(-bound, bound))
        else:
            adam_update_(self.x, self.m, self.v, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay, c1=c1,
                         c2=c2)
