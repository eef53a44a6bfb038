"""`ztune autotune -H` on the cluster in a box: does the search pick (nearly) the best of its grid, measuring
few of it, and leave nothing behind on any host?

    python benchmarks/bench_autotune_cluster.py [--quick]      (root; `make bench-autotune-cluster`)

Builds a box of 2 hosts x 2 ranks (benchmarks/cluster_box.py) with links shaped to 1 Gbit/s and sshd on each
host, then does what a user of two such machines would, all from host 0 (the head):
1. `ztune probe --inter-node-master` on both hosts: the measured link (and this machine's compute) written
   to a hardware profile, which the tuner then reads with `--hardware`;
2. `ztune autotune -H hostfile` (the real CLI; every trial through `ztune launch` over ssh, with its default
   confirmation: the search's leaders measured again, interleaved, the pick on their medians): which
   candidates it measured, how many trials it ran in all, and which it picked on which samples;
3. the same command with `--exhaustive --confirm 0` and a fresh journal: every candidate of the same grid
   measured once with the same trial settings, the ground truth (step 4 repeats its leaders);
4. the exhaustive run's 3 fastest candidates and the tuner's pick again, `--rounds` times each, interleaved
   (each trial run exactly as the tuner runs one: ztune.tune.hosts.run_trial_on_hosts), since a single trial
   on a shared machine is one sample of a load that changes by the minute;
5. a third tuner killed with SIGKILL while its first trial runs on both hosts (run right after step 2).
During 2, 3 and 4 a watcher samples every process in the box's namespaces: a process that existed when a trial
was journalled as finished and is still alive afterwards is a leftover of that trial. After each tuner ends
(and after the SIGKILL) the box must hold nothing but its keepers and sshd listeners.

Reports the grid, the fraction the tuner measured (target <= 30%), the pick's step time against the grid's
best (target within 5%; judged on the medians of step 4), and the process checks; writes
docs/bench/autotune_cluster.md. Exit 1 if a target or a check fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks.cluster_box import ClusterBox, why_unavailable  # noqa: E402
from benchmarks.netns import ns_pids, start_ticks  # noqa: E402
from tests.e2e.strays import describe  # noqa: E402

OUT_PATH = ROOT / "docs" / "bench" / "autotune_cluster.md"
NUM_HOSTS, RANKS_PER_HOST, RATE_MBIT = 2, 2, 1000
# The workload: tiny-llama in bf16, global batch 8 (2 samples per rank: micro-batch 1 or 2), seq 64.
TUNE_ARGS = ["--model", "tiny-llama", "--precision", "bf16", "--global-batch", "8", "--seq", "64",
             "--stages", "0,1,2,3", "--vary", "stage,checkpointing,micro"]
TARGET_MEASURED_FRACTION = 0.30  # DESIGN.md: autotune spends <= 30% of the grid
TARGET_PICK_RATIO = 1.05  # ... and picks within 5% of the grid's best
SETTLE_S = 60.0  # how long a finished tuner's processes may take to go before they count as left behind
HZ = os.sysconf("SC_CLK_TCK")


def _env() -> dict[str, str]:
    """The tuner's environment: one thread per rank; the box's hosts are real, so no simulated host layout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ZTUNE_LOCAL_WORLD_SIZE", None)
    return env


def _uptime_s() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


