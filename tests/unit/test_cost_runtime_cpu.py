"""The runtime's own CPU work on CPU ranks: what `ztune probe --model` measures (ztune/probe_workload.py
time_engine_stages, runtime_cpu_per_param), how the profile carries it (Hardware.runtime_*_cpu_s_per_param_stage*)
and how the estimate charges it (cost/estimate.py runtime_cpu_wall_s, cost/compute.py step_time: serial, x the
measured contention, per micro-step and per optimizer step)."""

import dataclasses

import pytest

from ztune import probe
from ztune.config.io import from_dict
from ztune.cost.compute import OffloadTime, step_time
from ztune.cost.estimate import estimate, runtime_cpu_wall_s
from ztune.probe_workload import STAGES, EngineTimes, WorkloadRate, runtime_cpu_per_param
from ztune.profiles import load_hardware, load_model

TINY = load_model("tiny-llama")
MICRO = (0.1e-9, 0.5e-9, 2.4e-9, 3.1e-9)  # CPU s per parameter, first micro-step, stages 0-3: the order measured here
ACCUM = (0.05e-9, 0.2e-9, 6.0e-9, 5.0e-9)  # each later micro-step (stages 2-3 reduce into a fresh shard and add it)
STEP = (0.0, 0.7e-9, 0.5e-9, 0.2e-9)
CPU = dataclasses.replace(load_hardware("cpu-local"), gpus_per_node=2, cpu_cores=2, cpu_contention=2.0,
                          name="cpu-box", optimizer_step_elements_per_s=2e8,
                          **{f"runtime_micro_cpu_s_per_param_stage{s}": v for s, v in enumerate(MICRO)},
                          **{f"runtime_accum_cpu_s_per_param_stage{s}": v for s, v in enumerate(ACCUM)},
                          **{f"runtime_step_cpu_s_per_param_stage{s}": v for s, v in enumerate(STEP)})


def _cfg(stage: int, grad_accum: int = 1):
    return from_dict({"zero": {"stage": stage}, "batch": {"micro": 1, "grad_accum": grad_accum}, "seq_len": 128,
                      "precision": "fp32"})


@pytest.mark.parametrize("stage", STAGES)
def test_wall_time_is_per_micro_step_and_per_step_times_parameters_and_contention(stage):
    n = 30_941_696
    assert runtime_cpu_wall_s(CPU, stage=stage, num_params=n, grad_accum=1) == pytest.approx(
        (MICRO[stage] + STEP[stage]) * n * 2.0)
    # the first micro-step of an optimizer step, then each later one at its own figure
    assert runtime_cpu_wall_s(CPU, stage=stage, num_params=n, grad_accum=4) == pytest.approx(
        (MICRO[stage] + 3 * ACCUM[stage] + STEP[stage]) * n * 2.0)
    # stages 2-3: a later micro-step's excess over the first (the shard's reduction and addition) is shard-sized,
    # measured by the probe at world size 1: / the job's world size
    later = ACCUM[stage] if stage < 2 else MICRO[stage] + (ACCUM[stage] - MICRO[stage]) / 4
    assert runtime_cpu_wall_s(CPU, stage=stage, num_params=n, grad_accum=4, world_size=4) == pytest.approx(
        (MICRO[stage] + 3 * later + STEP[stage]) * n * 2.0)
    # no contention measured: the CPU seconds as they are
    assert runtime_cpu_wall_s(dataclasses.replace(CPU, cpu_contention=0.0), stage=stage, num_params=n,
                              grad_accum=1) == pytest.approx((MICRO[stage] + STEP[stage]) * n)


def test_unmeasured_profiles_charge_nothing():
    for name in ("cpu-local", "dgx-h100"):
        hw = load_hardware(name)
        assert all(runtime_cpu_wall_s(hw, stage=s, num_params=10**9, grad_accum=8) == 0.0 for s in STAGES), name


def test_step_time_adds_it_serially():
    base = dict(compute_s=1.0, grad_accum=1, comm_micro_s=0.0, comm_boundary_s=0.2, comm_after_step_s=0.0,
                offload=OffloadTime(), overlap=0.8)
    without, with_it = step_time(**base), step_time(**base, runtime_s=0.15)
    assert with_it.step_s == pytest.approx(without.step_s + 0.15) and with_it.runtime_s == 0.15
    # not hidden behind the exposed communication either (a CPU-bound step's roofline is over the comm CPU only)
    assert step_time(**base, runtime_s=0.15, comm_cpu_s=0.5).step_s == pytest.approx(1.0 + 0.15 + 0.5)


