"""Flat against hierarchical collectives: step time and bytes across hosts per step, ZeRO stages 0-3.

Each rank trains the model once per (stage, comm.hierarchical) pair from the same seed and batches, and
reports the median step time (after `--warmup` steps) and its comm_report: bytes sent per step in all, and
of them to other hosts (runtime/comm/collectives.py, per-level accounting), next to ztune.cost.comm's
prediction for the inter-host share.

Two ways to run it:
- `python benchmarks/bench_hierarchical.py`: 4 local ranks as 2 "hosts" x 2 (ZTUNE_LOCAL_WORLD_SIZE=2). The
  "link" between hosts is loopback, so this measures what the two levels cost and what shared memory
  inside a host saves, not a slow network.
- under torchrun on real hosts (or the cluster in a box's namespaces): `torchrun ... bench_hierarchical.py`;
  the layout is torchrun's (LOCAL_WORLD_SIZE). Rank 0 prints the table (and --json).

Usage: python benchmarks/bench_hierarchical.py [--model tiny-llama] [--stages 0,1,2,3] [--steps 6]
       [--warmup 2] [--micro 1] [--seq 64] [--precision bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = 0


def train_all(rank: int, world_size: int, opts: dict) -> list[dict]:
    import torch

    import ztune
    from ztune.profiles import load_model
    from ztune.runtime.data import batches, synthetic_corpus
    from ztune.runtime.models import build_model

    spec = load_model(opts["model"])
    steps = opts["warmup"] + opts["steps"]
    corpus = synthetic_corpus(vocab_size=spec.vocab_size, num_tokens=opts["seq"] * opts["micro"] * world_size
                              * steps * 2, seed=SEED)
    out = []
    for stage in opts["stages"]:
        for hierarchical in ("false", "true"):
            model = build_model(spec, seed=SEED)
            cfg = {"zero": {"stage": stage}, "precision": opts["precision"], "seq_len": opts["seq"],
                   "batch": {"micro": opts["micro"], "grad_accum": 1},
                   "optimizer": {"type": "AdamW", "lr": 1e-4}, "comm": {"hierarchical": hierarchical}}
            engine, *_ = ztune.initialize(model, cfg)
            times = []
            for i, (ids, labels) in enumerate(batches(corpus, batch_size=opts["micro"], seq_len=opts["seq"],
                                                      rank=rank, world_size=world_size, seed=SEED, steps=steps)):
                if i == opts["warmup"]:  # the per-step figures cover the timed steps only
                    before = engine.comm_report()
                start = time.perf_counter()
                engine.backward(engine(ids, labels=labels))
                engine.step()
                times.append(time.perf_counter() - start)
            report = engine.comm_report()
            timed = opts["steps"]
            out.append({"stage": stage, "hierarchical": hierarchical == "true", "rank": rank,
                        "step_s": statistics.median(times[opts["warmup"]:]),
                        "bytes_per_step": (report["bytes_sent_total"] - before["bytes_sent_total"]) / timed,
                        "inter_bytes_per_step": (report["inter_node_bytes_sent_total"]
                                                 - before["inter_node_bytes_sent_total"]) / timed,
                        "padded_params": report["padded_params"], "dtype_bytes": report["dtype_bytes"],
                        "num_nodes": report["num_nodes"], "ranks_per_node": report["ranks_per_node"],
                        "transport": report["transport"]})
            del engine, model
            torch.manual_seed(0)
    return out


def summarise(results: list[list[dict]]) -> list[dict]:
    """Per (stage, mode): the slowest rank's median step (a step ends when every rank's does) and the bytes
    each host sends to other hosts per step (summed over its ranks)."""
    rows = []
    for i, first in enumerate(results[0]):
        per_rank = [r[i] for r in results]
        nodes, per_node = first["num_nodes"], first["ranks_per_node"]
        host_inter = [sum(per_rank[k * per_node + j]["inter_bytes_per_step"] for j in range(per_node))
                      for k in range(nodes)]
        rows.append({"stage": first["stage"], "hierarchical": first["hierarchical"],
                     "step_s": max(r["step_s"] for r in per_rank),
                     "bytes_per_rank_per_step": first["bytes_per_step"],
                     "inter_bytes_per_host_per_step": max(host_inter), "transport": first["transport"],
                     "num_nodes": nodes, "ranks_per_node": per_node})
    return rows


def render(rows: list[dict]) -> str:
    lines = [f"{'stage':>5} {'mode':>12} {'step ms':>9} {'MB/rank/step':>13} {'MB across/host/step':>20}  transport"]
    for r in rows:
        mode = "hierarchical" if r["hierarchical"] else "flat"
        lines.append(f"{r['stage']:>5} {mode:>12} {r['step_s'] * 1e3:>9.1f} "
                     f"{r['bytes_per_rank_per_step'] / 1e6:>13.2f} "
                     f"{r['inter_bytes_per_host_per_step'] / 1e6:>20.2f}  {r['transport']}")
    flat = {r["stage"]: r for r in rows if not r["hierarchical"]}
    for r in rows:
        if r["hierarchical"] and r["stage"] in flat:
            f = flat[r["stage"]]
            across = r["inter_bytes_per_host_per_step"] / max(f["inter_bytes_per_host_per_step"], 1)
            lines.append(f"stage {r['stage']}: hierarchical/flat step time {r['step_s'] / f['step_s']:.2f}x, "
                         f"bytes across hosts {across:.2f}x")
    return "\n".join(lines)


def markdown(rows: list[dict], *, argv: list[str]) -> str:
    import datetime as dt

    load = os.getloadavg()[0]
    first = rows[0]
    out = [f"# Flat vs hierarchical collectives ({first['num_nodes']} hosts x {first['ranks_per_node']} ranks)", "",
           f"`python benchmarks/bench_hierarchical.py {' '.join(argv)}` on {dt.date.today()}, load average "
           f"{load:.1f} at the end (2-core machine shared with other jobs: step times are noisy).", "",
           "Step: the slowest rank's median. Bytes across hosts: what a host's ranks send to other hosts per step, "
           "ring accounting (runtime/comm/collectives.py); a flat ring sends from one rank per host, the two "
           "levels from every rank on 1/L of the buffer.", "",
           "| stage | collectives | step ms | MB sent per rank per step | MB across hosts per host per step |",
           "|---|---|---|---|---|"]
    for r in rows:
        mode = "hierarchical" if r["hierarchical"] else "flat"
        out.append(f"| {r['stage']} | {mode} | {r['step_s'] * 1e3:.0f} | {r['bytes_per_rank_per_step'] / 1e6:.2f} | "
                   f"{r['inter_bytes_per_host_per_step'] / 1e6:.2f} |")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="also write the table here (e.g. docs/bench/hierarchical.md)")
    args = ap.parse_args(argv)
    opts = {"model": args.model, "stages": [int(s) for s in args.stages.split(",")], "steps": args.steps,
            "warmup": args.warmup, "micro": args.micro, "seq": args.seq, "precision": args.precision}
    if "RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: this process is a rank
        import torch.distributed as dist

        dist.init_process_group("gloo")
        mine = train_all(dist.get_rank(), dist.get_world_size(), opts)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        is_root = dist.get_rank() == 0
        dist.destroy_process_group()
        if not is_root:
            return 0
        results = gathered
    else:
        from tests.helpers.spawn import run_ranks

        results = run_ranks(train_all, world_size=4, args=(opts,), timeout_s=3600,
                            env={"ZTUNE_LOCAL_WORLD_SIZE": "2"})
    rows = summarise(results)
    print(render(rows))
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, argv=sys.argv[1:] if argv is None else argv))
    if args.json:
        Path(args.json).write_text(json.dumps({"options": opts, "rows": rows, "load_avg": os.getloadavg()},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
