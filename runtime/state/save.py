"""engine.save_checkpoint and engine.save_16bit_model: every rank writes its own shard, in parallel.

Order of a save (each rank, then rank 0 alone after a barrier):
  1. rank 0 creates `save_dir/.tmp-<tag>/` (runtime/state/tags.py); barrier
  2. every rank writes rank<r>.safetensors (its fp32 masters and per-element optimizer state, one tensor per
     flat group, plus its RNG states) and rank 0 also module.safetensors (frozen parameters, buffers) and
     objects.pt (client_state, scheduler); each file is fsynced and its sha256 goes into rank<r>.json, written
     last and fsynced
  3. barrier (every rank's part is durable), then rank 0 renames the folder to `<tag>`, replaces `latest`,
     prunes to checkpoint.keep_last
An error on any rank (disk full, an unpicklable client_state) is raised on every rank, so none is left
waiting in a barrier.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

import ztune
from ztune.errors import UserError
from ztune.runtime.state import capture, frozen, tags
from ztune.runtime.state.files import sha256_file, write_bytes_durable, write_checked_json
from ztune.runtime.state.layout import fragments_of


def agree(comm, error: BaseException | None) -> None:
    """Collective: re-raise on every rank the first rank's error (as a UserError with its message), if any."""
    if comm.world_size == 1:
        if error is not None:
            raise error
        return
    messages: list = [None] * comm.world_size
    text = None if error is None else (str(error) if isinstance(error, UserError) else
                                       f"{error.__class__.__name__}: {error}")
    dist.all_gather_object(messages, (comm.rank, text), group=comm.group)
    for rank, msg in messages:
        if msg is not None:
            if error is not None and rank == comm.rank:
                raise error
            raise UserError(f"rank {rank}: {msg}")


def _barrier(comm) -> None:
    if comm.world_size > 1:
        dist.barrier(group=comm.group)


def _names_of(engine) -> list[list[str]]:
    names = capture.canonical_names(engine.module)
    return [[names[id(p)] for p in g.params] for g in engine.groups]


def _rank_tensors(engine) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """This rank's shard tensors (CPU) and its per-group metadata."""
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for i, (g, names) in enumerate(zip(engine.groups, _names_of(engine), strict=True)):
        # Replicated states (stage 0) are written as if sharded: each rank its 1/n slice, in parallel.
        lo, hi = g.layout.shard_range(engine.rank)
        cut = slice(lo - g.owned[0], hi - g.owned[0])
        tensors[f"g{i}.master"] = g.master.detach()[cut].cpu()
        keys = capture.shard_state_keys(engine.optimizer, g.master)
        for key in keys:
            tensors[f"g{i}.{key}"] = engine.optimizer.state[g.master][key].detach()[cut].cpu()
        # Per-rank state (1-bit Adam's error feedback): whole, under a name no fragment reader asks for.
        local = capture.rank_local_state(engine.optimizer, g.master)
        for key, t in local.items():
            tensors[f"g{i}.local.{key}"] = t.detach().cpu()
        frags = fragments_of(g.layout, names, owned=(lo, hi), rank=engine.rank, group=i)
        groups.append({"owned": [lo, hi], "padded_numel": g.layout.padded_numel,
                       "params": [[n, list(s.shape)] for n, s in zip(names, g.layout.slots, strict=True)],
                       "state_keys": keys, "rank_local_keys": list(local),
                       "step": capture.step_count(engine.optimizer, g.master),
                       "fragments": [f.as_json() for f in frags]})
    return tensors, groups


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _write_rank(engine, staging: Path, *, tag: str, objects: bytes | None, exclude_frozen: bool) -> None:
    from ztune.config.io import to_dict

    cfg, rank = engine.config, engine.rank
    files = {}
    shard, groups = _rank_tensors(engine)
    rng_tensors, rng_meta = capture.capture_rng()
    shard.update(rng_tensors)
    files[tags.rank_tensors_name(rank)] = _write_safetensors(staging / tags.rank_tensors_name(rank), shard)
    del shard
    body = {
        "format": tags.FORMAT, "format_version": tags.FORMAT_VERSION, "ztune_version": ztune.__version__,
        "torch_version": torch.__version__, "tag": tag, "rank": rank, "world_size": engine.world_size,
        "stage": engine.plan.stage, "precision": cfg.precision.value, "config": to_dict(cfg),
        "counters": {"global_steps": engine.global_steps, "micro_steps": engine.micro_steps,
                     "skipped_steps": engine.skipped_steps,
                     "global_samples": engine.global_steps * cfg.global_batch_for(engine.world_size)},
        "loss_scaler": engine.scaler.state_dict(),
        "optimizer": {"class": type(engine.optimizer).__name__, "kind": engine.optimizer_kind.value,
                      "hyper": capture.capture_hyper(engine.optimizer)},
        "groups": groups, "rng": rng_meta,
    }
    # Stage 3's frozen groups: gathered one at a time (collective), kept by rank 0 for module.safetensors.
    names = capture.canonical_names(engine.module)
    sharded_frozen = {} if exclude_frozen else frozen.gather_frozen(engine, names=names)
    if rank == 0:
        skip = {id(p) for g in engine.groups for p in g.params} | frozen.frozen_ids(engine)
        untrained = capture.capture_untrained(engine.module, trainable_ids=skip, exclude_frozen=exclude_frozen)
        untrained.update(sharded_frozen)
        files[tags.MODULE_FILE] = _write_safetensors(staging / tags.MODULE_FILE, untrained)
        path = staging / tags.OBJECTS_FILE
        write_bytes_durable(path, objects)
        files[tags.OBJECTS_FILE] = {"bytes": len(objects), "sha256": sha256_file(path)}
        body["module"] = {"state_dict_keys": capture.state_dict_keys(engine.module),
                          "untrained": {n: [str(t.dtype).removeprefix("torch."), list(t.shape)]
                                        for n, t in untrained.items()},
                          "has_lr_scheduler": engine.lr_scheduler is not None}
    body["files"] = files
    write_checked_json(staging / tags.rank_meta_name(rank), body)


