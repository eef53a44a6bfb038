"""engine.load_checkpoint: each rank reads the parameter ranges its own shards need, from any world size,
stage or offload setting the checkpoint was saved with (runtime/state/layout.py), then refreshes the
compute-dtype parameters from the loaded fp32 masters.

Exact resume: at the same world size and config the loaded masters, optimizer state, step counts, loss
scale, scheduler, RNG streams and counters are bit for bit the saved ones, so training continues with the
losses the uninterrupted run has (tests/dist/test_checkpoint.py).
"""

from __future__ import annotations

import torch

from ztune.errors import UserError
from ztune.runtime.state import capture, frozen
from ztune.runtime.state.files import CheckpointError
from ztune.runtime.state.layout import fragments_of
from ztune.runtime.state.reader import TagReader, resolve
from ztune.runtime.state.save import agree


def _needed_ranks(engine, reader: TagReader, *, strict: bool) -> set[int]:
    """Saved ranks whose shards hold any range this rank's new shards need."""
    from ztune.runtime.state.layout import plan_reads

    ranks: set[int] = set()
    names = capture.canonical_names(engine.module)
    for i, g in enumerate(engine.groups):
        for f in fragments_of(g.layout, [names[id(p)] for p in g.params], owned=g.owned, rank=engine.rank,
                              group=i):
            if not strict and f.name not in reader.index:
                continue
            ranks |= {rd.rank for rd in plan_reads(reader.index, name=f.name, start=f.start, end=f.end,
                                                   dst_offset=0, where=str(reader.path))}
    return ranks


def _check_model(engine, reader: TagReader, *, strict: bool) -> None:
    shapes = reader.param_shapes()
    names = capture.canonical_names(engine.module)
    for g in engine.groups:
        for p in g.params:
            name = names[id(p)]
            if name not in shapes and not strict:
                continue
            if name not in shapes:
                raise CheckpointError(f"checkpoint {reader.path} has no trainable parameter {name!r}: it was "
                                      "saved from a different model (or with other parameters frozen)")
            if tuple(shapes[name]) != tuple(p.shape):
                raise CheckpointError(f"checkpoint {reader.path}: parameter {name!r} has shape {shapes[name]}, the "
                                      f"model's is {tuple(p.shape)}")


def _fill(engine, reader: TagReader, *, key: str, group_index: int, out: torch.Tensor) -> None:
    """(Parameters the checkpoint lacks, which only a non-strict load lets through, keep `out`'s values.)"""
    """Read this rank's owned range of group `group_index`'s `key` state into 1-D CPU `out`."""
    g = engine.groups[group_index]
    names = capture.canonical_names(engine.module)
    for f in fragments_of(g.layout, [names[id(p)] for p in g.params], owned=g.owned, rank=engine.rank,
                          group=group_index):
        if f.name not in reader.index:
            continue
        reader.read_param(f.name, f.start, f.end, key=key, out=out[f.offset:f.offset + (f.end - f.start)])


def _load_into(engine, reader: TagReader, *, key: str, i: int, dst: torch.Tensor) -> None:
    if dst.device.type == "cpu" and dst.is_contiguous():
        _fill(engine, reader, key=key, group_index=i, out=dst)
    else:
        buf = torch.zeros(dst.numel(), dtype=torch.float32)
        _fill(engine, reader, key=key, group_index=i, out=buf)
        dst.copy_(buf)


def _refresh_params(engine) -> None:
    """Compute-dtype parameters from the loaded masters, as the end of an optimizer step leaves them."""
    comm = engine.comm
    if engine._shared_shards:
        comm.shard_barrier()  # no rank still reads a shard this rewrites
    for g in engine.groups:
        if g.param_shard is not g.master:
            g.param_shard.copy_(g.master)
    if engine._shared_shards:
        comm.shard_barrier()
    if engine.plan.gathers_params_after_step:
        for g in engine.groups:
            comm.all_gather(g.param_full, g.param_shard)


def _load_untrained(engine, reader: TagReader, *, strict: bool) -> None:
    saved = reader.meta0["module"]["untrained"]
    names = capture.canonical_names(engine.module)
    skip = {id(p) for g in engine.groups for p in g.params} | frozen.frozen_ids(engine)
    tensors = {names[id(t)]: t for t in engine.module.state_dict(keep_vars=True).values()
               if id(t) in names and id(t) not in skip}
    sharded = {names[id(p)] for g in engine.frozen_groups for p in g.params}
    missing = sorted((set(tensors) | sharded) - set(saved))
    if missing and strict:
        raise CheckpointError(f"checkpoint {reader.path} lacks frozen parameters or buffers {missing[:3]}: it was "
                              "saved from a different model")
    f = reader.module_file()
    with torch.no_grad():
        for name, t in tensors.items():
            if name not in saved:
                continue
            t.data.copy_(f.read(name).reshape(f.shape(name)))

    def value_of(p, start: int, end: int):
        name = names[id(p)]
        return f.read(name, start, end) if name in saved else None

    frozen.write_frozen_slices(engine, value_of=value_of)  # stage 3: each rank's slice into its shards


