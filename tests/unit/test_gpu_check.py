"""`make gpu-check`'s script (benchmarks/gpu_check.py) cannot rot before a GPU is lent: its --dry-run runs every
phase end to end on the CPU with tiny sizes (tests/gpu collected and skipped, `ztune probe --quick`, the parity
and both training runs of a tiny transformers Llama, `ztune estimate` on the probed profile) and must write
the Markdown and JSON reports with every phase passed and sane numbers. Plus the pure parts of the report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check_report as report

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("kernel", "tests", "probe", "parity", "train-z0", "train-offload", "estimate")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # Wide safety net only (a loaded 2-core machine took ~4 min; CPU time ~50 s, mostly 7 interpreters
    # importing torch): each phase has its own budget inside the script.
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    return proc, out


@pytest.mark.e2e
@pytest.mark.timeout(1800)  # the dry run is set up by the first test that asks for it
def test_dry_run_passes_every_phase_and_writes_both_reports(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    doc = json.loads((out / "gpu-check.json").read_text())
    assert doc["schema"] == "ztune-gpu-check/1" and doc["dry_run"] is True
    assert "benchmarks/gpu_check.py --dry-run" in doc["command"] and doc["date_utc"].startswith("20")
    assert doc["machine"]["hostname"] and doc["machine"]["cpu_cores_logical"] >= 1
    assert {n: p["status"] for n, p in doc["phases"].items()} == dict.fromkeys(PHASES, "ok")
    assert doc["result"] == "all phases passed"
    md = (out / "gpu-check.md").read_text()
    for text in ("# GPU check (dry run", doc["command"], doc["date_utc"], "## Phases", "## Training",
                 "## Offload transfers", "## Parity", "## ztune probe", "## Predicted"):
        assert text in md, text
    assert {"gpu-check.log", "probe.yaml", "tests-gpu.xml"} <= {p.name for p in out.iterdir()}
    assert "ok in" in (out / "gpu-check.log").read_text()


@pytest.mark.e2e
@pytest.mark.timeout(1800)  # the dry run is set up by the first test that asks for it
def test_dry_run_numbers_are_sane(dry_run):
    _, out = dry_run
    doc = json.loads((out / "gpu-check.json").read_text())
    ph = doc["phases"]
    counts = ph["tests"]["data"]["counts"]
    assert counts["failed"] == counts["error"] == 0 and counts["skipped"] >= 1  # tests/gpu: no CUDA here
    assert ph["kernel"]["data"]["backend"] in ("cpp", "torch-fallback")
    parity = ph["parity"]["data"]
    assert parity["passed"] and parity["rel_diff"] < 1e-5 and len(parity["losses"]["offload"]) == parity["steps"]
    for mode in ("z0", "offload"):
        run = ph[f"train-{mode}"]["data"]
        assert run["timed_steps"] == doc["sizes"]["steps"] and run["tokens_per_s"] > 0
        assert all(math.isfinite(s["loss"]) for s in run["steps"])
        derived = doc["derived"]["runs"][mode]
        assert derived["spec_params"] == run["num_params"]  # ztune's count equals transformers', exactly
        assert derived["mfu_probed"] > 0 and derived["mfu_datasheet"] is None  # no datasheet for a CPU
    off = ph["train-offload"]["data"]["offload"]
    params = ph["train-offload"]["data"]["num_params"]
    # bf16: gradients down and parameters up, 2 bytes each per parameter (flat buffers pad a little).
    for direction in ("d2h", "h2d"):
        assert 2 * params <= off[f"{direction}_bytes_per_step"] < 2 * params * 1.05
        assert off[f"{direction}_gbps"] > 0
    rows = doc["derived"]["predicted_vs_measured"]
    assert {r["run"] for r in rows} == {"z0", "offload"}
    states = {r["run"]: r for r in rows if r["quantity"].startswith("model states")}
    for r in states.values():  # the runtime holds what the cost model says, within the 2% of DESIGN.md
        assert r["measured_over_predicted"] == pytest.approx(1.0, rel=0.02)


def test_without_cuda_it_says_so_in_one_line_and_stops(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "o")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no CUDA" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_datasheet_peaks_match_the_most_specific_name():
    assert report.datasheet_peak("NVIDIA H200")[0] == 989.5e12
    assert report.datasheet_peak("NVIDIA H200 NVL")[0] == 835.5e12
    assert report.datasheet_peak("NVIDIA H100 80GB HBM3")[0] == 989.5e12
    assert report.datasheet_peak("NVIDIA H100 PCIe")[0] == 756.5e12
    assert report.datasheet_peak("NVIDIA L4") is None


def test_junit_outcomes_are_counted(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="3">'
                   '<testcase classname="tests.gpu.t" name="a" time="1.5"/>'
                   '<testcase classname="tests.gpu.t" name="b" time="0.1"><failure message="boom">tb</failure>'
                   '</testcase><testcase classname="tests.gpu.t" name="c" time="0"><skipped message="needs CUDA"/>'
                   '</testcase></testsuite></testsuites>')
    got = report.read_junit(xml)
    assert got["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert got["cases"][1] == {"name": "tests.gpu.t::b", "outcome": "failed", "time_s": 0.1, "message": "boom"}


def test_cuda_adam_numbers_recorded_by_tests_gpu_reach_the_report(tmp_path):
    # The shape tests/gpu/test_cuda_adam.py writes with record_testsuite_property (JSON in the value).
    timing = {"numel": 100_000_000, "grad_dtype": "bf16", "ztune_ms": 0.8, "torch_fused_ms": 1.2,
              "torch_over_ztune": 1.5, "bytes_per_element": 28, "ztune_gbps": 3500.0, "torch_fused_gbps": 2333.3,
              "device": "NVIDIA H200"}
    accuracy = {"max_rel_param_vs_single": 0.0, "max_rel_param_vs_fused": 1.2e-6, "max_abs_exp_avg_vs_fused": 3e-8}
    quote = lambda d: json.dumps(d).replace('"', "&quot;")  # noqa: E731
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="1"><properties>'
                   f'<property name="cuda_adam.timing.bf16" value="{quote(timing)}"/>'
                   f'<property name="cuda_adam.accuracy.adamw-wd0.01" value="{quote(accuracy)}"/>'
                   '<property name="other" value="plain text"/></properties>'
                   '<testcase classname="tests.gpu.t" name="a" time="1.5"/></testsuite></testsuites>')
    got = report.read_junit(xml)
    assert got["properties"]["cuda_adam.timing.bf16"] == timing and got["properties"]["other"] == "plain text"
    rows, acc = report.cuda_adam_rows(got["properties"])
    assert rows == [["bf16", "100,000,000", "0.800", "3,500", "1.200", "2,333", "1.50"]]
    assert acc == [["adamw-wd0.01", "0", "1.2e-06", "3e-08"]]


def test_a_phase_over_budget_is_killed_and_keeps_its_last_lines(tmp_path):
    from benchmarks import gpu_check

    check = gpu_check.Check(out=tmp_path, sizes=gpu_check.DRY, dry_run=True, selected=set(PHASES))
    try:
        phase = gpu_check.Phase("slow", budget_s=2.0)
        argv = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"]
        assert check.command(phase, argv) is None  # killed at its budget, not after 120 s
        check._settle(phase, None)
        assert phase.status == "timeout" and phase.output_tail == ["started"]
        failing = gpu_check.Phase("failing", budget_s=60.0)
        assert check.command(failing, [sys.executable, "-c", "raise SystemExit(3)"]) == 3
    finally:
        check.finish()


def test_a_failing_phase_is_recorded_and_the_reports_are_still_written(tmp_path):
    from benchmarks import gpu_check

    # estimate alone has no probed profile to work from: it fails, says why, and the run still reports.
    check = gpu_check.Check(out=tmp_path, sizes=gpu_check.DRY, dry_run=True, selected={"estimate"})
    try:
        assert check.run() == 1
    finally:
        check.finish()
    doc = json.loads((tmp_path / "gpu-check.json").read_text())
    assert doc["phases"]["estimate"]["status"] == "failed" and "probe" in doc["phases"]["estimate"]["error"]
    assert doc["phases"]["kernel"]["status"] == "skipped" and doc["result"] == "not passed: estimate"
    assert "| estimate | failed |" in (tmp_path / "gpu-check.md").read_text()
