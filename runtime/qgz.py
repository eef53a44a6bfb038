"""ZeRO++ qgZ (Wang et al. 2023, arXiv 2306.10209, section 3.3): stage 3's gradient reduce-scatter as two
all-to-alls of int4-quantized chunks, first inside each host, then across hosts (DeepSpeed's
`zero_quantized_gradients`; deepspeed/runtime/comm/coalesced_collectives.py all_to_all_quant_reduce).

A compressed gradient cannot be summed hop by hop in a ring without re-quantizing at every hop (error growing
with n); qgZ quantizes each value twice whatever n is. With n = N hosts x L ranks and the padded flat bucket
split into n shards of s elements (rank r = host h x L + local rank j owns shard r, the ordinary layout):
1. Intra-host all-to-all (group: the L ranks of the host). The bucket, viewed as [N, L, s], is cut by local
   rank: piece j = the shards [m * L + j for every host m] (N x s elements: the paper's "tensor slice
   reordering", so that step 2 needs no reshuffle). Each piece is quantized on its own; local rank j receives
   its piece from each of the host's ranks, dequantizes and sums them: the host's partial sums of the shards
   that local rank j on every host owns.
2. Inter-host all-to-all (group: the N ranks with local rank j, one per host). The partial sums, viewed as
   [N, s], go row m to host m, quantized again per row; each rank dequantizes and sums the N rows it receives:
   the reduced shard r, summed over all n ranks.
Quantization: int4 symmetric round-to-nearest per block of QGZ_BLOCK_NUMEL elements (the blocks start at each
piece's first element), scale = absmax / 7, two values per byte, one fp32 scale per block:
1/2 + 4/2048 bytes per element (ztune/cost/zeropp.py charges the same). Per value and quantization,
|error| <= scale / 2 = absmax(block) / 14. No error feedback: the paper's qgZ has none.

Wire bytes per rank (ring accounting of all_to_all, runtime/comm/collectives.py): step 1 (L-1)/L x the
quantized bucket inside the host; step 2 (N-1)/N x the quantized 1/L slice across hosts.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from ztune.runtime import codec_kernels
from ztune.runtime.comm import Comm
from ztune.runtime.comm.topology import NodeLayout

# Elements per int4 block (one fp32 scale each); the same block as qwZ's (runtime/zeropp.py QWZ_BLOCK_NUMEL).
QGZ_BLOCK_NUMEL = 2048
_INT4_MAX = 7


def _num_blocks(numel: int) -> int:
    return max(1, -(-numel // QGZ_BLOCK_NUMEL))


def int4_piece_bytes(numel: int) -> int:
    """Bytes of one quantized piece of `numel` elements: fp32 scales, then values two per byte, padded to 4."""
    return -(-(4 * _num_blocks(numel) + -(-numel // 2)) // 4) * 4


def quantize_int4(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Block-quantize `x` (1-D, or any shape read as x.reshape(-1)) into `out` (uint8 [int4_piece_bytes(numel)]):
    scales (fp32), then the values + 8 (1..15) packed two per byte, the first of each pair in the low nibble. The
    C++ codec kernel (runtime/codec_kernels.py) writes it where it can, bitwise as _torch_quantize_int4 does, and
    reads a 2-D slice with unit column stride in place."""
    if codec_kernels.quantize_int4(x, out, block_numel=QGZ_BLOCK_NUMEL):
        return out
    return _torch_quantize_int4(x.reshape(-1), out)


