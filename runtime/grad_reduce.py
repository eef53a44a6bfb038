"""Gradient reduction: bucketed, asynchronous, launched from backward hooks as each group's grads are ready.

- Unsharded gradients (stages 0/1): the first micro-step after an optimizer step lets autograd allocate fresh
  gradients and its hooks copy each into the group's flat `grad_full` (one write instead of zeroing the buffer
  and accumulating into it); `.grad` then views the buffer, so later micro-steps accumulate in place. Only
  the boundary micro-step's hooks launch a collective: all-reduce when every rank keeps full optimizer
  states (stage 0), reduce-scatter in place into the owned slice otherwise (stage 1). This is DDP's
  gradient-as-bucket-view plus no_sync accumulation.
- Sharded gradients (stages 2/3): each micro-step copies a parameter's fresh `.grad` into the group's
  transient bucket and drops it; a full bucket is reduce-scattered into the owned shard accumulator and
  freed once the collective completes (at most `max_inflight` buckets alive, then the oldest is drained).

Compression (compression.method) changes only what goes on the wire:
- bf16: the same collectives on a bf16 copy of the bucket (reduced in bf16), cast back into the gradient.
- int8 / onebit / topk (runtime/comm/compress.py): a compressed gradient cannot be summed hop by hop in a ring,
  so the exchange is 1-bit Adam's (Tang et al. 2021, section 4.1): phase 1, an all-to-all in which rank r
  receives every rank's compressed copy of shard r (each sender with its own error feedback) and sums the
  decompressed copies: the reduced shard, which is all stages 1-3 need; phase 2 (stage 0 only, whose
  optimizer wants the full gradient), the reduced shard is compressed again (with a second, "server"
  residual) and all-gathered, and every rank decompresses the same bytes, so replicas stay identical. Wire
  bytes: (n-1)/n x the compressed buffer per phase, which is what ztune.cost.comm charges (2(n-1)/n at stage
  0 as for an all-reduce, (n-1)/n at stages 1-3 as for a reduce-scatter). Phase 1 runs asynchronously like
  the uncompressed collective; phase 2 starts when phase 1 is waited for and is waited for at once.

Reductions sum; the engine divides by world size x loss scale once, on the owned slice, at the step.

Order: every rank must issue the same collectives in the same order, whichever parameters received gradients
on it (data-dependent routing such as MoE, a parameter used on one rank only). So groups are launched strictly
in `launch_order`: a group whose gradients are all in waits until every group before it has been launched,
and `finish` launches the rest in order, with zeros for the parameters that got no gradient on this rank.

Several backward calls before one step sum their gradients (torch's meaning). Sharded gradients add each
reduced shard into the accumulator. Unsharded buffers that were already reduced since the step (a second
boundary backward) keep the reduced values only where this rank is their owner (its shard at stage 1,
rank 0 at stage 0) and zero the rest before accumulating, so the next reduction sums each value once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from functools import partial

import torch

from ztune.config.schema import Compression
from ztune.runtime.comm import Comm
from ztune.runtime.comm.compress import Codec, ErrorFeedback
from ztune.runtime.partition import FlatGroup, free_storage_


class CompressedExchange:
    """The two-phase compressed reduction of one flat group (module docstring), with its two residuals."""

    def __init__(self, codec: Codec, *, comm: Comm, padded_numel: int, device: torch.device):
        self.codec = codec
        self.comm = comm
        self.num_pieces = comm.world_size
        self.shard_numel = padded_numel // comm.world_size
        self.piece_bytes = codec.payload_bytes(self.shard_numel)
        self.worker = ErrorFeedback(codec, numel=padded_numel, device=device)
        self.server = ErrorFeedback(codec, numel=self.shard_numel, device=device)

    def start(self, full: torch.Tensor):
        """Phase 1: compress `full` (every rank's whole bucket) shard by shard and launch the all-to-all.
        Returns (work, received buffer) for `reduce`."""
        send = self.worker.compress(full, pieces=self.num_pieces)
        recv = torch.empty_like(send)
        return self.comm.all_to_all(recv, send, async_op=True), recv

    def reduce(self, recv: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's decompressed copy of this rank's shard (fp32 [shard_numel])."""
        b, n = self.piece_bytes, self.shard_numel
        total = self.codec.decode(recv[:b], numel=n)
        for r in range(1, self.num_pieces):
            self.codec.decode_into(recv[r * b:(r + 1) * b], total, mode=1)  # total += decode(piece r)
        return total

    def gather(self, reduced: torch.Tensor, out: torch.Tensor) -> None:
        """Phase 2: compress the reduced shard, all-gather, decompress every rank's shard into `out`."""
        mine = self.server.compress(reduced)
        gathered = torch.empty(self.num_pieces * self.piece_bytes, dtype=torch.uint8, device=mine.device)
        self.comm.all_gather(gathered, mine)
        b, n = self.piece_bytes, self.shard_numel
        for r in range(self.num_pieces):
            self.codec.decode_into(gathered[r * b:(r + 1) * b], out[r * n:(r + 1) * n])

    def residuals(self) -> list[torch.Tensor]:
        return [t for t in (self.worker.residual, self.server.residual) if t is not None]


class GradReducer:
    def __init__(self, groups: Sequence[FlatGroup], *, comm: Comm, shard_states: bool, shard_grads: bool,
                 on_reduced: Callable[[FlatGroup], None] | None = None, max_inflight: int = 2,
                 compression: Compression | str = Compression.NONE, topk_ratio: float = 0.01,
                 launch_order: Sequence[int] | None = None, exchanges: Sequence | None = None):
        """exchanges: one reduction per group with CompressedExchange's interface (start, reduce, residuals)
        to use instead of the collectives and of `compression` (ZeRO++ qgZ, runtime/qgz.py), or None."""
        self.groups = list(groups)
        # Group indices in the order their collectives go out (module docstring: Order); identical on every rank.
        self._order = list(range(len(self.groups))) if launch_order is None else list(launch_order)
        if sorted(self._order) != list(range(len(self.groups))):
            raise ValueError(f"launch_order must be a permutation of the {len(self.groups)} group indices")
        self._next = 0  # position in _order of the next group to launch
        self._reduced = False  # unsharded buffers hold reduced values since the last step
        self.comm = comm
        self.shard_states = shard_states
        self.shard_grads = shard_grads
        self.on_reduced = on_reduced
        self.max_inflight = max_inflight
        self.in_backward = False
        self._active = False
        # True: gradients stay local, nothing is reduced (1-bit Adam's compression stage; stages 0-1 only, whose
        # buffers hold the whole gradient). The engine sets it before each backward.
        self.skip_reduction = False
        self._ready = [0] * len(self.groups)
        self._buckets: list[torch.Tensor | None] = [None] * len(self.groups)
        self._fired: list[bytearray] = [bytearray(len(g.params)) for g in self.groups]
        self._pending: deque = deque()
        method = Compression(compression)
        dtype = self.groups[0].dtype if self.groups else torch.float32
        # bf16 compression of an already-16-bit gradient changes nothing on the wire.
        self._wire_dtype = torch.bfloat16 if method is Compression.BF16 and dtype == torch.float32 else None
        self._exchanges: list[CompressedExchange] | None = None
        if method in (Compression.INT8, Compression.ONEBIT, Compression.TOPK):
            codec = Codec(method, topk_ratio=topk_ratio, value_dtype=dtype)
            self._exchanges = [CompressedExchange(codec, comm=comm, padded_numel=g.layout.padded_numel,
                                                  device=g.grad_owned.device) for g in self.groups]
        if exchanges is not None:
            self._wire_dtype = None
            self._exchanges = list(exchanges)
        self._handles = []
        for gi, g in enumerate(self.groups):
            for pi, p in enumerate(g.params):
                self._handles.append(p.register_post_accumulate_grad_hook(partial(self._on_grad, gi, pi)))

    def begin(self, *, boundary: bool) -> None:
        """Start one backward pass; `boundary`: the last micro-step before an optimizer step."""
        self._active = (self.shard_grads or boundary) and not self.skip_reduction
        self._ready = [0] * len(self.groups)
        self._next = 0
        self._fired = [bytearray(len(g.params)) for g in self.groups]
        if self._reduced:
            self._keep_owned_reduced()
        if not self.shard_grads:
            for g in self.groups:
                if g.grad_fresh:  # first micro-step since the step: autograd hands over fresh gradients
                    for p in g.params:
                        p.grad = None
                else:  # later micro-steps accumulate in place into the buffer
                    for p, view in zip(g.params, g.grad_views, strict=True):
                        p.grad = view
        self.in_backward = True

    def _on_grad(self, gi: int, pi: int, p: torch.nn.Parameter) -> None:
        if not self.in_backward:
            raise RuntimeError("ztune: call engine.backward(loss), not loss.backward(): gradients must be reduced")
        g = self.groups[gi]
        self._fired[gi][pi] = 1
        if self.shard_grads:
            if self._buckets[gi] is None and self._grad_is_bucket(g, p.grad):
                self._buckets[gi] = p.grad.view(-1)  # no copy: the group is this one gradient
            else:
                bucket = self._bucket(gi)
                slot = g.layout.slots[pi]
                bucket[slot.offset:slot.offset + slot.numel].copy_(p.grad.reshape(-1))
            p.grad = None
        else:
            # A fresh gradient (first micro-step), or autograd replaced the view with the accumulated sum:
            # either way p.grad holds the whole value; it moves into the buffer, which .grad then views.
            view = g.grad_views[pi]
            if p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                p.grad = view
            if not self._active:
                return
        self._ready[gi] += 1
        if self._ready[gi] == len(g.params):
            self._launch_ready()

    def _launch_ready(self) -> None:
        """Launch, in launch order, every group whose predecessors are all launched and whose gradients are in."""
        while self._next < len(self._order):
            gi = self._order[self._next]
            if self._ready[gi] < len(self.groups[gi].params):
                return
            self._next += 1
            self._launch(gi)

    def _keep_owned_reduced(self) -> None:
        """Before accumulating into unsharded buffers that already hold a reduction since the step: keep the
        reduced values where this rank owns them (stage 1: its shard; stage 0: rank 0 the whole buffer), zero
        the rest (other ranks' reduced copies, or reduce-scatter scratch), so the next reduction counts the
        earlier backward once."""
        for g in self.groups:
            if self.shard_states:
                lo, hi = g.owned
                g.grad_full[:lo].zero_()
                g.grad_full[hi:].zero_()
            elif self.comm.rank != 0:
                g.grad_full.zero_()
        self._reduced = False

    def _grad_is_bucket(self, g: FlatGroup, grad: torch.Tensor) -> bool:
        """Whether `grad` can be reduce-scattered as the group's bucket itself: the group is this one parameter
        with no padding, in the wire dtype, and the gradient owns its whole storage (autograd's fresh tensor,
        not a view into a buffer something else still reads), so using it as the collective's scratch harms
        nothing. Saves a bucket-sized copy, e.g. for an untied embedding or head unit (runtime/param_gather.py)."""
        return (len(g.params) == 1 and g.layout.numel == g.layout.padded_numel and self._wire_dtype is None
                and self._exchanges is None and grad.dtype == g.dtype and grad.is_contiguous()
                and grad.storage_offset() == 0 and grad.device == g.grad_owned.device
                and grad.untyped_storage().nbytes() == grad.numel() * grad.element_size())

    def _bucket(self, gi: int) -> torch.Tensor:
        """The group's transient flat gradient bucket. Every parameter's slot is overwritten by its hook (or
        zeroed in `finish` if it never fires), so only the padding is zeroed here."""
        if self._buckets[gi] is None:
            g = self.groups[gi]
            bucket = torch.empty(g.layout.padded_numel, dtype=self._wire_dtype or g.dtype, device=g.grad_owned.device)
            bucket[g.layout.numel:].zero_()
            self._buckets[gi] = bucket
        return self._buckets[gi]

    def _launch(self, gi: int) -> None:
        g = self.groups[gi]
        lo, hi = g.owned
        full = g.grad_full if not self.shard_grads else self._bucket(gi)
        if self._exchanges is not None:
            work, recv = self._exchanges[gi].start(full)
            self._pending.append((gi, work, recv))
        elif not self.shard_grads:
            wire = full if self._wire_dtype is None else full.to(self._wire_dtype)
            if self.shard_states:
                out = wire[lo:hi] if self._wire_dtype is None else torch.empty(hi - lo, dtype=wire.dtype,
                                                                               device=wire.device)
                work = self.comm.reduce_scatter(out, wire, async_op=True)
            else:
                out = wire
                work = self.comm.all_reduce(wire, async_op=True)
            self._pending.append((gi, work, None if self._wire_dtype is None else out))
        else:
            exact = g.grad_fresh and self._wire_dtype is None
            out = g.grad_owned if exact else torch.empty_like(g.grad_owned, dtype=full.dtype)
            work = self.comm.reduce_scatter(out, full, async_op=True)
            self._pending.append((gi, work, out))
        if self.on_reduced is not None:
            self.on_reduced(g)
        while len(self._pending) > self.max_inflight:
            self._complete(self._pending.popleft())

    def _complete(self, entry) -> None:
        """Wait for one launched reduction and put its result where the optimizer reads it: `out` is None
        when the collective wrote in place, the received bytes for a compressed exchange, else a buffer
        holding the reduced shard (or, stage 0 with bf16 compression, the whole reduced bucket)."""
        gi, work, out = entry
        work.wait()
        if out is None:
            return
        g = self.groups[gi]
        if self._exchanges is not None:
            out = self._exchanges[gi].reduce(out)
            if not self.shard_states:  # stage 0: every rank needs the whole reduced gradient
                self._exchanges[gi].gather(out, g.grad_full)
                return
        if not self.shard_grads:  # stage 0/1, bf16 wire or compressed: copy back into the gradient buffer
            lo, hi = g.owned
            (g.grad_full if out.numel() == g.grad_full.numel() else g.grad_full[lo:hi]).copy_(out)
            return
        if out is not g.grad_owned:
            if g.grad_fresh:
                g.grad_owned.copy_(out)
            else:
                g.grad_owned.add_(out)
        g.grad_fresh = False
        bucket, self._buckets[gi] = self._buckets[gi], None
        if bucket is not None and bucket._base is None:
            # A bucket of our own (not a gradient used in place, which is a view): free its memory now.
            # Comm keeps the collective's views referenced a while longer (runtime/comm/collectives.py, tensor
            # lifetimes), which would otherwise keep each bucket alive for two more collectives.
            free_storage_(bucket)

    def finish(self) -> None:
        """After backward: reduce groups whose hooks did not all fire (unused parameters count as zero
        gradients, so every rank issues the same collectives), then wait for everything in flight."""
        self.in_backward = False
        if not self.shard_grads:
            for g, fired in zip(self.groups, self._fired, strict=True):
                if g.grad_fresh:  # parameters without a gradient this pass still hold the last step's
                    for pi, p in enumerate(g.params):
                        if not fired[pi]:
                            g.grad_views[pi].zero_()
                            p.grad = g.grad_views[pi]
                    g.grad_fresh = False
        if self._active:
            self._reduced = not self.shard_grads
            for gi in self._order[self._next:]:
                self._next += 1
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
        """Called after an optimizer step. Unsharded gradient buffers are not cleared: the next backward's
        fresh gradients overwrite them (finish() zeroes the slots of parameters that got none), which saves
        a pass over the buffer; their padding is never written, so it stays zero. `.grad` is None meanwhile."""
        self._reduced = False
        for g in self.groups:
            if g.grad_full is not None:
                for p in g.params:
                    p.grad = None
            g.grad_fresh = True

    def live_bucket_tensors(self) -> list[torch.Tensor]:
        """Transient buckets in flight, and the error-feedback residuals compression keeps between steps."""
        residuals = [r for ex in self._exchanges or () for r in ex.residuals()]
        return [b for b in self._buckets if b is not None] + residuals
