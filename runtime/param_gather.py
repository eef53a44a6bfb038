"""Stage 3 parameter gathering: all-gather a module unit's flat buffer right before it runs, free it after.

Units are found structurally (the largest nn.ModuleList of same-typed blocks: `model.blocks`,
`transformer.h`, `model.layers`, plus each module outside the blocks that alone holds at least a block's
worth of parameters: an untied token embedding, an untied output head) or given by the user; every parameter
outside them belongs to the root unit (the model itself). A parameter shared by two units also goes to the
root. Splitting the embedding and the head off the root matters for memory: the root is gathered from the
first forward hook to the end of backward, so on a Llama with a 32k vocabulary a root holding both would keep
5 blocks' worth of weights (and, in backward, of gradients) alive through the whole step.

Lifecycle per unit and micro-step:
- forward pre-hook: gather (or wait for the prefetch already in flight), then prefetch the next
  `prefetch_units` units in last iteration's forward order;
- forward post-hook: free the buffer, and hook the unit's outputs (register_multi_grad_hook, mode "any"):
  the first gradient reaching an output fires before any of the unit's backward nodes run, and re-gathers
  the unit (prefetching the units whose backward comes next: reverse order of forward completion), unless
  its backward reads no weight (a plain nn.Embedding);
- after the unit's gradients are all accumulated the reducer launches their reduce-scatter and calls
  `release`, freeing the buffer again.
Freeing resizes the flat buffer's storage to zero instead of swapping `param.data`, so tensors autograd
saved as views of a weight (e.g. `weight.t()`) see the refilled storage in backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from ztune.runtime.comm import Comm
from ztune.runtime.lockstep import BACKWARD, FORWARD, FORWARD_NO_GRAD, Lockstep
from ztune.runtime.partition import FlatGroup, alloc_storage_, free_storage_


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of the largest nn.ModuleList of same-typed modules (by parameter count); [] if none."""
    best: list[nn.Module] = []
    best_numel = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        children = list(module)
        if len({type(c) for c in children}) != 1:
            continue
        numel = sum(p.numel() for p in module.parameters())
        if numel > best_numel:
            best, best_numel = children, numel
    return best


def find_units(model: nn.Module) -> list[nn.Module]:
    """The stage-3 units in module registration order: the blocks (`find_blocks`) and every large leaf outside
    them (module docstring); [] when the model has no blocks.

    A leaf qualifies when its parameters are all its own (none in a child module, none registered in another
    module too: a tied embedding stays in the root), it has a forward of its own (so its hooks run), and it
    holds at least as many parameters as the smallest block."""
    blocks = find_blocks(model)
    if not blocks:
        return []
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    smallest = min(sum(p.numel() for p in b.parameters()) for b in blocks)
    registrations: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                registrations[id(p)] = registrations.get(id(p), 0) + 1
    units = []
    for module in model.modules():
        if id(module) in in_blocks:
            if any(module is b for b in blocks):
                units.append(module)
            continue
        own = [p for p in module._parameters.values() if p is not None]
        if (module is model or not own or type(module).forward is nn.Module.forward
                or len(own) != len(list(module.parameters())) or any(registrations[id(p)] > 1 for p in own)):
            continue
        if sum(p.numel() for p in own) >= smallest:
            units.append(module)
    return units


def assign_params(model: nn.Module, units: Sequence[nn.Module], trainable: Sequence[nn.Parameter]
                  ) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """[(module, params)] per unit with its trainable params, root (the model) first with the rest."""
    owners: dict[int, list[int]] = {}
    for ui, unit in enumerate(units):
        for p in unit.parameters():
            owners.setdefault(id(p), []).append(ui)
    per_unit: list[list[nn.Parameter]] = [[] for _ in units]
    root: list[nn.Parameter] = []
    for p in trainable:
        where = owners.get(id(p), [])
        if len(set(where)) == 1:
            per_unit[where[0]].append(p)
        else:
            root.append(p)
    out = [(model, root)] if root else []
    out += [(u, ps) for u, ps in zip(units, per_unit, strict=True) if ps]
    return out


def _tensors_needing_grad(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.requires_grad else []
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_needing_grad(v)]
    if isinstance(value, dict):  # also transformers' ModelOutput
        return [t for v in value.values() for t in _tensors_needing_grad(v)]
    return []