def _torch_quantize_int4(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    numel, nb = x.numel(), _num_blocks(x.numel())
    blocks = torch.nn.functional.pad(x.float(), (0, nb * QGZ_BLOCK_NUMEL - numel)).view(nb, QGZ_BLOCK_NUMEL)
    scales = blocks.abs().amax(dim=1) / _INT4_MAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / safe[:, None]).clamp_(-_INT4_MAX, _INT4_MAX).add_(8).to(torch.uint8).view(-1)
    q = q[:2 * -(-numel // 2)].view(-1, 2)
    h = 4 * nb
    out[:h].copy_(scales.view(torch.uint8))
    packed = q[:, 0] | (q[:, 1] << 4)
    out[h:h + packed.numel()].copy_(packed)
    out[h + packed.numel():].zero_()
    return out


def dequantize_int4(buf: torch.Tensor, *, numel: int, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [numel] from a piece written by quantize_int4; with `add_to` (fp32 [numel]), that tensor after
    `add_to += the dequantized piece` (the same roundings, without the temporary)."""
    out = torch.empty(numel, dtype=torch.float32, device=buf.device) if add_to is None else add_to
    if codec_kernels.dequantize_int4(buf, out, numel=numel, block_numel=QGZ_BLOCK_NUMEL,
                                     mode=0 if add_to is None else 1):
        return out
    deq = _torch_dequantize_int4(buf, numel=numel)
    return deq if add_to is None else add_to.add_(deq)


def _torch_dequantize_int4(buf: torch.Tensor, *, numel: int) -> torch.Tensor:
    nb = _num_blocks(numel)
    h = 4 * nb
    scales = buf[:h].contiguous().view(torch.float32)
    packed = buf[h:h + -(-numel // 2)]
    q = torch.stack((packed & 15, packed >> 4), dim=1).view(-1).float().sub_(8)
    q = torch.nn.functional.pad(q, (0, nb * QGZ_BLOCK_NUMEL - q.numel()))
    return (q.view(nb, QGZ_BLOCK_NUMEL) * scales[:, None]).view(-1)[:numel]


def build_qgz_comms(*, layout: NodeLayout, rank: int, timeout_s: float) -> tuple[Comm, Comm]:
    """Collective over the default group: the intra-host groups (each host's L ranks) and the inter-host groups
    (the ranks of one local rank, one per host), every rank creating all in the same order. Returns this rank's
    (intra, inter) Comm, each with its own byte counters (a Comm of world size 1 where a level has one rank)."""
    L, N = layout.ranks_per_node, layout.num_nodes
    timeout = timedelta(seconds=timeout_s)

    def make(all_ranks: list[list[int]], size: int, my_index: int) -> Comm:
        mine = None
        for ranks in all_ranks:
            if size > 1:
                group = dist.new_group(ranks, timeout=timeout)  # the default backend (gloo or NCCL)
                if rank in ranks:
                    mine = group
        return Comm(group=mine, rank=my_index, world_size=size)

    intra = make([layout.intra_node_ranks(h) for h in range(N)], L, layout.local_rank_of(rank))
    inter = make([layout.inter_node_ranks(j) for j in range(L)], N, layout.node_of(rank))
    return intra, inter


class QgzExchange:
    """One flat group's qgZ reduce-scatter, with the interface of grad_reduce.CompressedExchange (start, reduce,
    residuals)."""

    def __init__(self, *, intra: Comm, inter: Comm, padded_numel: int):
        self.intra, self.inter = intra, inter
        self.L, self.N = intra.world_size, inter.world_size
        self.shard_numel = padded_numel // (self.L * self.N)
        self.piece1 = int4_piece_bytes(self.N * self.shard_numel)
        self.piece2 = int4_piece_bytes(self.shard_numel)

    def start(self, full: torch.Tensor):
        """Step 1's all-to-all of `full` (this rank's whole bucket), launched; returns (work, received bytes)."""
        L, N, s = self.L, self.N, self.shard_numel
        by_local = full.view(N, L, s).transpose(0, 1)  # [j, m, s]: piece j holds shards m * L + j
        send = torch.empty(L * self.piece1, dtype=torch.uint8, device=full.device)
        for j in range(L):
            quantize_int4(by_local[j], send[j * self.piece1:(j + 1) * self.piece1])  # [N, s], rows L * s apart
        recv = torch.empty_like(send)
        return self.intra.all_to_all(recv, send, async_op=True), recv

    def reduce(self, recv: torch.Tensor) -> torch.Tensor:
        """Step 1's sums, step 2's all-to-all across hosts and its sums: the reduced shard (fp32 [s])."""
        L, N, s = self.L, self.N, self.shard_numel
        partial = dequantize_int4(recv[:self.piece1], numel=N * s)
        for j in range(1, L):
            dequantize_int4(recv[j * self.piece1:(j + 1) * self.piece1], numel=N * s, add_to=partial)
        send = torch.empty(N * self.piece2, dtype=torch.uint8, device=recv.device)
        for m, row in enumerate(partial.view(N, s)):
            quantize_int4(row, send[m * self.piece2:(m + 1) * self.piece2])
        got = torch.empty_like(send)
        self.inter.all_to_all(got, send)
        total = dequantize_int4(got[:self.piece2], numel=s)
        for m in range(1, N):
            dequantize_int4(got[m * self.piece2:(m + 1) * self.piece2], numel=s, add_to=total)
        return total

    def residuals(self) -> list[torch.Tensor]:
        return []
