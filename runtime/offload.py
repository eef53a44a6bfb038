"""Host offload of model states (ZeRO-Offload, Ren et al. 2021): optimizer shards and stage-3 parameter shards
kept in host memory, with the transfers overlapped against the CPU optimizer group by group.

offload_optimizer (stages 1-3): each flat group's fp32 master and Adam moments live in host memory (pinned when
CUDA is present, so copies are true DMA and can be asynchronous), next to a host gradient buffer. At the
optimizer step, `step` runs a pipeline over the groups:

    side stream D2H:  grad 0 ─ grad 1 ─ grad 2 ─ ...            (all issued at once, one event each)
    CPU:                wait 0, Adam 0 ─ wait 1, Adam 1 ─ ...   (runtime/ops.py fused kernel)
    side stream H2D:                 param 0 ──────── param 1 ─ ...

so group i+1's gradient download and group i-1's parameter upload run while the CPU updates group i. The
kernel writes the rounded 16-bit parameter into a pinned staging buffer (a ring of two, so the upload of one
group never races the kernel writing the next); at fp32 the master itself is uploaded. At stages 2/3 the
device gradient shard is freed once downloaded and re-allocated before the next backward, so between steps
no gradient state stays on the device (ztune/cost/memory.py's accounting).

offload_params (stage 3): a unit's parameter shard lives in host memory; `fetch_shard` uploads it into a
transient device shard right before the unit's all-gather (prefetches upload too), and the CPU optimizer
writes the updated shard straight into it, so nothing is uploaded after the step.

Without CUDA the "device" is the CPU and the same code runs: the D2H/H2D copies are real same-device memcpys
into and out of the host buffers (not skipped, so the bookkeeping and the data flow are what a GPU run does),
streams and events are absent (copies are synchronous) and memory is not pinned.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

from ztune.runtime.partition import FlatGroup, alloc_storage_, free_storage_

# Two staging buffers: the kernel writes one while the other's upload may still be in flight.
_STAGING_SLOTS = 2


def _host_empty(numel: int, *, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype, device="cpu", pin_memory=torch.cuda.is_available())


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    out = _host_empty(t.numel(), dtype=t.dtype)
    out.copy_(t.reshape(-1))
    return out


class HostOffload:
    """Host-side state of the offloaded shards of `groups`, and the step pipeline over them.

    Constructing it moves the states: `g.master` becomes the host fp32 master (offload_optimizer) and
    `g.param_shard` the host parameter shard (offload_params); build the optimizer over `g.master` after."""

    def __init__(self, groups: Sequence[FlatGroup], *, offload_optimizer: bool, offload_params: bool):
        self.groups = list(groups)
        self.offload_optimizer = offload_optimizer
        self.offload_params = offload_params
        self.device = self.groups[0].grad_owned.device
        self.cuda = self.device.type == "cuda"
        self._d2h = torch.cuda.Stream(self.device) if self.cuda else None
        self._h2d = torch.cuda.Stream(self.device) if self.cuda else None
        self.host_params: list[torch.Tensor | None] = [None] * len(self.groups)
        self.host_grads: list[torch.Tensor | None] = [None] * len(self.groups)
        self.staging: list[torch.Tensor] = []
        for i, g in enumerate(self.groups):
            device_master_is_param = g.master is g.param_shard  # fp32: the master aliases the parameter shard
            if offload_params:
                self.host_params[i] = _host_copy(g.param_shard)
            if offload_optimizer:
                if device_master_is_param and offload_params:
                    g.master = self.host_params[i]  # fp32 everywhere on the host: keep the alias
                else:
                    g.master = _host_copy(g.master)
                self.host_grads[i] = _host_empty(g.grad_owned.numel(), dtype=g.grad_owned.dtype)
                if g.grad_full is None:  # sharded grads: nothing stays on the device between steps
                    free_storage_(g.grad_owned)
            if offload_params:
                # Without offload_optimizer an fp32 master that aliased the device shard stays on the device
                # as the master; the step copies it into the host shard (step_shards: shard is not master).
                g.param_shard = self.host_params[i]
        low_precision = self.groups[0].dtype != torch.float32
        if offload_optimizer and not offload_params and low_precision:
            numel = max(g.master.numel() for g in self.groups)
            self.staging = [_host_empty(numel, dtype=self.groups[0].dtype) for _ in range(_STAGING_SLOTS)]

    # -- stage 3 parameter upload ------------------------------------------------------------------------
    def fetch_shard(self, g: FlatGroup) -> torch.Tensor:
        """A device copy of `g`'s host parameter shard, for its all-gather (queued on the current stream, so
        the collective that follows sees it; asynchronous from pinned memory). Keep it alive until the
        all-gather completes."""
        shard = torch.empty(g.param_shard.numel(), dtype=g.param_shard.dtype, device=self.device)
        shard.copy_(g.param_shard, non_blocking=self.cuda)
        return shard

    # -- optimizer step ----------------------------------------------------------------------------------
    def before_backward(self) -> None:
        """Give the device gradient shards (freed after the last step) their memory back."""
        if self.offload_optimizer:
            for g in self.groups:
                if g.grad_full is None:
                    alloc_storage_(g.grad_owned)

    def step(self, optimizer, *, grads: Sequence[torch.Tensor], grad_divisor: float) -> None:
        """Download `grads` (device, compute dtype, summed over ranks), update each host master with
        `optimizer` (ztune.runtime.optim_shard.FusedCpuAdam, `step_param`), and upload the new parameter shard
        (or leave it in host memory when parameters are offloaded). Returns when every upload is done."""
        optimizer.grad_divisor = grad_divisor
        if self.cuda:  # uploads overwrite parameter shards that work queued before the step may still read
            self._h2d.wait_stream(torch.cuda.current_stream(self.device))
        events = self._download(grads)
        slot_done: list[torch.cuda.Event | None] = [None] * len(self.staging)
        for i, g in enumerate(self.groups):
            if events[i] is not None:
                events[i].synchronize()
            out, slot = None, None
            if self.offload_params:
                out = g.param_shard if g.param_shard is not g.master else None
            elif self.staging:
                slot = i % len(self.staging)
                if slot_done[slot] is not None:  # the upload still reading this buffer
                    slot_done[slot].synchronize()
                out = self.staging[slot][:g.master.numel()]
            optimizer.step_param(g.master, grad=self.host_grads[i], out=out)
            if not self.offload_params:
                done = self._upload(g.param_shard, out if out is not None else g.master)
                if slot is not None:
                    slot_done[slot] = done
        if self.cuda:
            self._h2d.synchronize()  # the next step's kernel rewrites the buffers these uploads read
            torch.cuda.current_stream(self.device).wait_stream(self._h2d)
        for g in self.groups:
            if g.grad_full is None:
                free_storage_(g.grad_owned)

    def _download(self, grads: Sequence[torch.Tensor]) -> list[torch.cuda.Event | None]:
        if self.cuda:  # the reductions that produced the grads were queued on the current stream
            self._d2h.wait_stream(torch.cuda.current_stream(self.device))
        events: list[torch.cuda.Event | None] = []
        with torch.cuda.stream(self._d2h) if self.cuda else nullcontext():
            for host, grad in zip(self.host_grads, grads, strict=True):
                host.copy_(grad, non_blocking=self.cuda)
                if self.cuda:
                    grad.record_stream(self._d2h)
                    event = torch.cuda.Event()
                    event.record(self._d2h)
                    events.append(event)
                else:
                    events.append(None)
        return events

    def _upload(self, dst: torch.Tensor, src: torch.Tensor) -> torch.cuda.Event | None:
        if not self.cuda:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self._h2d):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._h2d)
        return event

    # -- reports -----------------------------------------------------------------------------------------
    def host_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Host-resident tensors by category (params, grads, buffers); the optimizer's masters and moments
        are added by the engine, which owns the optimizer."""
        return {
            "params": [t for t in self.host_params if t is not None],
            "grads": [t for t in self.host_grads if t is not None],
            "buffers": list(self.staging),
        }
