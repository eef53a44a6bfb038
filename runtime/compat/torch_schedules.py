"""`scheduler.type` naming a torch scheduler (torch.optim.lr_scheduler), read as DeepSpeed 0.19.8 reads it.

DeepSpeed's engine (deepspeed/runtime/engine.py, `_scheduler_from_config`) builds a type that is not one of
its own schedules as `getattr(torch.optim.lr_scheduler, type)(optimizer, **params)`, and steps it with no
argument after every applied optimizer step, like its own schedules. ztune does the same over its shard
optimizer (a torch Optimizer whose groups are the user's parameter groups), at every stage and precision.
DeepSpeed itself only manages this at ZeRO stage 0 in fp32: at stages 1-3 (and with fp16/bf16) it hands the
torch class its ZeRO optimizer wrapper, which torch refuses ("DeepSpeedZeroOptimizer is not an Optimizer").

Classes a JSON config cannot build are rejected with the reason (DeepSpeed fails on them with a TypeError, or,
for ReduceLROnPlateau, quietly feeds it train_batch_size() as the metric; see NOT_FROM_CONFIG).
Names are checked without importing torch (the config layer stays torch-free); parameter names and values
are checked against the torch class when the scheduler is built (ztune.initialize).
"""

from __future__ import annotations

import inspect
from typing import Any

from ztune.errors import ConfigError

# The classes of torch.optim.lr_scheduler (torch 2.x, its __all__) whose arguments are plain values.
FROM_CONFIG = ("StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "CosineAnnealingLR",
               "CyclicLR", "CosineAnnealingWarmRestarts", "OneCycleLR", "PolynomialLR")

# The other classes of torch.optim.lr_scheduler -> why a config cannot name them.
NOT_FROM_CONFIG = {
    "LambdaLR": "needs lr_lambda, a Python function, which a JSON config cannot hold",
    "MultiplicativeLR": "needs lr_lambda, a Python function, which a JSON config cannot hold",
    "SequentialLR": "needs scheduler objects, which a JSON config cannot hold",
    "ChainedScheduler": "needs scheduler objects, which a JSON config cannot hold",
    "ReduceLROnPlateau": "needs the watched metric at every step, which engine.step() does not have (DeepSpeed "
                         "0.19.8 passes train_batch_size() in its place, a constant); create it on the returned "
                         "optimizer and call its step(metric) yourself",
    "LRScheduler": "is torch's abstract base class",
}

_HOW = "pass a scheduler object or a callable(optimizer) to initialize(lr_scheduler=...) instead"


def is_torch_schedule(type_name: str) -> bool:
    """Whether `type_name` names a torch.optim.lr_scheduler class (buildable from a config or not)."""
    return type_name in FROM_CONFIG or type_name in NOT_FROM_CONFIG


def check_torch_scheduler(type_name: str) -> None:
    """ConfigError naming scheduler.type when the torch class cannot be built from a config."""
    if type_name in NOT_FROM_CONFIG:
        raise ConfigError(f"scheduler.type: {type_name} {NOT_FROM_CONFIG[type_name]}; {_HOW}")


def build_torch_scheduler(type_name: str, params: dict[str, Any], *, optimizer) -> Any:
    """torch.optim.lr_scheduler.<type_name>(optimizer, **params). ConfigError naming the key for a parameter
    the class does not take, a required one that is missing, or values torch refuses."""
    check_torch_scheduler(type_name)
    from torch.optim import lr_scheduler

    cls = getattr(lr_scheduler, type_name)
    signature = dict(inspect.signature(cls.__init__).parameters)
    for name in ("self", "optimizer"):
        signature.pop(name)
    for key in params:
        if key not in signature:
            raise ConfigError(f"unknown key 'scheduler.params.{key}' for torch's {type_name}; allowed here: "
                              + ", ".join(signature))
    for key, p in signature.items():
        if p.default is inspect.Parameter.empty and key not in params:
            raise ConfigError(f"scheduler.params.{key}: required by torch's {type_name}; add it to the scheduler "
                              "block")
    try:
        return cls(optimizer, **params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"scheduler.params: torch's {type_name} refused them: {err}") from None
