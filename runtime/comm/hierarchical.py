"""Two-level (hierarchical) all-reduce, reduce-scatter and all-gather for ranks on several hosts.

With L ranks per host on N hosts (runtime/comm/topology.py, `NodeLayout`; n = N x L, global rank
r = k x L + j for host k, local rank j), each collective runs in two levels:

- inside the host over shared memory (runtime/comm/shm.py, one transport per host whose group is the host's
  L ranks), or over a gloo group of the host's ranks where the buffer is not shared (ZTUNE_SHM=0, or a
  buffer the engine did not allocate with `Comm.zeros`, or one below the transport's size threshold);
- across hosts over a gloo group of the N ranks with the same local rank j, on 1/L of the buffer, so each
  host's data crosses the host boundary once (Jia et al. 2018, "Highly Scalable Deep Learning Training
  System with Mixed-Precision", section 4.2: hierarchical all-reduce; NCCL's trees and rings likewise cross
  each node boundary once per channel, DESIGN.md "Networks").

The runtime's shard layout is kept exactly: a buffer of n equal chunks, chunk r belonging to global rank r.
Seen as [N, L, S] (S = chunk size), chunk (k, j) is rank k x L + j's. Hence:

- reduce_scatter: intra, local rank j sums column [:, j] of the host's buffers (its N chunks); inter, the N
  ranks with local rank j reduce-scatter that column, chunk (k, j) to host k. Rank (k, j) holds the sum
  over all n ranks of chunk k x L + j, as with the flat collective.
- all_gather: inter, the ranks with local rank j all-gather column [:, j] (chunk (k, j) from host k); intra,
  every rank copies the other columns from its host peers.
- all_reduce: intra reduce-scatter of L contiguous pieces, inter all-reduce of piece j, intra all-gather.

Bytes each rank sends, ring accounting (collectives.py), B = the full buffer's bytes:
  all_reduce:      intra 2(L-1)/L x B,  inter 2(N-1)/N x B/L
  reduce_scatter:  intra  (L-1)/L x B,  inter  (N-1)/N x B/L        all_gather: the same
Their sum equals the flat ring's 2(n-1)/n x B (resp. (n-1)/n x B): the total per rank is unchanged, but a
host sends L x (N-1)/N x B/L = (N-1)/N x B across (x2 for all-reduce), where a flat collective whose ranks
all exchange with all (gloo's broadcast / reduce per chunk, the all-to-all) sends up to L x that.
ztune/cost/comm.py (`hierarchical_level_bytes`) holds the same formulas for the cost model.

Ordering: the levels of one collective depend on each other (the inter level reads what the intra level
wrote), which gloo's asynchronous work handles cannot express across two process groups. So every
hierarchical collective runs, whole, on a worker thread, in the order the ranks issued them: identical on
every rank, as each group's collectives must be. There are two such lanes (`TwoLevel`: gathers, and
reductions), each with groups of its own. The caller gets a handle (`wait`, `is_completed`) and goes on
computing, as with an asynchronous gloo collective. The host's transport for the engine's shared buffers is
read by the lanes and allocated from by the main thread (`Comm.zeros`) only after `drain`.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ztune.errors import ConfigError
from ztune.runtime.comm.shm import SharedMemoryTransport, chunk_bounds
from ztune.runtime.comm.topology import NodeLayout

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER = "all_reduce", "all_gather", "reduce_scatter"
HIERARCHICAL_OPS = (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER)


def level_bytes(op: str, nbytes: float, layout: NodeLayout) -> tuple[float, float]:
    """(intra-host, inter-host) bytes one rank sends for a hierarchical `op` on a full buffer of `nbytes`
    (module docstring)."""
    n_nodes, per_node = layout.num_nodes, layout.ranks_per_node
    intra = (per_node - 1) / per_node * nbytes
    inter = (n_nodes - 1) / n_nodes * nbytes / per_node
    if op == ALL_REDUCE:
        return 2 * intra, 2 * inter
    if op in (ALL_GATHER, REDUCE_SCATTER):
        return intra, inter
    raise ValueError(f"no hierarchical form of {op!r}")


def wants_hierarchy(setting: str, *, layout: NodeLayout, backend: str) -> bool:
    """Whether a job runs two-level collectives: comm.hierarchical `setting` ("auto", "true", "false", the
    values of ztune.config.schema.Hierarchical) for `layout` on a `backend` group. auto: on for gloo groups
    spanning several hosts of more than one rank each. Raises ConfigError where "true" cannot be honoured:
    NCCL builds its own topology-aware rings and trees (DESIGN.md, Networks), and one host, or one rank per
    host, has only one level."""
    setting = str(getattr(setting, "value", setting)).lower()
    possible = layout.multi_node and layout.ranks_per_node > 1
    if setting == "false":
        return False
    if setting == "auto":
        return possible and backend == "gloo"
    if backend != "gloo":
        raise ConfigError(f"comm.hierarchical: true needs CPU ranks on gloo (this group is {backend}, whose "
                          "collectives are topology-aware already); set comm.hierarchical: auto")
    if not possible:
        raise ConfigError(f"comm.hierarchical: true needs several hosts with more than one rank each (this job: "
                          f"{layout.num_nodes} host(s), {layout.world_size} rank(s)); set comm.hierarchical: auto")
    return True


class _Future:
    """The handle of one collective running on the worker: `wait` re-raises its error on the caller."""

    def __init__(self):
        self._done = threading.Event()
        self._error: BaseException | None = None

    def wait(self) -> bool:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        return self._done.is_set()


class _Worker:
    """One daemon thread running submitted collectives in order."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Tensors handed to gloo stay referenced a while after their collective completed: gloo's threads
        # drop their own references only after wait() returned (collectives.py, tensor lifetimes).
        self._recent: deque = deque(maxlen=8)

    def submit(self, fn: Callable[[], tuple]) -> _Future:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ztune-hierarchical", daemon=True)
            self._thread.start()
        fut = _Future()
        self._queue.put((fn, fut))
        return fut

    def _run(self) -> None:
        while True:
            fn, fut = self._queue.get()
            try:
                self._recent.append(fn())
            except BaseException as e:  # noqa: BLE001 -- handed to whoever waits for this collective
                fut._error = e
            fut._done.set()
            del fn, fut


