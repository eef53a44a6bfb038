"""Stage 3's frozen parameters (runtime/construct/shards.py FrozenGroup) in checkpoints and state dicts.

Their module tensors are views of a `param_full` whose storage is freed between uses, so nothing may read or
write them through the module. Saving gathers each frozen group in full, one group at a time, and rank 0
keeps the values by parameter name (they go into module.safetensors like every other frozen parameter, so
the file is the same at every stage and world size); loading writes each rank's slice of every parameter into
its group's `param_shard`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ztune.runtime.partition import views_of


def frozen_ids(engine) -> set[int]:
    """id() of every parameter held by a stage-3 frozen group (empty below stage 3)."""
    return {id(p) for g in getattr(engine, "frozen_groups", ()) for p in g.params}


def gather_frozen(engine, *, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Collective: {canonical name: CPU tensor in the group's dtype and the parameter's shape} of every frozen
    group's parameters on rank 0 ({} on other ranks). At most one group is held in full at a time."""
    from ztune.runtime.construct.full_state import _full_of

    out: dict[str, torch.Tensor] = {}
    for g in engine.frozen_groups:
        full = _full_of(engine.comm, g.param_shard, padded_numel=g.layout.padded_numel, device=g.param_full.device)
        if engine.rank == 0:
            for p, v in zip(g.params, views_of(full, g.layout), strict=True):
                out.setdefault(names[id(p)], v.detach().to("cpu", copy=True).contiguous())
        del full
    return out


def write_frozen_slices(engine, *, value_of: Callable[[torch.nn.Parameter, int, int], torch.Tensor | None]) -> None:
    """Write into every frozen group's `param_shard` this rank's slice of each parameter: `value_of(p, start,
    end)` returns elements [start, end) of p (flattened), or None to keep the current values. A group that is
    gathered at the moment gets the same values in its `param_full`. No collective."""
    with torch.no_grad():
        for g in engine.frozen_groups:
            lo, hi = g.owned
            for p, slot in zip(g.params, g.layout.slots, strict=True):
                a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
                if a >= b:
                    continue
                value = value_of(p, a - slot.offset, b - slot.offset)
                if value is not None:
                    g.param_shard[a - lo:b - lo].copy_(value.reshape(-1))
            if g.gathered:  # no collective: every rank reads the whole parameter itself
                for p, slot in zip(g.params, g.layout.slots, strict=True):
                    value = value_of(p, 0, slot.numel)
                    if value is not None:
                        g.param_full[slot.offset:slot.offset + slot.numel].copy_(value.reshape(-1))
