"""Pruning and ranking: memory limit with margin, learned offset/limit, doubling and bisection."""

from __future__ import annotations

from ztune.config.schema import TrainConfig
from ztune.profiles import load_hardware, load_model
from ztune.tune.calibrate import Calibration
from ztune.tune.rank import MemoryModel, Workload, assess, fit_memory, local_hardware
from ztune.tune.space import Candidate, Constraints, build_space


def _setup(micros=(1, 2, 4, 8)):
    hw = local_hardware(load_hardware("cpu-local"), num_ranks=2)
    w = Workload(model=load_model("tiny-gpt"), hardware=hw, base=TrainConfig(), global_batch=16, seq_len=128)
    space = build_space(Constraints(num_ranks=2, global_batch=16, seq_len=128, vary=("stage", "micro"),
                                    stages=(0, 3), precisions=("fp32",), micro=micros))
    return w, space


def _mem(w, c):
    return int(w.estimate(c).memory_per_gpu.total)


def test_ranking_is_fastest_first_and_the_margin_prunes() -> None:
    w, space = _setup()
    z0 = [c for c in space if c.stage == 0]
    # A limit between micro 2 and micro 4 (with the 10% margin): micro 4 and 8 are out.
    limit = int(1.1 * (_mem(w, z0[1]) + _mem(w, z0[2])) / 2)
    out = assess(z0, workload=w, calibration=Calibration(), memory=MemoryModel(limit_bytes=limit),
                 outcomes={})
    assert [a.step_time_s for a in out] == sorted(a.step_time_s for a in out)
    eligible = {a.candidate.micro for a in out if a.eligible}
    assert eligible == {1, 2}
    assert all("limit" in a.reason or "margin" in a.reason for a in out if not a.eligible)


def test_oom_rules_out_larger_micro_batches_and_bisects() -> None:
    w, space = _setup()
    z0 = {c.micro: c for c in space if c.stage == 0}
    mem = MemoryModel(limit_bytes=1 << 40)
    out = assess(list(z0.values()), workload=w, calibration=Calibration(), memory=mem,
                 outcomes={z0[8]: "oom"})
    eligible = {a.candidate.micro for a in out if a.eligible}
    # Bisection over (none fits yet, 8 OOM): the middle of 1, 2, 4 is 2.
    assert eligible == {2}
    out = assess(list(z0.values()), workload=w, calibration=Calibration(), memory=mem,
                 outcomes={z0[8]: "oom", z0[2]: "ok"})
    assert {a.candidate.micro for a in out if a.eligible} == {1, 4}


def test_doubling_past_the_margin_after_a_fit() -> None:
    w, space = _setup()
    z0 = {c.micro: c for c in space if c.stage == 0}
    # micro 4 fits raw but not with the margin; micro 8 fits neither.
    limit = int(_mem(w, z0[4]) * 1.05)
    mem = MemoryModel(limit_bytes=limit)
    before = assess(list(z0.values()), workload=w, calibration=Calibration(), memory=mem, outcomes={})
    assert {a.candidate.micro for a in before if a.eligible} == {1, 2}
    after = assess(list(z0.values()), workload=w, calibration=Calibration(), memory=mem, outcomes={z0[2]: "ok"})
    assert {a.candidate.micro for a in after if a.eligible} == {1, 4}


def test_crashed_family_is_not_retried() -> None:
    w, space = _setup()
    z3 = [c for c in space if c.stage == 3]
    out = assess(space, workload=w, calibration=Calibration(), memory=MemoryModel(limit_bytes=1 << 40),
                 outcomes={z3[0]: "crash"})
    assert not any(a.eligible for a in out if a.candidate.stage == 3)
    assert any(a.eligible for a in out if a.candidate.stage == 0)


def test_fit_memory_learns_offset_and_limit() -> None:
    w, space = _setup()
    z0 = {c.micro: c for c in space if c.stage == 0}
    e1, e8 = w.estimate(z0[1]), w.estimate(z0[8])
    base = 300 << 20
    m = fit_memory(limit_bytes=1 << 40, margin=0.1,
                   measured=[(e1, "ok", int(e1.memory_per_gpu.total) + base), (e8, "oom", None)])
    assert m.offset_bytes == base
    assert m.limit_bytes < m.predicted_bytes(e8) and not m.fits(e8, with_margin=False)
    assert m.fits(e1, with_margin=False)


def test_calibrated_step_time_adds_the_micro_step_overhead() -> None:
    w, space = _setup()
    c = Candidate(0, False, "none", "fp32", "none", 1)  # grad_accum 8 on 2 ranks x 16 global
    base = w.step_time_s(c, Calibration())
    assert abs(w.step_time_s(c, Calibration(micro_step_overhead_s=0.01)) - (base + 0.08)) < 1e-9
