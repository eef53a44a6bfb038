"""DeepSpeed's five learning-rate schedules, with DeepSpeed 0.19.8's parameter names, defaults and formulas
(deepspeed/runtime/lr_schedules.py; the schedules themselves come from Smith 2018, "A disciplined approach to
neural network hyper-parameters: Part 1", arXiv:1803.09820, and the usual warm-up/decay shapes).

Each schedule writes `lr` into every param group of the optimizer it is given (ztune's shard optimizer, whose
groups are the user's parameter groups, runtime/compat/optimizers.py), once at construction and again at each
`step()`; the engine calls `step()` after every applied optimizer step (not after an fp16 step skipped for
overflow, as DeepSpeed's engine does). `it` below is `last_batch_iteration`: -1 at construction, +1 per step.

- WarmupLR(warmup_min_lr=0, warmup_max_lr=None (the groups' lr), warmup_num_steps=1000, warmup_type="log"):
  lr = min + (max - min) * gamma, gamma = ln(it + 1) / ln(N) ("log") or it / N ("linear") while it < N,
  else 1, with N = max(2, warmup_num_steps); lr = min before the first step.
- WarmupDecayLR(total_num_steps, warmup_min_lr=0, warmup_max_lr=0.001, warmup_num_steps=1000,
  warmup_type="log"): as WarmupLR, then gamma = max(0, (T - it) / max(1, T - N)).
- WarmupCosineLR(total_num_steps, warmup_min_ratio=0, warmup_num_steps=1000, cos_min_ratio=0.0001,
  warmup_type="log"): lr = lr0 * ratio (lr0: the groups' lr at construction); while it < N ratio = r0 +
  w * (1 - r0), w the warm-up curve above, r0 = warmup_min_ratio; then with p = min(1, (it - N + 1) /
  max(1, T - N)): ratio = max(0, c + (1 - c) * (1 + cos(pi p)) / 2), c = cos_min_ratio; 0 before the first step.
- OneCycle(cycle_min_lr, cycle_max_lr, decay_lr_rate=0, cycle_first_step_size=2000,
  cycle_second_step_size=None (= first), cycle_first_stair_count=0, cycle_second_stair_count=None (= first),
  decay_step_size=0, cycle_momentum=True, cycle_min_mom=0.8, cycle_max_mom=0.9, decay_mom_rate=0):
  a triangle from min to max lr over the first step size and back over the second (optionally in stairs),
  then lr = min / (1 + decay_lr_rate * (it - S + 1) / decay_step_size) (S = sum of the two step sizes; no
  decay when decay_step_size or decay_lr_rate is 0). With cycle_momentum and an optimizer with `betas`,
  beta1 runs the opposite triangle between cycle_max_mom and cycle_min_mom (beta2 is set to 0.99, as
  DeepSpeed does), then beta1 = max_mom * (1 + decay_mom_rate * (it - S + 1) / decay_step_size).
- LRRangeTest(lr_range_test_min_lr=0.001, lr_range_test_step_size=2000, lr_range_test_step_rate=1.0,
  lr_range_test_staircase=False): lr = min * (1 + rate * x), x = (it + 1) / step_size (floored when
  staircase).

Per-group values: every `*_lr`, `*_mom` and `*_ratio` bound may be a list with one value per param group.
Deliberate difference: an unknown `warmup_type` is an error here (DeepSpeed logs a warning and uses "log").
A `type` naming a torch scheduler (StepLR, ...) is built from torch.optim.lr_scheduler, as DeepSpeed does
(torch_schedules.py). This module does not import torch, so the config layer can check a `scheduler` block
cheaply.
"""

from __future__ import annotations

import abc
import inspect
import math
import warnings
from typing import Any

from ztune.errors import ConfigError, describe, shown_key

__all__ = ["SCHEDULES", "LRRangeTest", "OneCycle", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR",
           "build_scheduler", "check_scheduler"]

_WARMUP_TYPES = ("log", "linear")


