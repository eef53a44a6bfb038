"""Gradient reduction: bucketed, asynchronous, launched from backward hooks as each group's grads are ready.

- Unsharded gradients (stages 0/1): parameters' `.grad` are views into the group's flat `grad_full`, so
  autograd accumulates micro-steps in place; only the boundary micro-step's hooks launch a collective:
  all-reduce when every rank keeps full optimizer states (stage 0), reduce-scatter in place into the owned
  slice otherwise (stage 1). This is DDP's gradient-as-bucket-view plus no_sync accumulation.
- Sharded gradients (stages 2/3): each micro-step copies a parameter's fresh `.grad` into the group's
  transient bucket and drops it; a full bucket is reduce-scattered into the owned shard accumulator and
  freed once the collective completes (at most `max_inflight` buckets alive, then the oldest is drained).

Reductions sum; the engine divides by world size x loss scale once, on the owned slice, at the step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from functools import partial

import torch

from ztune.runtime.comm import Comm
from ztune.runtime.partition import FlatGroup


class GradReducer:
    def __init__(self, groups: Sequence[FlatGroup], *, comm: Comm, shard_states: bool, shard_grads: bool,
                 on_reduced: Callable[[FlatGroup], None] | None = None, max_inflight: int = 2):
        self.groups = list(groups)
        self.comm = comm
        self.shard_states = shard_states
        self.shard_grads = shard_grads
        self.on_reduced = on_reduced
        self.max_inflight = max_inflight
        self.in_backward = False
        self._active = False
        self._ready = [0] * len(self.groups)
        self._launched = [False] * len(self.groups)
        self._buckets: list[torch.Tensor | None] = [None] * len(self.groups)
        self._fired: list[bytearray] = [bytearray(len(g.params)) for g in self.groups]
        self._pending: deque = deque()
        self._handles = []
        for gi, g in enumerate(self.groups):
            for pi, p in enumerate(g.params):
                self._handles.append(p.register_post_accumulate_grad_hook(partial(self._on_grad, gi, pi)))

    def begin(self, *, boundary: bool) -> None:
        """Start one backward pass; `boundary`: the last micro-step before an optimizer step."""
        self._active = self.shard_grads or boundary
        self._ready = [0] * len(self.groups)
        self._launched = [False] * len(self.groups)
        self._fired = [bytearray(len(g.params)) for g in self.groups]
        if not self.shard_grads:
            for g in self.groups:
                for p, view in zip(g.params, g.grad_views, strict=True):
                    if p.grad is None:  # e.g. the user called module.zero_grad(set_to_none=True)
                        p.grad = view
        self.in_backward = True

    def _on_grad(self, gi: int, pi: int, p: torch.nn.Parameter) -> None:
        if not self.in_backward:
            raise RuntimeError("ztune: call engine.backward(loss), not loss.backward(): gradients must be reduced")
        g = self.groups[gi]
        self._fired[gi][pi] = 1
        if self.shard_grads:
            bucket = self._bucket(gi)
            slot = g.layout.slots[pi]
            bucket[slot.offset:slot.offset + slot.numel].copy_(p.grad.reshape(-1))
            p.grad = None
        else:
            view = g.grad_views[pi]
            if p.grad.data_ptr() != view.data_ptr():  # autograd replaced the view: fold it back in
                view.copy_(p.grad)
                p.grad = view
            if not self._active:
                return
        self._ready[gi] += 1
        if self._ready[gi] == len(g.params):
            self._launch(gi)

    def _bucket(self, gi: int) -> torch.Tensor:
        """The group's transient flat gradient bucket. Every parameter's slot is overwritten by its hook (or
        zeroed in `finish` if it never fires), so only the padding is zeroed here."""
        if self._buckets[gi] is None:
            g = self.groups[gi]
            bucket = torch.empty(g.layout.padded_numel, dtype=g.dtype, device=g.grad_owned.device)
            bucket[g.layout.numel:].zero_()
            self._buckets[gi] = bucket
        return self._buckets[gi]

    def _launch(self, gi: int) -> None:
        g = self.groups[gi]
        self._launched[gi] = True
        lo, hi = g.owned
        if not self.shard_grads:
            if self.shard_states:
                work = self.comm.reduce_scatter(g.grad_full[lo:hi], g.grad_full, async_op=True)
            else:
                work = self.comm.all_reduce(g.grad_full, async_op=True)
            self._pending.append((gi, work, None))
        else:
            out = g.grad_owned if g.grad_fresh else torch.empty_like(g.grad_owned)
            work = self.comm.reduce_scatter(out, self._bucket(gi), async_op=True)
            self._pending.append((gi, work, out))
        if self.on_reduced is not None:
            self.on_reduced(g)
        while len(self._pending) > self.max_inflight:
            self._complete(self._pending.popleft())

    def _complete(self, entry) -> None:
        gi, work, out = entry
        work.wait()
        if out is None:
            return
        g = self.groups[gi]
        if out is not g.grad_owned:
            g.grad_owned.add_(out)
        g.grad_fresh = False
        self._buckets[gi] = None

    def finish(self) -> None:
        """After backward: reduce groups whose hooks did not all fire (unused parameters count as zero
        gradients, so every rank issues the same collectives), then wait for everything in flight."""
        self.in_backward = False
        if self._active:
            for gi, launched in enumerate(self._launched):
                if launched:
                    continue
                if self.shard_grads:
                    bucket, g = self._bucket(gi), self.groups[gi]
                    for pi, slot in enumerate(g.layout.slots):
                        if not self._fired[gi][pi]:
                            bucket[slot.offset:slot.offset + slot.numel].zero_()
                self._launch(gi)
        while self._pending:
            self._complete(self._pending.popleft())
        self._active = False

    def zero_grads(self) -> None:
        """Called after an optimizer step."""
        for g in self.groups:
            if g.grad_full is not None:
                g.grad_full.zero_()
            g.grad_fresh = True

    def live_bucket_tensors(self) -> list[torch.Tensor]:
        return [b for b in self._buckets if b is not None]
