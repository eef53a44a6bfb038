"""Which elements of which parameter a shard holds: the record that makes checkpoints reshardable.

A rank's flat group g owns elements [lo, hi) of the group's flat buffer (runtime/partition.py). Each parameter
slot that overlaps that range contributes one *fragment*: elements [start, end) of the flattened parameter,
stored at `offset` in the rank's saved shard tensor of group g. Loading at another world size or stage asks,
for every parameter range its new shards need, which saved fragments cover it (`plan_reads`); nothing about
the old flat layout (bucket order, padding, world size) has to match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ztune.runtime.partition import FlatLayout
from ztune.runtime.state.files import CheckpointError


@dataclass(frozen=True)
class Fragment:
    """Elements [start, end) of parameter `name` (flattened), at `offset` in group `group`'s shard of `rank`."""

    name: str
    start: int
    end: int
    rank: int
    group: int
    offset: int

    def as_json(self) -> list:
        return [self.name, self.start, self.end, self.group, self.offset]

    @classmethod
    def from_json(cls, row: list, *, rank: int) -> Fragment:
        name, start, end, group, offset = row
        return cls(name=name, start=int(start), end=int(end), rank=rank, group=int(group), offset=int(offset))


@dataclass(frozen=True)
class Read:
    """Copy `length` elements from `src_offset` of fragment source (rank, group) into `dst_offset`."""

    rank: int
    group: int
    src_offset: int
    dst_offset: int
    length: int


def fragments_of(layout: FlatLayout, names: Sequence[str], *, owned: tuple[int, int], rank: int,
                 group: int) -> list[Fragment]:
    """The fragments of the parameters (`names`, in slot order) that overlap flat range `owned` = [lo, hi)."""
    lo, hi = owned
    out = []
    for slot, name in zip(layout.slots, names, strict=True):
        a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
        if a < b:
            out.append(Fragment(name=name, start=a - slot.offset, end=b - slot.offset, rank=rank, group=group,
                                offset=a - lo))
    return out


def index_fragments(fragments: Sequence[Fragment]) -> dict[str, list[Fragment]]:
    """Fragments by parameter name, sorted by start."""
    index: dict[str, list[Fragment]] = {}
    for f in fragments:
        index.setdefault(f.name, []).append(f)
    for frags in index.values():
        frags.sort(key=lambda f: f.start)
    return index


def plan_reads(index: dict[str, list[Fragment]], *, name: str, start: int, end: int, dst_offset: int,
               where: str) -> list[Read]:
    """Reads that fill elements [start, end) of parameter `name` into a buffer at `dst_offset`.
    Raises CheckpointError (naming `where`, the checkpoint) when the saved fragments do not cover the range."""
    if name not in index:
        raise CheckpointError(f"checkpoint {where} has no parameter {name!r}: it was saved from a different model")
    reads, pos = [], start
    for f in index[name]:
        if f.end <= pos or f.start >= end:
            continue
        if f.start > pos:
            break
        stop = min(end, f.end)
        reads.append(Read(rank=f.rank, group=f.group, src_offset=f.offset + (pos - f.start),
                          dst_offset=dst_offset + (pos - start), length=stop - pos))
        pos = stop
        if pos == end:
            break
    if pos < end:
        raise CheckpointError(f"checkpoint {where} lacks elements [{pos}, {end}) of parameter {name!r}: a rank's "
                              "metadata is inconsistent")
    return reads


def param_numels(index: dict[str, list[Fragment]]) -> dict[str, int]:
    return {name: max(f.end for f in frags) for name, frags in index.items()}
