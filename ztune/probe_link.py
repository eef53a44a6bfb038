"""The link between two hosts, measured: what `ztune probe --inter-node-master HOST[:PORT] --node-rank K`
runs on each of two hosts before its local measurements.

One process per host joins a 2-rank gloo group (rank = node rank, rendezvous at the master's HOST:PORT)
and times all_reduce of fp32 buffers of each size, exactly as ztune.probe times the local collective but
without the shared-memory transport (which cannot span hosts). With one rank per host every byte crosses
the link: a 2-rank ring all_reduce of S bytes sends S/2 each way in each of its two phases, so
busbw = 2(n-1)/n x S / t = S / t is one direction of the link (nccl-tests, doc/PERFORMANCE.md), and the
alpha-beta fit's intercept gives the per-step latency (ztune.probe.fit_alpha_beta). Both hosts get the
same numbers (rank 0's view of the slowest rank).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
from collections.abc import Sequence

from ztune.errors import UserError
from ztune.inputs import ascii_int, shown
from ztune.launch.hostfile import canonical_host
from ztune.probe import CollectiveResult, ProbeFailed, _collective_worker, _wait_for_result, fit_alpha_beta

DEFAULT_PORT = 29510  # torchrun's default is 29500; a probe may run beside a job on the same hosts
TRANSPORT = "gloo between hosts"


def parse_master(text: str) -> tuple[str, int]:
    """"HOST" or "HOST:PORT" -> (host, port). UserError naming the option on anything else."""
    host, sep, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not sep:
        host, port = text, DEFAULT_PORT
    else:
        port = ascii_int(port_text)  # int() would also take other scripts' digits, '_' and spaces
        if port is None:
            raise UserError(f"--inter-node-master {shown(text)}: the port must be ASCII digits, as in HOST:29510")
    if not host or not 1 <= port <= 65535:
        raise UserError(f"--inter-node-master {text!r}: give HOST or HOST:PORT (port 1-65535)")
    return canonical_host(host, where="--inter-node-master"), port  # no spaces or leading '-'; [v6] bare


def check_resolves(host: str, port: int) -> None:
    """UserError when `host` does not resolve here: the probe would retry the rendezvous until its timeout."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"--inter-node-master: host {host!r} does not resolve here "
                        f"({exc.strerror if isinstance(exc, socket.gaierror) else exc}); give the master host's "
                        "name or address as both hosts reach it") from None


def measure_inter_node_link(*, master_addr: str, master_port: int, node_rank: int, sizes: Sequence[int],
                            target_s: float = 0.2, timeout_s: float = 180.0) -> CollectiveResult:
    """Join the 2-host probe at `master_addr`:`master_port` as `node_rank` (0 on the master's host, 1 on the
    other) and time all_reduce over the link for each of `sizes` (bytes), then gloo's reduce at the largest (its
    CPU: the hierarchical reduce-scatter's inter level, cost/comm.py collective_cpu_s). Raises ProbeFailed when the peer
    does not show up or a collective fails within `timeout_s`."""
    if node_rank not in (0, 1):
        raise UserError(f"--node-rank {node_rank}: the inter-node probe joins two hosts, 0 and 1")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_collective_worker, daemon=True,
                       args=(node_rank, 2, master_port, "gloo", list(sizes), target_s, 1, queue),
                       kwargs={"addr": master_addr, "report_rank": node_rank, "shared_memory": False,
                               "reduce_too": True})
    proc.start()
    try:
        status, payload = _wait_for_result(queue, [proc], timeout_s=timeout_s)
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
    if status != "ok":
        raise ProbeFailed(f"inter-node probe with {master_addr}:{master_port} as node {node_rank} failed: {payload}"
                          " (is `ztune probe --inter-node-master` running on the other host too?)")
    sizes_t = tuple(int(4 * max(1, s // 4)) for s in sizes)
    times = payload["times"]
    return CollectiveResult("gloo", 2, sizes_t, tuple(times), fit_alpha_beta(sizes_t, times, world_size=2),
                            transport=TRANSPORT, cpu_s=tuple(payload.get("cpu_times", ())),
                            reduce_cpu=tuple(payload["reduce_cpu"]) if payload.get("reduce_cpu") else None)
