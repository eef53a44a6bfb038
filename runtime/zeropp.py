"""ZeRO++ (Wang et al. 2023, "ZeRO++: Extremely Efficient Collective Communication for Giant Model Training",
arXiv 2306.10209) for stage 3: qwZ and hpZ change the parameter gathers (here), qgZ the gradient reduce-scatter
(runtime/qgz.py, set up from here).

qwZ (`zero.quantized_weights`, DeepSpeed's `zero_quantized_weights`; paper section 3.1): the all-gathers of a
unit in forward (and in backward, without hpZ) send each rank's parameter shard as block-quantized int8 instead
of the compute dtype. Each rank quantizes its own shard in blocks of QWZ_BLOCK_NUMEL elements (the blocks start
at the shard's first element; the last block of a shard may be short), one fp32 scale per block: scale =
absmax(block) / 127, q = round(x / scale) clamped to [-127, 127] (symmetric round-to-nearest,
runtime/comm/compress.py). Every rank, the owner included, dequantizes all gathered shards, so all ranks compute
with identical weights. Per element, |dequantized - x| <= scale / 2 = absmax(block) / 254 (round to nearest; then
rounded once more to the compute dtype). The fp32 master weights and the optimizer never see the quantization: it
only changes the weights the forward and backward compute with (the gradient is taken at the quantized weights,
as in the paper). Wire bytes per element: 1 + 4 / QWZ_BLOCK_NUMEL (ztune/cost/zeropp.py charges the same).

hpZ (`zero.hpz_partition_size` = k, DeepSpeed's `zero_hpz_partition_size`; paper section 3.2): after a unit's
forward all-gather, each rank keeps a secondary shard: its 1/k slice of the unit's full (dequantized, with qwZ)
flat buffer, where its k-rank group is DeepSpeed's: ranks [i*k, (i+1)*k) (deepspeed/utils/groups.py,
_create_zero_param_parallel_group), which lie on one host because k divides the ranks per host. The backward
gather of the unit is then an all-gather of the secondary shards inside that group only: no bytes cross hosts,
and backward sees exactly the weights forward used. Secondary shards are persistent (as DeepSpeed's
ds_secondary_tensor), padded_numel / k elements per unit in the compute dtype: `Engine.memory_report()`'s
`secondary_params`. They are marked stale at the start of every forward and refreshed by each unit's forward
gather; a backward gather that finds its unit's secondary stale (e.g. a forward that bypassed the engine) gathers
over all ranks instead.

Only the gathers of a training pass (engine forward, backward) use these paths; `Engine.gathered()` and
checkpoint code gather exact values through the ordinary all-gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from ztune.config.schema import TrainConfig
from ztune.config.validate import check_zeropp_layout
from ztune.runtime import codec_kernels
from ztune.runtime.comm import Comm
from ztune.runtime.comm.compress import int8_compress_into
from ztune.runtime.comm.topology import NodeLayout

# Elements per qwZ quantization block (one fp32 scale each). The paper (section 3.1) quantizes weights
# block-wise, each block with its own scale, to bound the error by the block's own range instead of the whole
# tensor's; DeepSpeed's CUDA quantizer picks blocks of up to ~8000 elements and calls ~4k the optimum
# (deepspeed/runtime/zero/partition_parameters.py, CUDAQuantizer.target_group_size). 2048 keeps the scale
# overhead at 4/2048 = 0.2% of the int8 payload and halves DeepSpeed's block (a tighter error bound for small
# test models); it must divide nothing in particular: a shard's last block may be short.
QWZ_BLOCK_NUMEL = 2048
_INT8_MAX = 127


def check_zeropp(cfg: TrainConfig, *, layout: NodeLayout) -> None:
    """ConfigError (one line naming the key) for ZeRO++ settings this run cannot honour
    (ztune/config/validate.py check_zeropp_layout, which the launcher also runs)."""
    check_zeropp_layout(cfg, world_size=layout.world_size, ranks_per_node=layout.ranks_per_node)


def qwz_num_blocks(shard_numel: int) -> int:
    return max(1, -(-shard_numel // QWZ_BLOCK_NUMEL))


def qwz_piece_bytes(shard_numel: int) -> int:
    """Bytes one rank sends for a shard of `shard_numel` elements: fp32 scales, then int8 values, padded to 4."""
    return -(-(4 * qwz_num_blocks(shard_numel) + shard_numel) // 4) * 4


def quantize_shard(shard: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Block-quantize 1-D `shard` into `out` (uint8 [qwz_piece_bytes(numel)]): scales (fp32), values (int8)."""
    return int8_compress_into(shard, out, chunk_numel=QWZ_BLOCK_NUMEL)


