"""Stage 3's flat groups built shard-local: no rank ever holds a full fp32 master or the whole model's buffers.

For each unit in turn (the root first, then the units in order) the unit's parameters are made full-size on
this rank, this rank's slice of each of its flat groups is copied out, and the unit is freed again:
- a meta-device model (construct/materialize.py): `MetaInit.materialize(unit)` runs the unit's own init;
- an already materialised model: the group is flattened (one unit, fp32) and broadcast from rank 0, so every
  rank starts from rank 0's values as before, one unit at a time instead of the whole model at once.

Frozen parameters (`requires_grad=False`, or not in `model_parameters`) get their own flat groups per unit
(`FrozenGroup`): a compute-dtype shard, gathered and released with the unit by the ParamGatherer like the
trainable group, and no gradient, master or optimizer state. A frozen group is also released as soon as
backward has produced the gradients of the unit's inputs (the last use of its weights in backward); when no
input of the unit needs a gradient, the engine's release at the end of backward frees it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ztune.runtime.partition import FlatLayout, flatten_to, free_storage_, views_of

Spec = tuple[nn.Module, list[nn.Parameter]]


class FrozenGroup:
    """The frozen parameters of one unit in one flat buffer: `param_full` (storage freed until gathered) and
    this rank's `param_shard` (in shared memory where `zeros` puts it), both in the compute dtype."""

    frozen = True

    def __init__(self, params: Sequence[nn.Parameter], *, layout: FlatLayout, owned: torch.Tensor, rank: int,
                 dtype: torch.dtype, module: nn.Module, zeros: Callable[[int, torch.dtype], torch.Tensor]):
        self.params = list(params)
        self.layout = layout
        self.module = module
        self.dtype = dtype
        lo, hi = layout.shard_range(rank)
        self.owned = (lo, hi)
        self.param_full = torch.empty(layout.padded_numel, dtype=dtype, device=owned.device)
        self.param_shard = zeros(hi - lo, dtype)
        self.param_shard.copy_(owned)
        for p, v in zip(self.params, views_of(self.param_full, layout), strict=True):
            p.data = v
        free_storage_(self.param_full)

    @property
    def gathered(self) -> bool:
        return self.param_full.untyped_storage().size() > 0


def owned_slice(params: Sequence[torch.Tensor], layout: FlatLayout, *, rank: int,
                device: torch.device) -> torch.Tensor:
    """fp32 [shard_numel]: elements [lo, hi) of the group's flat buffer, read from the full `params` (padding
    zero), without building the full buffer."""
    lo, hi = layout.shard_range(rank)
    out = torch.zeros(hi - lo, dtype=torch.float32, device=device)
    for p, slot in zip(params, layout.slots, strict=True):
        a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
        if a < b:
            out[a - lo:b - lo].copy_(p.detach().reshape(-1)[a - slot.offset:b - slot.offset])
    return out


def build_sharded_groups(*, model: nn.Module, trainable: list[Spec], frozen: list[Spec],
                         layouts: list[FlatLayout], frozen_layouts: list[FlatLayout], rank: int,
                         device: torch.device, dtype: torch.dtype, broadcast: Callable[[torch.Tensor], None],
                         meta, make_group: Callable[..., object],
                         zeros: Callable[[int, torch.dtype], torch.Tensor]) -> tuple[list, list[FrozenGroup]]:
    """(trainable groups in `trainable`'s order, frozen groups), built unit by unit.

    make_group(params, layout=..., master_owned=..., module=...) builds one trainable FlatGroup from this
    rank's fp32 shard. meta: a MetaInit for a meta-device model, else None (values broadcast from rank 0)."""
    by_unit: dict[int, list[tuple[bool, int]]] = {}
    order: list[nn.Module] = []
    for kind, specs in ((False, trainable), (True, frozen)):
        for i, (mod, _ps) in enumerate(specs):
            if id(mod) not in by_unit:
                by_unit[id(mod)] = []
                order.append(mod)
            by_unit[id(mod)].append((kind, i))
    groups: list = [None] * len(trainable)
    frozen_groups: list = [None] * len(frozen)
    for mod in order:
        if meta is not None:
            meta.materialize(mod)
        for is_frozen, i in by_unit[id(mod)]:
            _mod, ps = (frozen if is_frozen else trainable)[i]
            layout = (frozen_layouts if is_frozen else layouts)[i]
            if meta is not None:
                owned = owned_slice(ps, layout, rank=rank, device=device)
            else:
                flat = flatten_to([p.data for p in ps], layout, dtype=torch.float32, device=device)
                broadcast(flat)
                lo, hi = layout.shard_range(rank)
                owned = flat[lo:hi].clone()
                del flat
            if is_frozen:
                frozen_groups[i] = FrozenGroup(ps, layout=layout, owned=owned, rank=rank, dtype=dtype, module=mod,
                                               zeros=zeros)
            else:
                groups[i] = make_group(ps, layout=layout, master_owned=owned, module=mod)
        if meta is not None:
            meta.release(mod)
    return groups, frozen_groups


def trim_host_heap() -> bool:
    """Hand the C heap's free pages back to the kernel (glibc's malloc_trim(0), which since glibc 2.8 also
    releases whole free pages in the middle of the heap, not only at its top). Returns False where the C library
    has no malloc_trim (not glibc).

    Why: building the shards unit by unit frees full-size units and fp32 slices between long-lived shards, and
    glibc serves those of up to its dynamic mmap threshold (up to 32 MiB) from the heap, whose holes it keeps.
    Measured on a 330M-parameter Llama at 2 CPU ranks (benchmarks/bench_zero_init.py): one rank ended
    initialisation with 1.2 GiB of freed heap still resident, which then stayed in its RSS for the whole run."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def cast_buffers_(model: nn.Module, *, device: torch.device, dtype: torch.dtype) -> None:
    """Buffers to `device`, floating-point ones to `dtype` (what model.to(device, dtype) does to them),
    without touching the parameters (views of freed flat buffers)."""
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device=device, dtype=dtype if b.is_floating_point() else b.dtype)


def release_frozen_after_input_grads(frozen_groups: Sequence[FrozenGroup], *, gatherer) -> list:
    """Forward pre-hooks that free each frozen group once backward has the unit's input gradients. Returns the
    hook handles."""
    from ztune.runtime.param_gather import _tensors_needing_grad

    handles = []
    for g in frozen_groups:
        def pre_hook(module, args, g=g):
            if gatherer.in_backward or not torch.is_grad_enabled():
                return
            inputs = _tensors_needing_grad(args)
            if inputs:
                torch.autograd.graph.register_multi_grad_hook(inputs, lambda _grads, g=g: gatherer.release(g),
                                                              mode="all")
        handles.append(g.module.register_forward_pre_hook(pre_hook))
    return handles
