"""Builders for the systems that benchmarks/runtime_vs_peers.py times side by side.

Every builder takes a freshly built model (same seed on every rank, fp32 parameters) whose forward is
`model(*batch) -> scalar loss`, and returns a `Trainer` whose `step(batch)` runs forward, backward and the
optimizer step on one micro-batch and returns this rank's local loss. All systems use the same optimizer
(AdamW, `OPTIM`) and no gradient clipping, so their fp32 losses agree step for step
(tests/unit/test_bench_peers_smoke.py checks it).

What each system does in bf16 ("mixed precision" as that system offers it):
- DDP and DDP + ZeroRedundancyOptimizer: `torch.autocast("cpu", bfloat16)` around forward; parameters,
  gradients, the all-reduce and AdamW stay fp32.
- FSDP2: `MixedPrecisionPolicy(param_dtype=bfloat16)`: bf16 all-gathers and compute; with reduce_dtype left
  unset FSDP2 reduce-scatters gradients in bf16 too; fp32 sharded parameters and AdamW.
- DeepSpeed: `bf16.enabled`: bf16 module parameters, gradients and communication; fp32 master weights and
  AdamW states in the ZeRO optimizer.
- ztune: `precision: bf16`: bf16 parameters and gradients, fp32 master weights and AdamW states.

DeepSpeed on a CPU-only machine (0.19.8): the accelerator must be chosen before `import deepspeed`
(`DS_ACCELERATOR=cpu`, else it probes for CUDA); `deepspeed.init_distributed(dist_backend="gloo")` adopts
the process group torch.distributed already has (the CPU accelerator would otherwise ask for oneCCL).
DeepSpeed's own optimizers (FusedAdam, DeepSpeedCPUAdam) need JIT-built C++ ops, so each DeepSpeed engine
gets a client `torch.optim.AdamW`, which ZeRO accepts with `zero_allow_untested_optimizer`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# One optimizer for all: AdamW with ztune's defaults. fused=True is torch's fastest CPU AdamW
# (12.6M params: 15 ms fused, 44 ms for-loop, 58 ms foreach, measured on the bench machine).
OPTIM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
# DeepSpeed's default bucket (5e8 elements) would allocate a 2 GB fp32 staging buffer per rank; use
# ztune's default bucket size (elements) instead, so both stage through buffers of the same size.
DS_BUCKET_NUMEL = 25_000_000


@dataclass(frozen=True)
class System:
    """One configuration to time: `family` picks the builder, `stage` the ZeRO stage it matches."""

    name: str
    family: str  # "ztune" | "ddp" | "zero_redundancy" | "fsdp2" | "deepspeed"
    stage: int
    reshard_after_forward: bool = True  # FSDP2 only


PEERS: tuple[System, ...] = (
    System("DDP", "ddp", 0),
    System("DDP + ZeroRedundancyOptimizer", "zero_redundancy", 1),
    System("DeepSpeed ZeRO-1", "deepspeed", 1),
    System("DeepSpeed ZeRO-2", "deepspeed", 2),
    System("FSDP2 reshard_after_forward=True", "fsdp2", 3, True),
    System("FSDP2 reshard_after_forward=False", "fsdp2", 3, False),
    System("DeepSpeed ZeRO-3", "deepspeed", 3),
)
ZTUNE: tuple[System, ...] = tuple(System(f"ztune stage {s}", "ztune", s) for s in range(4))
# ztune with its collectives on gloo only (ZTUNE_SHM=0, no shared-memory transport): how much of the lead
# over DDP and ZeroRedundancyOptimizer comes from the transport.
ZTUNE_GLOO: tuple[System, ...] = tuple(System(f"ztune stage {s}, gloo only", "ztune-gloo", s) for s in (0, 1))


class Trainer:
    """A built system: `step(batch)` trains on one micro-batch and returns the local loss (float)."""

    def __init__(self, *, system: System, step: Callable[[Sequence[torch.Tensor]], torch.Tensor],
                 owner: Any, memory_report: Callable[[], Any] | None = None,
                 foreign_storages: Callable[[], set[int]] | None = None) -> None:
        self.system = system
        self._step = step
        # Keeps the wrapped model / optimizer / engine alive for as long as the trainer is.
        self.owner = owner
        self.memory_report = memory_report
        # Storages this process can see but another rank owns (ztune's mappings of its peers' shared-memory
        # buffers, runtime/comm/shm.py): left out of this rank's tensor census.
        self.foreign_storages = foreign_storages or set

    def step(self, batch: Sequence[torch.Tensor]) -> float:
        return float(self._step(batch).detach().float())


def ztune_available() -> bool:
    """True once the ztune runtime exposes `initialize` (it is written in parallel with this benchmark)."""
    try:
        import ztune.runtime as runtime
    except ImportError:
        return False
    return hasattr(runtime, "initialize")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 wraps one by one: the children of every nn.ModuleList (the blocks)."""
    return [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, *, bf16: bool):
    def step(batch):
        with _autocast(bf16):
            loss = model(*batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def build_ddp(model: nn.Module, *, system: System, bf16: bool, group=None) -> Trainer:
    from torch.nn.parallel import DistributedDataParallel as DDP

    # gradient_as_bucket_view: grads live in DDP's buckets, saving one copy and one memcpy per bucket.
    ddp = DDP(model, process_group=group, gradient_as_bucket_view=True)
    if system.family == "zero_redundancy":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.AdamW,
                                            process_group=group, fused=True, **OPTIM)
    else:
        optimizer = torch.optim.AdamW(ddp.parameters(), fused=True, **OPTIM)
    return Trainer(system=system, step=_plain_step(ddp, optimizer, bf16=bf16), owner=(ddp, optimizer))


