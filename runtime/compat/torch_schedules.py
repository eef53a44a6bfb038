"""`scheduler.type` naming a torch scheduler (torch.optim.lr_scheduler), read as DeepSpeed 0.19.8 reads it.

DeepSpeed's engine (deepspeed/runtime/engine.py, `_scheduler_from_config`) builds a type that is not one of
its own schedules as `getattr(torch.optim.lr_scheduler, type)(optimizer, **params)`, and steps it with no
argument after every applied optimizer step, like its own schedules. ztune does the same over its shard
optimizer (a torch Optimizer whose groups are the user's parameter groups), at every stage and precision.
DeepSpeed itself only manages this at ZeRO stage 0 in fp32: at stages 1-3 (and with fp16/bf16) it hands the
torch class its ZeRO optimizer wrapper, which torch refuses ("DeepSpeedZeroOptimizer is not an Optimizer").

Classes a JSON config cannot build are rejected with the reason (DeepSpeed fails on them with a TypeError, or,
for ReduceLROnPlateau, quietly feeds it train_batch_size() as the metric; see NOT_FROM_CONFIG).
Names are checked without importing torch (the config layer stays torch-free); parameter names, their types
(against the class's annotations) and what the class refuses in its first DRY_RUN_STEPS steps (over a stand-in
optimizer) are checked when the scheduler is built (ztune.initialize), before any training step.
"""

from __future__ import annotations

import ast
import inspect
import math
import warnings
from typing import Any

from ztune.errors import ConfigError, describe, shown_key

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
            raise ConfigError(f"unknown key '{shown_key(f'scheduler.params.{key}')}' for torch's {type_name}; allowed "
                              "here: "
                              + ", ".join(signature))
    for key, p in signature.items():
        if p.default is inspect.Parameter.empty and key not in params:
            raise ConfigError(f"scheduler.params.{key}: required by torch's {type_name}; add it to the scheduler "
                              "block")
    params = {key: _typed(type_name, key, value, signature[key].annotation) for key, value in params.items()}
    _dry_run(cls, type_name, params, optimizer)
    try:
        return cls(optimizer, **params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"scheduler.params: torch's {type_name} refused them: {err}") from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fits(value: Any, annotation: str) -> tuple[bool, Any]:
    """(whether `value` is of the type torch's annotation string names, the value to pass: an integral float
    for an int becomes the int). Forms it cannot read are taken as fitting (torch checks them when built)."""
    for alt in (a.strip() for a in annotation.split("|")):
        if alt == "None" and value is None:
            return True, value
        if alt == "bool" and isinstance(value, bool):
            return True, value
        if alt == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return True, value
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                return True, int(value)
        if alt == "float" and _number(value):
            return True, value
        if alt in ("list[float]", "list[int]", "Iterable[int]") and isinstance(value, (list, tuple)) and value:
            kind = "float" if alt == "list[float]" else "int"
            items = [_fits(v, kind) for v in value]
            if all(ok for ok, _ in items):
                return True, [v for _, v in items]
        if alt.startswith("Literal[") and alt.endswith("]"):
            if value in ast.literal_eval("(" + alt[len("Literal["):-1] + ",)"):
                return True, value
        if alt not in _READ_FORMS and not alt.startswith(("Literal[", "Callable")):
            return True, value  # a form not read here (a Callable never fits: a JSON config cannot hold one)
    return False, value


_READ_FORMS = frozenset({"None", "bool", "int", "float", "list[float]", "list[int]", "Iterable[int]"})


def _typed(type_name: str, key: str, value: Any, annotation: Any) -> Any:
    """`value` checked against torch's annotation of parameter `key` (a wrong type fails only at some later step
    otherwise: StepLR's step_size "ten" at the first, its gamma at the step_size-th)."""
    if not isinstance(annotation, str):
        return value
    ok, typed = _fits(value, annotation)
    if not ok:
        raise ConfigError(f"scheduler.params.{key}: got {describe(value)}; torch's {type_name} takes {annotation}")
    return typed


DRY_RUN_STEPS = 3


def _dry_run(cls, type_name: str, params: dict[str, Any], optimizer) -> None:
    """Build and step the scheduler DRY_RUN_STEPS times over a stand-in AdamW with the optimizer's groups' lrs and
    betas, so that values torch refuses only when stepping are a ConfigError before training, not a traceback at
    its first step."""
    import torch

    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": float(g["lr"]),
               "betas": tuple(g.get("betas", (0.9, 0.999)))} for g in optimizer.param_groups]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stepping a scheduler before its optimizer
            sched = cls(torch.optim.AdamW(groups), **params)
            for _ in range(DRY_RUN_STEPS):
                sched.step()
    except (TypeError, ValueError, ArithmeticError) as err:
        raise ConfigError(f"scheduler.params: torch's {type_name} refused them: {err}") from None