def load_checkpoint(engine, load_dir, *, tag=None, load_module_strict: bool = True, load_optimizer_states: bool = True,
                    load_lr_scheduler_states: bool = True, load_module_only: bool = False, custom_load_fn=None):
    """Collective: load `load_dir/<tag>` (default: the tag `latest` names) into the engine. Returns
    (tag folder path as str, client_state), or (None, None) when `tag` is None and there is no `latest`
    (nothing saved yet: training starts fresh). load_module_only: only the weights (fp32 masters, frozen
    parameters, buffers); optimizer, scheduler, scaler, counters and RNG stay as they are.
    load_module_strict=False: parameters and buffers the checkpoint lacks keep their values (their optimizer
    state starts at zero) instead of raising. custom_load_fn (DeepSpeed's hook for its own module files) is
    rejected with a UserError: there are no such files here.
    Raises CheckpointError (a UserError naming the file) on every rank for a missing, truncated or corrupted
    file."""
    if custom_load_fn is not None:
        raise UserError("load_checkpoint: custom_load_fn is not supported (ztune checkpoints have no per-module "
                        "files to hand it); load, then adjust the module yourself")
    comm = engine.comm
    error, path = None, None
    try:
        path = resolve(load_dir, tag)
    except UserError as exc:
        error = exc
    agree(comm, error)
    if path is None:
        return None, None
    phase, comm.phase = comm.phase, "checkpoint"
    reader = None
    try:
        try:
            reader = TagReader(path)
            _check_model(engine, reader, strict=load_module_strict)
            needed = _needed_ranks(engine, reader, strict=load_module_strict)
            if reader.world_size == engine.world_size:
                needed.add(engine.rank)  # its RNG states
            reader.verify(checksum_ranks=needed)
            # The kind the optimizer really was (a client optimizer's, runtime/compat/optimizers.py); checkpoints
            # from before it was recorded have only the config's.
            saved_type = reader.meta0["optimizer"].get("kind", reader.meta0["config"]["optimizer"]["type"])
            with_optimizer = load_optimizer_states and not load_module_only
            if with_optimizer and saved_type != engine.optimizer_kind.value:
                raise UserError(f"load_checkpoint: {path} was saved with optimizer {saved_type}, this run uses "
                                f"{engine.optimizer_kind.value}; pass load_optimizer_states=False to load "
                                "the weights only")
            if with_optimizer:  # a param-group count mismatch fails before anything is overwritten
                capture.hyper_groups(reader.meta0["optimizer"]["hyper"], where=str(path),
                                     groups=len(engine.optimizer.param_groups))
            objects = reader.objects()
        except (UserError, OSError) as exc:
            error = exc
        agree(comm, error)
        try:
            _restore(engine, reader, objects=objects, with_optimizer=with_optimizer,
                     with_scheduler=load_lr_scheduler_states and not load_module_only,
                     module_only=load_module_only, strict=load_module_strict)
        except (UserError, OSError) as exc:
            error = exc
        agree(comm, error)
        _refresh_params(engine)
    finally:
        if reader is not None:
            reader.close()
        comm.phase = phase
    return str(path), objects["client_state"]


def _restore(engine, reader: TagReader, *, objects: dict, with_optimizer: bool, with_scheduler: bool,
             module_only: bool, strict: bool) -> None:
    for i, g in enumerate(engine.groups):
        _load_into(engine, reader, key="master", i=i, dst=g.master)
    _load_untrained(engine, reader, strict=strict)
    if with_optimizer:
        keys, step = reader.state_keys(), reader.step()
        states = []
        # Per-rank state (1-bit Adam's error feedback) maps onto the same rank of the same layout only; at
        # another world size it starts again from zero, as DeepSpeed's OnebitAdam always restarts it.
        same_layout = reader.world_size == engine.world_size and reader.stage == engine.plan.stage
        for i, g in enumerate(engine.groups):
            tensors = {}
            for key in keys:
                tensors[key] = torch.zeros_like(g.master)
                _load_into(engine, reader, key=key, i=i, dst=tensors[key])
            saved_groups = reader.metas[engine.rank]["groups"] if same_layout else []
            if i < len(saved_groups):
                f = reader.shard_file(engine.rank)
                for key in saved_groups[i].get("rank_local_keys", []):
                    name = f"g{i}.local.{key}"
                    tensors[key] = f.read(name).reshape(f.shape(name))
            states.append(tensors)
        capture.restore_optimizer(engine.optimizer, masters=[g.master for g in engine.groups], states=states,
                                  steps=[step] * len(engine.groups), hyper=reader.meta0["optimizer"]["hyper"],
                                  where=str(reader.path))
    if with_scheduler and engine.lr_scheduler is not None and objects.get("lr_scheduler") is not None:
        from ztune.runtime.compat.optimizers import SchedulerBridge

        if isinstance(engine.lr_scheduler, SchedulerBridge):  # the client optimizer's lr from the restored one
            engine.lr_scheduler.sync_back()
        engine.lr_scheduler.load_state_dict(objects["lr_scheduler"])
    if module_only:
        return
    counters = reader.counters
    engine.global_steps = int(counters["global_steps"])
    engine.skipped_steps = int(counters["skipped_steps"])
    engine.micro_steps = engine.global_steps * engine.grad_accum
    if reader.meta0["precision"] == engine.config.precision.value:
        engine.scaler.load_state_dict(reader.meta0["loss_scaler"])
    if reader.world_size == engine.world_size:  # per-rank streams only map onto the same ranks
        meta = reader.metas[engine.rank]
        capture.restore_rng(reader.rng_tensors(engine.rank), meta["rng"])