@pytest.mark.parametrize("stage", STAGES)
def test_estimate_charges_the_stages_figure(stage):
    bare = dataclasses.replace(CPU, **{f: 0.0 for f in probe.RUNTIME_CPU_FIELDS})
    got, base = estimate(TINY, CPU, _cfg(stage), num_nodes=2), estimate(TINY, bare, _cfg(stage), num_nodes=2)
    want = (MICRO[stage] + STEP[stage]) * got.num_params * 2.0
    assert got.step.runtime_s == pytest.approx(want) and base.step.runtime_s == 0.0
    assert got.step_time_s == pytest.approx(base.step_time_s + want)
    assert any(n.startswith("runtime CPU:") for n in got.notes) == (want > 0)
    accum = estimate(TINY, CPU, _cfg(stage, grad_accum=3), num_nodes=2)  # 2 nodes of 2 ranks: world size 4
    later = ACCUM[stage] if stage < 2 else MICRO[stage] + (ACCUM[stage] - MICRO[stage]) / 4
    assert accum.step.runtime_s == pytest.approx((MICRO[stage] + 2 * later + STEP[stage]) * got.num_params * 2.0)


def test_per_parameter_figures_from_the_ranks_timings():
    # per stage, per timed optimizer step: the plain forward + backward, the runtime's first micro-step, its later
    # one, the boundary's engine.step (CPU seconds); the load drifts between steps, not within one
    engine = {0: EngineTimes([0.41, 0.40, 0.60], [0.42, 0.40, 0.61], [0.41, 0.40, 0.60], [0.10, 0.11, 0.10]),
              1: EngineTimes([0.40, 0.40, 0.60], [0.45, 0.44, 0.65], [0.41, 0.41, 0.61], [0.12, 0.13, 0.12]),
              2: EngineTimes([0.41, 0.40, 0.40], [0.50, 0.49, 0.48], [0.60, 0.61, 0.59], [0.09, 0.10, 0.11]),
              3: EngineTimes([0.40, 0.40, 0.60], [0.55, 0.56, 0.77], [0.60, 0.61, 0.81], [0.10, 0.10, 0.10])}
    first, later, step = runtime_cpu_per_param(engine, optimizer_cpu_s=0.10, numel=1000)
    # medians of the differences from each step's own plain forward + backward
    assert first == pytest.approx((0.01 / 1000, 0.05 / 1000, 0.09 / 1000, 0.16 / 1000))
    assert later == pytest.approx((0.0, 0.01 / 1000, 0.19 / 1000, 0.21 / 1000))
    assert step == pytest.approx((0.0, 0.02 / 1000, 0.0, 0.0))  # less the optimizer; stage 0 below it: floored at 0
    below = {3: EngineTimes([0.40] * 3, [0.39] * 3, [0.38] * 3, [0.3] * 3)}
    first, later, step = runtime_cpu_per_param(below, optimizer_cpu_s=0.2, numel=1000)
    assert first == later == (0.0, 0.0, 0.0, 0.0) and step == pytest.approx((0.0, 0.0, 0.0, 0.1 / 1000))


def test_the_engine_timing_leaves_the_environment_as_it_found_it(monkeypatch):
    """time_engine_stages runs its engines as one host of one rank, without an autotune trial's reporting (a probe
    started from a trial's environment must not write trial records or exit early), and restores both after."""
    import os

    from ztune.probe_workload import _one_process_runtime_env

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("ZTUNE_LOCAL_WORLD_SIZE", "3")
    monkeypatch.setenv("ZTUNE_TRIAL_REPORT", "/tmp/x.jsonl")
    monkeypatch.setenv("ZTUNE_TRIAL_EXIT", "1")
    monkeypatch.setenv("ZTUNE_DISABLE_CPP_ADAM", "1")
    with _one_process_runtime_env():
        assert os.environ["LOCAL_WORLD_SIZE"] == "1"
        assert not {"ZTUNE_LOCAL_WORLD_SIZE", "ZTUNE_TRIAL_REPORT", "ZTUNE_TRIAL_EXIT"} & set(os.environ)
        assert os.environ["ZTUNE_DISABLE_CPP_ADAM"] == "1"  # the runtime as this host's jobs run it
    assert (os.environ["LOCAL_WORLD_SIZE"], os.environ["ZTUNE_LOCAL_WORLD_SIZE"]) == ("4", "3")
    assert os.environ["ZTUNE_TRIAL_REPORT"] == "/tmp/x.jsonl" and os.environ["ZTUNE_TRIAL_EXIT"] == "1"
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with _one_process_runtime_env():
        pass
    assert "LOCAL_WORLD_SIZE" not in os.environ


