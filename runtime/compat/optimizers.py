"""What `initialize` is given to train with, as DeepSpeed reads it: `model_parameters` (parameters, or
parameter groups: dicts with "params" and their own hyper-parameters), a client `optimizer` (a torch.optim
Adam / AdamW / SGD instance, or a callable returning one, whose class and hyper-parameters ztune takes over
for its shards) and a client `lr_scheduler`; plus the config's `scheduler` block.

The result is an `OptimizerPlan`: the trainable parameters in model order, the optimizer kind and its
defaults, and per param group the parameters and the hyper-parameters that differ from the defaults. The
engine keeps every flat group inside one param group (`split_by_param_group`), so each shard-optimizer param
group holds the masters of exactly one user group and carries its lr / weight_decay / betas / eps /
momentum / bias_correction, through sharding, offload and the fused CPU kernel alike.

DeepSpeed's semantics followed (deepspeed/runtime/engine.py, 0.19.8): a client optimizer overrides the
config's optimizer block; a client scheduler overrides the config's scheduler block; a callable scheduler is
called with the (shard) optimizer. Where ztune departs, it says so at once instead of training differently:
an optimizer class it cannot shard, or an option it does not implement (amsgrad, nesterov, ...), is a
ConfigError naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ztune.config.schema import OptimizerType, TrainConfig
from ztune.errors import ConfigError, describe

# Hyper-parameters a param group may set, per optimizer kind (the rest of a group's keys are kept as data,
# as torch.optim keeps them).
_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "bias_correction")
_SGD_KEYS = ("lr", "momentum", "weight_decay")
# torch.optim options ztune's shard optimizers do not implement, with the value that means "off".
_UNSUPPORTED = {"amsgrad": False, "maximize": False, "nesterov": False, "dampening": 0}
# torch.optim keys that pick an implementation, not the math: dropped (the shard optimizer picks its own).
_IMPLEMENTATION_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay"})
_CLIENT_KINDS = {torch.optim.AdamW: OptimizerType.ADAMW, torch.optim.Adam: OptimizerType.ADAM,
                 torch.optim.SGD: OptimizerType.SGD}


@dataclass
class OptimizerPlan:
    """trainable: parameters to shard, in model order. groups: per param group, (ids of its parameters,
    hyper-parameter overrides). defaults: the kind's hyper-parameters (config or client optimizer)."""

    kind: OptimizerType
    defaults: dict[str, Any]
    trainable: list[nn.Parameter]
    groups: list[tuple[set[int], dict[str, Any]]] = field(default_factory=list)

    def group_of(self) -> dict[int, int] | None:
        """id(param) -> param-group index, or None with a single group (nothing to split)."""
        if len(self.groups) <= 1:
            return None
        return {pid: gi for gi, (ids, _) in enumerate(self.groups) for pid in ids}

    def remap(self, replaced: dict[int, nn.Parameter]) -> None:
        """Follow parameters that were replaced by new objects (meta-device construction, runtime/construct/):
        `replaced` maps id(old parameter) -> its replacement."""
        self.trainable = [replaced.get(id(p), p) for p in self.trainable]
        self.groups = [({id(replaced[i]) if i in replaced else i for i in ids}, overrides)
                       for ids, overrides in self.groups]

    def shard_groups(self, masters: Sequence[torch.Tensor], *, group_index: Sequence[int] | None
                     ) -> list[dict[str, Any]]:
        """torch.optim param groups over `masters` (flat group i belongs to param group group_index[i])."""
        if len(self.groups) <= 1:
            overrides = self.groups[0][1] if self.groups else {}
            return [{"params": list(masters), **overrides}]
        out = []
        for gi, (_, overrides) in enumerate(self.groups):
            mine = [m for m, g in zip(masters, group_index, strict=True) if g == gi]
            if mine:
                out.append({"params": mine, **overrides})
        return out


def _keys_for(kind: OptimizerType) -> tuple[str, ...]:
    return _SGD_KEYS if kind is OptimizerType.SGD else _ADAM_KEYS


