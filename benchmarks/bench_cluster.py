"""Where the network is the bottleneck: ztune and its peers on a cluster in a box, 2 hosts x 2 ranks.

    python benchmarks/bench_cluster.py [--quick] [--rates 1000,10000]      (root; `make bench-cluster`)

Builds a box of 2 hosts (benchmarks/cluster_box.py: network namespaces with their own /dev/shm and
hostname, links shaped with tc tbf), then for each link rate runs one torchrun job per host
(`--nnodes 2 --nproc-per-node 2`, so ranks inside a host may use shared memory and ranks on different hosts
talk gloo over the shaped link) in which every rank trains each variant of cluster_worker.VARIANTS in turn
on tiny-llama in bf16. Reports the step time (the timed steps' wall time over their number, mean over the ranks:
cluster_worker.step_ms) and the bytes that crossed between the
hosts per step, read from the kernel's counters of the hosts' veths (not from ztune's accounting), and
a single-stream TCP transfer between the hosts as what the shaped link actually carries here. Tears the
box down at the end, also on failure or SIGTERM. Judges issue 15's targets at 1 Gbit/s (TARGET_*; exit 1 if
one is missed). Writes docs/bench/cluster.md; `make bench` (with
--cluster, or `make bench-cluster`) assembles docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks.cluster_box import ClusterBox, rates_for_cli  # noqa: E402
from benchmarks.cluster_worker import ONEBIT_FREEZE_STEP, VARIANTS, step_ms  # noqa: E402

OUT_PATH = ROOT / "docs" / "bench" / "cluster.md"
WORKER = str(ROOT / "benchmarks" / "cluster_worker.py")
NUM_HOSTS, RANKS_PER_HOST = 2, 2
MODEL, PRECISION, MICRO_BATCH, SEQ_LEN = "tiny-llama", "bf16", 1, 128
# Below this fraction of the shaped rate, the measured link is limited by something else (the CPU here).
CPU_BOUND_FRACTION = 0.7
# Issue 15's targets, judged at TARGET_RATE_MBIT: hierarchical >= 1.3x faster than flat at every stage;
# ZeRO++ (qwZ+hpZ+qgZ) <= 0.3x the bytes across hosts of plain stage 3; 1-bit Adam after its warm-up <= 0.05x
# those of an fp32 all-reduce (DDP's gradients).
TARGET_RATE_MBIT = 1000
TARGET_HIER_SPEEDUP, TARGET_ZEROPP_BYTES, TARGET_ONEBIT_BYTES = 1.3, 0.3, 0.05


def run_rate(box: ClusterBox, rate_mbit: int, *, warmup: int, steps: int, timeout_s: float) -> dict:
    """Shape the box to `rate_mbit`, measure what one TCP stream gets, then run every variant."""
    box.set_rate(rate_mbit)
    link_mbit = box.measure_transfer_mbit(0, 1, num_bytes=max(8 << 20, rate_mbit * 1_000_000 // 8 // 4))
    probed = probe_link(box)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        start = time.perf_counter()
        results = box.torchrun([WORKER, "--model", MODEL, "--precision", PRECISION, "--micro-batch", str(MICRO_BATCH),
                                "--seq-len", str(SEQ_LEN), "--warmup", str(warmup), "--steps", str(steps),
                                "--out", str(out)],
                               nproc_per_node=RANKS_PER_HOST, env={"OMP_NUM_THREADS": "1"}, timeout_s=timeout_s)
        for r in results:
            print(r.output[-2000:] if r.returncode else "\n".join(
                line for line in r.output.splitlines() if line.startswith("[box]")), flush=True)
        failed = [f"host {r.host}: exit {r.returncode}" for r in results if r.returncode]
        result = json.loads(out.read_text()) if out.exists() else {"variants": []}
    result.update(rate_mbit=rate_mbit, link_mbit=link_mbit, probe=probed, wall_s=time.perf_counter() - start,
                  failed=failed)
    return result


def probe_link(box: ClusterBox) -> dict | str:
    """`ztune probe --quick --inter-node-master` on both hosts: the link as the cost model will see it
    ({"gbps", "latency_us"} from host 0's JSON), or the error."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = [box.popen(k, [sys.executable, "-m", "ztune", "probe", "--quick", "--ranks", "1", "--json", "--force",
                               "--output", f"{tmp}/host{k}.yaml", "--inter-node-master",
                               f"{box.hosts[0].addr}:29511", "--node-rank", str(k)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
    if procs[0].returncode:
        return f"ztune probe failed: {outs[0][1].strip()[-200:]}"
    fit = json.loads(outs[0][0])["measured"]["inter_node"]["fit"]
    return {"gbps": fit["busbw_bytes_per_s"] * 8 / 1e9, "latency_us": fit["latency_s"] * 1e6}


def _mib(num_bytes: float | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:,.1f}"


def _record(run: dict, name: str) -> dict | None:
    rec = next((x for x in run["variants"] if x["name"] == name), None)
    return None if rec is None or rec.get("error") else rec


def targets(runs: list[dict]) -> list[tuple[str, float | None, bool]]:
    """Issue 15's targets at TARGET_RATE_MBIT: (what, measured ratio or None if not measured, met)."""
    run = next((r for r in runs if r["rate_mbit"] == TARGET_RATE_MBIT), None)
    if run is None:
        return []
    out = []

    def ratio(num: str, den: str, value) -> float | None:
        """value(record) of `num` over that of `den`; None where either is missing, failed or 0."""
        a, b = _record(run, num), _record(run, den)
        return None if a is None or b is None or not value(b) else value(a) / value(b)

    def sent(rec: dict) -> float:
        return rec["tx_bytes_per_step"]

    for stage in range(4):
        r = ratio(f"ztune flat, stage {stage}", f"ztune hierarchical, stage {stage}", step_ms)
        out.append((f"stage {stage}: hierarchical >= {TARGET_HIER_SPEEDUP}x faster than flat (flat / hierarchical "
                    "ms/step)", r, r is not None and r >= TARGET_HIER_SPEEDUP))
    zpp = next((v.name for v in VARIANTS if v.name.startswith("ztune ZeRO++")), "")
    for plain in ("ztune hierarchical, stage 3", "ztune flat, stage 3"):
        r = ratio(zpp, plain, sent)
        out.append((f"ZeRO++ bytes across hosts <= {TARGET_ZEROPP_BYTES}x those of {plain.removeprefix('ztune ')}",
                    r, r is not None and r <= TARGET_ZEROPP_BYTES))
    r = ratio("ztune 1-bit Adam, stage 0", "DDP", sent)
    out.append((f"1-bit Adam bytes across hosts <= {TARGET_ONEBIT_BYTES}x those of DDP's fp32 all-reduce", r,
                r is not None and r <= TARGET_ONEBIT_BYTES))
    return out


def render(runs: list[dict], *, command: str, elapsed_s: float, loads: tuple, steps: int, warmup: int) -> str:
    from run_all import machine_line

    rates = [r["rate_mbit"] for r in runs]
    head = "| variant | ZeRO stage | " + " | ".join(
        f"{r / 1000:g} Gbit/s: ms/step | MiB across hosts/step" for r in rates) + " | loss (last step, rank 0) |"
    lines = [
        "## Cluster in a box: 2 hosts x 2 ranks behind shaped links",
        "",
        f"Command: `{command}` (as root; also `make bench-cluster`). Date: {dt.date.today().isoformat()}. "
        f"Machine: {machine_line()}. Load average (1 min) {loads[0]:.1f} at the start, {loads[1]:.1f} at the "
        f"end: this machine is shared, so absolute times are slow and noisy; bytes are not. Whole run: "
        f"{elapsed_s:.0f} s.",
        "",
        f"{MODEL}, {PRECISION}, micro batch {MICRO_BATCH} x seq {SEQ_LEN} per rank, {NUM_HOSTS} hosts x "
        f"{RANKS_PER_HOST} ranks (torchrun per host, LOCAL_WORLD_SIZE={RANKS_PER_HOST}), one thread per rank; "
        f"{warmup} warm-up step(s), then {steps} timed step(s) per variant. The hosts are network namespaces with "
        "their own /dev/shm and hostname (benchmarks/cluster_box.py), so ranks of one host may share memory "
        "and ranks of different hosts cannot; each host's link is shaped in both directions with tc tbf. "
        "`ms/step`: the timed steps' wall time over their number, mean over the ranks (cluster_worker.step_ms; "
        "before 2026-12-08 the median over steps of the slowest rank's step, which overstates stage 0's by 9-15%). "
        "`MiB across hosts/step`: the bytes both hosts sent on "
        "their veths during the timed steps (kernel interface counters, IP and TCP headers included), per "
        "step. ztune flat = its default collectives over the whole job (gloo, as shared memory does not span "
        "hosts); DeepSpeed on flat gloo; DDP all-reduces fp32 gradients under bf16 autocast.",
        "",
    ]
    for r in runs:
        p = r["probe"]
        probed = p if isinstance(p, str) else f"`ztune probe --inter-node-master` measured {p['gbps']:.2f} Gbit/s " \
            f"(gloo all_reduce busbw) and {p['latency_us']:,.0f} us per ring step"
        best_mbit = max(r["link_mbit"], 0 if isinstance(p, str) else p["gbps"] * 1000)
        cpu_bound = best_mbit < CPU_BOUND_FRACTION * r["rate_mbit"]
        lines.append(f"- link shaped to {r['rate_mbit'] / 1000:g} Gbit/s: one TCP stream between the hosts "
                     f"carried {r['link_mbit'] / 1000:.2f} Gbit/s; {probed}; the job took {r['wall_s']:.0f} s"
                     + (f"; **failed: {', '.join(r['failed'])}**" if r["failed"] else "")
                     + (". Neither reached the shaped rate: on this machine the CPU, not the shaper, limits the "
                        "link at this setting" if cpu_bound else "") + ".")
    lines += ["", head, "|---|---:|" + "---:|---:|" * len(rates) + "---:|"]
    for v in VARIANTS:
        cells = []
        loss = "-"
        for r in runs:
            rec = next((x for x in r["variants"] if x["name"] == v.name), None)
            if rec is None:
                cells.append("not run | -")
            elif rec["error"]:
                cells.append(f"failed: {rec['error'][:60]} | -")
            else:
                cells.append(f"{step_ms(rec):,.0f} | {_mib(rec['tx_bytes_per_step'])}")
                loss = f"{rec['losses_by_rank'][0][-1]:.4f}"
        config = f" `{json.dumps(v.config)}`" if v.config else ""
        lines.append(f"| {v.name}{config} | {v.stage} | " + " | ".join(cells) + f" | {loss} |")
    checks = targets(runs)
    if checks:
        lines += ["", f"Targets (issue 15), at {TARGET_RATE_MBIT / 1000:g} Gbit/s:", ""]
        lines += [f"- {what}: " + ("not measured" if r is None else f"{r:.3f}") + f" ({'met' if ok else 'MISSED'})"
                  for what, r, ok in checks]
    lines += ["", f"1-bit Adam runs with freeze_step {ONEBIT_FREEZE_STEP} and as many more untimed steps, so that "
              "every timed step sends the compressed momentum (its loss column is therefore "
              f"{ONEBIT_FREEZE_STEP} steps later than the others'). Runs before 2026-12-08 used freeze_step 1, "
              "whose variance frozen after one step diverged to NaN within 8 steps, and timed the NaN steps, "
              "where the C++ kernels hand non-finite blocks to the torch ops; the algorithm's convergence with a "
              "real warm-up is measured in docs/bench/onebit_adam.md."]
    sep = runs[0].get("shared_memory") if runs else None
    if sep:
        lines += ["", f"Shared memory (runtime/comm/shm.py's own check, in the job): across the whole job "
                  f"{'found' if sep['whole_job'] else 'not found'}; among the ranks of host 0 "
                  f"{'found' if sep['first_host'] else 'not found'}."]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 1 timed step (smoke run)")
    parser.add_argument("--rates", default="1000,10000", help="link rates in Mbit/s, comma-separated")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"markdown section (default {OUT_PATH.relative_to(ROOT)}; with --quick only when given)")
    args = parser.parse_args(argv)
    rates = rates_for_cli(args.rates, prog="bench_cluster")
    if rates is None:
        return 2
    warmup, steps = (1, 1) if args.quick else (2, 4)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    with ClusterBox(num_hosts=NUM_HOSTS, rate_mbit=rates[0]) as box:
        runs = []
        for rate in rates:
            print(f"== link {rate} Mbit/s", flush=True)
            runs.append(run_rate(box, rate, warmup=warmup, steps=steps, timeout_s=1800))
    command = "python benchmarks/bench_cluster.py" + (" --quick" if args.quick else "") + \
        (f" --rates {args.rates}" if args.rates != "1000,10000" else "")
    text = render(runs, command=command, elapsed_s=time.perf_counter() - start,
                  loads=(load_start, os.getloadavg()[0]), steps=steps, warmup=warmup)
    out = args.out or (None if args.quick else OUT_PATH)
    if out is None:
        print(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    missed = [what for what, _, ok in targets(runs) if not ok]
    for what in missed:
        print(f"target missed: {what}", file=sys.stderr)
    return 1 if any(r["failed"] for r in runs) or missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
