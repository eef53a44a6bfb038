"""`Engine.full_state_dict`: the consolidated state dict, built on rank 0 one flat group (unit) at a time.

Each group's fp32 master (or, for a frozen group, its compute-dtype shard) is all-gathered into a transient
full buffer of that one group; only the ranks that return the result (rank 0 when rank0_only) clone the
values out, so no other rank ever holds more than one unit in full. Collective: every rank must call it.
"""

from __future__ import annotations

import torch

from ztune.runtime.partition import views_of


def _full_of(comm, shard: torch.Tensor, *, padded_numel: int, device: torch.device) -> torch.Tensor:
    """The whole flat buffer whose `shard` this rank holds ([padded_numel], shard's dtype, on `device`)."""
    if shard.numel() == padded_numel:
        return shard
    full = torch.empty(padded_numel, dtype=shard.dtype, device=device)
    # An offloaded shard is in host memory; the collective runs on the training device.
    comm.all_gather(full, shard.to(device))
    return full


def full_state_dict(engine, *, rank0_only: bool = True) -> dict | None:
    """The model's state_dict: trainable parameters as fp32 master values, frozen ones in the compute dtype,
    buffers as they are. None on ranks > 0 when rank0_only."""
    keep = not rank0_only or engine.rank == 0
    values: dict[int, torch.Tensor] = {}
    engine.comm.phase = "checkpoint"
    try:
        for g in engine.groups:
            full = _full_of(engine.comm, g.master, padded_numel=g.layout.padded_numel, device=g.param_full.device)
            if keep:
                for p, v in zip(g.params, views_of(full, g.layout), strict=True):
                    values[id(p)] = v.clone()
            del full
        for g in engine.frozen_groups:
            full = _full_of(engine.comm, g.param_shard, padded_numel=g.layout.padded_numel,
                            device=g.param_full.device)
            if keep:
                for p, v in zip(g.params, views_of(full, g.layout), strict=True):
                    values[id(p)] = v.clone()
            del full
    finally:
        engine.comm.phase = "train"
    if not keep:
        return None
    state = engine.module.state_dict(keep_vars=True)
    return {k: values[id(v)] if id(v) in values else v.detach().clone() for k, v in state.items()}