def _per_group(optimizer, value: Any, name: str) -> list:
    """`value` for each param group: a scalar repeated, or a list/tuple with one entry per group."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"scheduler.params.{name}: got {len(value)} values for {n} parameter groups; "
                              "give one value, or one per group")
        return list(value)
    return [value] * n


def _write_lrs(optimizer, lrs: list[float]) -> list[float]:
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        if hasattr(group["lr"], "fill_"):  # a tensor lr (torch's capturable optimizers) is updated in place
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    return [group["lr"] for group in optimizer.param_groups]


def _positive_int(value: Any, name: str) -> int:
    """`value` as a positive int; an integral float (JSON's 1e3) counts, as for the config's other integer keys."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"scheduler.params.{name}: got {describe(value)}; must be a positive integer")
    return value


def _warmup_type(value: Any) -> str:
    if value not in _WARMUP_TYPES:
        raise ConfigError(f"scheduler.params.warmup_type: got {describe(value)}; allowed: log, linear")
    return value


class _Schedule(abc.ABC):
    """Shared protocol: step(), get_lr(), get_last_lr(), state_dict(), load_state_dict()."""

    last_batch_iteration: int
    _last_lr: list[float]

    @abc.abstractmethod
    def get_lr(self) -> list[float]:
        """The lrs (one per param group) at the current last_batch_iteration."""

    def get_last_lr(self) -> list[float]:
        """The lrs written by the latest step (or by construction)."""
        return list(self._last_lr)

    def step(self, last_batch_iteration: int | None = None) -> None:
        self.last_batch_iteration = self.last_batch_iteration + 1 if last_batch_iteration is None \
            else last_batch_iteration
        self._last_lr = _write_lrs(self.optimizer, self.get_lr())

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the lrs are rewritten at the next step (as in DeepSpeed)."""
        self.last_batch_iteration = int(state["last_batch_iteration"])


class _WarmupCurve:
    """The warm-up fraction in [0, 1) of WarmupLR / WarmupDecayLR / WarmupCosineLR, for it < N."""

    def _init_warmup(self, warmup_num_steps: Any, warmup_type: Any) -> None:
        self.warmup_num_steps = max(2, _positive_int(warmup_num_steps, "warmup_num_steps"))
        self.warmup_type = _warmup_type(warmup_type)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)

    def _warmup_fraction(self, it: int) -> float:
        if self.warmup_type == "log":
            return self.inverse_log_warm_up * math.log(it + 1)
        return it / self.warmup_num_steps


class WarmupLR(_WarmupCurve, _Schedule):
    def __init__(self, optimizer, warmup_min_lr: float | list = 0.0, warmup_max_lr: float | list | None = None,
                 warmup_num_steps: int = 1000, warmup_type: str = "log", last_batch_iteration: int = -1):
        self.optimizer = optimizer
        self._init_warmup(warmup_num_steps, warmup_type)
        if warmup_max_lr is None:
            warmup_max_lr = [group["lr"] for group in optimizer.param_groups]
        self.min_lrs = _per_group(optimizer, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(optimizer, warmup_max_lr, "warmup_max_lr")
        self.delta_lrs = [hi - lo for hi, lo in zip(self.max_lrs, self.min_lrs, strict=True)]
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = _write_lrs(optimizer, self.get_lr()) if last_batch_iteration == -1 else \
            [group["lr"] for group in optimizer.param_groups]

    def _gamma(self) -> float:
        it = self.last_batch_iteration
        return self._warmup_fraction(it) if it < self.warmup_num_steps else 1.0

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma()
        return [lo + (delta * gamma) for lo, delta in zip(self.min_lrs, self.delta_lrs, strict=True)]


class WarmupDecayLR(WarmupLR):
    def __init__(self, optimizer, total_num_steps: int, warmup_min_lr: float | list = 0.0,
                 warmup_max_lr: float | list = 0.001, warmup_num_steps: int = 1000, warmup_type: str = "log",
                 last_batch_iteration: int = -1):
        self.total_num_steps = _positive_int(total_num_steps, "total_num_steps")
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)

    def _gamma(self) -> float:
        it = self.last_batch_iteration
        if it < self.warmup_num_steps:
            return self._warmup_fraction(it)
        return max(0.0, float(self.total_num_steps - it) / float(max(1.0, self.total_num_steps
                                                                       - self.warmup_num_steps)))


class WarmupCosineLR(_WarmupCurve, _Schedule):
    def __init__(self, optimizer, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001, warmup_type: str = "log",
                 last_batch_iteration: int = -1):
        self.optimizer = optimizer
        self.total_num_steps = _positive_int(total_num_steps, "total_num_steps")
        self._init_warmup(warmup_num_steps, warmup_type)
        self.warmup_min_ratio = warmup_min_ratio
        self.cos_min_ratio = cos_min_ratio
        self.last_batch_iteration = last_batch_iteration
        self.org_lrs = [group["lr"].clone() if hasattr(group["lr"], "clone") else group["lr"]
                        for group in optimizer.param_groups]
        self._last_lr = _write_lrs(optimizer, self.get_lr()) if last_batch_iteration == -1 else \
            [group["lr"] for group in optimizer.param_groups]

    def get_lr_ratio(self) -> float:
        it = self.last_batch_iteration
        if it < 0:
            return 0.0
        if it < self.warmup_num_steps:
            return self.warmup_min_ratio + self._warmup_fraction(it) * (1.0 - self.warmup_min_ratio)
        progress = min(1.0, (it - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps))
        cosine = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return [0.0 for _ in self.org_lrs]
        ratio = self.get_lr_ratio()
        return [lr0 * ratio for lr0 in self.org_lrs]


class OneCycle(_Schedule):
    def __init__(self, optimizer, cycle_min_lr: float | list, cycle_max_lr: float | list,
                 decay_lr_rate: float = 0.0, cycle_first_step_size: int = 2000,
                 cycle_second_step_size: int | None = None, cycle_first_stair_count: int = 0,
                 cycle_second_stair_count: int | None = None, decay_step_size: int = 0,
                 cycle_momentum: bool = True, cycle_min_mom: float | list = 0.8, cycle_max_mom: float | list = 0.9,
                 decay_mom_rate: float = 0.0, last_batch_iteration: int = -1):
        self.optimizer = optimizer
        first = float(cycle_first_step_size)
        second = first if cycle_second_step_size is None else float(cycle_second_step_size)
        if first <= 0:
            raise ConfigError(f"scheduler.params.cycle_first_step_size: got {describe(cycle_first_step_size)}; "
                              "must be > 0")
        if second < 0:
            raise ConfigError(f"scheduler.params.cycle_second_step_size: got {describe(cycle_second_step_size)}; "
                              "must be >= 0")
        self.first_step_size, self.second_step_size = first, second
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = cycle_first_stair_count if cycle_second_stair_count is None \
            else cycle_second_stair_count
        self.decay_step_size = decay_step_size
        no_decay_steps = math.isclose(decay_step_size, 0)
        self.min_lrs = _per_group(optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = _per_group(optimizer, cycle_max_lr, "cycle_max_lr")
        self.decay_lr_rate = decay_lr_rate
        self.skip_lr_decay = no_decay_steps or math.isclose(decay_lr_rate, 0)
        self.cycle_momentum = bool(cycle_momentum)
        self.skip_mom_decay = no_decay_steps
        self.last_batch_iteration = last_batch_iteration
        if last_batch_iteration == -1:
            _write_lrs(optimizer, self.min_lrs)
        if self.cycle_momentum and "betas" not in optimizer.defaults:
            warnings.warn(f"OneCycle: cycle_momentum is off because {type(optimizer).__name__} has no betas",
                          stacklevel=2)
            self.cycle_momentum = False
        if self.cycle_momentum:
            self.decay_mom_rate = decay_mom_rate
            # beta2 is pinned to 0.99 while momentum cycles (DeepSpeed 0.19.8 OneCycle._initialize_momentum).
            self.min_moms = [(m, 0.99) for m in _per_group(optimizer, cycle_min_mom, "cycle_min_mom")]
            self.max_moms = [(m, 0.99) for m in _per_group(optimizer, cycle_max_mom, "cycle_max_mom")]
            if last_batch_iteration == -1:
                for group, betas in zip(optimizer.param_groups, self.min_moms, strict=True):
                    group["betas"] = betas
            self.skip_mom_decay = self.skip_mom_decay or math.isclose(decay_mom_rate, 0)
        self._last_lr = [group["lr"] for group in optimizer.param_groups]

    def _scale_factor(self) -> float:
        """Position in the current cycle's triangle, 0 at the ends and 1 at the peak (or its stair)."""
        iteration = self.last_batch_iteration + 1
        cycle = math.floor(1 + iteration / self.total_size)
        x = 1.0 + iteration / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:
            in_cycle = iteration % self.total_size
            if in_cycle <= self.first_step_size:
                position = in_cycle * stairs / self.first_step_size
            else:
                position = (self.total_size - in_cycle) * stairs / self.second_step_size
            scale = math.floor(position) / stairs
        return scale

    def get_lr(self) -> list[float]:
        it = self.last_batch_iteration
        if it < self.total_size:
            scale = self._scale_factor()
            return [lo + (hi - lo) * scale for lo, hi in zip(self.min_lrs, self.max_lrs, strict=True)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        factor = 1 + self.decay_lr_rate * ((it - self.total_size + 1) / self.decay_step_size)
        return [lo / factor for lo in self.min_lrs]

    def get_mom(self) -> list[tuple[float, float]] | None:
        if not self.cycle_momentum:
            return None
        it = self.last_batch_iteration
        if it < self.total_size:
            scale = self._scale_factor()
            return [(hi[0] - (hi[0] - lo[0]) * scale, lo[1])
                    for lo, hi in zip(self.min_moms, self.max_moms, strict=True)]
        if self.skip_mom_decay:
            return list(self.max_moms)
        factor = 1 + self.decay_mom_rate * ((it - self.total_size + 1) / self.decay_step_size)
        return [(b1 * factor, b2) for b1, b2 in self.max_moms]

    def step(self, last_batch_iteration: int | None = None) -> None:
        super().step(last_batch_iteration)
        if self.cycle_momentum:
            for group, betas in zip(self.optimizer.param_groups, self.get_mom(), strict=True):
                group["betas"] = betas


class LRRangeTest(_Schedule):
    def __init__(self, optimizer, lr_range_test_min_lr: float | list = 1e-3, lr_range_test_step_size: int = 2000,
                 lr_range_test_step_rate: float = 1.0, lr_range_test_staircase: bool = False,
                 last_batch_iteration: int = -1):
        self.optimizer = optimizer
        self.min_lr = _per_group(optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = _positive_int(lr_range_test_step_size, "lr_range_test_step_size")
        self.step_rate = lr_range_test_step_rate
        self.staircase = bool(lr_range_test_staircase)
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = _write_lrs(optimizer, self.min_lr) if last_batch_iteration == -1 else \
            [group["lr"] for group in optimizer.param_groups]

    def get_lr(self) -> list[float]:
        x = float(self.last_batch_iteration + 1) / self.step_size
        if self.staircase:
            x = math.floor(x)
        return [lo * (1 + self.step_rate * x) for lo in self.min_lr]


SCHEDULES: dict[str, type[_Schedule]] = {cls.__name__: cls for cls in
                                         (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest)}


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The config parameters of schedule `cls`: its keyword arguments after `optimizer`."""
    params = dict(inspect.signature(cls.__init__).parameters)
    for name in ("self", "optimizer"):
        params.pop(name)
    return params


def check_scheduler(type_name: str | None, params: dict) -> None:
    """ConfigError naming the key when `type_name` is not one of the five schedules, a parameter is not one
    of its parameters, a required one is missing, or a value is of the wrong type, out of range (_check_range) or
    refused by the schedule's constructor (_dry_build). torch's schedules: the name only (torch_schedules.py)."""
    if type_name is None:
        if params:
            raise ConfigError("scheduler.params: given without scheduler.type; set type to one of "
                              + ", ".join(SCHEDULES))
        return
    from ztune.runtime.compat.torch_schedules import FROM_CONFIG, check_torch_scheduler, is_torch_schedule

    if is_torch_schedule(type_name):  # DeepSpeed builds it from torch.optim.lr_scheduler (torch_schedules.py)
        check_torch_scheduler(type_name)
        return
    if type_name not in SCHEDULES:
        raise ConfigError(f"scheduler.type: got {describe(type_name)}; allowed: {', '.join(SCHEDULES)} (DeepSpeed's "
                          f"schedules) or torch's {', '.join(FROM_CONFIG)}")
    allowed = _parameters(SCHEDULES[type_name])
    for key in params:
        if key not in allowed:
            raise ConfigError(f"unknown key '{shown_key(f'scheduler.params.{key}')}' for {type_name}; allowed here: "
                              + ", ".join(allowed))
    for key, p in allowed.items():
        if p.default is inspect.Parameter.empty and key not in params:
            raise ConfigError(f"scheduler.params.{key}: required by {type_name}; add it to the scheduler block")
    for key, value in params.items():
        _check_value(key, value)
        _check_range(key, value)
    _dry_build(type_name, params)


def _check_range(key: str, value: Any) -> None:
    """Learning rates and lr ratios must be >= 0 (a negative one trains by gradient ascent, as optimizer.lr's
    own check says); momentum bounds are Adam's beta1, in [0, 1)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if key in _LR_PARAMS and any(v < 0 for v in values):
        what = "an lr ratio" if key.endswith("_ratio") else "a learning rate"
        raise ConfigError(f"scheduler.params.{key}: got {describe(value)}; {what} must be >= 0 (a negative learning "
                          "rate trains by gradient ascent)")
    if key in _MOMENTUM_PARAMS and not all(0 <= v < 1 for v in values):
        raise ConfigError(f"scheduler.params.{key}: got {describe(value)}; a momentum (Adam's beta1) must be in [0, 1)")


class _StandIn:
    """An optimizer stand-in for _dry_build: `groups` parameter groups at lr 1e-3, with Adam's betas."""

    def __init__(self, groups: int):
        self.defaults = {"lr": 1e-3, "betas": (0.9, 0.999)}
        self.param_groups = [dict(self.defaults) for _ in range(groups)]


def _dry_build(type_name: str, params: dict) -> None:
    """Build the schedule over a stand-in optimizer (as many groups as the longest per-group list), so that every
    value check its constructor makes (step sizes and counts, per-group list lengths against each other) runs
    when the config is loaded, not first on the ranks."""
    groups = max((len(v) for v in params.values() if isinstance(v, (list, tuple))), default=1)
    SCHEDULES[type_name](_StandIn(groups), **params)


_BOOL_PARAMS = frozenset({"lr_range_test_staircase", "cycle_momentum"})
# Bounds that may be given per param group (a list); every other numeric parameter is one number.
_LR_PARAMS = frozenset({"warmup_min_lr", "warmup_max_lr", "cycle_min_lr", "cycle_max_lr", "lr_range_test_min_lr",
                        "warmup_min_ratio", "cos_min_ratio"})
_MOMENTUM_PARAMS = frozenset({"cycle_min_mom", "cycle_max_mom"})
_PER_GROUP_PARAMS = frozenset({"warmup_min_lr", "warmup_max_lr", "cycle_min_lr", "cycle_max_lr", "cycle_min_mom",
                               "cycle_max_mom", "lr_range_test_min_lr"})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_value(key: str, value: Any) -> None:
    """The value's type (DeepSpeed's schedules would fail later, or compute nonsense, on a wrong one)."""
    if key == "warmup_type":
        _warmup_type(value)
    elif key in _BOOL_PARAMS:
        if not isinstance(value, bool):
            raise ConfigError(f"scheduler.params.{key}: expected true or false, got {describe(value)}")
    elif value is None and key in ("warmup_max_lr", "cycle_second_step_size", "cycle_second_stair_count"):
        return  # None means "derive it" (the groups' lr, or the first step size / stair count)
    elif key in _PER_GROUP_PARAMS and isinstance(value, (list, tuple)):
        if not value or not all(_is_number(v) for v in value):
            raise ConfigError(f"scheduler.params.{key}: expected a number or a list of numbers, got {describe(value)}")
    elif not _is_number(value):
        raise ConfigError(f"scheduler.params.{key}: expected a number, got {describe(value)}")


def build_scheduler(type_name: str, params: dict, *, optimizer):
    """Schedule `type_name` over `optimizer` (any object with param_groups and defaults; a torch Optimizer for a
    torch scheduler, see torch_schedules.py)."""
    check_scheduler(type_name, params)
    if type_name not in SCHEDULES:
        from ztune.runtime.compat.torch_schedules import build_torch_scheduler

        return build_torch_scheduler(type_name, params, optimizer=optimizer)
    return SCHEDULES[type_name](optimizer, **params)
