"""`ztune.initialize`: config, process group, validation, engine, dataloader, scheduler.

Side effects live here (STYLE.md 6): the process group is created from torchrun's environment when the
script has not created one, and handed down to the engine inside a Comm object.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ztune.config import CONFIG_ENV, LoadedConfig, load_detailed, resolve_batch
from ztune.config.deepspeed_auto import context_from_model
from ztune.config.schema import Offload, OptimizerType, Precision, TrainConfig
from ztune.errors import ConfigError
from ztune.runtime.comm import Comm
from ztune.runtime.comm.groups import unpin_default_group
from ztune.runtime.comm.hierarchical import TwoLevel, wants_hierarchy
from ztune.runtime.comm.shm import SharedMemoryTransport
from ztune.runtime.comm.topology import NodeLayout, layout_from_env

DEFAULT_PORT = 29500  # DeepSpeed's TORCH_DISTRIBUTED_DEFAULT_PORT (deepspeed/constants.py)


def _load_config(config, *, model: nn.Module) -> LoadedConfig:
    if config is None:
        config = os.environ.get(CONFIG_ENV) or None
    return load_detailed(config, context=context_from_model(model))


def init_distributed(dist_backend: str | None = None, auto_mpi_discovery: bool = True,
                     distributed_port: int = DEFAULT_PORT, verbose: bool = True, timeout=None,
                     init_method: str | None = None, dist_init_required: bool | None = None,
                     rank: int = -1, world_size: int = -1) -> None:
    """Create the default process group the way `deepspeed.init_distributed` does for torchrun jobs.

    Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (torchrun's environment; MASTER_PORT defaults to
    `distributed_port`, MASTER_ADDR to 127.0.0.1); `rank`/`world_size` >= 0 override the environment. Backend:
    `dist_backend`, else nccl with CUDA and gloo without. Does nothing when a group exists. dist_init_required
    False: create nothing, and fail when there is no group but several ranks. Without any environment the
    script is a world of one and no group is created (ztune needs none). `auto_mpi_discovery` and `verbose`
    are accepted for DeepSpeed's signature; ztune reads torchrun's variables only and prints nothing.
    """
    del auto_mpi_discovery, verbose
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    world = world_size if world_size >= 0 else env_world
    if dist.is_initialized():
        return
    if dist_init_required is False:
        if world > 1:
            raise ConfigError("dist_init_required=False but no process group exists and WORLD_SIZE is "
                              f"{world}: create the group first or pass dist_init_required=None")
        return
    if world <= 1 and dist_init_required is not True:
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(distributed_port))
    backend = dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    kwargs = {"timeout": timeout} if timeout is not None else {}
    if init_method is not None:
        kwargs["init_method"] = init_method
    r = rank if rank >= 0 else int(os.environ.get("RANK", "0"))
    if init_method is None:
        store = _restart_safe_store(rank=r, world_size=max(world, 1), timeout=timeout)
        if store is not None:
            kwargs["store"] = store
    dist.init_process_group(backend, rank=r, world_size=max(world, 1), **kwargs)


def _restart_safe_store(*, rank: int, world_size: int, timeout) -> dist.Store | None:
    """Under torchrun's agent store, a client of that store with keys prefixed by the restart attempt; else None.

    torchrun (torch 2.13) hands restarted workers the same agent TCPStore, and torch's env:// handler adds no
    per-attempt prefix (it assumes a new store per retry): a restarted rank could then read the gloo address
    a killed rank of the previous attempt published, and fail connecting to it ("Connection refused").
    The attempt is counted in the store itself (how many times this rank has joined it), not read from
    TORCHELASTIC_RESTART_COUNT: on several hosts that count differs between agents (the agent whose worker
    failed counts a restart; an agent that restarts because a peer re-joined the rendezvous does not, torch's
    "membership changes do not count as retries"), so the ranks would wait under different prefixes forever.
    Every rank joins once per attempt (the whole group restarts), so the counts agree.
    Every group created later (dist.new_group) inherits the prefix through the default store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_PORT" not in os.environ:
        return None
    from datetime import timedelta

    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                           is_master=False, timeout=timeout or timedelta(minutes=30))
    attempt = client.add(f"/ztune/joins/rank{rank}", 1)
    return dist.PrefixStore(f"/ztune/attempt_{attempt}", client)


