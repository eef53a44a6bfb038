"""Fit the cost model's efficiency factors to measured step times.

The calibrated step time of a candidate is the cost model's, with fitted `Efficiency(compute, bandwidth,
overlap, host_bandwidth)`, plus `micro_step_overhead_s` per micro-step: the fixed cost of one
forward/backward call (Python, kernel launches, hook bookkeeping) that the FLOP-based model does not see
and that makes small micro-batches slower than their FLOPs say. The fit minimises

    sum_i log(calibrated_i / measured_i)^2  +  PRIOR_WEIGHT * sum_f distance(f, default_f)^2

Log ratios weigh a 10% miss the same on a fast and a slow config. The prior term keeps a factor that no
measurement constrains (e.g. host bandwidth when no trial offloaded) at its default instead of wandering.
The search is coordinate descent over one factor at a time on a coarse grid, refined around the best
point: the objective is cheap (an estimate is ~40 us) and piecewise smooth, and the whole fit stays in pure
Python with no solver dependency.

In-sample errors of a fit with as many free factors as points say nothing; `Fit.out_of_sample_errors`
gives each point's error under a fit that excluded it (leave-one-out cross-validation), which is what the
calibrated model can be expected to do on a configuration it has not measured.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ztune.cost.compute import DEFAULT_EFFICIENCY, MAX_COMPUTE_SCALE, Efficiency

PRIOR_WEIGHT = 1e-4
# (lower, upper, log-scaled) per factor; bounds are Efficiency's own validity ranges.
_BOUNDS = {
    "compute": (1e-3, MAX_COMPUTE_SCALE, True),  # a scale on the profile's achieved FLOP rate
    "bandwidth": (1e-3, 1.0, True),
    "overlap": (0.0, 1.0, False),
    "host_bandwidth": (1e-3, 1.0, True),
}
GRID_POINTS = 25
REFINE_POINTS = 9
REFINE_ROUNDS = 3
SWEEPS = 8
OVERHEAD = "micro_step_overhead_s"
# Leave-one-out needs a fit on the other points: with fewer than this many there is nothing to fit on.
MIN_POINTS_OUT_OF_SAMPLE = 2


@dataclass(frozen=True)
class Calibration:
    efficiency: Efficiency = DEFAULT_EFFICIENCY
    micro_step_overhead_s: float = 0.0


@dataclass(frozen=True)
class Fit:
    calibration: Calibration
    # Relative errors (estimate - measured) / measured, one per measured point, in input order.
    errors: tuple[float, ...]
    # The same, each point predicted by a fit on the other points (leave-one-out); empty below
    # MIN_POINTS_OUT_OF_SAMPLE points.
    out_of_sample_errors: tuple[float, ...] = ()

    @property
    def efficiency(self) -> Efficiency:
        return self.calibration.efficiency

    @property
    def mean_abs_error(self) -> float:
        return sum(abs(e) for e in self.errors) / len(self.errors) if self.errors else 0.0

    @property
    def max_abs_error(self) -> float:
        return max((abs(e) for e in self.errors), default=0.0)

    @property
    def out_of_sample_mean_abs_error(self) -> float | None:
        oos = self.out_of_sample_errors
        return sum(abs(e) for e in oos) / len(oos) if oos else None

    @property
    def out_of_sample_max_abs_error(self) -> float | None:
        return max(abs(e) for e in self.out_of_sample_errors) if self.out_of_sample_errors else None


def _distance(name: str, value: float, prior: float, *, scale_s: float) -> float:
    if name == OVERHEAD:
        return (value - prior) / scale_s
    lo, hi, log = _BOUNDS[name]
    return math.log(value / prior) if log else (value - prior)


def _grid(lo: float, hi: float, n: int, *, log: bool) -> list[float]:
    if log:
        a, b = math.log(lo), math.log(hi)
        return [math.exp(a + (b - a) * i / (n - 1)) for i in range(n)]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _get(cal: Calibration, name: str) -> float:
    return cal.micro_step_overhead_s if name == OVERHEAD else getattr(cal.efficiency, name)


def _set(cal: Calibration, name: str, value: float) -> Calibration:
    if name == OVERHEAD:
        return dataclasses.replace(cal, micro_step_overhead_s=value)
    return dataclasses.replace(cal, efficiency=dataclasses.replace(cal.efficiency, **{name: value}))


StepTimeFn = Callable[[object, Calibration], float]


def relative_errors(step_time: StepTimeFn, points: Sequence[tuple[object, float]],
                    calibration: Calibration) -> tuple[float, ...]:
    return tuple((step_time(x, calibration) - measured) / measured for x, measured in points)


def fit_calibration(step_time: StepTimeFn, points: Sequence[tuple[object, float]], *,
                    prior: Calibration = Calibration(), fields: Sequence[str] = (*_BOUNDS, OVERHEAD),
                    out_of_sample: bool = False) -> Fit:
    """Fit `fields` so that `step_time(x, calibration)` matches the measured seconds of each (x, measured_s)
    point. With no points the prior is returned unchanged. out_of_sample: also refit once per point without
    it and record that point's error (leave-one-out; n extra fits)."""
    points = [(x, s) for x, s in points if s and s > 0]
    if not points:
        return Fit(prior, ())
    best = _fit(step_time, points, prior=prior, fields=fields)
    oos: tuple[float, ...] = ()
    if out_of_sample and len(points) >= MIN_POINTS_OUT_OF_SAMPLE:
        held = []
        for i, (x, measured) in enumerate(points):
            others = points[:i] + points[i + 1:]
            cal = _fit(step_time, others, prior=prior, fields=fields)
            held.append((step_time(x, cal) - measured) / measured)
        oos = tuple(held)
    return Fit(best, relative_errors(step_time, points, best), oos)


def _fit(step_time: StepTimeFn, points: Sequence[tuple[object, float]], *, prior: Calibration,
         fields: Sequence[str]) -> Calibration:
    """Coordinate descent on the regularised log-ratio loss (module docstring); `points` is not empty."""
    # The overhead per micro-step is searched up to the slowest measured step (it cannot exceed it).
    scale_s = max(s for _, s in points)
    bounds = dict(_BOUNDS)
    bounds[OVERHEAD] = (0.0, scale_s, False)

    def loss(cal: Calibration) -> float:
        total = sum(math.log(max(step_time(x, cal), 1e-12) / s) ** 2 for x, s in points)
        for name in fields:
            total += PRIOR_WEIGHT * _distance(name, _get(cal, name), _get(prior, name), scale_s=scale_s) ** 2
        return total

    best, best_loss = prior, loss(prior)
    for _ in range(SWEEPS):
        before = best_loss
        for name in fields:
            lo, hi, log = bounds[name]
            grid = _grid(lo, hi, GRID_POINTS, log=log)
            for _round in range(REFINE_ROUNDS + 1):
                for value in grid:
                    trial = _set(best, name, value)
                    value_loss = loss(trial)
                    if value_loss < best_loss:
                        best, best_loss = trial, value_loss
                # Refine on a finer grid spanning one coarse step either side of the best value.
                center = _get(best, name)
                step = (grid[1] / grid[0]) if log else (grid[1] - grid[0])
                a = max(lo, center / step) if log else max(lo, center - step)
                b = min(hi, center * step) if log else min(hi, center + step)
                grid = _grid(a, b, REFINE_POINTS, log=log) if b > a else [center]
        if before - best_loss < 1e-9:
            break
    return best
