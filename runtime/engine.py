"""The training engine: builds the flat groups the stage table asks for, runs forward/backward/step.

This is the one orchestrator that reads the TrainConfig; every mechanism below it (partition, grad_reduce,
param_gather, optim_shard, comm, precision) takes plain keyword arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ztune.config.schema import Checkpointing, Offload, OptimizerType, TrainConfig
from ztune.runtime.comm import Comm
from ztune.runtime.grad_reduce import GradReducer
from ztune.runtime.param_gather import ParamGatherer, assign_params, find_units
from ztune.runtime.partition import FlatGroup, build_layout, flatten_to, split_buckets
from ztune.runtime.plan import plan_for
from ztune.runtime.precision import LossScaler, compute_dtype

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing (same constant, for parity).
_CLIP_EPS = 1e-6
# On CPU the squared norm is taken in chunks of this many elements: one vector_norm(dtype=float32) over a whole
# 31M-element bf16 gradient upcasts it into a fresh 124 MB buffer first (71 ms on one EPYC core, measured) and
# sums 31M terms in one float32 accumulator (1.6e-3 relative error against float64); per 1M chunk it took 8 ms
# and erred 3e-5. On CUDA the reduction is a tree already, so the whole tensor goes in one call.
_NORM_CHUNK_NUMEL = 1 << 20


def squared_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of every element of `tensors` (any float dtype, one device), as a float32 tensor of shape
    [1] on that device; on CPU per _NORM_CHUNK_NUMEL chunk (see there)."""
    parts = []
    for t in tensors:
        chunks = t.split(_NORM_CHUNK_NUMEL) if t.device.type == "cpu" else (t,)
        parts += [torch.linalg.vector_norm(c, dtype=torch.float32).square() for c in chunks]
    if not parts:
        return torch.zeros(1, dtype=torch.float32)
    return torch.stack(parts).sum().reshape(1)