def save_checkpoint(engine, save_dir, *, tag=None, client_state=None, save_latest: bool = True,
                    exclude_frozen_parameters: bool = False) -> Path:
    """Collective: write the engine's training state to `save_dir/<tag>` (default tag `global_step<N>`, as
    DeepSpeed names it) and point `save_dir/latest` at it. Returns the tag folder. exclude_frozen_parameters:
    leave parameters with requires_grad=False out (buffers are kept); loading then needs
    load_module_strict=False, as in DeepSpeed.
    Raises UserError (on every rank) for a call between the micro-steps of one accumulation, a bad tag, a
    client_state that cannot be saved safely, or any rank's write failure."""
    if save_dir is None or str(save_dir) == "":
        raise UserError(f"save_checkpoint: save_dir must be a non-empty path, got {save_dir!r}")
    if engine.micro_steps % engine.grad_accum:
        raise UserError(f"save_checkpoint: called after micro-step {engine.micro_steps % engine.grad_accum} of "
                        f"{engine.grad_accum} in a gradient accumulation (partial gradients are not saved); "
                        "save right after the step() that completes the accumulation")
    tag = tags.check_tag(str(tag) if tag is not None else f"global_step{engine.global_steps}")
    save_dir = Path(save_dir)
    comm = engine.comm
    phase, comm.phase = comm.phase, "checkpoint"
    try:
        objects, error = None, None
        if engine.rank == 0:
            try:
                sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
                objects = capture.objects_bytes({"client_state": {} if client_state is None else client_state,
                                                 "lr_scheduler": sched})
                tags.begin(save_dir, tag)
            except (UserError, OSError) as exc:
                error = exc
        agree(comm, error)
        try:
            _write_rank(engine, save_dir / f"{tags.TMP_PREFIX}{tag}", tag=tag, objects=objects,
                        exclude_frozen=exclude_frozen_parameters)
        except OSError as exc:
            error = exc
        agree(comm, error)  # also the barrier: every rank's files are durable past this point
        if engine.rank == 0:
            try:
                tags.commit(save_dir, tag, save_latest=save_latest)
                tags.prune(save_dir, keep_last=engine.config.checkpoint.keep_last, protect=tag)
            except OSError as exc:
                error = exc
        agree(comm, error)
    finally:
        comm.phase = phase
    return save_dir / tag


def save_16bit_model(engine, save_dir, *, save_filename: str = "pytorch_model.bin") -> bool:
    """Collective: rank 0 writes the model's state_dict in the compute dtype (trainable parameters from the
    fp32 masters, rounded) to save_dir/save_filename: torch.save, or safetensors for a `.safetensors` name.
    Returns True (as DeepSpeed's save_16bit_model does when it saved)."""
    state = engine.full_state_dict(rank0_only=True)
    error = None
    if engine.rank == 0:
        try:
            out = {k: (v.to(engine.dtype) if v.is_floating_point() else v).cpu().contiguous()
                   for k, v in state.items()}
            path = Path(save_dir) / save_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".safetensors":
                from safetensors.torch import save_file

                seen: dict[int, str] = {}
                unique = {}
                for k, v in out.items():  # tied tensors: safetensors stores each storage once
                    if v.untyped_storage().data_ptr() not in seen:
                        seen[v.untyped_storage().data_ptr()] = k
                        unique[k] = v
                save_file(unique, str(path), metadata={"format": "pt"})
            else:
                torch.save(out, path)
        except OSError as exc:
            error = exc
    agree(engine.comm, error)
    _barrier(engine.comm)
    return True