def dequantize_pieces(gathered: torch.Tensor, out: torch.Tensor, *, num_pieces: int) -> None:
    """Dequantize `num_pieces` pieces written by quantize_shard, laid end to end in `gathered`, into flat `out`
    (num_pieces x shard_numel elements, any float dtype). The C++ codec kernel (runtime/codec_kernels.py) does
    it where it can (bitwise as _torch_dequantize_pieces, the rounding to a bf16/fp16 `out` included)."""
    shard = out.numel() // num_pieces
    h = 4 * qwz_num_blocks(shard)
    pieces, rows = gathered.view(num_pieces, -1), out.view(num_pieces, shard)
    if all(codec_kernels.dequantize_int8(piece[:h], piece[h:h + shard], row, chunk_numel=QWZ_BLOCK_NUMEL)
           for piece, row in zip(pieces, rows, strict=True)):
        return
    _torch_dequantize_pieces(gathered, out, num_pieces=num_pieces)  # rewrites every piece


def _torch_dequantize_pieces(gathered: torch.Tensor, out: torch.Tensor, *, num_pieces: int) -> None:
    shard = out.numel() // num_pieces
    nb = qwz_num_blocks(shard)
    pieces = gathered.view(num_pieces, -1)
    scales = pieces[:, :4 * nb].contiguous().view(torch.float32)  # [pieces, nb]
    values = pieces[:, 4 * nb:4 * nb + shard].contiguous().view(torch.int8).float()  # [pieces, shard]
    pad = nb * QWZ_BLOCK_NUMEL - shard
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    deq = values.view(num_pieces, nb, QWZ_BLOCK_NUMEL) * scales[:, :, None]
    out.view(num_pieces, shard).copy_(deq.view(num_pieces, -1)[:, :shard])


def fake_quantize(flat: torch.Tensor, *, num_shards: int) -> torch.Tensor:
    """What qwZ's gather yields for the full flat buffer `flat` split into `num_shards` shards (fp32)."""
    shard = flat.numel() // num_shards
    out = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
    buf = torch.empty(num_shards * qwz_piece_bytes(shard), dtype=torch.uint8, device=flat.device)
    for r, piece in enumerate(buf.view(num_shards, -1)):
        quantize_shard(flat[r * shard:(r + 1) * shard], piece)
    dequantize_pieces(buf, out, num_pieces=num_shards)
    return out


def build_hpz_comm(*, layout: NodeLayout, partition_size: int, rank: int, timeout_s: float) -> Comm:
    """Collective over the default group: DeepSpeed's hpZ groups (ranks [i*k, (i+1)*k)), every rank creating
    all of them in the same order; returns the Comm of this rank's group (its own byte counters)."""
    k = partition_size
    mine = None
    for first in range(0, layout.world_size, k):
        ranks = list(range(first, first + k))
        group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))  # the default backend
        if rank in ranks:
            mine = group
    return Comm(group=mine, rank=rank % k, world_size=k)


