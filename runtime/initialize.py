"""`ztune.initialize`: config, process group, validation, engine, dataloader, scheduler.

Side effects live here (STYLE.md 6): the process group is created from torchrun's environment when the
script has not created one, and handed down to the engine inside a Comm object.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ztune.config import CONFIG_ENV, load, resolve_batch
from ztune.config.schema import Offload, OptimizerType, Precision, TrainConfig
from ztune.errors import ConfigError
from ztune.runtime.comm import Comm
from ztune.runtime.shm import SharedMemoryTransport


def _load_config(config) -> TrainConfig:
    if config is None:
        config = os.environ.get(CONFIG_ENV) or None
    return load(config)


def _process_group() -> tuple[Comm, torch.device]:
    """The Comm over the default group, initialising it from torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) when needed; a world of one without any env."""
    use_cuda = torch.cuda.is_available()
    if use_cuda:  # before the group exists: NCCL binds each rank to the current device
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        return Comm(group=None, rank=0, world_size=1), device
    if use_cuda and dist.get_backend() != "nccl":
        device = torch.device("cpu")  # a gloo group on a GPU machine: keep the run on the CPU
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shm = None
    if device.type == "cpu":  # CPU ranks on one host move buffers through shared memory (runtime/shm.py)
        shm = SharedMemoryTransport.connect(group=dist.group.WORLD, rank=rank, world_size=world_size)
    return Comm(group=dist.group.WORLD, rank=rank, world_size=world_size, shm=shm), device


def _trainable(model: nn.Module, model_parameters) -> list[nn.Parameter]:
    params = list(model.parameters())
    if not params:
        raise ConfigError(f"{type(model).__name__} has no parameters: there is nothing for ZeRO to shard or train")
    if model_parameters is None:
        chosen = [p for p in params if p.requires_grad]
    else:
        chosen = list(model_parameters)
        if any(isinstance(p, dict) for p in chosen):
            raise ConfigError("model_parameters: parameter groups (dicts) are not supported; pass an iterable "
                              "of parameters and set per-run hyperparameters in the config's optimizer block")
        known = {id(p) for p in params}
        if any(id(p) not in known for p in chosen):
            raise ConfigError("model_parameters: every tensor must be a parameter of the model passed to initialize")
        chosen = [p for p in params if id(p) in {id(q) for q in chosen} and p.requires_grad]
    if not chosen:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters (all have requires_grad=False); "
                          "unfreeze some or pass them in model_parameters")
    return chosen


def _validate(cfg: TrainConfig, *, model: nn.Module, world_size: int, device: torch.device, units) -> None:
    resolve_batch(cfg.batch, world_size)  # ConfigError when the global batch does not split over the ranks
    if cfg.precision is not Precision.FP32:
        from ztune.runtime.precision import compute_dtype, dtype_supported

        if not dtype_supported(compute_dtype(cfg.precision), device=device):
            raise ConfigError(f"precision: {cfg.precision.value} is not supported on {device} by this torch "
                              "build (a test matmul failed); use precision: fp32 or bf16")
    if units is not None:
        members = {id(m) for m in model.modules()}
        seen: set[int] = set()
        for u in units:
            if not isinstance(u, nn.Module) or id(u) not in members or u is model:
                raise ConfigError("units: every unit must be a submodule of the model (not the model itself)")
            inner = {id(m) for m in u.modules()}
            if inner & seen:
                raise ConfigError("units: units must not overlap (one unit is inside another, or listed twice)")
            seen |= inner


def _use_fused_cpu_adam(cfg: TrainConfig, *, device: torch.device) -> bool:
    """Whether the fused C++ Adam kernel (runtime/ops.py) steps the fp32 masters: Adam/AdamW whose masters live
    in host memory, i.e. offloaded (any device; the kernel's torch fallback runs if it cannot be built) or a CPU
    run (only when the kernel is built: otherwise torch's fused AdamW is faster than the fallback)."""
    if cfg.optimizer.type is OptimizerType.SGD:
        return False
    if cfg.zero.offload_optimizer is Offload.CPU:
        return True
    if device.type != "cpu":
        return False
    from ztune.runtime.ops import CppAdamFallbackWarning, kernel_backend

    with warnings.catch_warnings():
        # The warning says "using the slower pure-torch step", which is not what happens here: torch's fused
        # AdamW runs instead. (The backend is cached per process, so a later offloaded engine in this process
        # uses the fallback without repeating it.)
        warnings.simplefilter("ignore", CppAdamFallbackWarning)
        return kernel_backend() == "cpp"


def initialize(model: nn.Module, config=None, model_parameters: Iterable | None = None,
               training_data: torch.utils.data.Dataset | None = None,
               lr_scheduler: Callable | object | None = None, *, units: Sequence[nn.Module] | None = None,
               weights: str | os.PathLike | None = None, init_fn: Callable[[nn.Module], None] | None = None,
               seed: int = 0):
    """Wrap `model` for sharded data-parallel training. Returns (engine, optimizer, dataloader, scheduler).

    config: a dict (ztune or DeepSpeed keys), a YAML/JSON path, a TrainConfig, or None (the file named by
    $ZTUNE_CONFIG, else defaults). model_parameters: the parameters to train (default: all that require
    grad). training_data: a Dataset; the dataloader then yields this rank's micro-batches
    (DistributedSampler). lr_scheduler: a scheduler object, or a callable(optimizer) returning one; stepped
    after every applied optimizer step. units (stage 3): the modules to gather one at a time (default: the
    largest ModuleList of identical blocks).

    A model whose parameters are on the meta device (`with ztune.zero_init(): model = Model(cfg)`) is
    materialised unit by unit, each rank keeping only its shards at stage 3 (runtime/construct/materialize.py):
    init_fn(module) initialises every module (default: transformers' model._init_weights, else the module's
    reset_parameters), with the generator seeded per module name from `seed`, so the initial model does not
    depend on the world size or stage. weights: a safetensors file or a Hugging Face model directory to load
    the parameters from, each rank reading only its shards' slices (runtime/construct/pretrained.py).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"initialize: model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = _load_config(config)
    trainable = _trainable(model, model_parameters)
    comm, device = _process_group()
    _validate(cfg, model=model, world_size=comm.world_size, device=device, units=units)
    from ztune.runtime.construct.materialize import has_meta_tensors

    meta_init = None
    if has_meta_tensors(model):
        from ztune.runtime.construct.materialize import MetaInit
        from ztune.runtime.param_gather import find_units

        meta_init = MetaInit(model, units=find_units(model) if units is None else list(units), device=device,
                             seed=seed, init_fn=init_fn)
        trainable = meta_init.remap(trainable)
    else:
        model.to(device)
    fused = _use_fused_cpu_adam(cfg, device=device)
    from ztune.runtime.engine import Engine

    engine = Engine(model, cfg, comm=comm, trainable=trainable, units=units, fused_cpu_adam=fused,
                    meta_init=meta_init)
    if weights is not None:
        from ztune.runtime.construct.pretrained import load_pretrained

        load_pretrained(engine, weights)
    scheduler = None
    if lr_scheduler is not None:
        is_scheduler = hasattr(lr_scheduler, "step") and not isinstance(lr_scheduler, type)
        scheduler = lr_scheduler if is_scheduler else lr_scheduler(engine.optimizer)
        engine.lr_scheduler = scheduler
    dataloader = None
    if training_data is not None:
        from torch.utils.data import DataLoader, DistributedSampler

        sampler = DistributedSampler(training_data, num_replicas=comm.world_size, rank=comm.rank)
        dataloader = DataLoader(training_data, batch_size=cfg.batch.micro, sampler=sampler)
    return engine, engine.optimizer, dataloader, scheduler
