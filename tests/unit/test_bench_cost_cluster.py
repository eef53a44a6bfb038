"""benchmarks/bench_cost_cluster.py's report: per configuration and rate PASS or FAIL against the 15% target,
and one verdict line (the issue-15 check). Pure: a stored run, no box."""

from __future__ import annotations

from benchmarks import bench_cost_cluster as bench

FLAT0, HIER3 = bench.SMOKE_VARIANTS


def _run(rate: int, measured_ms: dict[str, float | None], predicted_ms: dict[str, float]) -> dict:
    return {"rate_mbit": rate, "repeat": 0, "variants": list(measured_ms), "probe": {"error": "not probed"},
            "job": {"failed": [], "variants": [{"name": k, "error": None if v else "crashed", "median_ms": v}
                                               for k, v in measured_ms.items()]},
            "estimates": {k: {"step_time_s": v / 1e3} for k, v in predicted_ms.items()},
            "probe_s": 1.0, "job_s": 1.0, "load": [1.0, 1.0]}


def _render(runs: list[dict]) -> str:
    return bench.render(runs, command="python benchmarks/bench_cost_cluster.py", elapsed_s=1.0, rerendered=False)


def test_every_pair_within_the_target_passes():
    text = _render([_run(1000, {FLAT0: 1000.0, HIER3: 2000.0}, {FLAT0: 1100.0, HIER3: 1750.0}),
                    _run(10000, {FLAT0: 800.0, HIER3: 900.0}, {FLAT0: 850.0, HIER3: 1000.0})])
    assert f"| {FLAT0} | 1,000 | 1,100 | +10.0% | PASS | 800 | 850 | +6.2% | PASS |" in text
    assert "Verdict (issue 15): **PASS**" in text
    assert "ztune flat, stage 1" not in text  # only the variants the run measured


def test_one_miss_or_one_failed_measurement_fails_the_check():
    text = _render([_run(1000, {FLAT0: 1000.0, HIER3: None}, {FLAT0: 1200.0, HIER3: 1000.0})])
    assert "+20.0% | FAIL" in text and "failed | - | - | FAIL" in text
    assert (f"Verdict (issue 15): **FAIL**: 2 of 2 (configuration, rate) pairs are outside 15%: {FLAT0} at "
            f"1 Gbit/s (+20%); {HIER3} at 1 Gbit/s (not measured or not estimated).") in text


def test_busy_outside_the_ranks_is_what_idle_and_the_ranks_cpu_leave():
    """4 ranks of 0.25 CPU s per step on 2 cores over 0.6 s steps use 1/1.2 of the cores; 5% idle leaves 11.7%."""
    run = {"probe": {"profile_yaml": "name: cpu-box\ncpu_cores: 2\n"}}
    rec = {"times_s": [0.5, 0.7]}
    share = bench._busy_elsewhere(run, rec, cpus=[0.25] * 4, idle_fraction=0.05)
    assert abs(share - (1 - 0.05 - 4 * 0.25 / (2 * 0.6))) < 1e-12
    assert bench._busy_elsewhere({"probe": {"profile_yaml": "name: x\n"}}, rec, cpus=[0.25] * 4,
                                 idle_fraction=0.05) is None  # no core count
    assert bench._busy_elsewhere({"probe": {"error": "not probed"}}, rec, cpus=[0.25] * 4, idle_fraction=0.05) is None
    assert bench._busy_elsewhere(run, rec, cpus=[], idle_fraction=0.05) is None
