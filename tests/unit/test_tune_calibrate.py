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


def test_out_of_sample_errors_predict_each_point_without_it() -> None:
    """Leave-one-out: with as many free factors as points the in-sample fit is near perfect whatever the
    data; the out-of-sample errors show what the calibrated model does on a configuration it did not see."""
    w, space = _workload()
    truth = Calibration(Efficiency(compute=0.12, bandwidth=0.4, overlap=0.3), micro_step_overhead_s=0.05)
    picks = space[::9][:4]
    # Measurements with +-15% noise the model cannot explain.
    noise = [1.15, 0.85, 1.15, 0.85]
    points = [(c, w.step_time_s(c, truth) * f) for c, f in zip(picks, noise, strict=True)]
    fit = fit_calibration(w.step_time_s, points, out_of_sample=True)
    assert fit_calibration(w.step_time_s, points).out_of_sample_errors == ()  # off by default
    assert len(fit.out_of_sample_errors) == len(points)
    assert fit.out_of_sample_mean_abs_error > fit.mean_abs_error
    # Each out-of-sample error is the point's error under a fit that never saw it.
    first = fit_calibration(w.step_time_s, points[1:], out_of_sample=False)
    c, measured = points[0]
    assert fit.out_of_sample_errors[0] == (w.step_time_s(c, first.calibration) - measured) / measured
    # One point: nothing to fit the others on.
    assert fit_calibration(w.step_time_s, points[:1], out_of_sample=True).out_of_sample_errors == ()