def _process_group(*, dist_init_required: bool | None = None, distributed_port: int = DEFAULT_PORT,
                   hierarchical: str = "auto") -> tuple[Comm, torch.device]:
    """The Comm over the default group, initialising it from torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) when needed; a world of one without any env. `hierarchical`: comm.hierarchical (two-level
    collectives where the ranks span several hosts, runtime/comm/topology.py)."""
    use_cuda = torch.cuda.is_available()
    if use_cuda:  # before the group exists: NCCL binds each rank to the current device
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    init_distributed(dist_backend="nccl" if use_cuda else "gloo", distributed_port=distributed_port,
                     dist_init_required=dist_init_required)
    if not dist.is_initialized():
        return Comm(group=None, rank=0, world_size=1), device
    if use_cuda and dist.get_backend() != "nccl":
        device = torch.device("cpu")  # a gloo group on a GPU machine: keep the run on the CPU
    unpin_default_group()  # before the optimizer's lazy imports bind the group for good (runtime/comm/groups.py)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        layout = _agreed_layout(layout_from_env(world_size=world_size))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if wants_hierarchy(hierarchical, layout=layout, backend=dist.get_backend()):  # runtime/comm/hierarchical.py
        hierarchy = TwoLevel.connect(layout=layout, rank=rank, use_shm=device.type == "cpu")
        return Comm(group=dist.group.WORLD, rank=rank, world_size=world_size, layout=layout,
                    hierarchy=hierarchy), device
    shm = None
    # CPU ranks on one host move buffers through shared memory (runtime/comm/shm.py); never across hosts.
    if device.type == "cpu" and not layout.multi_node:
        shm = SharedMemoryTransport.connect(group=dist.group.WORLD, rank=rank, world_size=world_size)
    return Comm(group=dist.group.WORLD, rank=rank, world_size=world_size, shm=shm, layout=layout), device


def _agreed_layout(layout: NodeLayout) -> NodeLayout:
    """`layout` if every rank read the same ranks per host, else the one-group layout: hosts that run different
    numbers of ranks (hostfile slots 2 and 1) see different LOCAL_WORLD_SIZE values, and every rank must take
    the same branch below (the shared-memory transport's connect is collective; it finds by itself which ranks
    share files and falls back to gloo when not all do)."""
    sizes: list = [None] * layout.world_size
    dist.all_gather_object(sizes, layout.ranks_per_node)
    if len(set(sizes)) == 1:
        return layout
    return NodeLayout(world_size=layout.world_size, ranks_per_node=layout.world_size)


def _validate(cfg: TrainConfig, *, model: nn.Module, world_size: int, device: torch.device, units) -> None:
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
            if type(u).forward is nn.Module.forward:  # ModuleList / ModuleDict: never called, so never gathered
                raise ConfigError(f"units: a {type(u).__name__} is never called itself (it has no forward), so it "
                                  "cannot be gathered as a unit; pass the module that calls its members (e.g. the "
                                  "MoE layer), or the members themselves")
            inner = {id(m) for m in u.modules()}
            if inner & seen:
                raise ConfigError("units: units must not overlap (one unit is inside another, or listed twice)")
            seen |= inner


def _use_fused_cpu_adam(cfg: TrainConfig, *, device: torch.device, kind: OptimizerType) -> bool:
    """Whether the fused C++ Adam kernel (runtime/ops.py) steps the fp32 masters: Adam/AdamW whose masters live
    in host memory, i.e. offloaded (any device; the kernel's torch fallback runs if it cannot be built) or a CPU
    run (only when the kernel is built: otherwise torch's fused AdamW is faster than the fallback)."""
    if kind is OptimizerType.SGD:
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


def _report_ignored(ignored: Sequence[str], *, rank: int) -> None:
    """Print the ignored DeepSpeed keys once, on rank 0 (they are listed, never dropped silently)."""
    if ignored and rank == 0:
        print("ignored DeepSpeed keys: " + ", ".join(ignored), flush=True)


