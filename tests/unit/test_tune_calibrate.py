"""Calibration: fitting efficiency factors and the per-micro-step overhead to measured step times."""

from __future__ import annotations

from ztune.config.schema import TrainConfig
from ztune.cost.compute import Efficiency
from ztune.profiles import load_hardware, load_model
from ztune.tune.calibrate import Calibration, fit_calibration
from ztune.tune.rank import Workload, local_hardware
from ztune.tune.space import Constraints, build_space


def _workload():
    hw = local_hardware(load_hardware("cpu-local"), num_ranks=2)
    w = Workload(model=load_model("tiny-gpt"), hardware=hw, base=TrainConfig(), global_batch=16, seq_len=128)
    space = build_space(Constraints(num_ranks=2, global_batch=16, seq_len=128,
                                    vary=("stage", "checkpointing", "micro"), precisions=("fp32",)))
    return w, space


def test_fit_recovers_step_times_generated_by_a_known_calibration() -> None:
    w, space = _workload()
    truth = Calibration(Efficiency(compute=0.12, bandwidth=0.4, overlap=0.3), micro_step_overhead_s=0.05)
    train = space[::5]
    points = [(c, w.step_time_s(c, truth)) for c in train]
    fit = fit_calibration(w.step_time_s, points)
    assert fit.max_abs_error < 0.03, fit
    # It generalises to candidates it did not see.
    held_out = [c for c in space if c not in train]
    errors = [abs(w.step_time_s(c, fit.calibration) / w.step_time_s(c, truth) - 1) for c in held_out]
    assert max(errors) < 0.05


def test_uncalibrated_model_is_far_off_and_one_point_fixes_the_scale() -> None:
    w, space = _workload()
    truth = Calibration(Efficiency(compute=0.05))
    c = space[0]
    measured = w.step_time_s(c, truth)
    assert abs(w.step_time_s(c, Calibration()) / measured - 1) > 0.5
    fit = fit_calibration(w.step_time_s, [(c, measured)])
    assert fit.max_abs_error < 0.02


def test_no_points_returns_the_prior() -> None:
    w, _ = _workload()
    fit = fit_calibration(w.step_time_s, [])
    assert fit.calibration == Calibration() and fit.errors == ()
