"""The one wrapper every collective goes through: it holds the process group and counts calls and bytes.

Wire bytes per rank use ring-algorithm accounting, the nccl-tests convention (NVIDIA/nccl-tests,
doc/PERFORMANCE.md): all_reduce sends 2(n-1)/n x payload, all_gather and reduce_scatter (n-1)/n x the full
(unsharded) buffer, broadcast (n-1)/n x payload (pipelined ring). all_to_all sends each of the other n-1
ranks its 1/n piece of the input: (n-1)/n x the input buffer (gradient compression's first phase).
Counters are kept per phase ("init", "train", "checkpoint") so the per-step report covers training traffic only.

Algorithms on gloo: its all-gather and reduce-scatter are slower than the same bytes sent another way
(2 ranks, 21M fp32 on the dev machine: all_gather_into_tensor 78 ms vs one broadcast per rank 33 ms;
reduce_scatter_tensor 100 ms vs one reduce per rank 73 ms; 4 ranks: 180 vs 84 and 233 vs 122 ms), so on a gloo
group they run as n broadcasts (rank r sends its shard) and n reduces (chunk r to rank r), asynchronously.
Each rank sends the same bytes as with the ring algorithm, so the accounting does not change.

Transport: a collective whose tensors live in a shared-memory buffer (`Comm.zeros`, runtime/comm/shm.py: CPU
ranks on one host) runs as memory copies between barriers, synchronously; everything else goes to the
process group (gloo or NCCL). Byte accounting is the same either way.

Hosts: where the layout (runtime/comm/topology.py) has several hosts of more than one rank each, the Comm may
hold a `TwoLevel` (runtime/comm/hierarchical.py): all_reduce, reduce_scatter and all_gather then run in two
levels (inside the host over its shared memory or a host group, across hosts on 1/L of the buffer), with the
same results and shard layout; callers do not change. broadcast and all_to_all stay flat. Each op's sent
bytes are also split by level, intra-host and inter-host: hierarchical ops by the formulas in
hierarchical.py; flat ring ops by where this rank's ring successor (rank + 1 mod n) lives, since a ring rank
sends everything to its successor; all_to_all by where each 1/n piece goes. On one host everything is intra.

Tensor lifetimes: a gloo worker thread drops its references to a collective's tensors only after the
collective has completed, i.e. possibly after `wait()` has returned. If it holds the last reference to a
tensor whose Python object has died (a chunk view made for the call), it needs the GIL to free that object,
and when the interpreter is already shutting down (a script that exits right after its last step) the
thread is killed inside a destructor and the process aborts ("terminate called without an active
exception", SIGABRT; 6 ranks aborted in 20 four-rank runs of an all-gather followed by exit on the dev machine). So on
gloo every tensor handed to the process group stays referenced here until the call after the one that first
saw its collective completed (`Comm._hold`), or until `settle()` (the engine calls it after each backward,
so that no gradient bucket outlives its backward); at exit the last ones are freed by the main thread.
The group itself is not kept alive here (runtime/comm/groups.py): destroy_process_group() joins its workers.
NCCL groups are left as they were: their tensors are released by the watchdog thread, and holding CUDA
buffers longer would cost device memory.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ztune.runtime.comm.groups import GroupRef
from ztune.runtime.comm.hierarchical import HIERARCHICAL_OPS, TwoLevel, level_bytes
from ztune.runtime.comm.shm import SharedMemoryTransport
from ztune.runtime.comm.topology import NodeLayout

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, BROADCAST = "all_reduce", "all_gather", "reduce_scatter", "broadcast"
ALL_TO_ALL = "all_to_all"

# torch >= 2.12 renamed the flat-tensor collectives; fall back to the older names on older releases.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def ring_wire_factor(op: str, world_size: int) -> float:
    """Bytes each rank sends per byte of the counted buffer (see module docstring)."""
    n = world_size
    if op == ALL_REDUCE:
        return 2 * (n - 1) / n
    return (n - 1) / n


def split_levels(op: str, nbytes: float, *, layout: NodeLayout, rank: int, hierarchical: bool
                 ) -> tuple[float, float]:
    """(intra-host, inter-host) bytes `rank` sends for `op` on a full buffer of `nbytes` (module docstring:
    Hosts). Their sum is ring_wire_factor(op, n) x nbytes."""
    n = layout.world_size
    sent = nbytes * ring_wire_factor(op, n) if n > 1 else 0.0
    if not layout.multi_node or n <= 1:
        return sent, 0.0
    if hierarchical and op in HIERARCHICAL_OPS:
        return level_bytes(op, nbytes, layout)
    if op == ALL_TO_ALL:
        return (layout.ranks_per_node - 1) / n * nbytes, (n - layout.ranks_per_node) / n * nbytes
    crosses = layout.node_of(rank) != layout.node_of((rank + 1) % n)
    return (0.0, sent) if crosses else (sent, 0.0)


def _finish(work, async_op: bool):
    if async_op:
        return work
    work.wait()
    return None


@dataclass
class OpCounter:
    calls: int = 0
    payload_bytes: int = 0  # the full (unsharded) buffer each call moves
    sent_bytes: float = 0.0  # what this rank puts on the wire, ring accounting
    intra_sent_bytes: float = 0.0  # of which to ranks on this rank's host
    inter_sent_bytes: float = 0.0  # of which to ranks on other hosts


class _Works:
    """Several in-flight collectives as one handle; `then` runs once after they all complete."""

    def __init__(self, works: list, then=None):
        self.works = works
        self.then = then

    def wait(self) -> bool:
        for w in self.works:
            w.wait()
        if self.then is not None:
            then, self.then = self.then, None
            then()
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)


class _Done:
    """Stand-in work handle for collectives that finished synchronously (world size 1)."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