def test_the_probe_writes_the_fields_and_says_where_they_come_from(tmp_path):
    from tests.unit.test_probe import _measurements

    m = _measurements(gpu=False)
    assert probe.runtime_cpu_fields(m.workload) == {}
    notes = probe.field_notes(m)
    assert all(notes[f].startswith("assumed: 0 = unknown") for f in probe.RUNTIME_CPU_FIELDS)
    w = WorkloadRate("tiny-llama", 2, 128, 1, "fp32", 1, step_s=0.5, flops_per_s=4e10,
                     runtime_micro_cpu_s_per_param=MICRO, runtime_accum_cpu_s_per_param=ACCUM,
                     runtime_step_cpu_s_per_param=STEP)
    with_w = dataclasses.replace(m, workload=w)
    hw, notes = probe.build_profile(with_w), probe.field_notes(with_w)
    assert [hw.runtime_cpu_s_per_param(s) for s in STAGES] == list(zip(MICRO, ACCUM, STEP, strict=True))
    assert all(notes[f].startswith("measured: the runtime's") for f in probe.RUNTIME_CPU_FIELDS)
    path = tmp_path / "p.yaml"
    path.write_text(probe.to_yaml(hw, notes))
    back = load_hardware(str(path))
    assert back.runtime_micro_cpu_s_per_param_stage3 == pytest.approx(MICRO[3], rel=1e-4)
    # GPU ranks: their host CPU time says nothing about the runtime's work on the device
    on_gpu = dataclasses.replace(_measurements(gpu=True), workload=w)
    assert all(getattr(probe.build_profile(on_gpu), f) == 0.0 for f in probe.RUNTIME_CPU_FIELDS)
    from ztune.errors import UserError

    path.write_text(probe.to_yaml(dataclasses.replace(hw, runtime_step_cpu_s_per_param_stage1=-1e-9)))
    with pytest.raises(UserError, match="runtime_step_cpu_s_per_param_stage1 must be >= 0"):
        load_hardware(str(path))


def test_a_skipped_runtime_timing_says_why(monkeypatch):
    from tests.unit.test_probe import _measurements

    w = WorkloadRate("big", 2, 128, 1, "fp32", 1, step_s=0.5, flops_per_s=4e10,
                     runtime_skipped="2 ranks x big's engine need ~40.0 GiB, over 80% of the 20.0 GiB available")
    m = dataclasses.replace(_measurements(gpu=False), workload=w)
    assert all(getattr(probe.build_profile(m), f) == 0.0 for f in probe.RUNTIME_CPU_FIELDS)
    notes = probe.field_notes(m)
    assert all(notes[f].startswith("assumed: 0 = unknown: the runtime was not timed (2 ranks x big's engine need")
               for f in probe.RUNTIME_CPU_FIELDS)


@pytest.mark.dist
def test_the_workload_skips_the_runtime_where_the_host_lacks_the_memory(monkeypatch):
    """Every rank would hold the plain model and an engine at once (ENGINE_BYTES_PER_PARAM): on a host without the
    memory for that, the probe still measures the workload and leaves the runtime's CPU unknown, saying why."""
    import psutil

    from ztune import probe_workload
    from ztune.specs import Architecture, ModelSpec, count_params

    spec = ModelSpec(name="probe-test-llama", architecture=Architecture.LLAMA, vocab_size=128, hidden_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=64)
    need = 2 * count_params(spec).total * probe_workload.ENGINE_BYTES_PER_PARAM
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=need))  # 80% of it is too little
    w = probe_workload.measure_workload_rate(spec, ranks=2, seq_len=16, micro_batch=1, dtype="fp32", threads=1,
                                             repeats=2, codec=False, timeout_s=300)
    assert w.flops_per_s > 0 and w.runtime_micro_cpu_s_per_param == () and w.params == count_params(spec).total
    assert w.runtime_skipped.startswith("2 ranks x probe-test-llama's engine need") and "available" in w.runtime_skipped


def test_a_difference_under_half_a_millisecond_is_not_named_as_the_reason():
    """Two configurations a hair apart: the recommendation does not name a part of the step that saves "0 ms"."""
    from types import SimpleNamespace

    from ztune.cost.compute import StepTime
    from ztune.cost.estimate import _why

    def est(runtime_s, total):
        step = StepTime(compute_s=1.0, comm_s=0.0, exposed_comm_s=0.0, offload_s=0.0, step_s=1.0 + runtime_s,
                        runtime_s=runtime_s)
        return SimpleNamespace(step=step, micro_batch=1, memory_per_gpu=SimpleNamespace(total=total))

    assert _why(est(0.0, 1), est(4e-6, 2)) == "equal step time; smaller memory"
    assert _why(est(0.0, 1), est(0.02, 2)) == "less runtime CPU (20 ms/step saved)"