class LeftoverWatch(threading.Thread):
    """Samples the box while a tuner runs. A process (not a box service, not the tuner itself) that started
    before trial i's journal record was written and is alive after it is a leftover of trial i.

    Start times and record times are compared on one clock: /proc's ticks since boot, the record's wall time
    converted through /proc/uptime at the moment of the sample (psutil's create_time rounds boot time to a
    second, too coarse for back-to-back trials)."""

    def __init__(self, box: ClusterBox, journal: Path, tuner_pid: int) -> None:
        super().__init__(daemon=True)
        self.box, self.journal, self.tuner_pid = box, journal, tuner_pid
        self.stop = threading.Event()
        self.leftovers: dict[int, str] = {}  # pid -> description (with the trial it outlived)
        self.samples_after: dict[int, int] = {}  # trial index -> samples taken after its record

    def _records(self) -> list[tuple[int, str, float]]:
        out = []
        try:
            lines = self.journal.read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if rec.get("kind") in ("trial", "repeat"):  # repeat: a confirmation trial (ztune/tune/confirm.py)
                out.append((rec["index"], rec["key"], rec["time"]))
        return out

    def run(self) -> None:
        services = self.box.service_pids() | {self.tuner_pid}
        while not self.stop.wait(0.5):
            records = self._records()
            if not records:
                continue
            now_wall, now_up = time.time(), _uptime_s()
            for index, _key, _t in records:
                self.samples_after[index] = self.samples_after.get(index, 0) + 1
            for pid in self.box.pids() - services:
                ticks = start_ticks(pid)
                if ticks is None or pid in self.leftovers:
                    continue
                started_up = ticks / HZ
                for index, key, t in records:
                    # Started before trial `index` was journalled (the tuner computes, prints and journals a
                    # "start" record before its next trial's first fork: far more than this margin, which
                    # covers the tick's 10 ms truncation).
                    if started_up < now_up - (now_wall - t) - 0.05:
                        self.leftovers[pid] = f"alive after trial {index} ({key}) ended: {_describe(pid)}"
                        break


def _describe(pid: int) -> str:
    try:
        return describe([psutil.Process(pid)]) or f"pid {pid} (gone)"
    except psutil.Error:
        return f"pid {pid} (gone)"


def wait_box_empty(box: ClusterBox, *, limit_s: float = SETTLE_S) -> tuple[float, str]:
    """(seconds until the box holds only its services, "" or what was still there after `limit_s`)."""
    t0 = time.monotonic()
    while True:
        left = box.pids() - box.service_pids()
        if not left:
            return time.monotonic() - t0, ""
        if time.monotonic() - t0 > limit_s:
            return time.monotonic() - t0, "; ".join(_describe(p) for p in sorted(left))
        time.sleep(0.2)


def probe(box: ClusterBox, work: Path) -> tuple[Path, dict]:
    """`ztune probe --quick --ranks 2 --inter-node-master` on both hosts, as a user would; host 0's profile."""
    master = f"{box.hosts[0].addr}:29511"
    procs = [box.popen(k, [sys.executable, "-m", "ztune", "probe", "--quick", "--ranks", str(RANKS_PER_HOST),
                           "--json", "--force", "--output", str(work / f"probe-host{k}.yaml"),
                           "--inter-node-master", master, "--node-rank", str(k)],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env=_env()) for k in range(NUM_HOSTS)]
    outs = [p.communicate(timeout=600) for p in procs]
    if procs[0].returncode:
        raise RuntimeError(f"ztune probe failed on host 0: {outs[0][1].strip()[-500:]}")
    fit = json.loads(outs[0][0])["measured"]["inter_node"]["fit"]
    return work / "probe-host0.yaml", {"gbps": fit["busbw_bytes_per_s"] * 8 / 1e9,
                                       "latency_us": fit["latency_s"] * 1e6}


def tuner_argv(*, hostfile: Path, ssh_config: Path, hardware: Path, out: Path, port: int, warmup: int,
               steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "ztune", "autotune", "-H", str(hostfile), "-F", str(ssh_config),
            "--workdir", str(ROOT), "--hardware", str(hardware), *TUNE_ARGS, "--warmup", str(warmup),
            "--steps", str(steps), "--out", str(out), "--fresh", "--no-plot", "--json",
            "--master-port", str(port), *extra]


def run_tuner(box: ClusterBox, argv: list[str], out: Path, *, timeout_s: float) -> dict:
    """One tuner run on host 0 with the leftover watch; its JSON result plus the process checks."""
    out.mkdir(parents=True, exist_ok=True)
    load0, t0 = os.getloadavg()[0], time.monotonic()
    with open(out / "stdout.json", "w") as so, open(out / "stderr.txt", "w") as se:
        proc = box.popen(0, argv, cwd=ROOT, stdout=so, stderr=se, stdin=subprocess.DEVNULL,
                         env=_env())
        watch = LeftoverWatch(box, out / "journal.jsonl", proc.pid)
        watch.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        watch.stop.set()
        watch.join()
    wall_s = time.monotonic() - t0
    settle_s, left = wait_box_empty(box)
    text = (out / "stdout.json").read_text()
    result = json.loads(text) if proc.returncode == 0 and text.strip() else None
    return {"rc": proc.returncode, "result": result, "wall_s": wall_s, "load": (load0, os.getloadavg()[0]),
            "trial_leftovers": sorted(watch.leftovers.values()), "samples_after": watch.samples_after,
            "settle_s": settle_s, "left_after_run": left,
            "stderr_tail": (out / "stderr.txt").read_text()[-2000:]}


