"""Intra-host shared-memory collectives for CPU tensors.

When every rank of a CPU group runs on one host, moving a gradient bucket through gloo costs a TCP loopback
round trip per ring hop: on the 2-core dev machine an all-reduce of 21M fp32 elements takes ~58 ms, a
reduce-scatter ~100 ms and an all-gather ~78 ms, while one pass over that memory takes ~6-12 ms. So the flat
buffers that collectives move (stage 0/1 gradient buffers, stage 1/2 parameter buffers) are allocated in
/dev/shm instead, each rank's buffer mapped by every rank, and a collective on such a buffer is plain memory
traffic between gloo barriers (which also order the memory: each is a round of socket messages):

- reduce-scatter: rank r sums chunk r of every rank's buffer into its own chunk r (no rank reads another's
  chunk r, so the in-place sum is race-free);
- all-gather: rank r copies chunk s of rank s's buffer into its own, for every s != r;
- all-reduce: the reduce-scatter, then the all-gather;
with a barrier before each phase and one after the last, so that nobody still reads a buffer its owner is
about to change. Stage 3's parameter shards are shared too, and change only in the optimizer step, which
the engine brackets with barriers: its per-unit all-gathers are then plain copies from every rank's shard
(`gather_shards`), with no synchronisation at all. Each rank reads (n-1)/n of the buffer from its peers
per phase: what collectives.py's ring accounting charges, so comm_report and the cost model hold unchanged.

Every rank gets identical results (each chunk is summed once, by its owner, and copied by everyone else).
The summation order differs from gloo's ring (own chunk first, then the other ranks in rank order), which
is within the parity tolerance of the tests like any other reduction order.

Availability is checked once, collectively: every rank writes a probe file and must read every other rank's
(ranks in separate containers or on separate hosts cannot); any failure on any rank, or ZTUNE_SHM=0, and the
group keeps using gloo for everything. Files are unlinked as soon as every rank has mapped them, so a crash
leaves nothing behind in /dev/shm; space is reserved with posix_fallocate, so a full /dev/shm is an error
at allocation (and a fallback to ordinary memory), never a SIGBUS later.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ztune import envvars
from ztune.runtime.comm.groups import GroupRef

SHM_ROOT = "/dev/shm"
ENV_SWITCH = "ZTUNE_SHM"  # "0" turns the transport off (gloo only)
# Below this size a collective through gloo is faster than three barriers (2 ranks on the dev machine:
# 4 KiB all-reduce 346 us gloo vs 564 us here, 64 KiB 495 vs 800, 256 KiB 754 vs 566, 4 MiB 4.5 vs 2.0 ms).
# ZTUNE_SHM_MIN_BYTES overrides it (the tests set 0 so that their small models exercise this path).
MIN_BYTES = 256 * 1024
MIN_BYTES_ENV = "ZTUNE_SHM_MIN_BYTES"
# Chunk boundaries are multiples of this many elements (64 bytes at fp32), like the flat-buffer shards.
_CHUNK_ALIGN = 16


@dataclass
class _Region:
    """One shared buffer: this rank's tensor and every rank's mapping of its own (index = rank)."""

    mine: torch.Tensor
    ranks: list[torch.Tensor]

    @property
    def base(self) -> int:
        return self.mine.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.mine.numel() * self.mine.element_size()


def enabled_by_env() -> bool:
    return bool(envvars.read(ENV_SWITCH))


class SharedMemoryTransport:
    """Shared buffers and the collectives over them for one process group (see the module docstring).
    Create it with `connect`, which returns None where the ranks cannot share memory."""

    def __init__(self, *, group: dist.ProcessGroup | None, rank: int, world_size: int, prefix: str,
                 root: str = SHM_ROOT):
        self._group = GroupRef(group)  # not owned (runtime/comm/groups.py)
        self.rank = rank
        self.world_size = world_size
        self.prefix = prefix
        self.root = root
        self._regions: list[_Region] = []
        self._count = 0
        self.min_bytes = _min_bytes_from_env()

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self._group.get()

    # -- set-up -------------------------------------------------------------------------------------------
    @classmethod
    def connect(cls, *, group: dist.ProcessGroup | None, rank: int, world_size: int,
                root: str = SHM_ROOT) -> SharedMemoryTransport | None:
        """Collective: every rank must call it. None unless every rank can read every other rank's files."""
        if world_size < 2:
            return None
        names = [f"ztune-{uuid.uuid4().hex[:16]}-{os.getpid()}" if rank == 0 else None]
        first = 0 if group is None or group is dist.group.WORLD else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(names, src=first, group=group)  # (src is a global rank)
        prefix = names[0]
        ok = enabled_by_env() and os.path.isdir(root) and os.access(root, os.W_OK)
        probe = os.path.join(root, f"{prefix}-probe-{rank}")
        if ok:
            try:
                with open(probe, "w") as f:
                    f.write(f"{prefix}:{rank}")
            except OSError:
                ok = False
        dist.barrier(group=group)
        if ok:
            for other in range(world_size):
                try:
                    with open(os.path.join(root, f"{prefix}-probe-{other}")) as f:
                        ok = ok and f.read() == f"{prefix}:{other}"
                except OSError:
                    ok = False
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        _unlink(probe)
        return cls(group=group, rank=rank, world_size=world_size, prefix=prefix, root=root) if flag.item() else None

    def zeros(self, numel: int, *, dtype: torch.dtype) -> torch.Tensor | None:
        """Collective: a zeroed flat CPU tensor in shared memory that every rank maps, or None on every rank
        when any rank could not reserve the space (the caller then allocates ordinary memory)."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        index = self._count
        self._count += 1
        path = self._path(index, self.rank)
        ok = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, max(nbytes, 1))  # tmpfs full: ENOSPC here, not SIGBUS on first touch
            finally:
                os.close(fd)
        except OSError:
            ok = False
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        if not flag.item():
            _unlink(path)
            return None
        ranks: list[torch.Tensor] = []
        try:
            ranks = [torch.from_file(self._path(index, r), shared=True, size=numel, dtype=dtype)
                     for r in range(self.world_size)]
        except (OSError, RuntimeError):
            ranks = []
        # Also the barrier after which the names can go: every rank has mapped every file, or failed to.
        flag = torch.tensor([1 if ranks else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        _unlink(path)
        if not flag.item():
            return None
        mine = ranks[self.rank]
        mine.zero_()  # fallocate'd tmpfs pages read as zero already; this also touches them on this rank
        self._regions.append(_Region(mine=mine, ranks=ranks))
        return mine

    def release(self, tensor: torch.Tensor) -> None:
        """Forget the shared buffer `tensor` (from `zeros`): its mappings go when the last reference does.
        Collective in effect: every rank must release the same buffers (indices are not reused)."""
        self._regions = [r for r in self._regions if r.mine is not tensor]

    def own_bytes(self) -> int:
        """Bytes of this rank's own shared buffers, in whole pages (how they are resident)."""
        page = os.sysconf("SC_PAGE_SIZE")
        return sum(-(-region.nbytes // page) * page for region in self._regions)

    def peer_mappings(self) -> list[torch.Tensor]:
        """This rank's mappings of the other ranks' buffers: memory those ranks own and account for (a
        tensor census of this process would otherwise count it twice)."""
        return [t for region in self._regions for r, t in enumerate(region.ranks) if r != self.rank]

    def _path(self, index: int, rank: int) -> str:
        return os.path.join(self.root, f"{self.prefix}-{index}-{rank}")

    # -- collectives --------------------------------------------------------------------------------------
    def owns(self, tensor: torch.Tensor) -> bool:
        """True when `tensor` is a contiguous piece of one of this transport's shared buffers."""
        return tensor.device.type == "cpu" and tensor.is_contiguous() and self._find(tensor) is not None

    def worth_it(self, tensor: torch.Tensor) -> bool:
        """True when a collective on `tensor` should run here rather than through gloo: it is shared and at
        least `min_bytes` (MIN_BYTES unless ZTUNE_SHM_MIN_BYTES says otherwise)."""
        return tensor.numel() * tensor.element_size() >= self.min_bytes and self.owns(tensor)

    def _find(self, tensor: torch.Tensor) -> tuple[_Region, int] | None:
        ptr = tensor.data_ptr()
        end = ptr + tensor.numel() * tensor.element_size()
        for region in self._regions:
            if region.base <= ptr and end <= region.base + region.nbytes and tensor.dtype == region.mine.dtype:
                return region, (ptr - region.base) // tensor.element_size()
        return None

    def views(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of the piece `tensor` is of this rank's buffer (same offset on every rank)."""
        found = self._find(tensor)
        if found is None:
            raise ValueError("tensor is not in a shared-memory buffer of this transport")
        region, offset = found
        return [t[offset:offset + tensor.numel()] for t in region.ranks]

    def _chunks(self, numel: int) -> list[tuple[int, int]]:
        return chunk_bounds(numel, self.world_size)

    def _barrier(self) -> None:
        dist.barrier(group=self.group)

    def _reduce_own_chunk(self, views: list[torch.Tensor], lo: int, hi: int) -> None:
        own = views[self.rank][lo:hi]
        for r, v in enumerate(views):
            if r != self.rank:
                own.add_(v[lo:hi])

    def _gather_other_chunks(self, views: list[torch.Tensor], chunks: list[tuple[int, int]]) -> None:
        own = views[self.rank]
        for r, (lo, hi) in enumerate(chunks):
            if r != self.rank and hi > lo:
                own[lo:hi].copy_(views[r][lo:hi])

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` (in a shared buffer) over the group, in place."""
        views = self.views(tensor)
        chunks = self._chunks(tensor.numel())
        self._barrier()
        self._reduce_own_chunk(views, *chunks[self.rank])
        self._barrier()
        self._gather_other_chunks(views, chunks)
        self._barrier()

    def reduce_scatter(self, output: torch.Tensor, full: torch.Tensor) -> None:
        """Sum `full` (in a shared buffer, numel divisible by n) over the group; this rank's 1/n slice of the
        sum lands in `output` (which may be that slice of `full`)."""
        n = self.world_size
        if full.numel() % n:
            raise ValueError(f"reduce_scatter: {full.numel()} elements do not split over {n} ranks")
        shard = full.numel() // n
        lo, hi = self.rank * shard, (self.rank + 1) * shard
        views = self.views(full)
        self._barrier()
        self._reduce_own_chunk(views, lo, hi)
        if output.data_ptr() != views[self.rank][lo:hi].data_ptr():
            output.copy_(views[self.rank][lo:hi])
        self._barrier()

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor) -> None:
        """Every rank's `shard` concatenated into `output` (in a shared buffer, numel = n x shard's)."""
        n = self.world_size
        size = shard.numel()
        if output.numel() != n * size:
            raise ValueError(f"all_gather: output has {output.numel()} elements, expected {n} x {size}")
        views = self.views(output)
        own = views[self.rank][self.rank * size:(self.rank + 1) * size]
        if own.data_ptr() != shard.data_ptr():
            own.copy_(shard)
        self._barrier()
        self._gather_other_chunks(views, [(r * size, (r + 1) * size) for r in range(n)])
        self._barrier()

    def gather_shards(self, output: torch.Tensor, shard: torch.Tensor) -> None:
        """Every rank's copy of `shard` (a piece of a shared buffer) concatenated into `output` (any memory),
        without barriers: the caller guarantees that no rank is writing its shard meanwhile."""
        size = shard.numel()
        if output.numel() != self.world_size * size:
            raise ValueError(f"gather_shards: output has {output.numel()} elements, expected "
                             f"{self.world_size} x {size}")
        for r, v in enumerate(self.views(shard)):
            output[r * size:(r + 1) * size].copy_(v)


def chunk_bounds(numel: int, n: int) -> list[tuple[int, int]]:
    """[lo, hi) of n chunks covering `numel` elements: equal, aligned to _CHUNK_ALIGN, the last ones ragged or
    empty (an all-reduce's pieces; any split works as long as every rank uses the same one)."""
    size = -(-numel // n)
    size = -(-size // _CHUNK_ALIGN) * _CHUNK_ALIGN
    return [(min(r * size, numel), min((r + 1) * size, numel)) for r in range(n)]


def _min_bytes_from_env() -> int:
    return int(envvars.read(MIN_BYTES_ENV, default=MIN_BYTES))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
