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