def sigkill_check(box: ClusterBox, argv: list[str], *, log: Path, limit_s: float = 300.0) -> dict:
    """Start a tuner, SIGKILL it once its first trial's ranks run on every host; how long until the box is
    empty again (and what was left, if anything). The tuner's output goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = box.popen(0, argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env=_env())
    t0 = time.monotonic()
    ranks: dict[str, int] = {}
    try:
        while True:
            ranks = {h.ns: sum(_is_rank(pid) for pid in ns_pids(h.ns) - box.service_pids()) for h in box.hosts}
            if all(n >= RANKS_PER_HOST for n in ranks.values()):
                break
            if proc.poll() is not None or time.monotonic() - t0 > limit_s:
                proc.kill()
                proc.wait()
                wait_box_empty(box)
                return {"ok": False, "why": f"the trial did not start on every host ({ranks}): "
                                            f"{log.read_text()[-1500:]}"}
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    settle_s, left = wait_box_empty(box)
    return {"ok": not left, "ranks_seen": ranks, "settle_s": settle_s, "left": left}


def _is_rank(pid: int) -> bool:
    """A training rank: torchrun sets LOCAL_RANK in its workers' environment (not in its own, nor the launcher's)."""
    try:
        return "LOCAL_RANK" in psutil.Process(pid).environ()
    except psutil.Error:
        return False


def remeasure_argv(*, hostfile: Path, ssh_config: Path, configs: dict[str, str], rounds: int, warmup: int,
                   steps: int, port: int, out: Path) -> list[str]:
    spec = out / "spec.json"
    out.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps({"hostfile": str(hostfile), "ssh_config": str(ssh_config), "configs": configs,
                                "rounds": rounds, "warmup": warmup, "steps": steps, "port": port,
                                "out": str(out)}))
    return [sys.executable, str(Path(__file__).resolve()), "--remeasure", str(spec)]


def remeasure(spec_path: Path) -> int:
    """Run on the head: each config of the spec `rounds` times, interleaved (round r in order, reversed on odd
    rounds, so a load that drifts during the run weighs on every config alike), each a trial exactly as the
    tuner runs it on hosts (ztune.tune.hosts.run_trial_on_hosts: `ztune launch` over ssh, the built-in
    workload, the same warm-up and measured steps). Journals each trial like the tuner; prints JSON."""
    from ztune.tune.hosts import HostTrials, run_trial_on_hosts

    spec = json.loads(spec_path.read_text())
    out = Path(spec["out"])
    hosts = HostTrials(hostfile=spec["hostfile"], ssh_config=spec["ssh_config"], workdir=str(ROOT),
                       base_port=spec["port"])
    keys = sorted(spec["configs"])
    trials = []
    for r in range(spec["rounds"]):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            index = len(trials) + 1
            outcome = run_trial_on_hosts(
                hosts=hosts, index=index, config_path=spec["configs"][key], report_path=out / f"{index}.report.jsonl",
                log_path=out / f"{index}.log", script=str(ROOT / "ztune" / "tune" / "worker.py"),
                script_args=("--model", "tiny-llama"), warmup_steps=spec["warmup"], measured_steps=spec["steps"],
                timeout_s=900, stall_s=300, preflight_cache=out / "preflight.json")
            rec = {"kind": "trial", "index": index, "key": key, "round": r, "status": outcome.status,
                   "reason": outcome.reason, "step_time_s": outcome.step_time_s, "time": time.time()}
            with open(out / "journal.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            trials.append(rec)
    print(json.dumps({"trials": trials}))
    return 0


def top_keys(exhaustive: dict, *, pick: str, k: int = 3) -> list[str]:
    """The `k` fastest candidates of the exhaustive run, and the tuner's pick."""
    ok = sorted((tr["step_time_s"], tr["key"]) for tr in exhaustive["trials"]
                if tr["status"] == "ok" and tr["step_time_s"])
    return sorted({key for _, key in ok[:k]} | {pick})