@dataclass
class _Held:
    work: object
    tensors: tuple
    seen_completed: bool = False


class Comm:
    """Collectives over one process group (None with world_size 1: every collective is local)."""

    def __init__(self, *, group: dist.ProcessGroup | None, rank: int, world_size: int,
                 shm: SharedMemoryTransport | None = None, layout: NodeLayout | None = None,
                 hierarchy: TwoLevel | None = None):
        """shm: the transport over every rank of `group` (one host); layout: which ranks share a host (None:
        one host); hierarchy: two-level collectives over `layout` (its host's transport is then `self.shm`,
        and `shm` must be None)."""
        if world_size > 1 and group is None:
            raise ValueError("a process group is needed for world_size > 1")
        if hierarchy is not None and shm is not None:
            raise ValueError("a hierarchical Comm's shared memory is its host's (hierarchy.shm), not shm=")
        self._group = GroupRef(group)  # not owned: destroy_process_group() must end it (runtime/comm/groups.py)
        self.rank = rank
        self.world_size = world_size
        self.layout = layout if layout is not None else NodeLayout(world_size=world_size, ranks_per_node=world_size)
        self.hierarchy = hierarchy
        self.shm = hierarchy.shm if hierarchy is not None else shm
        self.gloo = world_size > 1 and dist.get_backend(group) == "gloo"
        self.phase = "train"
        self._counts: dict[tuple[str, str], OpCounter] = defaultdict(OpCounter)
        self._held: list[_Held] = []

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self._group.get()

    def zeros(self, numel: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zeroed flat buffer for collectives to move: in shared memory when the transport has one
        (collective then: every rank must call it in the same order), else ordinary memory on `device`."""
        if self.shm is not None and torch.device(device).type == "cpu":
            if self.hierarchy is not None:  # its transport belongs to the worker thread: nothing in flight
                self.hierarchy.drain()
            shared = self.shm.zeros(numel, dtype=dtype)
            if shared is not None:
                return shared
        return torch.zeros(numel, dtype=dtype, device=device)

    def _shared(self, tensor: torch.Tensor) -> bool:
        return self.shm is not None and self.shm.worth_it(tensor)

    # -- accounting ---------------------------------------------------------------------------------------
    def _count(self, op: str, payload: torch.Tensor) -> None:
        c = self._counts[(self.phase, op)]
        nbytes = payload.numel() * payload.element_size()
        c.calls += 1
        c.payload_bytes += nbytes
        c.sent_bytes += nbytes * ring_wire_factor(op, self.world_size)
        intra, inter = self.level_split(op, nbytes)
        c.intra_sent_bytes += intra
        c.inter_sent_bytes += inter

    def level_split(self, op: str, nbytes: float) -> tuple[float, float]:
        """(intra-host, inter-host) bytes this rank sends for `op` on a full buffer of `nbytes`."""
        return split_levels(op, nbytes, layout=self.layout, rank=self.rank, hierarchical=self.hierarchy is not None)

    def counters(self, phase: str = "train") -> dict[str, OpCounter]:
        return {op: c for (ph, op), c in self._counts.items() if ph == phase}

    def reset(self, phase: str = "train") -> None:
        for key in [k for k in self._counts if k[0] == phase]:
            del self._counts[key]

    # -- tensor lifetimes (module docstring) ---------------------------------------------------------------
    def _hold(self, work, *tensors: torch.Tensor):
        """Keep `tensors` referenced until the call after the one that first finds `work` completed; returns
        `work`. Entries seen completed at the previous call go now."""
        kept = []
        for h in self._held:
            if h.seen_completed:
                continue
            h.seen_completed = h.work.is_completed()
            kept.append(h)
        kept.append(_Held(work, tensors))
        self._held = kept
        return work

    def _issue(self, work, tensors, async_op: bool):
        return _finish(self._hold(work, *tensors) if self.gloo else work, async_op)

    def settle(self) -> None:
        """Let go of the tensors of every completed collective (call it where no collective is in flight
        and the process goes on computing, e.g. after a backward)."""
        self._held = [h for h in self._held if not h.work.is_completed()]

    # -- collectives --------------------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, *, op: dist.ReduceOp = dist.ReduceOp.SUM, async_op: bool = False):
        """Sum (or `op`) `tensor` in place over the group."""
        self._count(ALL_REDUCE, tensor)
        if self.world_size == 1:
            return _Done() if async_op else None
        if self.hierarchy is not None:
            return _finish(self._hold(self.hierarchy.submit(ALL_REDUCE, tensor, op)), async_op)
        if op == dist.ReduceOp.SUM and self._shared(tensor):
            self.shm.all_reduce(tensor)
            return _Done() if async_op else None
        return self._issue(dist.all_reduce(tensor, op=op, group=self.group, async_op=True), (tensor,), async_op)

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor, *, async_op: bool = False,
                   group: dist.ProcessGroup | None = None):
        """Concatenate every rank's `shard` (numel = output.numel() / n) into flat `output`.
        `shard` may be this rank's slice of `output` (in place). `group`: another group over the same ranks
        (stage 3's gathers, runtime/lockstep.py), same backend; default this Comm's."""
        group = self.group if group is None else group
        self._count(ALL_GATHER, output)
        if self.world_size == 1:
            if output.data_ptr() != shard.data_ptr():
                output.copy_(shard)
            return _Done() if async_op else None
        if self.hierarchy is not None:  # (its own groups; `group` only orders flat gathers)
            return _finish(self._hold(self.hierarchy.submit(ALL_GATHER, output, shard)), async_op)
        if self._shared(output):
            self.shm.all_gather(output, shard)
            return _Done() if async_op else None
        if self.gloo:
            chunks = output.split(shard.numel())
            if chunks[self.rank].data_ptr() != shard.data_ptr():
                chunks[self.rank].copy_(shard)
            works = [dist.broadcast(chunk, src=self._global(r, group), group=group, async_op=True)
                     for r, chunk in enumerate(chunks)]
            return self._issue(_Works(works), chunks, async_op)
        work = _all_gather_flat(output, shard, group=group, async_op=True)
        return self._issue(work, (output, shard), async_op)

    def gather_stable_shards(self, output: torch.Tensor, shard: torch.Tensor) -> bool:
        """Stage 3's all-gather when `shard` lives in shared memory: copy every rank's shard straight into
        `output`, with no synchronisation, which is only right while no rank writes its shard (the engine
        brackets each optimizer step with barriers, `shard_barrier`). Returns False, doing nothing, where the
        shard is not shared (the caller then uses `all_gather`)."""
        if self.world_size == 1 or self.shm is None or self.hierarchy is not None or not self.shm.owns(shard):
            return False
        self._count(ALL_GATHER, output)
        self.shm.gather_shards(output, shard)
        return True

    def _global(self, group_rank: int, group: dist.ProcessGroup | None = None) -> int:
        group = self.group if group is None else group
        return group_rank if group is dist.group.WORLD else dist.get_global_rank(group, group_rank)

    def shard_barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def reduce_scatter(self, output: torch.Tensor, full: torch.Tensor, *, async_op: bool = False):
        """Sum flat `full` over the group and leave this rank's 1/n slice of the sum in `output`.
        `output` may be this rank's slice of `full` (in place); the rest of `full` is scratch afterwards."""
        self._count(REDUCE_SCATTER, full)
        if self.world_size == 1:
            if output.data_ptr() != full.data_ptr():
                output.copy_(full)
            return _Done() if async_op else None
        if self.hierarchy is not None:
            return _finish(self._hold(self.hierarchy.submit(REDUCE_SCATTER, output, full)), async_op)
        if self._shared(full):
            self.shm.reduce_scatter(output, full)
            return _Done() if async_op else None
        if self.gloo:  # `full` is scratch: a reduce may leave partial sums in chunks other than the root's
            chunks = full.split(full.numel() // self.world_size)
            works = [dist.reduce(chunk, dst=self._global(r), group=self.group, async_op=True)
                     for r, chunk in enumerate(chunks)]
            own = chunks[self.rank]
            then = None if own.data_ptr() == output.data_ptr() else (lambda: output.copy_(own))
            return self._issue(_Works(works, then), chunks, async_op)
        work = _reduce_scatter_flat(output, full, group=self.group, async_op=True)
        return self._issue(work, (output, full), async_op)

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, *, async_op: bool = False):
        """Split flat `input` into n equal pieces and send piece r to rank r; `output`'s piece r is what rank r
        sent this rank. Both hold n equal pieces (any dtype)."""
        self._count(ALL_TO_ALL, input)
        if self.world_size == 1:
            output.copy_(input)
            return _Done() if async_op else None
        work = dist.all_to_all_single(output, input, group=self.group, async_op=True)
        return self._issue(work, (output, input), async_op)

    def broadcast(self, tensor: torch.Tensor, *, src: int = 0) -> None:
        self._count(BROADCAST, tensor)
        if self.world_size > 1:
            self._issue(dist.broadcast(tensor, src=src, group=self.group, async_op=True), (tensor,), False)

    def report(self, *, steps: int, phase: str = "train") -> dict:
        """Per-op calls / payload bytes / sent bytes (of which intra_sent_bytes to this host's ranks and
        inter_sent_bytes to other hosts', module docstring: Hosts), and bytes this rank sends per optimizer
        step, in all and to other hosts. `hierarchical`: two-level collectives (runtime/comm/hierarchical.py)."""
        ops = {
            op: {"calls": c.calls, "payload_bytes": c.payload_bytes, "sent_bytes": c.sent_bytes,
                 "intra_sent_bytes": c.intra_sent_bytes, "inter_sent_bytes": c.inter_sent_bytes}
            for op, c in sorted(self.counters(phase).items())
        }
        total = sum(v["sent_bytes"] for v in ops.values())
        inter = sum(v["inter_sent_bytes"] for v in ops.values())
        if self.hierarchy is not None:
            transport = "hierarchical: " + ("shared memory" if self.shm is not None else "host group") \
                + " inside each host + process group across hosts"
        else:
            transport = "shared memory + process group" if self.shm is not None else "process group"
        return {
            "world_size": self.world_size,
            "transport": transport,
            "hierarchical": self.hierarchy is not None,
            "num_nodes": self.layout.num_nodes,
            "ranks_per_node": self.layout.ranks_per_node if self.layout.uniform else self.world_size,
            "steps": steps,
            "bytes_sent_total": total,
            "bytes_sent_per_step": total / steps if steps else 0.0,
            "inter_node_bytes_sent_total": inter,
            "inter_node_bytes_sent_per_step": inter / steps if steps else 0.0,
            "ops": ops,
        }
