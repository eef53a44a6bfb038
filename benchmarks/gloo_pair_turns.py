"""Do gloo's reduce and broadcast between two hosts send and receive at once? The measurement behind
ztune/cost/gloo.py's pair rule.

    python benchmarks/gloo_pair_turns.py [--rate-mbit 1000] [--mib 16]      (root: builds a cluster in a box)

Builds a box of 2 hosts x 1 rank (benchmarks/cluster_box.py, links shaped with tc tbf) and, in one torchrun job,
times (median of 4, between barriers) on a 2-rank gloo group: one reduce (root 0); two reduces with roots 0 and 1
issued at once (async) and in turn; one broadcast; two broadcasts with opposite roots at once; the two reduces
beside the two broadcasts on a second group (two of the runtime's lanes, as stage 3's backward runs its
re-gathers beside its gradient reductions). Prints them with
what each would take at the shaped rate if its transfers ran one after the other (the pair rule) or if each host's
uplink carried only its own sends at once (the uplink rule). Not part of `make bench`: a one-off check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker() -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    n = int(os.environ["GX_NUMEL"])
    a, b, c, d = torch.ones(n), torch.ones(n), torch.ones(n), torch.ones(n)
    lane = dist.new_group([0, 1], backend="gloo")  # a second group: another of the runtime's lanes

    def wait(works):
        for w in works:
            w.wait()

    cases = {
        "one reduce": lambda: dist.reduce(a, dst=0),
        "two reduces at once": lambda: wait([dist.reduce(a, dst=0, async_op=True),
                                             dist.reduce(b, dst=1, async_op=True)]),
        "two reduces in turn": lambda: (dist.reduce(a, dst=0), dist.reduce(b, dst=1)),
        "one broadcast": lambda: dist.broadcast(a, src=0),
        "two broadcasts at once": lambda: wait([dist.broadcast(a, src=0, async_op=True),
                                                dist.broadcast(b, src=1, async_op=True)]),
        "two reduces beside two broadcasts": lambda: wait([
            dist.reduce(a, dst=0, async_op=True), dist.reduce(b, dst=1, async_op=True),
            dist.broadcast(c, src=0, group=lane, async_op=True), dist.broadcast(d, src=1, group=lane, async_op=True)]),
    }
    out = {}
    for name, fn in cases.items():
        fn()
        times = []
        for _ in range(4):
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate-mbit", type=int, default=1000)
    parser.add_argument("--mib", type=int, default=16, help="MiB per op (fp32)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks.cluster_box import ClusterBox

    nbytes = args.mib << 20
    with ClusterBox(num_hosts=2, rate_mbit=args.rate_mbit) as box:
        results = box.torchrun([str(Path(__file__).resolve()), "--worker"], nproc_per_node=1,
                               env={"OMP_NUM_THREADS": "1", "GX_NUMEL": str(nbytes // 4)}, timeout_s=600)
    line = next((x for r in results for x in r.output.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print("\n".join(r.output[-2000:] for r in results), file=sys.stderr)
        return 1
    measured = json.loads(line.removeprefix("RESULT "))
    rate = args.rate_mbit * 1e6 / 8  # bytes/s
    # (pair rule: all transfers between the two ranks in turn; uplink rule: the busiest host's own sends)
    rules = {"one reduce": (1.5, 1.0), "two reduces at once": (3.0, 1.5), "two reduces in turn": (3.0, 2.0),
             "one broadcast": (1.0, 1.0), "two broadcasts at once": (2.0, 1.0),
             "two reduces beside two broadcasts": (5.0, 2.5)}
    print(f"{args.mib} MiB per op, link shaped to {args.rate_mbit} Mbit/s, 2 hosts x 1 rank, median of 4:")
    for name, s in measured.items():
        pair, uplink = rules[name]
        print(f"  {name:24s} {s * 1e3:7.0f} ms   pair rule {pair * nbytes / rate * 1e3:5.0f} ms   "
              f"uplink rule {uplink * nbytes / rate * 1e3:5.0f} ms")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
    else:
        sys.exit(main(sys.argv[1:]))