def phases_rounds(repeats: dict) -> int:
    return 1 + max(tr["round"] for tr in repeats["result"]["trials"])


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def summarize(tuned: dict, exhaustive: dict, repeats: dict | None) -> dict:
    """Grid, measured fraction, and the pick against the best: on the exhaustive run's single measurements,
    and on the medians of the interleaved repeats of the top candidates (where those ran)."""
    t, e = tuned["result"], exhaustive["result"]
    grid = {tr["key"]: tr for tr in e["trials"]}
    ok = {k: tr["step_time_s"] for k, tr in grid.items() if tr["status"] == "ok" and tr["step_time_s"]}
    best_key = min(ok, key=ok.get)
    pick = t["best"]["key"]
    out = {
        "grid_size": t["grid_size"], "exhaustive_grid_size": e["grid_size"], "exhaustive_measured": len(grid),
        "tuner_measured": len(t["trials"]), "measured_fraction": len(t["trials"]) / t["grid_size"],
        "time_fraction": tuned["wall_s"] / exhaustive["wall_s"],
        "tuner_trials_total": t.get("total_trials", len(t["trials"])), "tuner_repeats": t.get("num_repeats", 0),
        "confirmation": t.get("confirmation", ""), "pick_tuner_samples": t["best"].get("samples_s", []),
        # The tuner's own figure for its pick: the median of its samples (search trial + confirmation repeats).
        "pick": pick, "pick_tuner_s": t["best"]["step_time_s"], "pick_exhaustive_s": ok.get(pick),
        "best_key": best_key, "best_s": ok[best_key],
        "pick_ratio": ok[pick] / ok[best_key] if pick in ok else None,
        "pick_rank": sorted(ok, key=ok.get).index(pick) + 1 if pick in ok else None,
        "repeats": None,
    }
    if repeats is not None and repeats["result"] is not None:
        # Each repeated candidate's samples: its exhaustive-run trial, then its repeats (3 with 2 rounds, so the
        # median ignores one trial that a burst of load on the shared machine slowed down).
        runs: dict[str, list[float]] = {}
        for tr in repeats["result"]["trials"]:
            runs.setdefault(tr["key"], [ok[tr["key"]]] if tr["key"] in ok else [])
            if tr["status"] == "ok" and tr["step_time_s"]:
                runs[tr["key"]].append(tr["step_time_s"])
        med = {k: _median(v) for k, v in runs.items() if v}
        if pick in med:
            best_rep = min(med, key=med.get)
            out["repeats"] = {"runs": runs, "median": med, "best_key": best_rep,
                              "pick_ratio": med[pick] / med[best_rep]}
    # The verdict: the repeated medians where they exist (a single trial on a shared machine drifts with the
    # load), else the exhaustive run's single measurements.
    out["verdict_ratio"] = out["repeats"]["pick_ratio"] if out["repeats"] else out["pick_ratio"]
    return out


