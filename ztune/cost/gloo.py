"""Bytes that leave a host when the runtime's collectives run on gloo across hosts, from gloo's own algorithms.

The cost model's ring accounting (cost/comm.py, nccl-tests convention) charges each host boundary the ring's
per-rank bytes: a ring over hosts of L consecutive ranks crosses each boundary once per direction. That holds
for NCCL and for gloo's all_reduce (a ring), but the runtime runs reduce_scatter and all_gather on a gloo group
as n reduces and n broadcasts (runtime/comm/collectives.py: faster on one host than gloo's own reduce_scatter
and all_gather), and their algorithms send some data across hosts more than once:

- gloo::reduce (gloo/reduce.cc): a ring reduce-scatter in which every rank sends (n-1)/n of the buffer to rank
  - 1, then every rank other than the root sends its reduced 1/n chunk straight to the root;
- gloo::broadcast (gloo/broadcast.cc): a binomial tree over virtual ranks (rank - root) mod n: in round i
  every virtual rank below 2^i that holds the buffer sends it whole to virtual rank + 2^i;
- gloo's all_reduce: a ring (each rank sends 2(n-1)/n of the buffer to rank + 1), as the ring accounting says.

Measured on the cluster in a box (2 hosts x 2 ranks, docs/bench/cluster.md, veth counters): flat stages 1-2 sent
4.5 x the bf16 gradient bytes across hosts per step and flat stage 3 7.0 x; these rules give 4.5 (reduce_scatter
2 x 1.0 + all_gather 2 x 1.25) and 7.0 (+ one more all_gather), where the ring accounting gives 3.0 and 4.5.
The hierarchical path (runtime/comm/hierarchical.py) runs the same reduces and broadcasts, over the N ranks
with one local rank (one group per local rank, all L at once), on 1/L of the buffer.

`host_egress_bytes` returns the bytes the busiest host sends to other hosts (a shaped NIC is full duplex, and
these patterns are symmetric between hosts up to rounding), for a payload of `payload_bytes` (the full tensor).

`serial_egress_bytes` is what sets the time: the runtime's reduce_scatter / all_gather are n separate gloo
collectives (one per root), each a synchronising collective over the whole group that ends with its slowest
transfer, and the hosts' uplinks do not share one op's load evenly (a broadcast from a rank of host 0 loads host
0's uplink, the next root's may load the other). ProcessGroupGloo runs a group's ops from one work queue, in the
order issued, on `Options::threads` worker threads, 2 by default (torch/csrc/distributed/c10d/ProcessGroupGloo.hpp:
`threads{2}`, `workQueue_`, `runLoop`): so GLOO_WORKER_THREADS consecutive ops run at once and a batch takes the
sum, over those consecutive sets, of each set's busiest uplink. On 2 hosts x 2 ranks the flat all_gather's roots
(0, 1) both load host 0's uplink and (2, 3) host 1's: 2.0 x the payload against 1.25 x by the busiest host's total
(reduce_scatter 1.25 x against 1.0 x).

A reduce between two ranks sends and receives in turn, not at once: measured on the cluster in a box at 1 Gbit/s
(benchmarks/gloo_pair_turns.py: 2 hosts x 1 rank, 16 MiB fp32, medians of 4; two runs, 2026-12-06), one reduce
took 205-216 ms, the time of its 24 MiB of transfers one after the other (0.5 + 0.5 ring + 0.5 to the root, of
16 MiB: 201 ms), not of its busiest uplink's 16 MiB (134 ms); two reduces with opposite roots issued at once
395-407 ms, as in turn (387-408 ms; 403 by this rule); measured again 2026-12-07 the same (one 193-195 ms, two at
once 384 ms). So a set of reduces run at once takes the larger of its busiest uplink and its busiest pair of ranks
(both directions together): on the inter level of a hierarchical reduce_scatter (one rank per host) the pair.

A broadcast between two ranks is one send, and a set of broadcasts takes its busiest uplink, on the inter level
as on the flat group: one broadcast took 141-145 ms (the uplink's 134); two with opposite roots at once are
bimodal from run to run, each run's median of 4 near the uplink's time or the pair's: 222-279 ms (2026-12-06), and
140, 213, 278 ms at 16 MiB and 283, 559, 282 ms at 32 MiB (2026-12-07; the uplink 134 / 268 ms, the pair 268 /
537). The jobs run at the uplink's pace: with the pair rule for broadcasts, hierarchical stage 3 at 1 Gbit/s
(whose inter-level gathers are such pairs) ran 23-27% under its estimate in all four box runs of 2026-12-06/07,
and hierarchical stages 1-2 8-12% under; with the uplink rule those stages' 1 Gbit/s rows of the three fp32 runs
of 2026-12-07, re-estimated (`bench_cost_cluster.py --rerender`), are within -8..+3%, and in a run measured after
the change within -8..-7% (stage 3: -7.5%, where the pair rule gives +23.9%; 15:13 UTC, the page of commit
8f94a82); in the three-repeat run that replaced it (docs/bench/cost_cluster_fp32.md) the medians of hierarchical
stages 1-3 at 1 Gbit/s are -3.7%, -14.7% and -9.7%.
Stage 3's two lanes (runtime/comm/hierarchical.py, the reduces on one group and the broadcasts on another) do not
fill each other's idle direction: the two reduces beside the two broadcasts took 525-582 ms at 16 MiB, about the
sum of each set alone (524-662), and the estimate adds them. gloo's ring all_reduce sends and receives at once
(the hierarchical stage 0 measured within 7% of the uplink rule). On the cluster in a box (docs/bench/
cost_cluster.md, decomposition) flat stage 1's all_gather after the step took 980 ms at 1 Gbit/s, where the
total rule gives 560 ms and this 900.
Pure arithmetic over at most a few thousand transfers; no torch.
"""

