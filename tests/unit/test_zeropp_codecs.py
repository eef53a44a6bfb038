"""ZeRO++'s wire formats: qwZ's int8 blocks (runtime/zeropp.py) and qgZ's int4 blocks (runtime/qgz.py): error
bounds per block, byte sizes against the cost model, and the config checks that need no process group."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from ztune.config.schema import Offload, TrainConfig, ZeroConfig
from ztune.cost.zeropp import qgz_bytes_per_element, qwz_bytes_per_element
from ztune.errors import ConfigError
from ztune.runtime.comm.topology import NodeLayout
from ztune.runtime.qgz import QGZ_BLOCK_NUMEL, dequantize_int4, int4_piece_bytes, quantize_int4
from ztune.runtime.zeropp import (
    QWZ_BLOCK_NUMEL,
    check_zeropp,
    dequantize_pieces,
    fake_quantize,
    quantize_shard,
    qwz_piece_bytes,
)


def _worst(x: torch.Tensor, y: torch.Tensor, block: int, levels: int) -> float:
    """max over blocks of max |y - x| / (absmax / (2 levels)): <= 1 for round-to-nearest."""
    worst = 0.0
    for lo in range(0, x.numel(), block):
        bound = x[lo:lo + block].abs().max() / (2 * levels)
        worst = max(worst, float((y[lo:lo + block] - x[lo:lo + block]).abs().max() / bound))
    return worst


@pytest.mark.parametrize("shard", [8, 2048, 2056, 5000])
def test_qwz_round_trip_within_half_a_step_per_block(shard):
    torch.manual_seed(0)
    n = 3
    flat = torch.randn(n * shard) * torch.linspace(0.01, 10, n * shard)  # blocks of very different ranges
    buf = torch.empty(n * qwz_piece_bytes(shard), dtype=torch.uint8)
    for r, piece in enumerate(buf.view(n, -1)):
        quantize_shard(flat[r * shard:(r + 1) * shard], piece)
    out = torch.empty(n * shard, dtype=torch.bfloat16)
    dequantize_pieces(buf, out, num_pieces=n)
    exact = fake_quantize(flat, num_shards=n)
    assert torch.equal(out, exact.to(torch.bfloat16))
    for r in range(n):  # blocks restart at each shard
        sl = slice(r * shard, (r + 1) * shard)
        assert 0 < _worst(flat[sl], exact[sl], QWZ_BLOCK_NUMEL, 127) <= 1 + 1e-5
    assert qwz_piece_bytes(shard) <= shard * qwz_bytes_per_element() + 4 + 3


@pytest.mark.parametrize("numel", [1, 7, 2048, 5001])
def test_int4_round_trip_within_half_a_step_per_block(numel):
    torch.manual_seed(1)
    x = torch.randn(numel) * torch.linspace(0.01, 10, numel)
    buf = torch.empty(int4_piece_bytes(numel), dtype=torch.uint8)
    y = dequantize_int4(quantize_int4(x, buf), numel=numel)
    assert _worst(x, y, QGZ_BLOCK_NUMEL, 7) <= 1 + 1e-5
    assert int4_piece_bytes(numel) <= numel * qgz_bytes_per_element() + 4 + 4  # a short block, odd count, align
    zeros = dequantize_int4(quantize_int4(torch.zeros(numel), buf), numel=numel)
    assert torch.equal(zeros, torch.zeros(numel))


def test_config_checks_name_the_key():
    cfg = TrainConfig(zero=ZeroConfig(stage=3, hpz_partition_size=2))
    check_zeropp(cfg, layout=NodeLayout(world_size=4, ranks_per_node=2))
    with pytest.raises(ConfigError, match=r"zero_hpz_partition_size=4 must divide the ranks per host \(2\)"):
        check_zeropp(dataclasses.replace(cfg, zero=ZeroConfig(stage=3, hpz_partition_size=4)),
                     layout=NodeLayout(world_size=4, ranks_per_node=2))
    with pytest.raises(ConfigError, match="zero_hpz_partition_size=2: hpZ needs several ranks per host"):
        check_zeropp(cfg, layout=NodeLayout(world_size=4, ranks_per_node=1))
    with pytest.raises(ConfigError, match=re.escape("zero_quantized_weights: ZeRO++ with offload_param")):
        check_zeropp(TrainConfig(zero=ZeroConfig(stage=3, quantized_weights=True, offload_params=Offload.CPU)),
                     layout=NodeLayout(world_size=2, ranks_per_node=2))
    with pytest.raises(ConfigError, match="zero_quantized_gradients: qgZ needs the same number of ranks"):
        check_zeropp(TrainConfig(zero=ZeroConfig(stage=3, quantized_gradients=True)),
                     layout=NodeLayout(world_size=3, ranks_per_node=2))