def render(*, s: dict, tuned: dict, exhaustive: dict, repeats: dict | None, killed: dict, link: dict,
           command: str, loads: tuple, elapsed_s: float, warmup: int, steps: int) -> str:
    from run_all import machine_line

    t, e = tuned["result"], exhaustive["result"]
    tuned_keys = {tr["key"]: tr for tr in t["trials"]}
    ok_frac = s["measured_fraction"] <= TARGET_MEASURED_FRACTION
    ok_pick = s["verdict_ratio"] is not None and s["verdict_ratio"] <= TARGET_PICK_RATIO
    rep = s["repeats"]
    lines = [
        "## Autotune across hosts: `ztune autotune -H` on the cluster in a box",
        "",
        f"Command: `{command}` (as root; also `make bench-autotune-cluster`). Date: {dt.date.today().isoformat()}. "
        f"Machine: {machine_line()}. Load average (1 min) {loads[0]:.1f} at the start, {loads[1]:.1f} at the end "
        f"(tuner run {tuned['load'][0]:.1f} -> {tuned['load'][1]:.1f}, exhaustive run {exhaustive['load'][0]:.1f} "
        f"-> {exhaustive['load'][1]:.1f}): the machine is shared, so times are slow and noisy. Whole run: "
        f"{elapsed_s:.0f} s.",
        "",
        f"{NUM_HOSTS} hosts x {RANKS_PER_HOST} ranks (network namespaces with their own /dev/shm and hostname, "
        f"sshd on each), links shaped to {RATE_MBIT / 1000:g} Gbit/s with tc tbf; the tuner runs on host 0 and "
        "starts every trial with `ztune launch` over ssh. Hardware profile: `ztune probe --quick --ranks 2 "
        f"--inter-node-master` on both hosts, which measured {link['gbps']:.2f} Gbit/s and "
        f"{link['latency_us']:,.0f} us per ring step between them. Workload: `{' '.join(TUNE_ARGS)}`, "
        f"{warmup} warm-up and {steps} measured step(s) per trial (the median is the trial's step time). "
        "The grid is the tuner's own: ZeRO stage 0-3 x activation checkpointing (none, full) x micro-batch "
        "(1, 2; gradient accumulation follows). Collectives are hierarchical in every candidate "
        "(`comm.hierarchical: auto` turns them on for a multi-host gloo job; the tuner does not vary it).",
        "",
        f"- **Grid: {s['grid_size']} candidates. The tuner measured {s['tuner_measured']} "
        f"({s['measured_fraction']:.0%}; target <= {TARGET_MEASURED_FRACTION:.0%}: "
        f"{'met' if ok_frac else 'MISSED'})**, {s['tuner_trials_total']} trials in all with "
        f"{s['tuner_repeats']} confirmation repeat(s) of already measured candidates, in {tuned['wall_s']:.0f} s, "
        f"{s['time_fraction']:.0%} of the exhaustive run's {exhaustive['wall_s']:.0f} s; the search stopped: "
        f"{t['stop_reason']}; confirmation: {s['confirmation'] or 'none'}.",
        f"- **Pick: {s['pick']}**, a median of {s['pick_tuner_s'] * 1e3:,.0f} ms/step by the tuner (samples "
        f"{', '.join(f'{x * 1e3:,.0f}' for x in s['pick_tuner_samples']) or '-'}) and "
        + (f"{s['pick_exhaustive_s'] * 1e3:,.0f} ms/step in the exhaustive run, rank {s['pick_rank']} of "
           f"{len([1 for tr in e['trials'] if tr['status'] == 'ok'])}. **Grid best (exhaustive run): "
           f"{s['best_key']} at {s['best_s'] * 1e3:,.0f} ms/step; pick / best = {s['pick_ratio']:.3f}**"
           + (f". **Repeated (the exhaustive run's top 3 and the pick, each its exhaustive trial plus "
              f"{phases_rounds(repeats)} interleaved repeats; medians): best {rep['best_key']}, pick / best = "
              f"{rep['pick_ratio']:.3f}**" if rep else "")
           + f" (target <= {TARGET_PICK_RATIO}, judged on the "
           + ("repeats" if rep else "single measurements") + f": **{'met' if ok_pick else 'MISSED'}**)."
           if s["pick_ratio"] is not None else "not measured ok in the exhaustive run (MISSED)."),
        "- Processes: " + "; ".join([
            f"tuner run: {sum(1 for v in tuned['samples_after'].values() if v)} trials checked after they ended, "
            f"{len(tuned['trial_leftovers'])} leftover(s), box empty {tuned['settle_s']:.1f} s after the tuner "
            "exited" + (f" **NOT: {tuned['left_after_run']}**" if tuned["left_after_run"] else ""),
            f"exhaustive run: {sum(1 for v in exhaustive['samples_after'].values() if v)} trials checked, "
            f"{len(exhaustive['trial_leftovers'])} leftover(s), box empty {exhaustive['settle_s']:.1f} s after "
            "it exited" + (f" **NOT: {exhaustive['left_after_run']}**" if exhaustive["left_after_run"] else ""),
            ("SIGKILL of a tuner while its trial ran on both hosts: box empty "
             f"{killed['settle_s']:.1f} s later" if killed.get("ok") else
             f"SIGKILL of a tuner: **FAILED: {killed.get('why') or killed.get('left')}**")]) + ".",
    ]
    for label, run in (("tuner", tuned), ("exhaustive", exhaustive), ("repeats", repeats)):
        for text in (run or {}).get("trial_leftovers", ()):
            lines.append(f"  - {label}: **leftover** {text}")
    lines += ["", "| candidate | exhaustive: ms/step | status | tuner: trial # | tuner: ms/step (all samples) |",
              "|---|---:|---|---:|---:|"]
    for tr in sorted(e["trials"], key=lambda x: (x["step_time_s"] is None, x["step_time_s"] or 0)):
        mine = tuned_keys.get(tr["key"])
        mark = (" (pick)" if tr["key"] == s["pick"] else "") + (" (best)" if tr["key"] == s["best_key"] else "")
        lines.append(f"| {tr['key']}{mark} | "
                     + (f"{tr['step_time_s'] * 1e3:,.0f}" if tr["step_time_s"] else "-")
                     + f" | {tr['status']} | {mine['index'] if mine else ''} | "
                     + (f"{mine['step_time_s'] * 1e3:,.0f}" if mine and mine["step_time_s"] else "")
                     + (f" ({', '.join(f'{x * 1e3:,.0f}' for x in mine['samples_s'])})"
                        if mine and len(mine.get("samples_s") or ()) > 1 else "") + " |")
    if rep:
        lines += ["", "Repeats (each candidate's exhaustive-run trial first, then the interleaved repeats: round r "
                  "runs the candidates in order, reversed on odd rounds, each a trial as the tuner runs it on the "
                  "hosts), ms/step:", "",
                  "| candidate | trials | median |", "|---|---|---:|"]
        for key in sorted(rep["median"], key=rep["median"].get):
            lines.append(f"| {key} | {', '.join(f'{x * 1e3:,.0f}' for x in rep['runs'][key])} | "
                         f"{rep['median'][key] * 1e3:,.0f} |")
        spread = max(max(v) / min(v) for v in rep["runs"].values() if v)
        lines.append(f"\nOne candidate's trials differ by up to {spread:.2f}x (slowest / fastest) here, against "
                     "a 5% target: on this shared machine the pick is decided by the load each trial met as much "
                     "as by the configuration.")
        lines.append(f"\nRepeats: {repeats['wall_s']:.0f} s, load {repeats['load'][0]:.1f} -> "
                     f"{repeats['load'][1]:.1f}, {len(repeats['trial_leftovers'])} leftover(s) after trials, box "
                     f"empty {repeats['settle_s']:.1f} s after the last"
                     + (f" **NOT: {repeats['left_after_run']}**" if repeats["left_after_run"] else "") + ".")
    lines += ["", "How to reproduce this on real hosts: docs/autotune.md, \"Tuning across hosts, step by step\"."]
    return "\n".join(lines).rstrip() + "\n"