class ZeroPlusPlus:
    """qwZ and hpZ gathers for the parameter gatherer (runtime/param_gather.py); see the module docstring."""

    def __init__(self, groups: Sequence, *, comm: Comm, quantized_weights: bool, hpz_comm: Comm | None,
                 qgz_comms: tuple[Comm, Comm] | None = None):
        """qgz_comms: (intra-host, inter-host) Comm for qgZ (runtime/qgz.py), or None."""
        self.comm = comm
        self.quantized_weights = quantized_weights
        self.hpz_comm = hpz_comm
        self.qgz_comms = qgz_comms
        self._secondary: dict[int, torch.Tensor] = {}
        self._valid: set[int] = set()
        if hpz_comm is not None:
            k = hpz_comm.world_size
            for g in groups:
                self._secondary[id(g)] = torch.zeros(g.layout.padded_numel // k, dtype=g.param_full.dtype,
                                                     device=g.param_full.device)

    def qgz_exchanges(self, groups: Sequence) -> list | None:
        """One qgZ reduce-scatter per trainable group, or None without qgZ."""
        if self.qgz_comms is None:
            return None
        from ztune.runtime.qgz import QgzExchange

        intra, inter = self.qgz_comms
        return [QgzExchange(intra=intra, inter=inter, padded_numel=g.layout.padded_numel) for g in groups]

    def secondary_tensors(self) -> list[torch.Tensor]:
        return list(self._secondary.values())

    def invalidate(self) -> None:
        """Secondary shards no longer match the primary ones (a new forward, or the parameters changed)."""
        self._valid.clear()

    def has_secondary(self, g) -> bool:
        return id(g) in self._valid

    def gather_secondary(self, g):
        """Backward gather inside the hpZ group: every member's secondary shard into `g.param_full`."""
        return self.hpz_comm.all_gather(g.param_full, self._secondary[id(g)], async_op=True)

    def keep_secondary(self, g) -> None:
        """After a forward gather: this rank's 1/k slice of the full buffer becomes its secondary shard."""
        sec = self._secondary.get(id(g))
        if sec is None:
            return
        i = self.hpz_comm.rank
        sec.copy_(g.param_full[i * sec.numel():(i + 1) * sec.numel()])
        self._valid.add(id(g))

    def start_quantized(self, g, *, shard: torch.Tensor, group=None):
        """Launch the int8 all-gather of `shard` (this rank's); returns (work, finish), finish() dequantizing
        into `g.param_full` once the work is done."""
        n = self.comm.world_size
        piece = qwz_piece_bytes(shard.numel())
        recv = torch.empty(n * piece, dtype=torch.uint8, device=shard.device)
        mine = recv[self.comm.rank * piece:(self.comm.rank + 1) * piece]
        quantize_shard(shard, mine)
        work = self.comm.all_gather(recv, mine, async_op=True, group=group)

        def finish():
            dequantize_pieces(recv, g.param_full, num_pieces=n)
        return work, finish


def zeropp_report(zpp: ZeroPlusPlus, report: dict, *, layout: NodeLayout, steps: int) -> dict:
    """The ZeRO++ part of `Engine.comm_report()`: bytes per step this rank sends on collectives that span hosts
    and on collectives inside one host (the paper's "cross-node" volume, section 3: a collective over ranks of
    several hosts counts in full as cross-host, ring accounting), and the hpZ group's own counters. `report`:
    the default group's report (Comm.report), whose collectives span hosts when the job has several."""
    cross = report["bytes_sent_per_step"] if layout.multi_node else 0.0
    intra = 0.0 if layout.multi_node else report["bytes_sent_per_step"]
    out = {"quantized_weights": zpp.quantized_weights, "qwz_block_numel": QWZ_BLOCK_NUMEL,
           "hpz_partition_size": zpp.hpz_comm.world_size if zpp.hpz_comm is not None else 1,
           "num_nodes": layout.num_nodes}
    if zpp.hpz_comm is not None:
        hpz = zpp.hpz_comm.report(steps=steps)
        out["hpz_group"] = hpz
        intra += hpz["bytes_sent_per_step"]
    out["quantized_gradients"] = zpp.qgz_comms is not None
    if zpp.qgz_comms is not None:  # runtime/qgz.py: an all-to-all inside the host, then one across hosts
        q_intra, q_inter = (c.report(steps=steps) for c in zpp.qgz_comms)
        out.update(qgz_intra_host=q_intra, qgz_inter_host=q_inter)
        intra += q_intra["bytes_sent_per_step"]
        cross += q_inter["bytes_sent_per_step"]
    out.update(cross_host_bytes_per_step=cross, intra_host_bytes_per_step=intra)
    return out