def _then(first: Callable[[], None] | None, second: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        if first is not None:
            first()
        second()
    return both


class ParamGatherer:
    """fetch_shard(group) -> the shard to all-gather from, when it is not `group.param_shard` on the device
    (offload_params: runtime/offload.py uploads the host shard; kept alive until the all-gather completes)."""

    def __init__(self, groups: Sequence[FlatGroup], *, comm: Comm, prefetch_units: int,
                 fetch_shard: Callable[[FlatGroup], torch.Tensor] | None = None, lockstep: Lockstep | None = None,
                 zeropp=None):
        self.groups = list(groups)
        # runtime/zeropp.py (qwZ, hpZ): the gathers of a training pass (engine forward, backward) only.
        self.zeropp = zeropp
        self._in_forward = False
        self.comm = comm
        self.lockstep = lockstep  # process-group gathers: own group, stamps, bounded wait (runtime/lockstep.py)
        self.prefetch_units = prefetch_units
        self.fetch_shard = fetch_shard
        self.in_backward = False
        # group -> (all-gather work, source shard, stamp handle or None, what to run once it completed or None)
        self._works: dict[int, tuple] = {}
        self._index = {id(g): i for i, g in enumerate(self.groups)}
        # Orders from the previous forward (initially: root, then the units as listed).
        self._fwd_order: list[int] = list(range(len(self.groups)))
        self._bwd_order: list[int] = list(reversed(self._fwd_order))
        self._fwd_seen: list[int] = []
        self._done_seen: list[int] = []
        # Units whose backward reads no weight: a plain nn.Embedding (its gradient needs only the indices and the
        # output's gradient, aten::embedding_backward), so backward does not gather it. A recomputed forward
        # (activation checkpointing) still does.
        self._no_backward_gather = {i for i, g in enumerate(self.groups)
                                    if type(g.module).forward is nn.Embedding.forward}
        self._hooks = []
        for i, g in enumerate(self.groups):
            self._hooks.append(g.module.register_forward_pre_hook(lambda m, a, i=i: self._pre_forward(i)))
            self._hooks.append(g.module.register_forward_hook(lambda m, a, out, i=i: self._post_forward(i, out)))

    # -- gather / release ---------------------------------------------------------------------------------
    def _start(self, i: int) -> None:
        g = self.groups[i]
        if g.gathered or i in self._works:
            return
        alloc_storage_(g.param_full)
        pp = self.zeropp if (self._in_forward or self.in_backward) else None
        if pp is not None and self.in_backward and pp.has_secondary(g):  # hpZ: inside the host group only
            self._works[i] = (pp.gather_secondary(g), None, None, None)
            return
        keep = pp.keep_secondary if pp is not None and not self.in_backward else None
        if pp is None or not pp.quantized_weights:
            if self.fetch_shard is None and self.comm.gather_stable_shards(g.param_full, g.param_shard):
                if keep is not None:
                    keep(g)
                return  # copied from the shared shards (runtime/comm/shm.py); nothing in flight
        shard = g.param_shard if self.fetch_shard is None else self.fetch_shard(g)
        stamp, group = None, None
        if self.lockstep is not None:
            phase = BACKWARD if self.in_backward else FORWARD if torch.is_grad_enabled() else FORWARD_NO_GRAD
            stamp, group = self.lockstep.stamp(i, phase=phase), self.lockstep.group
        finish = None
        if pp is not None and pp.quantized_weights:  # qwZ: int8 blocks on the wire
            work, finish = pp.start_quantized(g, shard=shard, group=group)
        else:
            work = self.comm.all_gather(g.param_full, shard, async_op=True, group=group)
        if keep is not None:
            finish = _then(finish, partial(keep, g))
        self._works[i] = (work, shard, stamp, finish)

    def _wait(self, i: int) -> None:
        work, _shard, stamp, finish = self._works.pop(i, (None, None, None, None))
        if work is None:
            return
        if stamp is None:
            work.wait()
        else:
            self.lockstep.wait(work, stamp)
        if finish is not None:
            finish()

    def gather(self, i: int) -> None:
        self._start(i)
        self._wait(i)

    def release(self, g: FlatGroup) -> None:
        self._wait(self._index[id(g)])  # never free a buffer a collective is still writing
        if g.gathered and not getattr(g, "pinned", False):  # pinned: held by Engine.gathered (construct/)
            free_storage_(g.param_full)

    def release_all(self) -> None:
        for g in self.groups:
            self.release(g)

    def _prefetch(self, order: list[int], after: int) -> None:
        if after not in order:
            return
        pos = order.index(after)
        for j in order[pos + 1:pos + 1 + self.prefetch_units]:
            if not (self.in_backward and j in self._no_backward_gather):
                self._start(j)

    # -- hooks --------------------------------------------------------------------------------------------
    def begin_forward(self) -> None:
        self._fwd_seen, self._done_seen = [], []
        self._in_forward = True
        if self.zeropp is not None:
            self.zeropp.invalidate()

    def end_forward(self) -> None:
        self._in_forward = False
        if self._fwd_seen:
            self._fwd_order = self._fwd_seen
            self._bwd_order = list(reversed(self._done_seen))

    def _pre_forward(self, i: int) -> None:
        if self.in_backward:  # recomputation (activation checkpointing): the grad hook gathered it
            self.gather(i)
            return
        self._fwd_seen.append(i)
        self.gather(i)
        self._prefetch(self._fwd_order, i)

    def _post_forward(self, i: int, output) -> None:
        if self.in_backward:
            return
        self._done_seen.append(i)
        if torch.is_grad_enabled():
            tensors = _tensors_needing_grad(output)
            if tensors:
                torch.autograd.graph.register_multi_grad_hook(tensors, lambda _g, i=i: self._pre_backward(i),
                                                              mode="any")
        self.release(self.groups[i])

    def _pre_backward(self, i: int) -> None:
        if i not in self._no_backward_gather:
            self.gather(i)
        self._prefetch(self._bwd_order, i)