def measure(args: argparse.Namespace, work: Path, tmp: Path) -> dict:
    """Every phase in one box; returns what `finish` renders (also kept as work/phases.json)."""
    warmup, steps = (1, 1) if args.quick else (1, 4)  # ztune autotune's own defaults (--warmup 1 --steps 4)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    with ClusterBox(num_hosts=NUM_HOSTS, rate_mbit=RATE_MBIT) as box:
        ssh_config = box.start_sshd(tmp / "ssh")
        hostfile = work / "hostfile"
        hostfile.write_text("".join(f"{h.hostname} slots={RANKS_PER_HOST}\n" for h in box.hosts))
        hardware, link = probe(box, work)
        print(f"probe: {link['gbps']:.2f} Gbit/s, {link['latency_us']:.0f} us", flush=True)
        common = dict(hostfile=hostfile, ssh_config=ssh_config, hardware=hardware, warmup=warmup, steps=steps)
        tuned = run_tuner(box, tuner_argv(out=work / "tuned", port=29600, extra=[], **common), work / "tuned",
                          timeout_s=3600)
        print(f"tuner: rc {tuned['rc']} in {tuned['wall_s']:.0f} s, load {tuned['load']}", flush=True)
        killed = sigkill_check(box, tuner_argv(out=work / "killed", port=29800, extra=[
            "--stages", "1", "--vary", "stage", "--micro", "2"], **{**common, "steps": 100000}),
            log=work / "killed" / "output.txt")
        print(f"sigkill: {killed}", flush=True)
        exhaustive = run_tuner(box, tuner_argv(out=work / "exhaustive", port=29700, extra=["--exhaustive",
                                                                                           "--confirm", "0"],
                                               **common), work / "exhaustive", timeout_s=5400)
        print(f"exhaustive: rc {exhaustive['rc']} in {exhaustive['wall_s']:.0f} s, load {exhaustive['load']}",
              flush=True)
        repeats = None
        if tuned["result"] and exhaustive["result"] and args.rounds > 0:
            keys = top_keys(exhaustive["result"], pick=tuned["result"]["best"]["key"])
            configs = {k: str(work / "exhaustive" / "trials" / f"{k}.yaml") for k in keys}
            repeats = run_tuner(box, remeasure_argv(hostfile=hostfile, ssh_config=ssh_config, configs=configs,
                                                    rounds=args.rounds, warmup=warmup, steps=steps, port=29900,
                                                    out=work / "repeats"), work / "repeats", timeout_s=5400)
            print(f"repeats: rc {repeats['rc']} in {repeats['wall_s']:.0f} s, load {repeats['load']}", flush=True)
    phases = {"tuned": tuned, "exhaustive": exhaustive, "repeats": repeats, "killed": killed, "link": link,
              "loads": (load_start, os.getloadavg()[0]), "elapsed_s": time.perf_counter() - start,
              "warmup": warmup, "steps": steps,
              "command": "python benchmarks/bench_autotune_cluster.py" + (" --quick" if args.quick else "")}
    (work / "phases.json").write_text(json.dumps(phases))
    return phases