from __future__ import annotations

from collections import defaultdict

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER = "all_reduce", "all_gather", "reduce_scatter"
_MAX_SIMULATED_RANKS = 256  # beyond this the n^2 transfer list is not worth it: the ring accounting is used
# ProcessGroupGloo's worker threads per process group (torch/csrc/distributed/c10d/ProcessGroupGloo.hpp,
# Options::threads{2}; torch.distributed creates gloo groups with the default): the ops of a group that run at once.
GLOO_WORKER_THREADS = 2

Transfer = tuple[int, int, float]  # (sending group rank, receiving group rank, bytes)


def reduce_transfers(n: int, root: int, chunk_bytes: float) -> list[Transfer]:
    """gloo::reduce of `chunk_bytes` over n ranks to `root` (module docstring)."""
    ring = [(r, (r - 1) % n, (n - 1) / n * chunk_bytes) for r in range(n)]
    return ring + [(r, root, chunk_bytes / n) for r in range(n) if r != root]


def broadcast_transfers(n: int, root: int, nbytes: float) -> list[Transfer]:
    """gloo::broadcast of `nbytes` from `root` over n ranks: the binomial tree (module docstring)."""
    out, step = [], 1
    while step < n:
        for v in range(step):  # virtual ranks that hold the buffer send to v + step
            if v + step < n:
                out.append(((v + root) % n, (v + step + root) % n, nbytes))
        step *= 2
    return out


def ring_all_reduce_transfers(n: int, nbytes: float) -> list[Transfer]:
    return [(r, (r + 1) % n, 2 * (n - 1) / n * nbytes) for r in range(n)]


def _group_ops(op: str, n: int, payload_bytes: float) -> list[list[Transfer]]:
    """The gloo collectives the runtime runs for `op` on a payload (full tensor) over n ranks, each as its
    transfers: one ring all_reduce, or n reduces / n broadcasts of payload / n (one per root, in root order)."""
    if op == ALL_REDUCE:
        return [ring_all_reduce_transfers(n, payload_bytes)]
    chunk = payload_bytes / n
    if op == REDUCE_SCATTER:
        return [reduce_transfers(n, root, chunk) for root in range(n)]
    if op == ALL_GATHER:
        return [broadcast_transfers(n, root, chunk) for root in range(n)]
    raise ValueError(f"unknown collective {op!r}")


