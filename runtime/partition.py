"""Flat padded buffers and shard ranges: the one storage scheme behind every ZeRO stage.

A group's parameters are laid end to end in one flat buffer, padded so that it splits into n equal,
aligned shards; rank r owns elements [r * shard, (r + 1) * shard). Parameters become views into the buffer,
so collectives move one contiguous tensor per group and the optimizer updates one flat tensor per group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Shard sizes are rounded up to a multiple of this many elements: 16-byte alignment at fp32 and 2x that at
# 16-bit, so every shard starts on an aligned address for vectorised kernels and collectives.
SHARD_ALIGN_NUMEL = 8


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives in its group's flat buffer."""

    offset: int
    numel: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FlatLayout:
    """Element layout of one flat buffer split over `world_size` ranks."""

    slots: tuple[ParamSlot, ...]
    numel: int  # sum of parameter numels
    padded_numel: int  # numel rounded up so each rank's shard is equal and aligned
    world_size: int

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        """[start, end) of `rank`'s shard, in elements."""
        return rank * self.shard_numel, (rank + 1) * self.shard_numel


def padded_numel(numel: int, *, world_size: int, align_numel: int = SHARD_ALIGN_NUMEL) -> int:
    """Smallest size >= numel whose n-way shards are equal and a multiple of align_numel elements."""
    quantum = world_size * align_numel
    return max(quantum, -(-numel // quantum) * quantum)


def build_layout(shapes: Sequence[tuple[int, ...]], *, world_size: int,
                 align_numel: int = SHARD_ALIGN_NUMEL) -> FlatLayout:
    slots, offset = [], 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        slots.append(ParamSlot(offset=offset, numel=n, shape=tuple(shape)))
        offset += n
    return FlatLayout(tuple(slots), offset, padded_numel(offset, world_size=world_size, align_numel=align_numel),
                      world_size)


def split_buckets(numels: Sequence[int], *, bucket_numel: int) -> list[list[int]]:
    """Greedy consecutive split of items (by index) into buckets of at most `bucket_numel` elements;
    an item larger than a bucket gets a bucket of its own."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(numels):
        if current and size + n > bucket_numel:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        buckets.append(current)
    return buckets


def flatten_to(tensors: Sequence[torch.Tensor], layout: FlatLayout, *, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """A new zero-padded flat buffer holding `tensors` (cast to `dtype`) at their layout offsets."""
    flat = torch.zeros(layout.padded_numel, dtype=dtype, device=device)
    for t, slot in zip(tensors, layout.slots, strict=True):
        flat[slot.offset:slot.offset + slot.numel].copy_(t.detach().reshape(-1))
    return flat


def views_of(flat: torch.Tensor, layout: FlatLayout) -> list[torch.Tensor]:
    """Per-parameter views into `flat`, shaped like the parameters."""
    return [flat[s.offset:s.offset + s.numel].view(s.shape) for s in layout.slots]


def free_storage_(t: torch.Tensor) -> None:
    """Release `t`'s memory but keep the tensor object (and every view of it) for a later refill."""
    t.untyped_storage().resize_(0)


def alloc_storage_(t: torch.Tensor) -> None:
    """Give a freed tensor back its memory (contents undefined until written)."""
    nbytes = t.numel() * t.element_size()
    if t.untyped_storage().size() != nbytes:
        t.untyped_storage().resize_(nbytes)


class FlatGroup:
    """One flat buffer's tensors on this rank: parameters (views into `param_full`), the fp32 master and
    the gradient of the range this rank owns (the whole buffer when optimizer states are not sharded).

    Aliasing avoids copies where the dtypes allow it: at fp32 the master *is* the owned slice of the
    parameters, and unsharded gradients are views of `grad_full`, which the parameters' `.grad` also view.

    `zeros(numel, dtype)` allocates the buffers collectives read from other ranks (the unsharded gradient
    buffer, the parameter buffer that stages 1/2 all-gather after each step, stage 3's parameter shard):
    Comm.zeros, which puts them in shared memory where the ranks share a host (runtime/comm/shm.py). Default:
    ordinary zeroed memory.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], *, layout: FlatLayout, master_full: torch.Tensor | None,
                 rank: int, dtype: torch.dtype, shard_states: bool, shard_grads: bool, shard_params: bool,
                 module: torch.nn.Module | None = None,
                 zeros: Callable[[int, torch.dtype], torch.Tensor] | None = None,
                 master_owned: torch.Tensor | None = None):
        # master_owned (stage 3 only): the fp32 values of this rank's shard alone, instead of master_full.
        if master_full is None and not (shard_params and master_owned is not None):
            raise ValueError("FlatGroup: master_full is required unless parameters are sharded and master_owned "
                             "is given")
        device = (master_full if master_full is not None else master_owned).device
        if zeros is None:
            def zeros(numel: int, dt: torch.dtype) -> torch.Tensor:
                return torch.zeros(numel, dtype=dt, device=device)
        self.params = list(params)
        self.layout = layout
        self.module = module
        self.dtype = dtype
        self.owned = layout.shard_range(rank) if shard_states else (0, layout.padded_numel)
        lo, hi = self.owned
        partial = hi - lo < layout.padded_numel
        low_precision = dtype != torch.float32
        if shard_params:
            owned = master_owned if master_owned is not None else master_full[lo:hi]
            self.param_full = torch.empty(layout.padded_numel, dtype=dtype, device=device)
            self.param_shard = zeros(hi - lo, dtype)  # every unit's all-gather reads every rank's shard
            self.param_shard.copy_(owned)
            if not low_precision:
                self.master = self.param_shard
            else:
                self.master = master_owned if master_owned is not None else owned.clone()
        else:
            if partial:  # stages 1/2 all-gather the whole buffer after every step
                self.param_full = zeros(layout.padded_numel, dtype)
                self.param_full.copy_(master_full)
            else:
                self.param_full = master_full.to(dtype) if low_precision else master_full
            self.param_shard = self.param_full[lo:hi]
            if low_precision:
                self.master = master_full[lo:hi].clone() if partial else master_full
            else:
                self.master = self.param_shard
        for p, v in zip(self.params, views_of(self.param_full, layout), strict=True):
            p.data = v
        if shard_params:
            free_storage_(self.param_full)
        self.grad_full = None if shard_grads else zeros(layout.padded_numel, dtype)
        self.grad_views = None if self.grad_full is None else views_of(self.grad_full, layout)
        if self.grad_full is not None:
            self.grad_owned = self.grad_full[lo:hi]
        else:
            self.grad_owned = torch.zeros(hi - lo, dtype=dtype, device=device)
        # Sharded gradients: the first reduce-scatter after a step writes the accumulator, later ones add.
        self.grad_fresh = True

    @property
    def gathered(self) -> bool:
        return self.param_full.untyped_storage().size() > 0
