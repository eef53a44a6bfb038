"""Shard-wise loading of pretrained weights from safetensors: `ztune.initialize(model, config, weights=path)` or
`ztune.load_pretrained(engine, path)`.

path: a `.safetensors` file, or a Hugging Face model directory holding `model.safetensors` or the sharded
`model-0000k-of-0000n.safetensors` files with `model.safetensors.index.json` (what `save_pretrained` writes).
Checkpoint names are matched against the module's state dict (`model.state_dict()` names, tied parameters
under each of their names: the checkpoint needs one of them, as `save_pretrained` keeps one), persistent
buffers included. Missing or unexpected names, or a shape mismatch, raise one PretrainedLoadError listing them
before anything is written.

At stage 3 each rank reads only the rows of each tensor that overlap its shards (safetensors' `get_slice`
reads a row range of a tensor without the rest), so no rank reads or holds the whole model; stages 0-2 hold
full parameters and read whole tensors. Values are cast from the checkpoint's dtype to fp32 for the masters and
to the compute dtype for the parameters. The optimizer state is left as it is: load before training (the
intended use), or expect moments that belong to the old weights. Collective: every rank must call it.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack

import torch

from ztune.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LISTED = 12  # names shown per category in the error


class PretrainedLoadError(UserError):
    """A checkpoint that does not match the model (names, shapes) or cannot be found."""


def checkpoint_files(path: str | os.PathLike) -> dict[str, str]:
    """{tensor name: file} of the checkpoint at `path` (see the module docstring)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: path for k in f.keys()}  # noqa: SIM118 -- safe_open has keys(), not iteration
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise PretrainedLoadError(f"{index}: no 'weight_map' object; re-save the model with save_pretrained")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return checkpoint_files(single)
    raise PretrainedLoadError(f"weights={path}: expected a .safetensors file or a directory with {SINGLE_FILE} or "
                              f"{INDEX_FILE} (save the model with save_pretrained(..., safe_serialization=True))")


def _listing(names: list[str]) -> str:
    more = f" ... and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def match_names(state: dict[str, torch.Tensor], available: set[str]) -> dict[int, str]:
    """{id(tensor): checkpoint name} for every tensor of `state` (a state_dict with keep_vars=True); raises
    PretrainedLoadError listing the missing and unexpected names."""
    chosen: dict[int, str] = {}
    names_of: dict[int, list[str]] = {}
    for name, t in state.items():
        names_of.setdefault(id(t), []).append(name)
    missing = []
    for tid, names in names_of.items():
        found = [n for n in names if n in available]
        if found:
            chosen[tid] = found[0]
        else:
            missing.append(" / ".join(names))
    unexpected = sorted(available - set(state))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
        raise PretrainedLoadError(f"checkpoint does not match the model ({'; '.join(parts)}); load a checkpoint "
                                  "of this architecture and config")
    return chosen


def _read_range(handle, name: str, *, start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of tensor `name` in row-major order, reading only the rows that hold them."""
    sl = handle.get_slice(name)
    shape = sl.get_shape()
    if len(shape) == 0:
        return handle.get_tensor(name).reshape(-1)[start:end]
    row = math.prod(shape[1:])
    r0, r1 = start // row, -(-end // row)
    return sl[r0:r1].reshape(-1)[start - r0 * row:end - r0 * row]


def load_pretrained(engine, path: str | os.PathLike) -> None:
    """Load the checkpoint at `path` into `engine`'s parameters, masters and buffers (module docstring)."""
    from safetensors import safe_open

    files = checkpoint_files(path)
    state = engine.module.state_dict(keep_vars=True)
    chosen = match_names(state, set(files))
    sharded = engine.plan.parameters
    with ExitStack() as stack:
        handles: dict[str, object] = {}

        def handle(name: str):
            f = files[name]
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(f, framework="pt"))
            return handles[f]

        wrong = []
        for key, t in state.items():
            if id(t) in chosen and chosen[id(t)] == key:
                shape = tuple(handle(key).get_slice(key).get_shape())
                if shape != tuple(t.shape):
                    wrong.append(f"{key} {list(shape)} vs model {list(t.shape)}")
        if wrong:
            raise PretrainedLoadError(f"checkpoint shapes differ from the model: {_listing(wrong)}")
        if engine._shared_shards:
            engine.comm.shard_barrier()  # nobody still reads the shards about to change
        done: set[int] = set()
        with torch.no_grad():
            for g in engine.groups + engine.frozen_groups:
                _load_group(g, chosen=chosen, handle=handle, sharded=sharded)
                done.update(id(p) for p in g.params)
            for t in state.values():  # frozen parameters at stages 0-2, persistent buffers: whole
                if id(t) not in done:
                    name = chosen[id(t)]
                    t.data.copy_(handle(name).get_tensor(name))
                    done.add(id(t))
        if engine._shared_shards:
            engine.comm.shard_barrier()


def _load_group(g, *, chosen: dict[int, str], handle, sharded: bool) -> None:
    """One flat group: at stage 3 this rank's shard (and fp32 master) from row slices; else the full
    parameters, and the master's owned range where it is not the parameters themselves."""
    lo, hi = g.owned
    master = getattr(g, "master", None)
    for p, slot in zip(g.params, g.layout.slots, strict=True):
        name = chosen[id(p)]
        if sharded:
            a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
            if a >= b:
                continue
            values = _read_range(handle(name), name, start=a - slot.offset, end=b - slot.offset)
            g.param_shard[a - lo:b - lo].copy_(values)
            if master is not None and master.data_ptr() != g.param_shard.data_ptr():
                master[a - lo:b - lo].copy_(values)
            continue
        values = handle(name).get_tensor(name)
        p.data.copy_(values)
        a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
        if master is not None and a < b and not _aliases(master, g.param_full):
            master[a - lo:b - lo].copy_(values.reshape(-1)[a - slot.offset:b - slot.offset])


def _aliases(t: torch.Tensor, full: torch.Tensor) -> bool:
    """Whether `t` is a view into `full`'s storage (an fp32 master that *is* the parameters)."""
    return t.device == full.device and t.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
