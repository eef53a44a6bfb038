"""Autotune vs the exhaustive grid: does the tuner pick (nearly) the best config while measuring few?

1. Run `ztune autotune` (the CLI, fresh journal) on tiny-gpt, 2 gloo ranks, and record its pick, trials,
   wall time and calibrated step-time error.
2. Measure every candidate of the same space with the same trial runner and settings (the grid).
3. Confirm: the pick and the grid's best run again, alternately, CONFIRM_ROUNDS times each, because on a
   shared 2-core machine one trial's timing can be off by more than the 5% being tested.
4. Write docs/bench/autotune.md.

Targets (DESIGN.md): the pick within 5% of the grid's best step time; the tuner measured <= 30% of the
grid's candidates (and spent <= 30% of the grid's trial time).

Usage: python benchmarks/bench_autotune.py [--out DIR] [--reuse-grid] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ztune.config.io import save  # noqa: E402
from ztune.config.schema import TrainConfig  # noqa: E402
from ztune.tune.bench import run_trial  # noqa: E402
from ztune.tune.space import Candidate, Constraints, build_space  # noqa: E402

SPACE = {"model": "tiny-gpt", "hardware": "cpu-local", "nproc": 2, "global_batch": 8, "seq": 64,
         "stages": "0,1,2,3", "vary": "stage,checkpointing,micro", "precision": "fp32", "warmup": 1, "steps": 3}
QUICK = {"stages": "0,3", "vary": "stage,micro"}
CONFIRM_ROUNDS = 3
TRIAL_TIMEOUT_S = 240


def _space(space: dict) -> list[Candidate]:
    stages = tuple(int(s) for s in space["stages"].split(","))
    return build_space(Constraints(num_ranks=space["nproc"], global_batch=space["global_batch"],
                                   seq_len=space["seq"], vary=tuple(space["vary"].split(",")), stages=stages,
                                   precisions=(space["precision"],)))


def run_tuner(space: dict, out: Path) -> dict:
    args = [sys.executable, "-m", "ztune", "autotune", "--model", space["model"], "--hardware", space["hardware"],
            "--nproc", str(space["nproc"]), "--global-batch", str(space["global_batch"]), "--seq", str(space["seq"]),
            "--stages", space["stages"], "--vary", space["vary"], "--precision", space["precision"],
            "--warmup", str(space["warmup"]), "--steps", str(space["steps"]), "--out", str(out), "--fresh",
            "--json"]
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        raise SystemExit(f"autotune failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout)
    result["bench_wall_s"] = time.monotonic() - t0
    return result


def measure(c: Candidate, space: dict, work: Path, tag: str) -> dict:
    cfg = c.to_config(TrainConfig(), global_batch=space["global_batch"], seq_len=space["seq"])
    cfg_path = save(cfg, work / f"{c.key}.{tag}.yaml")
    o = run_trial(config_path=cfg_path, report_path=work / f"{c.key}.{tag}.report.jsonl",
                  log_path=work / f"{c.key}.{tag}.log", nproc=space["nproc"],
                  script=ROOT / "ztune" / "tune" / "worker.py", script_args=["--model", space["model"]],
                  warmup_steps=space["warmup"], measured_steps=space["steps"], timeout_s=TRIAL_TIMEOUT_S)
    return {"key": c.key, "status": o.status, "reason": o.reason, "step_time_s": o.step_time_s,
            "peak_memory_bytes": o.peak_memory_bytes, "wall_s": o.wall_s}


def measure_grid(cands: list[Candidate], space: dict, work: Path, cache: Path, reuse: bool) -> dict[str, dict]:
    grid: dict[str, dict] = json.loads(cache.read_text()) if reuse and cache.exists() else {}
    for i, c in enumerate(cands, 1):
        if c.key in grid:
            continue
        grid[c.key] = measure(c, space, work, "grid")
        r = grid[c.key]
        print(f"grid {i}/{len(cands)} {c.key}: {r['status']} "
              f"{(r['step_time_s'] or 0) * 1e3:.0f} ms ({r['wall_s']:.0f} s)", flush=True)
        cache.write_text(json.dumps(grid, indent=1))
    return grid


def confirm(pick: Candidate, best: Candidate, space: dict, work: Path) -> tuple[float, float]:
    """Median step time of the pick and of the grid's best over alternating re-runs."""
    if pick == best:
        return 0.0, 0.0
    times: dict[str, list[float]] = {pick.key: [], best.key: []}
    for i in range(CONFIRM_ROUNDS):
        for c in (pick, best) if i % 2 == 0 else (best, pick):
            r = measure(c, space, work, f"confirm{i}")
            if r["step_time_s"]:
                times[c.key].append(r["step_time_s"])
    return statistics.median(times[pick.key]), statistics.median(times[best.key])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "autotune")
    p.add_argument("--reuse-grid", action="store_true", help="reuse grid measurements cached in --out")
    p.add_argument("--quick", action="store_true", help="a 6-candidate space (a few minutes)")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "bench" / "autotune.md")
    args = p.parse_args()
    space = SPACE | (QUICK if args.quick else {})
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "grid"
    work.mkdir(exist_ok=True)
    cands = _space(space)
    by_key = {c.key: c for c in cands}

    print(f"tuner on {len(cands)} candidates ...", flush=True)
    tuned = run_tuner(space, args.out / "tuner")
    print(f"tuner: {tuned['num_trials']} trials, {tuned['wall_s']:.0f} s, pick {tuned['best']['key']}", flush=True)
    grid = measure_grid(cands, space, work, args.out / "grid.json", args.reuse_grid)
    ok = {k: r for k, r in grid.items() if r["status"] == "ok"}
    best_key = min(ok, key=lambda k: ok[k]["step_time_s"])
    pick_key = tuned["best"]["key"]
    grid_ratio = ok[pick_key]["step_time_s"] / ok[best_key]["step_time_s"] if pick_key in ok else float("inf")
    pick_s, best_s = confirm(by_key[pick_key], by_key[best_key], space, work)
    confirm_ratio = pick_s / best_s if best_s else 1.0
    # Every trial the tuner ran: its search trials and its confirmation repeats of already measured candidates.
    tuner_trial_s = sum(t["wall_s"] for t in tuned["trials"]) + sum(r["wall_s"] for r in tuned.get("repeats", []))
    grid_trial_s = sum(r["wall_s"] for r in grid.values())
    summary = {
        "space": space, "grid_size": len(cands), "tuner_trials": tuned["num_trials"],
        "tuner_repeats": tuned.get("num_repeats", 0), "tuner_samples": tuned["best"].get("samples_s"),
        "fraction_measured": tuned["num_trials"] / len(cands), "tuner_wall_s": tuned["wall_s"],
        "tuner_trial_s": tuner_trial_s, "grid_trial_s": grid_trial_s, "pick": pick_key, "grid_best": best_key,
        "pick_vs_best_grid": grid_ratio, "pick_vs_best_confirmed": confirm_ratio,
        "calibrated_error_mean": tuned["step_time_error"]["mean_abs"],
        "calibrated_error_max": tuned["step_time_error"]["max_abs"], "efficiency": tuned["efficiency"],
        "micro_step_overhead_s": tuned["micro_step_overhead_s"], "stop_reason": tuned["stop_reason"],
        "load_avg": os.getloadavg(),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_doc(args.doc, summary, tuned, grid)
    print(json.dumps(summary, indent=1))


def write_doc(path: Path, s: dict, tuned: dict, grid: dict[str, dict]) -> None:
    within = max(s["pick_vs_best_grid"], 1.0) <= 1.05 or s["pick_vs_best_confirmed"] <= 1.05
    tuned_keys = {t["key"] for t in tuned["trials"]}
    lines = [
        "# Autotune vs exhaustive grid",
        "",
        f"Generated by `benchmarks/bench_autotune.py` on {time.strftime('%Y-%m-%d %H:%M')}; machine load average "
        f"during the run {s['load_avg'][0]:.1f} / {s['load_avg'][1]:.1f} / {s['load_avg'][2]:.1f} (2 cores).",
        "",
        f"Space: {s['space']['model']} on {s['space']['nproc']} gloo ranks ({s['space']['hardware']}), global batch "
        f"{s['space']['global_batch']}, seq {s['space']['seq']}, {s['space']['precision']}, stages "
        f"{s['space']['stages']}, varying {s['space']['vary']}; every trial {s['space']['warmup']} warm-up + "
        f"{s['space']['steps']} measured steps (median).",
        "",
        "| metric | value | target |",
        "|---|---|---|",
        f"| candidates in the grid | {s['grid_size']} | |",
        f"| trials the tuner ran | {s['tuner_trials']} ({s['fraction_measured']:.0%}) | <= 30% |",
        f"| tuner trial time / grid trial time | {s['tuner_trial_s']:.0f} s / {s['grid_trial_s']:.0f} s "
        f"({s['tuner_trial_s'] / s['grid_trial_s']:.0%}) | <= 30% |",
        f"| tuner wall time | {s['tuner_wall_s']:.0f} s | |",
        f"| tuner's pick | {s['pick']} | |",
        f"| grid's best | {s['grid_best']} | |",
        f"| pick / best, grid pass | {s['pick_vs_best_grid']:.3f} | <= 1.05 |",
        f"| pick / best, confirmed ({CONFIRM_ROUNDS} alternating re-runs each, medians) | "
        f"{s['pick_vs_best_confirmed']:.3f} | <= 1.05 |",
        f"| calibrated step-time error on the tuner's trials (mean / max) | {s['calibrated_error_mean']:.1%} / "
        f"{s['calibrated_error_max']:.1%} | |",
        f"| target met | {'yes' if within and s['fraction_measured'] <= 0.30 else 'NO'} | |",
        "",
        f"Stop reason: {s['stop_reason']}. Calibrated efficiency: "
        + ", ".join(f"{k} {v:.3g}" for k, v in s["efficiency"].items())
        + f"; per-micro-step overhead {s['micro_step_overhead_s'] * 1e3:.1f} ms.",
        "",
        "## Grid (every candidate measured; T = also measured by the tuner)",
        "",
        "| config | status | step ms | peak MiB/rank | tuner |",
        "|---|---|---|---|---|",
    ]
    for key, r in sorted(grid.items(), key=lambda kv: kv[1]["step_time_s"] or 1e9):
        step = f"{r['step_time_s'] * 1e3:.0f}" if r["step_time_s"] else "-"
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r["peak_memory_bytes"] else "-"
        lines.append(f"| {key} | {r['status']} | {step} | {mem} | {'T' if key in tuned_keys else ''} |")
    lines += ["", "## Tuner trials (estimated vs measured)", "",
              "| # | config | status | est ms (uncalibrated) | calibrated ms | measured ms |",
              "|---|---|---|---|---|---|"]
    for t in tuned["trials"]:
        meas = f"{t['step_time_s'] * 1e3:.0f}" if t["step_time_s"] else "-"
        lines.append(f"| {t['index']} | {t['key']} | {t['status']} | {t['prior_step_time_s'] * 1e3:.0f} | "
                     f"{t['calibrated_step_time_s'] * 1e3:.0f} | {meas} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