def build_fsdp2(model: nn.Module, *, system: System, bf16: bool, group=None) -> Trainer:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(group),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16 else MixedPrecisionPolicy()
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=system.reshard_after_forward, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=system.reshard_after_forward, mp_policy=mp)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True, **OPTIM)
    return Trainer(system=system, step=_plain_step(model, optimizer, bf16=False), owner=(model, optimizer))


def import_deepspeed():
    """Import DeepSpeed for a CPU-only gloo job (see the module docstring) with its INFO logging off."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    # On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op at init (~30 s with a
    # C++ compiler, an error without one). Only `inference_all_reduce` uses it; training collectives
    # go through torch.distributed (deepspeed/comm/torch.py), so skip the build.
    # (`import deepspeed.comm.torch as m` would bind the torch package, which deepspeed.comm re-exports.)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    return deepspeed


def merge_config(base: dict, extra: dict | None) -> dict:
    """`base` with `extra` merged in, recursively for nested dicts (extra wins); neither is modified."""
    out = dict(base)
    for key, value in (extra or {}).items():
        out[key] = merge_config(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def build_deepspeed(model: nn.Module, *, system: System, bf16: bool, micro_batch: int,
                    group=None, extra_config: dict | None = None) -> Trainer:
    deepspeed = import_deepspeed()
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": system.stage, "reduce_bucket_size": DS_BUCKET_NUMEL,
                              "allgather_bucket_size": DS_BUCKET_NUMEL},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    config = merge_config(config, extra_config)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True, **OPTIM)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def step(batch):
        loss = engine(*batch)
        engine.backward(loss)
        engine.step()
        return loss

    return Trainer(system=system, step=step, owner=engine)


def build_ztune(model: nn.Module, *, system: System, bf16: bool, micro_batch: int, seq_len: int,
                group=None, extra_config: dict | None = None) -> Trainer:
    import ztune

    optim = {"type": "AdamW", "lr": OPTIM["lr"], "betas": list(OPTIM["betas"]), "eps": OPTIM["eps"],
             "weight_decay": OPTIM["weight_decay"]}
    config = {
        "zero": {"stage": system.stage},
        "precision": "bf16" if bf16 else "fp32",
        "batch": {"micro": micro_batch, "grad_accum": 1},
        "seq_len": seq_len,
        "optimizer": optim,
        "gradient_clipping": 0.0,
    }
    config = merge_config(config, extra_config)
    from ztune.runtime.comm.shm import ENV_SWITCH

    saved = os.environ.get(ENV_SWITCH)
    if system.family == "ztune-gloo":
        os.environ[ENV_SWITCH] = "0"
    try:
        engine, _, _, _ = ztune.initialize(model, config=config)
    finally:
        if saved is None:
            os.environ.pop(ENV_SWITCH, None)
        else:
            os.environ[ENV_SWITCH] = saved

    def step(batch):
        loss = engine(*batch)
        engine.backward(loss)
        engine.step()
        return loss

    report = getattr(engine, "memory_report", None)

    def foreign() -> set[int]:
        shm = getattr(engine.comm, "shm", None)
        return {t.untyped_storage().data_ptr() for t in shm.peer_mappings()} if shm is not None else set()

    return Trainer(system=system, step=step, owner=engine, memory_report=report, foreign_storages=foreign)


def build(system: System, model: nn.Module, *, bf16: bool, micro_batch: int, seq_len: int,
          group=None, extra_config: dict | None = None) -> Trainer:
    """Wrap `model` (fp32, already on every rank with the same weights) as `system` trains it.
    `extra_config` is merged into the config of ztune (its `initialize` config) and DeepSpeed (its JSON);
    DDP, ZeroRedundancyOptimizer and FSDP2 take none (ValueError)."""
    if extra_config and system.family not in ("deepspeed", "ztune", "ztune-gloo"):
        raise ValueError(f"{system.name}: extra_config is only for ztune and DeepSpeed, got {extra_config}")
    if system.family in ("ddp", "zero_redundancy"):
        return build_ddp(model, system=system, bf16=bf16, group=group)
    if system.family == "fsdp2":
        return build_fsdp2(model, system=system, bf16=bf16, group=group)
    if system.family == "deepspeed":
        return build_deepspeed(model, system=system, bf16=bf16, micro_batch=micro_batch, group=group,
                               extra_config=extra_config)
    if system.family in ("ztune", "ztune-gloo"):
        return build_ztune(model, system=system, bf16=bf16, micro_batch=micro_batch, seq_len=seq_len,
                           group=group, extra_config=extra_config)
    raise ValueError(f"unknown system family {system.family!r}")