def finish(phases: dict, out: Path | None) -> int:
    """Render, write, and the exit code: 0 when both targets are met and every process check passed."""
    tuned, exhaustive, repeats = phases["tuned"], phases["exhaustive"], phases["repeats"]
    for name, run in (("tuner", tuned), ("exhaustive", exhaustive)):
        if run["result"] is None:
            print(f"{name} run failed (exit {run['rc']}):\n{run['stderr_tail']}", file=sys.stderr)
            return 1
    s = summarize(tuned, exhaustive, repeats)
    text = render(s=s, tuned=tuned, exhaustive=exhaustive, repeats=repeats, killed=phases["killed"],
                  link=phases["link"], command=phases["command"], loads=phases["loads"],
                  elapsed_s=phases["elapsed_s"], warmup=phases["warmup"], steps=phases["steps"])
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    runs = [r for r in (tuned, exhaustive, repeats) if r is not None]
    checks_ok = phases["killed"].get("ok") and not any(r["trial_leftovers"] or r["left_after_run"] for r in runs)
    targets_ok = s["measured_fraction"] <= TARGET_MEASURED_FRACTION and s["verdict_ratio"] is not None \
        and s["verdict_ratio"] <= TARGET_PICK_RATIO
    return 0 if checks_ok and targets_ok else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 measured step per trial (smoke run)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats of the top candidates")
    parser.add_argument("--work", type=Path, default=None, help="directory for journals and logs (default: tmp)")
    parser.add_argument("--render", type=Path, default=None, help="only render a finished run's phases.json")
    parser.add_argument("--remeasure", type=Path, default=None, help=argparse.SUPPRESS)  # inside host 0
    parser.add_argument("--out", type=Path, default=None,
                        help=f"markdown section (default {OUT_PATH.relative_to(ROOT)}; with --quick only when given)")
    args = parser.parse_args(argv)
    if args.remeasure is not None:
        return remeasure(args.remeasure)
    out = args.out or (None if args.quick else OUT_PATH)
    if args.render is not None:
        return finish(json.loads(args.render.read_text()), out)
    if (reason := why_unavailable()) is not None:
        print(f"bench_autotune_cluster: cannot build the cluster in a box: {reason}", file=sys.stderr)
        return 2
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp) / "work"
        work.mkdir(parents=True, exist_ok=True)
        phases = measure(args, work, Path(tmp))
    return finish(phases, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
