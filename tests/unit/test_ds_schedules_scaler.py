"""DeepSpeed 0.19.8 is the reference for the learning-rate schedules (runtime/compat/lr_schedules.py) and the
fp16 loss scaler (runtime/precision.py): the same inputs give the same lr sequence (50 steps, 1e-12
relative) and the same loss-scale sequence, including DeepSpeed's error at the minimum scale."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.deepspeed_cpu import import_deepspeed_cpu
from ztune.config.schema import LossScaleConfig, Precision
from ztune.errors import ConfigError
from ztune.runtime.compat import lr_schedules
from ztune.runtime.precision import LossScaleError, LossScaler

STEPS = 50
LR_RTOL = 1e-12

# (type, params); lists are per param group (the optimizers below have two groups).
SCHEDULE_CASES = [
    ("WarmupLR", {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 100}),
    ("WarmupLR", {"warmup_min_lr": [1e-5, 0.0], "warmup_max_lr": [1e-3, 2e-3], "warmup_num_steps": 20,
                  "warmup_type": "linear"}),
    ("WarmupLR", {"warmup_num_steps": 1}),  # max lr = the groups' lr; N clamped to 2
    ("WarmupDecayLR", {"total_num_steps": 40, "warmup_min_lr": 1e-5, "warmup_max_lr": 1e-3,
                       "warmup_num_steps": 10}),
    ("WarmupDecayLR", {"total_num_steps": 30, "warmup_num_steps": 10, "warmup_type": "linear"}),
    ("WarmupCosineLR", {"total_num_steps": 45, "warmup_num_steps": 10}),
    ("WarmupCosineLR", {"total_num_steps": 30, "warmup_min_ratio": 0.1, "warmup_num_steps": 5,
                        "cos_min_ratio": 0.01, "warmup_type": "linear"}),
    ("OneCycle", {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-2, "cycle_first_step_size": 10}),
    ("OneCycle", {"cycle_min_lr": [1e-4, 2e-4], "cycle_max_lr": 1e-2, "cycle_first_step_size": 8,
                  "cycle_second_step_size": 12, "cycle_first_stair_count": 3, "decay_step_size": 5,
                  "decay_lr_rate": 0.1, "decay_mom_rate": 0.05, "cycle_min_mom": 0.85, "cycle_max_mom": 0.95}),
    ("OneCycle", {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-2, "cycle_first_step_size": 6,
                  "cycle_second_stair_count": 2, "cycle_momentum": False}),
    ("LRRangeTest", {"lr_range_test_min_lr": 1e-4, "lr_range_test_step_size": 10}),
    ("LRRangeTest", {"lr_range_test_min_lr": [1e-4, 1e-3], "lr_range_test_step_size": 7,
                     "lr_range_test_step_rate": 2.5, "lr_range_test_staircase": True}),
]


def _optimizer() -> torch.optim.Optimizer:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    return torch.optim.AdamW([{"params": [a], "lr": 3e-3}, {"params": [b], "weight_decay": 0.0}], lr=1e-3)


def _trace(schedule, optimizer) -> list[tuple]:
    """(lrs, betas) in the optimizer after construction and after each of STEPS steps."""
    out = [([g["lr"] for g in optimizer.param_groups], [tuple(g["betas"]) for g in optimizer.param_groups])]
    for _ in range(STEPS):
        schedule.step()
        out.append(([g["lr"] for g in optimizer.param_groups],
                     [tuple(g["betas"]) for g in optimizer.param_groups]))
    return out


@pytest.mark.parametrize(("name", "params"), SCHEDULE_CASES, ids=[f"{n}-{i}" for i, (n, _) in
                                                                  enumerate(SCHEDULE_CASES)])
def test_schedule_matches_deepspeed(name, params):
    import_deepspeed_cpu()
    from deepspeed.runtime import lr_schedules as ds

    ours_opt, ref_opt = _optimizer(), _optimizer()
    ours = lr_schedules.build_scheduler(name, dict(params), optimizer=ours_opt)
    ref = getattr(ds, name)(ref_opt, **params)
    got, want = _trace(ours, ours_opt), _trace(ref, ref_opt)
    assert len({lr for lrs, _ in want for lr in lrs}) > 2, "the case should move the lr"
    for step, ((g_lr, g_b), (w_lr, w_b)) in enumerate(zip(got, want, strict=True)):
        assert g_lr == pytest.approx(w_lr, rel=LR_RTOL, abs=0), f"lr after {step} steps"
        flat_g, flat_w = [b for pair in g_b for b in pair], [b for pair in w_b for b in pair]
        assert flat_g == pytest.approx(flat_w, rel=LR_RTOL, abs=0), f"betas after {step} steps"
    assert ours.get_last_lr() == pytest.approx(ref.get_last_lr(), rel=LR_RTOL, abs=0)
    assert ours.state_dict() == ref.state_dict()


def test_schedule_state_dict_resumes_the_sequence():
    opt_a, opt_b = _optimizer(), _optimizer()
    params = {"total_num_steps": 30, "warmup_num_steps": 8}
    a = lr_schedules.build_scheduler("WarmupDecayLR", params, optimizer=opt_a)
    for _ in range(12):
        a.step()
    b = lr_schedules.build_scheduler("WarmupDecayLR", params, optimizer=opt_b)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        a.step()
        b.step()
        assert [g["lr"] for g in opt_a.param_groups] == [g["lr"] for g in opt_b.param_groups]


@pytest.mark.parametrize(("name", "params", "message"), [
    ("Warmup", {}, "scheduler.type: got 'Warmup'"),
    ("StepLR", {"step_size": 2, "gama": 0.5}, "unknown key 'scheduler.params.gama' for torch's StepLR"),
    ("CosineAnnealingLR", {}, "scheduler.params.T_max: required by torch's CosineAnnealingLR"),
    ("OneCycleLR", {"max_lr": 0.1}, "scheduler.params: torch's OneCycleLR refused them: "),
    ("LambdaLR", {}, "scheduler.type: LambdaLR needs lr_lambda, a Python function"),
    ("ReduceLROnPlateau", {}, "scheduler.type: ReduceLROnPlateau needs the watched metric"),
    ("WarmupLR", {"warmup_max": 1e-3}, "unknown key 'scheduler.params.warmup_max' for WarmupLR"),
    ("WarmupDecayLR", {"warmup_num_steps": 5}, "scheduler.params.total_num_steps: required"),
    ("OneCycle", {"cycle_max_lr": 1e-2}, "scheduler.params.cycle_min_lr: required"),
    ("WarmupLR", {"warmup_type": "cosine"}, "scheduler.params.warmup_type: got 'cosine'"),
    ("WarmupLR", {"warmup_num_steps": 0}, "warmup_num_steps: got 0"),
    ("WarmupLR", {"warmup_max_lr": [1e-3, 1e-3, 1e-3]}, "3 values for 2 parameter groups"),
    ("WarmupLR", {"warmup_max_lr": "auto"}, "scheduler.params.warmup_max_lr: expected a number"),
    ("WarmupDecayLR", {"total_num_steps": [10]}, "scheduler.params.total_num_steps: expected a number"),
    ("LRRangeTest", {"lr_range_test_staircase": 1}, "lr_range_test_staircase: expected true or false"),
])
def test_bad_scheduler_is_a_config_error_naming_the_key(name, params, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lr_schedules.build_scheduler(name, params, optimizer=_optimizer())


@pytest.mark.parametrize(("name", "params"), [
    ("StepLR", {"step_size": 3, "gamma": 0.5}),
    ("MultiStepLR", {"milestones": [2, 5], "gamma": 0.3}),
    ("CosineAnnealingLR", {"T_max": 10, "eta_min": 1e-5}),
    ("CyclicLR", {"base_lr": 1e-4, "max_lr": 1e-2, "step_size_up": 4}),  # also cycles beta1
])
@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_torch_scheduler_type_is_torchs_class_as_in_deepspeed(name, params):
    """DeepSpeed builds a type that is not its own from torch.optim.lr_scheduler with the params as keyword
    arguments (engine.py, _scheduler_from_config): the same object, the same lrs and betas."""
    import_deepspeed_cpu()
    from deepspeed.runtime.engine import DeepSpeedEngine

    ours_opt, ref_opt = _optimizer(), _optimizer()
    ours = lr_schedules.build_scheduler(name, dict(params), optimizer=ours_opt)
    fake_engine = type("E", (), {"scheduler_name": lambda self: name, "scheduler_params": lambda self: params})()
    ref = DeepSpeedEngine._scheduler_from_config(fake_engine, ref_opt)
    assert type(ours) is type(ref) is getattr(torch.optim.lr_scheduler, name)
    got, want = _trace(ours, ours_opt), _trace(ref, ref_opt)
    assert len({lr for lrs, _ in want for lr in lrs}) > 2
    assert got == want


def test_torch_scheduler_name_is_checked_when_the_config_loads():
    from ztune.config import from_dict

    cfg = from_dict({"train_batch_size": 8, "scheduler": {"type": "StepLR", "params": {"step_size": 2}}})
    assert cfg.scheduler.type == "StepLR"
    with pytest.raises(ConfigError, match="scheduler.type: SequentialLR needs scheduler objects"):
        from_dict({"train_batch_size": 8, "scheduler": {"type": "SequentialLR", "params": {}}})
    with pytest.raises(ConfigError, match="scheduler.type: got 'StepLr'; allowed: WarmupLR, .* or torch's StepLR"):
        from_dict({"train_batch_size": 8, "scheduler": {"type": "StepLr", "params": {}}})


def test_scheduler_block_is_checked_when_the_config_loads():
    from ztune.config import from_dict

    with pytest.raises(ConfigError, match="unknown key 'scheduler.params.warmup_steps' for WarmupLR"):
        from_dict({"train_batch_size": 8, "scheduler": {"type": "WarmupLR", "params": {"warmup_steps": 5}}})
    with pytest.raises(ConfigError, match="unknown key 'scheduler.kind'"):
        from_dict({"train_batch_size": 8, "scheduler": {"kind": "WarmupLR"}})


@pytest.mark.parametrize(("name", "params", "message"), [
    ("WarmupLR", {"warmup_num_steps": -100}, "scheduler.params.warmup_num_steps: got -100; must be a positive"),
    ("WarmupLR", {"warmup_num_steps": 1.5}, "scheduler.params.warmup_num_steps: got 1.5"),
    ("WarmupDecayLR", {"total_num_steps": 0}, "scheduler.params.total_num_steps: got 0"),
    ("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-2, "cycle_first_step_size": -5},
     "scheduler.params.cycle_first_step_size: got -5; must be > 0"),
    ("LRRangeTest", {"lr_range_test_step_size": 0}, "scheduler.params.lr_range_test_step_size: got 0"),
    ("WarmupLR", {"warmup_min_lr": -1, "warmup_max_lr": -2, "warmup_num_steps": 2},
     "scheduler.params.warmup_min_lr: got -1; a learning rate must be >= 0"),
    ("WarmupLR", {"warmup_max_lr": [1e-3, -1e-3]}, r"scheduler.params.warmup_max_lr: got \[0.001, -0.001\]"),
    ("WarmupCosineLR", {"total_num_steps": 100, "cos_min_ratio": -1},
     "scheduler.params.cos_min_ratio: got -1; an lr ratio must be >= 0"),
    ("OneCycle", {"cycle_min_lr": 1e-3, "cycle_max_lr": 1e-2, "cycle_max_mom": 1.5},
     r"scheduler.params.cycle_max_mom: got 1.5; a momentum \(Adam's beta1\) must be in \[0, 1\)"),
    ("WarmupLR", {"warmup_min_lr": [0.0, 0.0], "warmup_max_lr": [1e-3, 1e-3, 1e-3]}, "parameter groups"),
])
def test_schedule_values_are_checked_when_the_config_loads(name, params, message):
    """What the schedule's constructor refuses, and learning rates < 0 (gradient ascent), fail at load time, on
    the launcher and in `ztune estimate`, not first on every rank."""
    from ztune.config import from_dict

    with pytest.raises(ConfigError, match=message):
        from_dict({"train_batch_size": 8, "scheduler": {"type": name, "params": params}})


@pytest.mark.parametrize(("name", "params", "message"), [
    ("StepLR", {"step_size": "ten"}, "scheduler.params.step_size: got 'ten'; torch's StepLR takes int"),
    ("StepLR", {"step_size": 30, "gamma": "half"}, "scheduler.params.gamma: got 'half'; torch's StepLR takes float"),
    ("MultiStepLR", {"milestones": ["a"]}, r"scheduler.params.milestones: got \['a'\]; torch's MultiStepLR takes"),
    ("CyclicLR", {"base_lr": 1e-4, "max_lr": 1e-2, "mode": "tri"}, "scheduler.params.mode: got 'tri'"),
    ("ExponentialLR", {"gamma": True}, "scheduler.params.gamma: got True; torch's ExponentialLR takes float"),
    ("CosineAnnealingLR", {"T_max": 0}, "scheduler.params: torch's CosineAnnealingLR refused them: "),
])
def test_torch_scheduler_values_are_checked_before_training(name, params, message):
    """A value of the wrong type for torch's class, or one it refuses only when stepping, is a ConfigError when the
    scheduler is built (ztune.initialize), not a TypeError at the first (or the step_size-th) optimizer step."""
    with pytest.raises(ConfigError, match=message):
        lr_schedules.build_scheduler(name, params, optimizer=_optimizer())


def test_integral_float_step_counts_are_integers():
    """JSON's 1e3 is a float; like the config's other integer keys, an integral one counts as the integer."""
    opt = _optimizer()
    sched = lr_schedules.build_scheduler("WarmupLR", {"warmup_num_steps": 1e3, "warmup_type": "linear"},
                                         optimizer=opt)
    assert sched.warmup_num_steps == 1000 and isinstance(sched.warmup_num_steps, int)
    torch_sched = lr_schedules.build_scheduler("StepLR", {"step_size": 3.0}, optimizer=_optimizer())
    assert torch_sched.step_size == 3 and isinstance(torch_sched.step_size, int)


# -- loss scaling ---------------------------------------------------------------------------------------------

def _pattern(name: str, n: int) -> list[bool]:
    if name == "early-then-clean":
        return [True, True, True] + [False] * (n - 3)
    if name == "periodic":
        return [i % 7 in (0, 1) for i in range(n)]
    if name == "isolated":
        return [i % 5 == 2 for i in range(n)]
    if name == "bursts":
        return [(i // 4) % 3 == 0 for i in range(n)]
    raise AssertionError(name)


def _ds_dynamic(cfg: LossScaleConfig):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    return DynamicLossScaler(init_scale=2.0 ** cfg.initial_scale_power, scale_window=cfg.loss_scale_window,
                             min_scale=cfg.min_loss_scale, delayed_shift=cfg.hysteresis,
                             consecutive_hysteresis=cfg.consecutive_hysteresis)


@pytest.mark.parametrize("pattern", ["early-then-clean", "periodic", "isolated", "bursts"])
@pytest.mark.parametrize("cfg", [
    LossScaleConfig(),
    LossScaleConfig(initial_scale_power=8, loss_scale_window=4, hysteresis=1, min_loss_scale=0.25),
    LossScaleConfig(initial_scale_power=12, loss_scale_window=3, hysteresis=3, consecutive_hysteresis=True),
    LossScaleConfig(initial_scale_power=10, loss_scale_window=5, hysteresis=2, min_loss_scale=64),
], ids=["defaults", "window4-hyst1", "hyst3-consecutive", "min64"])
def test_dynamic_loss_scale_sequence_matches_deepspeed(cfg, pattern, monkeypatch):
    import_deepspeed_cpu()
    import deepspeed.runtime.fp16.loss_scaler as ds_scaler

    monkeypatch.setattr(ds_scaler.dist, "get_rank", lambda *a, **k: 0)  # only used for its log line
    ours, ref = LossScaler.for_config(Precision.FP16, cfg), _ds_dynamic(cfg)
    assert ours.dynamic and ours.scale == ref.cur_scale
    overflows = _pattern(pattern, 60)
    got, want = [], []
    for overflow in overflows:
        for scaler, seq in ((ours, got), (ref, want)):
            try:
                if scaler is ours:
                    scaler.update(overflow=overflow)
                    seq.append(scaler.scale)
                else:
                    scaler.update_scale(overflow)
                    seq.append(scaler.cur_scale)
            except (LossScaleError, Exception) as exc:  # DeepSpeed raises a bare Exception
                seq.append(type(exc) is LossScaleError or "minimum" in str(exc))
        if got[-1] is True:
            break
    assert got == want
    assert len(set(got)) > 1, "the pattern should move the scale"


def test_overflow_at_minimum_scale_raises_like_deepspeed(monkeypatch):
    import_deepspeed_cpu()
    import deepspeed.runtime.fp16.loss_scaler as ds_scaler

    monkeypatch.setattr(ds_scaler.dist, "get_rank", lambda *a, **k: 0)
    cfg = LossScaleConfig(initial_scale_power=10, min_loss_scale=1024, hysteresis=2)
    ours, ref = LossScaler.for_config(Precision.FP16, cfg), _ds_dynamic(cfg)
    ours.update(overflow=True)  # hysteresis 2 -> 1; the scale stays at the minimum
    ref.update_scale(True)
    with pytest.raises(Exception, match="minimum"):
        ref.update_scale(True)
    with pytest.raises(LossScaleError, match="minimum loss scale 1024"):
        ours.update(overflow=True)


def test_static_loss_scale_never_moves_but_checks_overflow():
    scaler = LossScaler.for_config(Precision.FP16, LossScaleConfig(loss_scale=128))
    assert not scaler.dynamic and scaler.checks_overflow and scaler.scale == 128
    for overflow in (True, True, False, True):
        scaler.update(overflow=overflow)
    assert scaler.scale == 128
    for precision in (Precision.BF16, Precision.FP32):
        plain = LossScaler.for_config(precision, LossScaleConfig(loss_scale=128))
        assert plain.scale == 1.0 and not plain.checks_overflow


def test_loss_scaler_state_dict_round_trip():
    cfg = LossScaleConfig(initial_scale_power=6, loss_scale_window=3, hysteresis=2)
    a = LossScaler.for_config(Precision.FP16, cfg)
    for overflow in _pattern("periodic", 11):
        a.update(overflow=overflow)
    b = LossScaler.for_config(Precision.FP16, cfg)
    b.load_state_dict(a.state_dict())
    for overflow in _pattern("bursts", 20):
        a.update(overflow=overflow)
        b.update(overflow=overflow)
        assert a.scale == b.scale


def test_fp16_keys_of_a_deepspeed_config_reach_the_scaler():
    from ztune.config import from_dict

    cfg = from_dict({"train_batch_size": 8, "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 8,
                                                     "loss_scale_window": 50, "hysteresis": 1,
                                                     "min_loss_scale": 1024}})
    scaler = LossScaler.for_config(cfg.precision, cfg.loss_scaling)
    assert (scaler.scale, scaler.window, scaler.hysteresis, scaler.min_scale) == (256.0, 50, 1, 1024.0)
    static = from_dict({"train_batch_size": 8, "fp16": {"enabled": True, "loss_scale": 128}})
    assert LossScaler.for_config(static.precision, static.loss_scaling).scale == 128.0
    with pytest.raises(ConfigError, match="fp16.loss_scale_window: got 0"):
        from_dict({"train_batch_size": 8, "fp16": {"enabled": True, "loss_scale_window": 0}})