def _group_transfers(op: str, n: int, payload_bytes: float) -> list[Transfer]:
    """One group's transfers for the runtime's `op` on a payload (full tensor) over n ranks."""
    return [t for one in _group_ops(op, n, payload_bytes) for t in one]


def _busiest(transfers: list[Transfer], host, *, by_pair: bool = False) -> float:
    """The most bytes that cross between hosts through one uplink (by sending host), or with `by_pair` between
    two ranks (both directions together)."""
    out: dict[object, float] = defaultdict(float)
    for src, dst, nbytes in transfers:
        if host(src) != host(dst):
            out[frozenset((src, dst)) if by_pair else host(src)] += nbytes
    return max(out.values(), default=0.0)


def _level(level: str, n_nodes: int, per_node: int) -> tuple[int, object, int, float]:
    """(group size, rank -> host, groups at once, payload share per group) of a `level` ("flat" / "inter")."""
    if level == "flat":
        return n_nodes * per_node, (lambda r: r // per_node), 1, 1.0
    if level == "inter":
        # the group's buffer: a 1/L piece for all_reduce; for reduce_scatter / all_gather the column of N chunks
        # of payload / (N L), i.e. also payload / L in all; the L groups run at once through the same hosts
        return n_nodes, (lambda r: r), per_node, 1.0 / per_node
    raise ValueError(f"level must be 'flat' or 'inter', got {level!r}")


def serial_egress_bytes(op: str, payload_bytes: float, *, num_nodes: int, ranks_per_node: int,
                        level: str = "flat") -> float:
    """Bytes that set the time of one runtime collective on gloo across hosts: the sum, over the sets of
    GLOO_WORKER_THREADS consecutive gloo ops it runs, of each set's busiest uplink or, for reduces, busiest pair
    of ranks if that carries more (module docstring), for the same
    `level`s as host_egress_bytes; divide by one host's uplink rate for seconds. Equals host_egress_bytes for
    all_reduce (one ring, symmetric). 0 on one host. Raises ValueError on an unknown op or level."""
    if num_nodes <= 1 or payload_bytes <= 0:
        return 0.0
    n, host, groups, share = _level(level, num_nodes, ranks_per_node)
    if n > _MAX_SIMULATED_RANKS:
        return host_egress_bytes(op, payload_bytes, num_nodes=num_nodes, ranks_per_node=ranks_per_node, level=level)
    ops = _group_ops(op, n, payload_bytes * share)
    at_once = [[t for one in ops[i:i + GLOO_WORKER_THREADS] for t in one]
               for i in range(0, len(ops), GLOO_WORKER_THREADS)]
    # A reduce's transfers between two ranks take turns on their pair (module docstring); a broadcast is one send
    # and the ring all_reduce sends and receives at once.
    turns = op == REDUCE_SCATTER
    return groups * sum(max(_busiest(batch, host), _busiest(batch, host, by_pair=True) if turns else 0.0)
                        for batch in at_once)


def host_egress_bytes(op: str, payload_bytes: float, *, num_nodes: int, ranks_per_node: int,
                      level: str = "flat") -> float:
    """Bytes the busiest host sends to other hosts for one runtime collective on gloo.

    level "flat": `op` over all N x L ranks (host of rank r: r // L) on `payload_bytes`. level "inter": the inter-host
    level of a hierarchical `op` (the L groups of N ranks, one rank per host, each on its 1/L of the payload; for
    all_reduce its inter level is an all_reduce of the 1/L piece, for the others the same op over the group's
    column, chunks of payload / (N x L)). 0 on one host. Raises ValueError on an unknown op or level."""
    if num_nodes <= 1 or payload_bytes <= 0:
        return 0.0
    n, host, groups, share = _level(level, num_nodes, ranks_per_node)
    if n > _MAX_SIMULATED_RANKS:
        return groups * _ring_egress(op, payload_bytes * share, n)
    return groups * _busiest(_group_transfers(op, n, payload_bytes * share), host)


def _ring_egress(op: str, payload_bytes: float, n: int) -> float:
    """Ring accounting's bytes across one host boundary (cost/comm.py ring_factor), for very large groups."""
    return (2 if op == ALL_REDUCE else 1) * (n - 1) / n * payload_bytes