def _cast_floats(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _storage_bytes(tensors, seen: set[int]) -> int:
    """Bytes of the distinct storages behind `tensors` not already in `seen` (freed storages count 0)."""
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _frozen_in_place(fetch):
    """fetch_shard for the gatherer when frozen groups join offloaded ones: frozen shards are not offloaded."""
    def fetch_shard(g):
        return g.param_shard if getattr(g, "frozen", False) else fetch(g)
    return fetch_shard


class Engine:
    """`engine(*args)` runs the model, `engine.backward(loss)` and `engine.step()` train it.

    Call backward and step once per micro-batch; step() applies the optimizer at every grad_accum-th call.
    Several backward calls before one step() sum their gradients (as torch's .grad does), at every stage."""

    # Compute the global gradient norm at every applied step, not only when clipping or fp16 needs it
    # (runtime/compat/engine_api.py sets it: DeepSpeed's get_global_grad_norm()).
    want_grad_norm = False

    def __init__(self, model: nn.Module, cfg: TrainConfig, *, comm: Comm, trainable: Sequence[nn.Parameter],
                 units: Sequence[nn.Module] | None = None, fused_cpu_adam: bool = False, optimizer_plan=None,
                 meta_init=None):
        """optimizer_plan: runtime.compat.optimizers.OptimizerPlan (param groups, a client optimizer's kind and
        hyper-parameters); None: the config's optimizer block over `trainable` as one group. meta_init:
        runtime.construct.materialize.MetaInit for a model built on the meta device; None: a built model."""
        self.module = model
        self.config = cfg
        self.comm = comm
        self.plan = plan_for(cfg.zero.stage)
        self.world_size, self.rank = comm.world_size, comm.rank
        self.grad_accum = cfg.grad_accum_for(comm.world_size)
        self.dtype = compute_dtype(cfg.precision)
        self.scaler = LossScaler.for_config(cfg.precision, cfg.loss_scaling)
        self.micro_steps = self.global_steps = self.skipped_steps = 0
        self.last_grad_norm: float | None = None
        self.lr_scheduler = None
        # Set when `ztune autotune` runs this process as a trial (ZTUNE_TRIAL_REPORT); None otherwise.
        from ztune.runtime.trial_report import TrialReporter

        self.trial_reporter = TrialReporter.from_env(rank=comm.rank, world_size=comm.world_size)
        self._zeropp = None  # ZeRO++ qwZ / hpZ gathers, qgZ reductions (runtime/zeropp.py), stage 3 only
        self.node_layout = None  # which ranks share a host (runtime/comm/topology.py), read for ZeRO++ only
        if cfg.zero.quantized_weights or cfg.zero.hpz_partition_size > 1 or cfg.zero.quantized_gradients:
            from ztune.runtime.comm.topology import layout_from_env
            from ztune.runtime.zeropp import check_zeropp

            self.node_layout = layout_from_env(world_size=comm.world_size)
            check_zeropp(cfg, layout=self.node_layout)
        self.offload_activations = cfg.activations.offload is Offload.CPU
        if cfg.activations.checkpointing is not Checkpointing.NONE:
            from ztune.runtime.checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(model, mode=cfg.activations.checkpointing, every=cfg.activations.every)

        comm.phase = "init"
        from ztune.runtime.compat.optimizers import shard_optimizer_args, split_by_param_group

        specs, group_index = split_by_param_group(  # no flat group mixes the user's param groups
            self._group_specs(model, list(trainable), units),
            group_of=optimizer_plan.group_of() if optimizer_plan is not None else None)
        layouts = [build_layout([tuple(p.shape) for p in ps], world_size=self.world_size) for _, ps in specs]
        device = next(iter(trainable)).device
        self.frozen_groups: list = []  # stage 3: frozen parameters' flat groups (runtime/construct/shards.py)
        if self.plan.parameters:  # shard-local: no full fp32 master, one unit full-size at a time
            self._build_sharded(model, specs, layouts, units=units, device=device, meta_init=meta_init)
        else:
            if meta_init is not None:  # stages 0-2 hold full parameters: materialise them in full
                meta_init.materialize_all()
                model.to(device)
            # fp32 originals before the model is cast, made identical on every rank (rank 0's initialisation).
            masters_full = [flatten_to([p.data for p in ps], lay, dtype=torch.float32, device=device)
                            for (_, ps), lay in zip(specs, layouts, strict=True)]
            for m in masters_full:
                comm.broadcast(m)
            flat_ids = {id(p) for _, ps in specs for p in ps}
            for t in [p for p in model.parameters() if id(p) not in flat_ids] + list(model.buffers()):
                comm.broadcast(t.data)
            model.to(self.dtype)
            self.groups = [
                FlatGroup(ps, layout=lay, master_full=mf, rank=self.rank, dtype=self.dtype,
                          shard_states=self.plan.optimizer_states, shard_grads=self.plan.gradients,
                          shard_params=self.plan.parameters, module=mod,
                          zeros=lambda numel, dtype: comm.zeros(numel, dtype=dtype, device=device))
                for (mod, ps), lay, mf in zip(specs, layouts, masters_full, strict=True)
            ]
            del masters_full
        self._offload = None
        if cfg.zero.offload_optimizer is Offload.CPU or cfg.zero.offload_params is Offload.CPU:
            from ztune.runtime.offload import HostOffload

            self._offload = HostOffload(self.groups, offload_optimizer=cfg.zero.offload_optimizer is Offload.CPU,
                                        offload_params=cfg.zero.offload_params is Offload.CPU)
        from ztune.runtime.optim_shard import build_shard_optimizer

        masters = [g.master for g in self.groups]
        self.optimizer_kind = optimizer_plan.kind if optimizer_plan is not None else cfg.optimizer.type  # client's
        optim_args = shard_optimizer_args(cfg, optimizer_plan, masters=masters, group_index=group_index)
        self._onebit = None  # 1-bit Adam (runtime/onebit_adam.py): its own momentum exchange replaces reduction
        if self.optimizer_kind is OptimizerType.ONEBIT_ADAM:
            from ztune.runtime.onebit_adam import build_onebit_adam

            for unused in ("kind", "momentum"):
                optim_args.pop(unused)
            self.optimizer = self._onebit = build_onebit_adam(
                masters, valid_numels=[g.layout.numel for g in self.groups], comm=comm,
                freeze_step=cfg.optimizer.freeze_step, step_bound=cfg.optimizer.step_bound,
                local_momentum=cfg.optimizer.local_momentum, onebit_scale=cfg.optimizer.onebit_scale,
                fused_cpu=fused_cpu_adam,
                **optim_args)
        else:
            self.optimizer = build_shard_optimizer(masters, fused_cpu=fused_cpu_adam, **optim_args)
        # Stage 3 with shared-memory shards: the unit all-gathers read other ranks' shards directly, so no
        # rank may rewrite its shard while another could still read it (barriers around the step), and the
        # first gather must see every rank's initial shard (barrier now).
        # (Not with hierarchical collectives: their gathers cross hosts, runtime/comm/hierarchical.py.)
        self._shared_shards = self.plan.parameters and comm.shm is not None and comm.hierarchy is None and all(
            comm.shm.owns(g.param_shard) for g in self.groups + self.frozen_groups)
        if self._shared_shards:
            comm.shard_barrier()
        self._gatherer = None
        if self.plan.parameters:
            fetch = self._offload.fetch_shard if self._offload is not None and self._offload.offload_params else None
            if fetch is not None and self.frozen_groups:  # frozen shards stay on the device
                fetch = _frozen_in_place(fetch)
            gathered_groups = self.groups + self.frozen_groups
            self._zeropp = self._build_zeropp(gathered_groups)
            lockstep = None
            quantized = self._zeropp is not None and self._zeropp.quantized_weights  # never from shared shards
            if comm.gloo and (fetch is not None or not self._shared_shards or quantized):  # gathers through the group
                from ztune.runtime.lockstep import Lockstep, unit_names

                lockstep = Lockstep.create(rank=self.rank, world_size=self.world_size,
                                           names=unit_names(model, [g.module for g in gathered_groups]))
            self._gatherer = ParamGatherer(gathered_groups, comm=comm, prefetch_units=cfg.zero.prefetch_units,
                                           fetch_shard=fetch, lockstep=lockstep, zeropp=self._zeropp)
            from ztune.runtime.construct.gathered import guard_outside_forward
            from ztune.runtime.construct.shards import release_frozen_after_input_grads

            release_frozen_after_input_grads(self.frozen_groups, gatherer=self._gatherer)
            guard_outside_forward(gathered_groups, model=model)
        self._reducer = GradReducer(self.groups, comm=comm, shard_states=self.plan.optimizer_states,
                                    shard_grads=self.plan.gradients,
                                    on_reduced=self._gatherer.release if self._gatherer else None,
                                    # 1-bit Adam: warm-up all-reduces uncompressed, then nothing (its momentum
                                    # exchange is the optimizer's); compression.method names its wire format
                                    compression=cfg.compression.method if self._onebit is None else "none",
                                    topk_ratio=cfg.compression.topk_ratio,
                                    # stage 3: units in reverse (backward) order, the root (first) last
                                    launch_order=range(len(self.groups))[::-1] if self.plan.parameters else None,
                                    exchanges=self._zeropp.qgz_exchanges(self.groups) if self._zeropp else None)
        comm.phase = "train"

    def _build_zeropp(self, groups):
        """ZeRO++'s qwZ / hpZ state for stage 3's gathers, or None when the config asks for neither."""
        z = self.config.zero
        if not (z.quantized_weights or z.hpz_partition_size > 1 or z.quantized_gradients):
            return None
        from ztune.runtime.lockstep import timeout_from_env
        from ztune.runtime.zeropp import ZeroPlusPlus, build_hpz_comm

        hpz = qgz = None
        if z.hpz_partition_size > 1:
            hpz = build_hpz_comm(layout=self.node_layout, partition_size=z.hpz_partition_size, rank=self.rank,
                                 timeout_s=timeout_from_env())
        if z.quantized_gradients:
            from ztune.runtime.qgz import build_qgz_comms

            qgz = build_qgz_comms(layout=self.node_layout, rank=self.rank, timeout_s=timeout_from_env())
        return ZeroPlusPlus(groups, comm=self.comm, quantized_weights=z.quantized_weights, hpz_comm=hpz,
                            qgz_comms=qgz)

    def _build_sharded(self, model: nn.Module, specs, layouts, *, units, device: torch.device, meta_init) -> None:
        """Stage 3: self.groups and self.frozen_groups built unit by unit (runtime/construct/shards.py)."""
        from ztune.runtime.construct.shards import build_sharded_groups, cast_buffers_

        def zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
            return self.comm.zeros(numel, dtype=dtype, device=device)

        def make_group(ps, *, layout, master_owned, module):
            return FlatGroup(ps, layout=layout, master_full=None, master_owned=master_owned, rank=self.rank,
                             dtype=self.dtype, shard_states=True, shard_grads=True, shard_params=True,
                             module=module, zeros=zeros)

        flat_ids = {id(p) for _, ps in specs for p in ps}
        frozen_specs = assign_params(model, find_units(model) if units is None else list(units),
                                     [p for p in model.parameters() if id(p) not in flat_ids])
        frozen_layouts = [build_layout([tuple(p.shape) for p in ps], world_size=self.world_size)
                          for _, ps in frozen_specs]
        self.groups, self.frozen_groups = build_sharded_groups(
            model=model, trainable=specs, frozen=frozen_specs, layouts=layouts, frozen_layouts=frozen_layouts,
            rank=self.rank, device=device, dtype=self.dtype, broadcast=self.comm.broadcast, meta=meta_init,
            make_group=make_group, zeros=zeros)
        if meta_init is None:  # (a meta model's buffers come from the units' inits, identical on every rank)
            for b in model.buffers():
                self.comm.broadcast(b.data)
        cast_buffers_(model, device=device, dtype=self.dtype)
        if device.type == "cpu":
            from ztune.runtime.construct.shards import trim_host_heap

            trim_host_heap()

    def _group_specs(self, model: nn.Module, trainable: list[nn.Parameter], units
                     ) -> list[tuple[nn.Module | None, list[nn.Parameter]]]:
        if self.plan.parameters:
            return assign_params(model, find_units(model) if units is None else list(units), trainable)
        # Reverse registration order approximates the order backward produces gradients (as in DDP), so
        # the first buckets fill, and go on the wire, while backward is still running.
        ordered = list(reversed(trainable))
        buckets = split_buckets([p.numel() for p in ordered], bucket_numel=self.config.zero.reduce_bucket_numel)
        return [(None, [ordered[i] for i in b]) for b in buckets]

    # -- training -----------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """Forward. Floating-point tensor arguments are cast to the compute dtype."""
        if self.dtype != torch.float32:
            args, kwargs = _cast_floats(args, self.dtype), _cast_floats(kwargs, self.dtype)
        if self._gatherer is not None:
            self._gatherer.begin_forward()
        try:
            if self.offload_activations:
                from ztune.runtime.checkpointing import offload_activations

                with offload_activations(True):
                    out = self.module(*args, **kwargs)
            else:
                out = self.module(*args, **kwargs)
        except RuntimeError as exc:
            if self._gatherer is None or "out of bounds for storage of size 0" not in str(exc):
                raise
            from ztune.runtime.construct.gathered import ParamsNotGatheredError

            raise ParamsNotGatheredError(
                "a ZeRO-3 parameter was read outside the forward of the unit that holds it (e.g. a parent module "
                "using `self.lm_head.weight` directly), so it was not gathered: pass initialize(units=[...]) "
                f"so that the module reading it and the parameter are in one unit ({str(exc).splitlines()[0]})"
            ) from exc
        if self._gatherer is not None:
            self._gatherer.end_forward()
        return out

    forward = __call__

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of `loss` / grad_accum (x the fp16 loss scale), reducing gradients as the stage needs."""
        factor = self.scaler.scale / self.grad_accum
        if self._offload is not None:
            self._offload.before_backward()
        # 1-bit Adam's compression stage: every rank keeps its own gradient (runtime/onebit_adam.py, eq. (4)).
        self._reducer.skip_reduction = self._onebit is not None and self._onebit.compressing
        self._reducer.begin(boundary=self.is_gradient_accumulation_boundary())
        if self._gatherer is not None:
            self._gatherer.in_backward = True
        try:
            (loss * factor if factor != 1.0 else loss).backward()
        finally:
            if self._gatherer is not None:
                self._gatherer.in_backward = False
            self._reducer.in_backward = False
        self._reducer.finish()
        if self._gatherer is not None:
            self._gatherer.release_all()
        self.comm.settle()  # the gradient buckets' last references (runtime/comm/collectives.py: tensor lifetimes)
        if self.trial_reporter is not None:
            self.trial_reporter.note_loss(loss.detach())

    def step(self, lr_kwargs: dict | None = None) -> bool:
        """Count a micro-step; at the accumulation boundary update the parameters. Returns True if an
        optimizer step was applied (False between boundaries or when fp16 overflowed and the step was skipped).
        `lr_kwargs` go to the scheduler's step() after an applied step (DeepSpeed's engine.step(lr_kwargs=...),
        e.g. {"metrics": val_loss} for torch's ReduceLROnPlateau)."""
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return False
        grads = [g.grad_owned for g in self.groups]
        # 1-bit Adam after its warm-up: each rank's own gradient, not reduced (no global norm exists then).
        local = self._onebit is not None and self._onebit.compressing
        # reductions summed the ranks' scaled gradients
        divisor = (1 if local else self.world_size) * self.scaler.scale
        clip = self.config.gradient_clipping
        clip_coef, overflow = 1.0, False
        # skip a non-finite step: fp16's scaler, clipping (needs the norm anyway), DeepSpeed's bf16 check_grad_overflow
        checks = clip > 0 or self.scaler.checks_overflow or self.config.check_grad_overflow
        if checks or (self.want_grad_norm and not local):
            sq = squared_norm(grads)
            # each rank holds a disjoint shard, or (1-bit Adam, fp16) its own gradient: an overflow on any rank
            # must skip the step on all (4 bytes on the wire)
            if self.plan.optimizer_states or local:
                # Only for get_global_grad_norm: counted as monitoring, not training traffic (comm_report).
                monitor_only = not checks
                self.comm.phase = "monitor" if monitor_only else "train"
                self.comm.all_reduce(sq)
                self.comm.phase = "train"
            norm = math.sqrt(sq.item()) / divisor
            overflow = not math.isfinite(norm) and checks  # as without want_grad_norm
            self.last_grad_norm = None if local else norm
            if clip > 0 and not overflow:
                clip_coef = min(1.0, clip / (norm + _CLIP_EPS))
        if overflow:
            self.skipped_steps += 1
        else:
            from ztune.runtime.optim_shard import step_shards

            optimizer = self.optimizer
            if self._onebit is not None and not local:  # 1-bit Adam's warm-up: bitwise this engine's AdamW step
                optimizer = self._onebit.warmup_optimizer()
            if self._shared_shards:
                self.comm.shard_barrier()  # every rank is done reading the shards this step rewrites
            if self._offload is not None and self._offload.offload_optimizer:
                self._offload.step(optimizer, grads=grads, grad_divisor=divisor / clip_coef)
            else:
                step_shards(optimizer, masters=[g.master for g in self.groups], grads=grads,
                            param_shards=[g.param_shard for g in self.groups], grad_divisor=divisor / clip_coef)
            if self._shared_shards:
                self.comm.shard_barrier()  # every shard is updated before any rank gathers from it
            if self.plan.gathers_params_after_step:
                works = [self.comm.all_gather(g.param_full, g.param_shard, async_op=True) for g in self.groups]
                for w in works:
                    w.wait()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step(**(lr_kwargs or {}))
        self.scaler.update(overflow=overflow)
        self._reducer.zero_grads()
        self.global_steps += 1
        if self.trial_reporter is not None:
            self.trial_reporter.record_step(self)
        return not overflow

    def train(self, mode: bool = True) -> Engine:
        self.module.train(mode)
        return self

    def eval(self) -> Engine:
        return self.train(False)

    def gathered(self, modules: nn.Module | Sequence[nn.Module] | None = None, *, modifier_rank: int | None = None):
        """Context: full parameters of `modules` (None: the whole model) outside forward; with modifier_rank,
        that rank's changes are written back to every shard. Collective. (runtime/construct/gathered.py)"""
        from ztune.runtime.construct.gathered import gathered_params

        return gathered_params(self, modules, modifier_rank=modifier_rank)

    # -- reports ------------------------------------------------------------------------------------------
    @property
    def num_flat_params(self) -> int:
        """Trainable parameters in flat buffers, without padding."""
        return sum(g.layout.numel for g in self.groups)

    def comm_report(self) -> dict:
        """Training traffic: per-op calls / payload bytes / sent bytes (ring accounting, comm.py), and the
        bytes this rank sends per optimizer step."""
        report = self.comm.report(steps=self.global_steps)
        if self._zeropp is not None:
            from ztune.runtime.zeropp import zeropp_report

            report["zeropp"] = zeropp_report(self._zeropp, report, layout=self.node_layout, steps=self.global_steps)
        report.update(stage=self.plan.stage, grad_accum=self.grad_accum, num_params=self.num_flat_params,
                      padded_params=sum(g.layout.padded_numel for g in self.groups),
                      dtype_bytes=torch.tensor([], dtype=self.dtype).element_size())
        return report

    def memory_report(self) -> dict:
        """Bytes of tensor storage this rank holds, by category, each storage counted once:
        params: flat parameter buffers (full, or the shard at stage 3 plus any unit gathered right now) and
        frozen parameters; grads: gradient buffers or shard accumulators, plus reduce buckets in flight;
        optimizer: fp32 masters that do not alias the parameters, and optimizer state (moments, step);
        buffers: the model's registered buffers (masks, rotary tables, norm statistics), replicated;
        secondary_params: ZeRO++ hpZ's secondary shards (runtime/zeropp.py; 0 without hpZ).
        These are device bytes; host_params / host_grads / host_optimizer / host_buffers (upload staging) /
        host_total are what offload keeps in host memory (runtime/offload.py), counted first."""
        seen: set[int] = set()
        host = {"params": 0, "grads": 0, "optimizer": 0, "buffers": 0}
        if self._offload is not None:
            from ztune.runtime.optim_shard import optimizer_state_tensors

            tensors = self._offload.host_tensors()
            host["params"] = _storage_bytes(tensors["params"], seen)
            host["grads"] = _storage_bytes(tensors["grads"], seen)
            if self._offload.offload_optimizer:
                host["optimizer"] = _storage_bytes([g.master for g in self.groups]
                                                   + optimizer_state_tensors(self.optimizer), seen)
            host["buffers"] = _storage_bytes(tensors["buffers"], seen)
        flat_ids = {id(p) for g in self.groups for p in g.params}
        params = _storage_bytes([t for g in self.groups + self.frozen_groups for t in (g.param_full, g.param_shard)]
                                + [p for p in self.module.parameters() if id(p) not in flat_ids], seen)
        grads = _storage_bytes([g.grad_full if g.grad_full is not None else g.grad_owned for g in self.groups]
                               + self._reducer.live_bucket_tensors(), seen)
        from ztune.runtime.optim_shard import optimizer_state_tensors

        optimizer = _storage_bytes([g.master for g in self.groups] + optimizer_state_tensors(self.optimizer), seen)
        buffers = _storage_bytes(list(self.module.buffers()), seen)
        secondary = _storage_bytes(self._zeropp.secondary_tensors(), seen) if self._zeropp is not None else 0
        return {"params": params, "grads": grads, "optimizer": optimizer, "buffers": buffers,
                "secondary_params": secondary, "total": params + grads + optimizer + buffers + secondary,
                **{f"host_{k}": v for k, v in host.items()}, "host_total": sum(host.values())}

    def full_state_dict(self, *, rank0_only: bool = True) -> dict | None:
        """The model's state_dict with trainable parameters as full fp32 master values (gathered from the
        shards one unit at a time, kept only where returned). Collective: every rank must call it. Returns None
        on ranks > 0 when rank0_only. (runtime/construct/full_state.py)"""
        from ztune.runtime.construct.full_state import full_state_dict

        return full_state_dict(self, rank0_only=rank0_only)

    # -- checkpoints (saved training state; runtime/state/, docs/checkpoints.md) ---------------------------
    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False) -> bool:
        """Collective: every rank writes its shard of the training state to save_dir/<tag> (default
        `global_step<N>`) and `latest` names it once all are complete. Returns True (as DeepSpeed does)."""
        from ztune.runtime.state import save_checkpoint

        save_checkpoint(self, save_dir, tag=tag, client_state=client_state, save_latest=save_latest,
                        exclude_frozen_parameters=exclude_frozen_parameters)
        return True

    def load_checkpoint(self, load_dir, tag=None, load_module_strict: bool = True, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False, custom_load_fn=None):
        """Collective: load save_dir/<tag> (default: `latest`), at any world size or stage. Returns
        (path, client_state), or (None, None) when nothing was saved yet. Arguments in DeepSpeed's order."""
        from ztune.runtime.state import load_checkpoint

        return load_checkpoint(self, load_dir, tag=tag, load_module_strict=load_module_strict,
                               load_optimizer_states=load_optimizer_states,
                               load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                               custom_load_fn=custom_load_fn)

    def save_16bit_model(self, save_dir, save_filename: str = "pytorch_model.bin") -> bool:
        """Collective: rank 0 writes the compute-dtype state_dict to save_dir/save_filename."""
        from ztune.runtime.state import save_16bit_model

        return save_16bit_model(self, save_dir, save_filename=save_filename)