def initialize(args=None, model: nn.Module | None = None, optimizer=None, model_parameters: Iterable | None = None,
               training_data: torch.utils.data.Dataset | None = None, lr_scheduler: Callable | object | None = None,
               distributed_port: int = DEFAULT_PORT, mpu=None, dist_init_required: bool | None = None,
               collate_fn: Callable | None = None, config=None, mesh_param=None, config_params=None, *,
               units: Sequence[nn.Module] | None = None, weights: str | os.PathLike | None = None,
               init_fn: Callable[[nn.Module], None] | None = None, seed: int = 0):
    """Wrap `model` for sharded data-parallel training. Returns (engine, optimizer, dataloader, scheduler).

    DeepSpeed's signature and meanings (deepspeed.initialize, 0.19.8), plus ztune's own short form
    `initialize(model, config)`: when the first positional argument is a module it is the model, and a second
    positional argument is the config.
    args: parsed arguments; args.deepspeed_config or args.ztune_config names the config file (see
    add_config_arguments). config (or config_params, its older name): a dict (ztune or DeepSpeed keys), a
    YAML/JSON path, a TrainConfig, or None (the file named by $ZTUNE_CONFIG, else defaults). model_parameters:
    the parameters to train (default: all that require grad). training_data: a Dataset; the dataloader then
    yields this rank's micro-batches of train_micro_batch_size_per_gpu (DistributedSampler, collate_fn).
    lr_scheduler: a scheduler object, or a callable(optimizer) returning one; stepped after every applied
    optimizer step. dist_init_required / distributed_port: as in init_distributed. mpu and mesh_param (model
    parallelism) are refused. units (stage 3): the modules to gather one at a time (default: the largest
    ModuleList of identical blocks).
    model_parameters may also be parameter groups (dicts with "params" and their own lr / weight_decay / ...).
    optimizer: a torch.optim Adam/AdamW/SGD (or a callable(params) returning one) whose class, hyper-parameters
    and param groups the shard optimizer takes over (it overrides the config's optimizer block, as in
    DeepSpeed). Without lr_scheduler, the config's `scheduler` block (DeepSpeed's schedules) is used.

    A model whose parameters are on the meta device (`with ztune.zero_init(): model = Model(cfg)`) is
    materialised unit by unit, each rank keeping only its shards at stage 3 (runtime/construct/materialize.py):
    init_fn(module) initialises every module (default: transformers' model._init_weights, else the module's
    reset_parameters), with the generator seeded per module name from `seed`, so the initial model does not
    depend on the world size or stage. weights: a safetensors file or a Hugging Face model directory to load
    the parameters from, each rank reading only its shards' slices (runtime/construct/pretrained.py).
    """
    if isinstance(args, nn.Module) and not isinstance(model, nn.Module):
        if config is not None and model is not None:
            raise ConfigError("initialize(model, config, config=...): the config is given twice; pass one")
        args, model, config = None, args, model if model is not None else config
    if mpu is not None:
        raise ConfigError("initialize: mpu= (model parallelism) is not supported: ztune is data-parallel only; "
                          "remove mpu=")
    if mesh_param is not None:
        raise ConfigError("initialize: mesh_param= (data x sequence parallel mesh) is not supported: ztune is "
                          "data-parallel only; remove mesh_param=")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"initialize: model must be a torch.nn.Module, got {type(model).__name__}")
    from ztune.runtime.compat.args import config_from_args

    loaded = _load_config(config_from_args(args, config, config_params), model=model)
    from ztune.runtime.compat.optimizers import plan_optimizer, resolve_scheduler

    plan = plan_optimizer(model, loaded.config, model_parameters=model_parameters, optimizer=optimizer)
    comm, device = _process_group(dist_init_required=dist_init_required, distributed_port=distributed_port,
                                  hierarchical=loaded.config.comm.hierarchical)
    batch = resolve_batch(loaded.config.batch, comm.world_size, keys=loaded.batch_keys)
    cfg = dataclasses.replace(loaded.config, batch=batch)
    _validate(cfg, model=model, world_size=comm.world_size, device=device, units=units)
    _report_ignored(loaded.ignored, rank=comm.rank)
    from ztune.runtime.construct.materialize import has_meta_tensors

    meta_init = None
    if has_meta_tensors(model):
        from ztune.runtime.construct.materialize import MetaInit
        from ztune.runtime.param_gather import find_units

        meta_init = MetaInit(model, units=find_units(model) if units is None else list(units), device=device,
                             seed=seed, init_fn=init_fn)
        plan.remap(meta_init.replaced)
    else:
        model.to(device)
    fused = _use_fused_cpu_adam(cfg, device=device, kind=plan.kind)
    from ztune.runtime.compat.engine_api import CompatEngine

    engine = CompatEngine(model, cfg, comm=comm, trainable=plan.trainable, units=units, fused_cpu_adam=fused,
                          device=device, optimizer_plan=plan, meta_init=meta_init)
    if weights is not None:
        from ztune.runtime.construct.pretrained import load_pretrained

        load_pretrained(engine, weights)
    scheduler = resolve_scheduler(cfg, optimizer=engine.optimizer, lr_scheduler=lr_scheduler)
    engine.lr_scheduler = scheduler
    dataloader = None
    if training_data is not None:
        from torch.utils.data import DataLoader, DistributedSampler

        # DeepSpeed's loader: a DistributedSampler over the data-parallel ranks (shuffled, seed 0) and
        # batches of train_micro_batch_size_per_gpu (runtime/dataloader.py, DeepSpeedDataLoader).
        sampler = DistributedSampler(training_data, num_replicas=comm.world_size, rank=comm.rank)
        dataloader = DataLoader(training_data, batch_size=batch.micro, sampler=sampler, collate_fn=collate_fn)
    return engine, engine.optimizer, dataloader, scheduler


def initialize_engine(*args, **kwargs):
    """Same as `initialize` (the name in the project's first examples)."""
    return initialize(*args, **kwargs)