def config_defaults(cfg: TrainConfig) -> tuple[OptimizerType, dict[str, Any]]:
    o = cfg.optimizer
    if o.type is OptimizerType.SGD:
        return o.type, {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay}
    return o.type, {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                    "bias_correction": o.bias_correction}


def _check_group_options(options: dict, *, where: str, kind: OptimizerType) -> dict[str, Any]:
    """The hyper-parameter overrides of one group, validated; unsupported torch options rejected."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key == "params" or key in _IMPLEMENTATION_KEYS:
            continue
        if key in _UNSUPPORTED:
            if value != _UNSUPPORTED[key] and value is not None:
                raise ConfigError(f"{where}: {key}={describe(value)} is not supported by ztune's sharded optimizers; "
                                  f"remove it (or set it to {_UNSUPPORTED[key]!r})")
            continue
        if key in ("lr", "eps", "weight_decay", "momentum"):
            if key not in _keys_for(kind):
                raise ConfigError(f"{where}: '{key}' is not a hyper-parameter of {kind.value}; remove it")
            if isinstance(value, torch.Tensor):
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{where}: {key} must be a number >= 0, got {describe(value)}")
            out[key] = float(value)
        elif key == "betas":
            if kind is OptimizerType.SGD:
                raise ConfigError(f"{where}: 'betas' is not a hyper-parameter of SGD; remove it")
            if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(0 <= float(b) < 1 for b in value):
                raise ConfigError(f"{where}: betas must be two numbers in [0, 1), got {describe(value)}")
            out[key] = (float(value[0]), float(value[1]))
        elif key == "bias_correction":
            if kind is OptimizerType.SGD or not isinstance(value, bool):
                raise ConfigError(f"{where}: bias_correction must be true or false (Adam/AdamW only), got "
                                  f"{describe(value)}")
            out[key] = value
        else:
            out[key] = value  # torch keeps unknown group keys (names, tags) as data; so do the shard groups
    return out


def _groups_from(model: nn.Module, entries: list, *, kind: OptimizerType, where: str
                 ) -> tuple[list[nn.Parameter], list[tuple[set[int], dict[str, Any]]]]:
    """Trainable params (model order) and param groups from a list of parameters or group dicts."""
    params = list(model.parameters())
    known = {id(p) for p in params}
    groups: list[tuple[set[int], dict[str, Any]]] = []
    loose: list[nn.Parameter] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict):
            if "params" not in entry:
                raise ConfigError(f"{where}[{i}]: a parameter group needs a 'params' entry")
            ps = entry["params"]
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            groups.append(({id(p) for p in ps},
                           _check_group_options(entry, where=f"{where}[{i}]", kind=kind)))
            members = ps
        else:
            loose.append(entry)
            members = [entry]
        for p in members:
            if not isinstance(p, torch.Tensor) or id(p) not in known:
                raise ConfigError(f"{where}: every tensor must be a parameter of the model passed to initialize")
    if loose:
        if groups:  # torch.optim rejects the mix too ("optimizer got an empty parameter list" aside)
            raise ConfigError(f"{where}: mixes parameter groups (dicts) with bare parameters; wrap the bare "
                              "ones in a group: {'params': [...]}")
        groups.append(({id(p) for p in loose}, {}))
    seen: set[int] = set()
    for ids, _ in groups:
        if ids & seen:
            raise ConfigError(f"{where}: a parameter appears in more than one parameter group")
        seen |= ids
    trainable = [p for p in params if id(p) in seen and p.requires_grad]
    trainable_ids = {id(p) for p in trainable}
    groups = [(ids & trainable_ids, opts) for ids, opts in groups]
    return trainable, [(ids, opts) for ids, opts in groups if ids]


def _client_optimizer(optimizer: Any, *, model: nn.Module, model_parameters) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        params = list(model_parameters) if model_parameters is not None else \
            [p for p in model.parameters() if p.requires_grad]
        built = optimizer(params)
        if isinstance(built, torch.optim.Optimizer):
            return built
        raise ConfigError(f"optimizer: the callable returned {type(built).__name__}, not a torch.optim.Optimizer")
    raise ConfigError(f"optimizer: expected a torch.optim.Optimizer or a callable returning one, got "
                      f"{type(optimizer).__name__}")


def plan_optimizer(model: nn.Module, cfg: TrainConfig, *, model_parameters: Iterable | None = None,
                   optimizer: Any = None) -> OptimizerPlan:
    """The optimizer to build over the shards (module docstring). Raises ConfigError for input ztune cannot
    honour: an optimizer class other than torch.optim Adam/AdamW/SGD, an unsupported option, a tensor that
    is not a model parameter, a parameter in two groups, nothing trainable."""
    if not list(model.parameters()):
        raise ConfigError(f"{type(model).__name__} has no parameters: there is nothing for ZeRO to shard or train")
    if optimizer is not None and cfg.optimizer.type is OptimizerType.ONEBIT_ADAM:
        # Overriding it (DeepSpeed's rule for a client optimizer) would silently drop 1-bit Adam's communication.
        raise ConfigError("optimizer: a client optimizer was passed to initialize, but the config's optimizer is "
                          "OneBitAdam (ztune's own, runtime/onebit_adam.py); pass one of the two")
    if optimizer is not None:
        client = _client_optimizer(optimizer, model=model, model_parameters=model_parameters)
        kind = _CLIENT_KINDS.get(type(client))
        if kind is OptimizerType.ADAM and client.defaults.get("decoupled_weight_decay"):
            kind = OptimizerType.ADAMW  # torch.optim.Adam(decoupled_weight_decay=True) is AdamW
        if kind is None:
            raise ConfigError(f"optimizer: ztune cannot shard {type(client).__module__}.{type(client).__name__}; "
                              "it shards torch.optim.Adam, AdamW and SGD (pass one of those, or set the config's "
                              "optimizer block)")
        if any(client.state.values()):
            raise ConfigError("optimizer: it has state from earlier steps, which ztune would not carry over; "
                              "pass a freshly constructed optimizer")
        where = f"optimizer ({type(client).__name__}).param_groups"
        defaults = _check_group_options(client.defaults, where=f"optimizer ({type(client).__name__})", kind=kind)
        defaults = {k: v for k, v in defaults.items() if k in _keys_for(kind)}
        if kind is not OptimizerType.SGD:
            defaults["bias_correction"] = True  # torch's Adam always corrects
        trainable, groups = _groups_from(model, list(client.param_groups), kind=kind, where=where)
    else:
        kind, defaults = config_defaults(cfg)
        entries = [p for p in model.parameters() if p.requires_grad] if model_parameters is None \
            else list(model_parameters)
        trainable, groups = _groups_from(model, entries, kind=kind, where="model_parameters")
    if kind is OptimizerType.SGD and cfg.zero.offload_optimizer.value == "cpu":
        raise ConfigError("optimizer: SGD with zero.offload_optimizer: cpu is not supported (the offloaded step "
                          "is Adam/AdamW); use Adam/AdamW or turn optimizer offload off")
    if not trainable:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters (all have requires_grad=False); "
                          "unfreeze some or pass them in model_parameters")
    return OptimizerPlan(kind=kind, defaults=defaults, trainable=trainable, groups=groups)


def split_by_param_group(specs: Sequence[tuple[Any, list[nn.Parameter]]], *, group_of: dict[int, int] | None
                         ) -> tuple[list[tuple[Any, list[nn.Parameter]]], list[int] | None]:
    """Split each (module, params) flat-group spec so no flat group mixes param groups: a spec whose params
    span k groups becomes k specs (same module, params in their original order, groups in order of first
    appearance). Returns the specs and each one's param-group index (None when group_of is None)."""
    if group_of is None:
        return list(specs), None
    out: list[tuple[Any, list[nn.Parameter]]] = []
    index: list[int] = []
    for module, params in specs:
        parts: dict[int, list[nn.Parameter]] = {}
        for p in params:
            parts.setdefault(group_of[id(p)], []).append(p)
        for gi, ps in parts.items():
            out.append((module, ps))
            index.append(gi)
    return out, index