def _wait_all(works: list) -> None:
    for w in works:
        w.wait()


@dataclass
class _Lane:
    """One worker thread and the groups it alone uses: the host's ranks (`intra`, with a shared-memory
    transport `shm` for its barriers and staging buffers) and the ranks with this local rank (`inter`)."""

    worker: _Worker
    intra: dist.ProcessGroup
    inter: dist.ProcessGroup
    shm: SharedMemoryTransport | None
    staging: dict = field(default_factory=dict)  # dtype -> shared staging buffer (this lane's thread only)


def _new_groups(layout: NodeLayout, rank: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(this host's group, this local rank's group across hosts); collective over the default group
    (torch.distributed.new_group must be called by every rank for every group, in the same order)."""
    intra = inter = None
    for node in range(layout.num_nodes):
        g = dist.new_group(layout.intra_node_ranks(node), backend="gloo")
        if node == layout.node_of(rank):
            intra = g
    for local in range(layout.ranks_per_node):
        g = dist.new_group(layout.inter_node_ranks(local), backend="gloo")
        if local == layout.local_rank_of(rank):
            inter = g
    return intra, inter


class TwoLevel:
    """Hierarchical collectives over one NodeLayout (module docstring). Create it with `connect`.

    Two lanes, each a worker thread with groups of its own: gathers on one, reductions (all-reduce,
    reduce-scatter) on the other, so that stage 3's parameter gathers overlap its gradient reductions as they
    do on the flat path (where they use different groups too). Each lane runs its collectives in issue order,
    the same on every rank; the two kinds never share a buffer in the engine, and every collective ends with
    a barrier after its last read of a peer's buffer, so the lanes need no ordering between them. `shm` is the
    host's transport for the engine's buffers (`Comm.zeros`), used by the main thread with both lanes idle."""

    GATHER, REDUCE = 0, 1

    def __init__(self, *, layout: NodeLayout, rank: int, shm: SharedMemoryTransport | None, lanes: list[_Lane]):
        self.layout = layout
        self.rank = rank
        self.node = layout.node_of(rank)
        self.local_rank = layout.local_rank_of(rank)
        self.intra_ranks = layout.intra_node_ranks(self.node)  # global ranks of this host, by local rank
        self.inter_ranks = layout.inter_node_ranks(self.local_rank)  # global ranks with this local rank, by host
        self.shm = shm
        self.lanes = lanes

    @classmethod
    def connect(cls, *, layout: NodeLayout, rank: int, use_shm: bool) -> TwoLevel:
        """Collective over the default group: every rank must call it. Creates the host groups and the
        groups across hosts (one set for the engine's shared buffers, one per lane), and the host's
        shared-memory transports when `use_shm` (None where the host's ranks cannot share memory or
        ZTUNE_SHM=0: the host groups then carry the intra-host level)."""
        local, per_node = layout.local_rank_of(rank), layout.ranks_per_node
        host_group, _ = _new_groups(layout, rank)
        shm = SharedMemoryTransport.connect(group=host_group, rank=local, world_size=per_node) if use_shm else None
        lanes = []
        for _ in (cls.GATHER, cls.REDUCE):
            intra, inter = _new_groups(layout, rank)
            lane_shm = None
            if shm is not None:
                lane_shm = SharedMemoryTransport.connect(group=intra, rank=local, world_size=per_node)
            lanes.append(_Lane(worker=_Worker(), intra=intra, inter=inter, shm=lane_shm))
        return cls(layout=layout, rank=rank, shm=shm, lanes=lanes)

    # -- scheduling ---------------------------------------------------------------------------------------
    def submit(self, op: str, *args, **kwargs) -> _Future:
        """Run collective `op` ("all_reduce", "reduce_scatter", "all_gather") on its lane; the handle."""
        lane = self.lanes[self.GATHER if op == ALL_GATHER else self.REDUCE]
        run = {ALL_REDUCE: self._all_reduce, REDUCE_SCATTER: self._reduce_scatter, ALL_GATHER: self._all_gather}[op]
        return lane.worker.submit(lambda: run(lane, *args, **kwargs))

    def drain(self) -> None:
        """Wait until every collective submitted so far has completed."""
        for lane in self.lanes:
            lane.worker.submit(tuple).wait()

    def _owner(self, lane: _Lane, tensor: torch.Tensor) -> SharedMemoryTransport | None:
        """The transport whose shared buffer holds `tensor` (the engine's, or the lane's staging), if any and
        if the collective is large enough to go through shared memory."""
        for tr in (self.shm, lane.shm):
            if tr is not None and tr.worth_it(tensor):
                return tr
        return None

    def _shared(self, lane: _Lane, tensor: torch.Tensor) -> bool:
        return self._owner(lane, tensor) is not None

    def _views(self, lane: _Lane, tensor: torch.Tensor) -> list[torch.Tensor]:
        return self._owner(lane, tensor).views(tensor)

    def _stage(self, lane: _Lane, tensor: torch.Tensor) -> torch.Tensor | None:
        """A shared buffer of `tensor`'s size and dtype for a collective on a private CPU tensor (staging),
        or None where the host has no transport or the buffer is below its threshold. One per lane and dtype,
        grown to the largest collective seen (a gradient bucket or a stage-3 unit); collective: every rank
        calls it at the same collective of the lane, so every rank grows it together."""
        tr = lane.shm
        if tr is None or tensor.device.type != "cpu" or \
                tensor.numel() * tensor.element_size() < tr.min_bytes or tensor.numel() == 0:
            return None
        buf = lane.staging.get(tensor.dtype)
        if buf is None or buf.numel() < tensor.numel():
            if buf is not None:
                tr.release(buf)
            buf = tr.zeros(tensor.numel(), dtype=tensor.dtype)
            if buf is None:  # /dev/shm full on some rank: the host group instead, on every rank
                lane.staging.pop(tensor.dtype, None)
                return None
            lane.staging[tensor.dtype] = buf
        return buf[:tensor.numel()]

    # -- the collectives (on the worker thread) -----------------------------------------------------------
    def _inter_reduce_scatter(self, lane: _Lane, cols: list[torch.Tensor]) -> list:
        """Reduce chunk k of this rank's column to the rank of host k (inter group); launched, not waited."""
        return [dist.reduce(c, dst=dst, group=lane.inter, async_op=True)
                for c, dst in zip(cols, self.inter_ranks, strict=True)]

    def _inter_all_gather(self, lane: _Lane, cols: list[torch.Tensor]) -> list:
        return [dist.broadcast(c, src=src, group=lane.inter, async_op=True)
                for c, src in zip(cols, self.inter_ranks, strict=True)]

    def _reduce_scatter(self, lane: _Lane, output: torch.Tensor, full: torch.Tensor) -> tuple:
        n_nodes, per_node, j = self.layout.num_nodes, self.layout.ranks_per_node, self.local_rank
        n = n_nodes * per_node
        if full.numel() % n:
            raise ValueError(f"reduce_scatter: {full.numel()} elements do not split over {n} ranks")
        size = full.numel() // n
        stage = None if self._shared(lane, full) else self._stage(lane, full)
        if stage is not None:  # a private bucket: through the host's shared staging buffer
            stage.copy_(full)
            full = stage
        chunks = full.split(size)
        column = [chunks[k * per_node + j] for k in range(n_nodes)]
        if self._shared(lane, full):
            grids = [v.view(n_nodes, per_node, size) for v in self._views(lane, full)]
            mine = grids[j][:, j]
            dist.barrier(group=lane.intra)  # every host peer's buffer is ready
            for p, grid in enumerate(grids):
                if p != j:
                    mine.add_(grid[:, j])
            _wait_all(self._inter_reduce_scatter(lane, column))
            dist.barrier(group=lane.intra)  # no peer still reads this buffer when the caller reuses it
        else:  # gloo inside the host: chunk r to the host peer with local rank r % L (one reduce per chunk)
            _wait_all([dist.reduce(c, dst=self.intra_ranks[r % per_node], group=lane.intra, async_op=True)
                       for r, c in enumerate(chunks)])
            _wait_all(self._inter_reduce_scatter(lane, column))
        own = column[self.node]
        if own.data_ptr() != output.data_ptr():
            output.copy_(own)
        return tuple(chunks)

    def _all_gather(self, lane: _Lane, output: torch.Tensor, shard: torch.Tensor) -> tuple:
        n_nodes, per_node, j = self.layout.num_nodes, self.layout.ranks_per_node, self.local_rank
        size = shard.numel()
        if output.numel() != n_nodes * per_node * size:
            raise ValueError(f"all_gather: output has {output.numel()} elements, expected "
                             f"{n_nodes * per_node} x {size}")
        target = output
        stage = None if self._shared(lane, output) else self._stage(lane, output)
        if stage is not None:  # a private buffer (a stage-3 unit): gathered in the staging buffer, then copied
            output = stage
        chunks = output.split(size)
        column = [chunks[k * per_node + j] for k in range(n_nodes)]
        if column[self.node].data_ptr() != shard.data_ptr():
            column[self.node].copy_(shard)
        _wait_all(self._inter_all_gather(lane, column))
        if self._shared(lane, output):
            grids = [v.view(n_nodes, per_node, size) for v in self._views(lane, output)]
            dest = target.view(n_nodes, per_node, size)  # staged: the peers' columns straight into the target
            dist.barrier(group=lane.intra)  # every host peer holds its column
            for p, grid in enumerate(grids):
                if p != j:
                    dest[:, p].copy_(grid[:, p])
            if stage is not None:
                dest[:, j].copy_(grids[j][:, j])
            dist.barrier(group=lane.intra)  # no peer still reads this buffer when it is reused
        else:
            _wait_all([dist.broadcast(c, src=self.intra_ranks[r % per_node], group=lane.intra,
                                      async_op=True) for r, c in enumerate(chunks)])
        return tuple(chunks) + (shard,)

    def _all_reduce(self, lane: _Lane, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> tuple:
        per_node, j = self.layout.ranks_per_node, self.local_rank
        target = tensor
        stage = None if op != dist.ReduceOp.SUM or self._shared(lane, tensor) else self._stage(lane, tensor)
        if stage is not None:
            stage.copy_(tensor)
            tensor = stage
        bounds = chunk_bounds(tensor.numel(), per_node)
        pieces = [tensor[lo:hi] for lo, hi in bounds]
        if op == dist.ReduceOp.SUM and self._shared(lane, tensor):
            views = self._views(lane, tensor)
            lo, hi = bounds[j]
            dist.barrier(group=lane.intra)
            for p, v in enumerate(views):
                if p != j:
                    pieces[j].add_(v[lo:hi])
            if hi > lo:  # peers read only their own piece of this buffer meanwhile
                dist.all_reduce(pieces[j], group=lane.inter)
            dist.barrier(group=lane.intra)  # every piece is globally reduced
            for p, v in enumerate(views):  # staged: the peers' pieces straight into the target
                plo, phi = bounds[p]
                if (p != j or stage is not None) and phi > plo:
                    target[plo:phi].copy_(v[plo:phi])
            dist.barrier(group=lane.intra)
        else:
            _wait_all([dist.reduce(pc, dst=self.intra_ranks[p], op=op, group=lane.intra, async_op=True)
                       for p, pc in enumerate(pieces) if pc.numel()])
            if pieces[j].numel():
                dist.all_reduce(pieces[j], op=op, group=lane.inter)
            _wait_all([dist.broadcast(pc, src=self.intra_ranks[p], group=lane.intra, async_op=True)
                       for p, pc in enumerate(pieces) if pc.numel()])
        return tuple(pieces) + (tensor,)
