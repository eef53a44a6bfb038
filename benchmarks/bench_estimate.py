"""`ztune estimate` wall time for a 70B model (issue #14 target: < 0.25 s median, torch not imported).

Times the full command as a user runs it (`python -m ztune estimate ...` in a fresh process: interpreter
start, imports, sweep, rendering; median of 5) and the command alone in-process (CliRunner on the already
imported app; median of 5 after one warm-up). Writes docs/bench/estimate.md.
"""

from __future__ import annotations

import datetime as dt
import statistics
import subprocess
import sys
import time

from run_all import ROOT, SECTION_DIR, machine_line  # benchmarks/ is on sys.path when run as a script

ARGS = ["estimate", "--model", "llama-2-70b", "--hardware", "dgx-h100", "--nodes", "4", "--seq", "4096",
        "--global-batch", "1024"]
RUNS = 5
TARGET_S = 0.25


def subprocess_times() -> tuple[list[float], str]:
    times, output = [], ""
    for _ in range(RUNS):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "ztune", *ARGS], capture_output=True, text=True, cwd=ROOT,
                             check=True)
        times.append(time.perf_counter() - start)
        output = out.stdout
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
    wall, table = subprocess_times()
    inproc, torch_loaded = in_process_times()
    wall_med, inproc_med = statistics.median(wall), statistics.median(inproc)
    lines = [
        "## `ztune estimate` (70B)",
        "",
        f"Command: `python -m ztune {' '.join(ARGS)}`  ",
        f"Machine: {machine_line()}  ",
        f"Date: {dt.datetime.now().isoformat(timespec='seconds')}",
        "",
        "| measurement | median of 5 | all runs (s) | target |",
        "|---|---|---|---|",
        f"| wall clock, fresh process | {wall_med:.3f} s | {', '.join(f'{t:.3f}' for t in wall)} | "
        f"< {TARGET_S} s: {'met' if wall_med < TARGET_S else 'MISSED'} |",
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
    print("\n".join(lines[:12]))
    return 0 if wall_med < TARGET_S and not torch_loaded else 1


if __name__ == "__main__":
    sys.exit(main())
