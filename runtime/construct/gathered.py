"""Full parameters outside the engine's forward: `with engine.gathered(modules, modifier_rank=None): ...`.

At stage 3 a module's parameters are views of a flat buffer whose storage is freed between uses; the engine's
hooks gather a unit around its forward and backward. Code that calls a submodule directly (evaluation,
`model.generate`, `get_input_embeddings()(ids)`, weight surgery) asks for them with the context: every flat
group holding a parameter of `modules` (all groups when None) is gathered on entry and pinned (the engine's
own hooks do not free it) until exit. Collective: every rank enters and leaves it together.

modifier_rank=r: changes made inside the context on rank r are written back on exit: rank r's full values are
broadcast, each rank copies its slice into its parameter shard, and the fp32 master takes the elements that
changed (elements left alone keep their full-precision master). Other ranks' changes are overwritten.
Without a modifier rank the parameters are read-only in spirit: changes are discarded at stage 3.

Outside forward and outside the context, a module that owns sharded parameters raises `ParamsNotGatheredError`
naming the context (instead of torch's "setStorage ... out of bounds for storage of size 0").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ztune.errors import UserError
from ztune.runtime.partition import free_storage_


class ParamsNotGatheredError(UserError):
    """A stage-3 module was called outside the engine's forward without its parameters gathered."""


def guard_outside_forward(groups: Sequence, *, model: nn.Module) -> list:
    """Forward pre-hooks on every module owning a parameter of `groups` that raise ParamsNotGatheredError when
    that parameter's group is not gathered. Returns the hook handles."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    owner_group = {id(p): g for g in groups for p in g.params}
    handles = []
    for module in model.modules():
        mine = [owner_group[id(p)] for p in module._parameters.values() if p is not None and id(p) in owner_group]
        if not mine:
            continue

        def check(mod, args, mine=mine, name=names.get(id(module), "") or type(module).__name__):
            if not all(g.gathered for g in mine):
                raise ParamsNotGatheredError(
                    f"{name}: its ZeRO-3 parameters are sharded and not gathered here (called outside the "
                    "engine's forward); wrap the call in `with engine.gathered(module):` (or engine.gathered() "
                    "for the whole model)")
        handles.append(module.register_forward_pre_hook(check))
    return handles


def _groups_of(groups: Sequence, modules) -> list:
    if modules is None:
        return list(groups)
    if isinstance(modules, nn.Module):
        modules = [modules]
    wanted = {id(p) for m in modules for p in m.parameters()}
    return [g for g in groups if any(id(p) in wanted for p in g.params)]


def _write_back(g, *, before: torch.Tensor, comm, src: int) -> None:
    """Rank `src`'s full values of group `g` into every rank's shard and master (see the module docstring)."""
    comm.broadcast(g.param_full, src=src)
    lo, hi = g.owned
    new = g.param_full[lo:hi]
    if g.param_shard.data_ptr() != new.data_ptr():
        g.param_shard.copy_(new)
    master = getattr(g, "master", None)
    if master is not None and master.data_ptr() not in (new.data_ptr(), g.param_shard.data_ptr()):
        changed = new != before
        master[changed] = new[changed].to(master.dtype)


@contextmanager
def gathered_params(engine, modules: nn.Module | Sequence[nn.Module] | None = None, *,
                    modifier_rank: int | None = None) -> Iterator[None]:
    """The context behind `Engine.gathered` (see the module docstring)."""
    if modifier_rank is not None and not 0 <= modifier_rank < engine.world_size:
        raise UserError(f"gathered: modifier_rank={modifier_rank} is not a rank of this world of "
                        f"{engine.world_size}; pass 0..{engine.world_size - 1} or None")
    gatherer = engine._gatherer
    chosen = _groups_of(engine.groups + engine.frozen_groups, modules)
    gathered_here = []
    if gatherer is not None:
        for g in chosen:
            if getattr(g, "pinned", False):
                continue  # an enclosing context holds it
            gatherer.gather(gatherer.groups.index(g))
            g.pinned = True
            gathered_here.append(g)
    befores = None
    if modifier_rank is not None:
        befores = [g.param_full[g.owned[0]:g.owned[1]].clone() for g in chosen]
    try:
        yield
    finally:
        if modifier_rank is not None:
            if engine._shared_shards:
                engine.comm.shard_barrier()  # nobody still reads the shards about to change
            for g, before in zip(chosen, befores, strict=True):
                _write_back(g, before=before, comm=engine.comm, src=modifier_rank)
            if engine._shared_shards:
                engine.comm.shard_barrier()
        for g in gathered_here:
            g.pinned = False
            free_storage_(g.param_full)