class SchedulerBridge:
    """A client scheduler bound to an optimizer ztune does not step (the client optimizer it took over):
    after each `step()` the hyper-parameters the scheduler moves (lr, and betas / momentum where present)
    are copied group by group into the shard optimizer. Everything else is the client scheduler's."""

    _SYNCED = ("lr", "betas", "momentum")

    def __init__(self, scheduler: Any, *, source: torch.optim.Optimizer, target: torch.optim.Optimizer):
        if len(source.param_groups) != len(target.param_groups):
            raise ConfigError(f"lr_scheduler: it drives an optimizer with {len(source.param_groups)} parameter "
                              f"groups, ztune's has {len(target.param_groups)}; build it on the optimizer passed "
                              "to initialize, or pass a callable(optimizer) that builds it")
        self.scheduler, self.source, self.target = scheduler, source, target
        self.sync()

    def sync(self) -> None:
        for src, dst in zip(self.source.param_groups, self.target.param_groups, strict=True):
            for key in self._SYNCED:
                if key in src and key in dst:
                    value = src[key]
                    dst[key] = float(value) if isinstance(value, torch.Tensor) and value.dim() == 0 else value

    def sync_back(self) -> None:
        """The reverse of sync: the shard optimizer's values into the client optimizer's groups. A checkpoint
        load restores them into the shard optimizer only, and a chainable scheduler (ExponentialLR, ...) steps
        from the lr in the client's groups, so without this it would restart from the initial lr."""
        for src, dst in zip(self.source.param_groups, self.target.param_groups, strict=True):
            for key in self._SYNCED:
                if key in src and key in dst:
                    value = dst[key]
                    if isinstance(src[key], torch.Tensor):
                        src[key].fill_(value)
                    else:
                        src[key] = tuple(value) if isinstance(src[key], tuple) else value

    def step(self, *args, **kwargs) -> None:
        with warnings.catch_warnings():
            # torch warns that the client optimizer never stepped: ztune's shard optimizer steps in its place.
            warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)` before `optimizer\.step\(\)")
            self.scheduler.step(*args, **kwargs)
        self.sync()

    def __getattr__(self, name: str):
        return getattr(self.scheduler, name)


