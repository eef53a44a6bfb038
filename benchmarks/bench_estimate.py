"""`ztune estimate` wall time for a 70B model (issue #14 target: < 0.25 s median, torch not imported).

Times the full command as a user runs it (`python -m ztune estimate ...` in a fresh process: interpreter
start, imports, sweep, rendering; median of 7), beside a bare `python -c pass` on the same interpreter, timed
interleaved so both see the same machine load; for each also the CPU time the process used (user + system,
from wait4), which a loaded machine inflates far less than wall time. Then the command alone in-process
(CliRunner on the already imported app, i.e. through typer; median of 5 after one warm-up). Writes
docs/bench/estimate.md.
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time

from run_all import ROOT, SECTION_DIR, machine_line  # benchmarks/ is on sys.path when run as a script

ARGS = ["estimate", "--model", "llama-2-70b", "--hardware", "dgx-h100", "--nodes", "4", "--seq", "4096",
        "--global-batch", "1024"]
RUNS = 5
FRESH_RUNS = 7
TARGET_S = 0.25


def _timed(argv: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s = user + system of the child, stdout) of one fresh process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps the child and returns its resource usage
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{argv} failed: {err.read()}")
        return wall, usage.ru_utime + usage.ru_stime, out.read()


def subprocess_times() -> tuple[dict[str, list[tuple[float, float]]], str]:
    """Fresh-process (wall, CPU) times of the estimate and of bare Python, interleaved."""
    times: dict[str, list[tuple[float, float]]] = {"estimate": [], "pass": []}
    output = ""
    for _ in range(FRESH_RUNS):
        wall, cpu, output = _timed([sys.executable, "-m", "ztune", *ARGS])
        times["estimate"].append((wall, cpu))
        wall, cpu, _ = _timed([sys.executable, "-c", "pass"])
        times["pass"].append((wall, cpu))
    return times, output


def in_process_times() -> tuple[list[float], bool]:
    from typer.testing import CliRunner

    from ztune.cli import app

    runner = CliRunner()
    runner.invoke(app, ARGS)  # warm-up: first-call imports (rich, profiles, cost model)
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        result = runner.invoke(app, ARGS)
        times.append(time.perf_counter() - start)
        if result.exit_code != 0:
            raise SystemExit(f"estimate failed: {result.output}")
    return times, "torch" in sys.modules


def main() -> int:
    fresh, table = subprocess_times()
    inproc, torch_loaded = in_process_times()
    wall = [w for w, _ in fresh["estimate"]]
    wall_med, inproc_med = statistics.median(wall), statistics.median(inproc)
    cpu_med = statistics.median(c for _, c in fresh["estimate"])
    bare_wall = statistics.median(w for w, _ in fresh["pass"])
    bare_cpu = statistics.median(c for _, c in fresh["pass"])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "## `ztune estimate` (70B)",
        "",
        f"Command: `python -m ztune {' '.join(ARGS)}`  ",
        f"Machine: {machine_line()}  ",
        f"Date: {dt.datetime.now().isoformat(timespec='seconds')}; load average (1, 5, 15 min) at the end: {load}",
        "",
        f"| measurement | median of {FRESH_RUNS} (5 in-process) | all runs (s) | target |",
        "|---|---|---|---|",
        f"| wall clock, fresh process | {wall_med:.3f} s | {', '.join(f'{t:.3f}' for t in wall)} | "
        f"< {TARGET_S} s: {'met' if wall_med < TARGET_S else 'MISSED'} |",
        f"| CPU time (user + system), fresh process | {cpu_med:.3f} s | "
        f"{', '.join(f'{c:.3f}' for _, c in fresh['estimate'])} | |",
        f"| bare `python -c pass`: wall / CPU | {bare_wall:.3f} s / {bare_cpu:.3f} s | | |",
        f"| estimate / bare Python: wall / CPU | {wall_med / bare_wall:.1f}x / {cpu_med / bare_cpu:.1f}x | | |",
        f"| in-process (CliRunner, warm) | {inproc_med * 1e3:.1f} ms | "
        f"{', '.join(f'{t:.4f}' for t in inproc)} | |",
        "",
        f"torch imported by the estimate path: {'yes (regression)' if torch_loaded else 'no'}.",
        "",
        "Output:",
        "",
        "```",
        table.rstrip(),
        "```",
        "",
    ]
    SECTION_DIR.mkdir(parents=True, exist_ok=True)
    (SECTION_DIR / "estimate.md").write_text("\n".join(lines))
    print("\n".join(lines[:14]))
    return 0 if wall_med < TARGET_S and not torch_loaded else 1


if __name__ == "__main__":
    sys.exit(main())