def resolve_scheduler(cfg: TrainConfig, *, optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> Any:
    """The scheduler the engine steps: the client's (a callable is called with `optimizer`; an instance
    bound to another optimizer is bridged), else the config's DeepSpeed schedule, else None."""
    if lr_scheduler is not None:
        if cfg.scheduler.type is not None:
            warnings.warn(f"initialize: lr_scheduler was passed, so the config's scheduler block "
                          f"({cfg.scheduler.type}) is not used (as in DeepSpeed)", stacklevel=3)
        if isinstance(lr_scheduler, type) or not hasattr(lr_scheduler, "step"):
            if not callable(lr_scheduler):
                raise ConfigError(f"lr_scheduler: expected a scheduler or a callable(optimizer), got "
                                  f"{type(lr_scheduler).__name__}")
            return lr_scheduler(optimizer)
        bound = getattr(lr_scheduler, "optimizer", None)
        if bound is None or bound is optimizer:
            return lr_scheduler
        return SchedulerBridge(lr_scheduler, source=bound, target=optimizer)
    if cfg.scheduler.type is None:
        return None
    from ztune.runtime.compat.lr_schedules import build_scheduler

    return build_scheduler(cfg.scheduler.type, dict(cfg.scheduler.params), optimizer=optimizer)



def shard_optimizer_args(cfg: TrainConfig, plan: OptimizerPlan | None, *, masters: Sequence[torch.Tensor],
                         group_index: Sequence[int] | None) -> dict[str, Any]:
    """Keyword arguments of runtime.optim_shard.build_shard_optimizer (all but masters and fused_cpu)."""
    if plan is None:
        kind, defaults = config_defaults(cfg)
        groups = None
    else:
        kind, defaults = plan.kind, plan.defaults
        groups = plan.shard_groups(masters, group_index=group_index)
    o = cfg.optimizer
    return {"kind": kind, "lr": defaults.get("lr", o.lr), "betas": defaults.get("betas", tuple(o.betas)),
            "eps": defaults.get("eps", o.eps), "weight_decay": defaults.get("weight_decay", o.weight_decay),
            "momentum": defaults.get("momentum", o.momentum),
            "bias_correction": defaults.get("bias_correction", o.bias_correction), "param_groups": groups}
