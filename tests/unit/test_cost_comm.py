"""Traffic per stage vs DESIGN.md's formulas (incl. gradient accumulation), alpha-beta sanity, links,
compression ratios."""

import dataclasses

import pytest

from ztune.config.schema import Compression
from ztune.cost.comm import (
    ALL_GATHER,
    ALL_REDUCE,
    REDUCE_SCATTER,
    Link,
    collective_time_s,
    comm_estimate,
    latency_steps,
    ring_factor,
    ring_link,
    wire_bytes_per_element,
    zero_traffic_elements,
)
from ztune.specs import Hardware

PSI = 1_000_000_000


@pytest.mark.parametrize("n", [2, 8, 32])
@pytest.mark.parametrize("accum", [1, 4])
def test_traffic_matches_design_formulas(n, accum):
    ring = (n - 1) / n
    # Stages 0/1 reduce once per step whatever the accumulation; 2 reduce-scatters every micro-step and
    # refreshes params once; 3 gathers twice and reduce-scatters every micro-step.
    expected = {0: 2 * ring * PSI, 1: 2 * ring * PSI, 2: (accum + 1) * ring * PSI, 3: 3 * accum * ring * PSI}
    for stage, want in expected.items():
        assert zero_traffic_elements(PSI, n, stage, accum) == pytest.approx(want, rel=1e-12)
    if accum == 1:
        assert [zero_traffic_elements(PSI, n, s, 1) for s in (0, 1, 2)] == [pytest.approx(2 * ring * PSI)] * 3


def test_one_rank_sends_nothing():
    for stage in range(4):
        assert zero_traffic_elements(PSI, 1, stage, 8) == 0


def test_ring_factors_are_nccl_tests_busbw_conventions():
    assert ring_factor(ALL_REDUCE, 8) == 2 * 7 / 8
    assert ring_factor(ALL_GATHER, 8) == ring_factor(REDUCE_SCATTER, 8) == 7 / 8
    with pytest.raises(ValueError):
        ring_factor("broadcast", 8)


def test_alpha_beta():
    link = Link(bw_bytes_per_s=1e9, latency_s=1e-5)
    # A tiny message costs the latency steps: 2(n-1) for all-reduce, n-1 for all-gather.
    assert collective_time_s(op=ALL_REDUCE, payload_bytes=1e-9, world_size=8, link=link) == pytest.approx(14e-5)
    assert collective_time_s(op=ALL_GATHER, payload_bytes=1e-9, world_size=8, link=link) == pytest.approx(7e-5)
    # A large one is bandwidth bound: bytes * factor / busbw; doubling bytes doubles the beta term.
    t1 = collective_time_s(op=ALL_REDUCE, payload_bytes=1e9, world_size=8, link=link)
    t2 = collective_time_s(op=ALL_REDUCE, payload_bytes=2e9, world_size=8, link=link)
    assert t1 == pytest.approx(14e-5 + 1.75)
    assert t2 - 14e-5 == pytest.approx(2 * (t1 - 14e-5))
    assert collective_time_s(op=ALL_REDUCE, payload_bytes=1e9, world_size=1, link=link) == 0


def _hw():
    return Hardware(name="x", gpus_per_node=8, gpu_memory_bytes=80 << 30, peak_flops_bf16=1e15,
                    peak_flops_fp32=6e13, intra_node_bw_bytes_per_s=3e11, intra_node_latency_s=1e-6,
                    inter_node_bw_bytes_per_s=4e10, inter_node_latency_s=5e-6, host_device_bw_bytes_per_s=5e10,
                    host_memory_bytes=2 << 40, host_memory_bw_bytes_per_s=4e11)


def test_one_node_uses_nvlink():
    assert ring_link(_hw(), num_nodes=1) == Link(3e11, 1e-6, num_nodes=1, gpus_per_node=8)


def test_across_nodes_every_nic_carries_a_ring():
    # 8 NICs x 40 GB/s = 320 GB/s per node; NVLink's 300 GB/s busbw is now the tighter bound (NCCL's rule,
    # github.com/NVIDIA/nccl/issues/412: more NICs give more bandwidth, up to the intra-node bandwidth).
    link = ring_link(_hw(), num_nodes=4)
    assert link.bw_bytes_per_s == 3e11
    slow_nics = dataclasses.replace(_hw(), inter_node_bw_bytes_per_s=1e10)  # 8 x 10 GB/s = 80 GB/s per node
    assert ring_link(slow_nics, num_nodes=4).bw_bytes_per_s == 8e10
    assert ring_link(slow_nics, num_nodes=4, bandwidth_efficiency=0.5).bw_bytes_per_s == 4e10
    # 4 of the ring's 32 steps cross a node boundary: mean step latency (4 x 5 + 28 x 1) / 32 us.
    assert link.latency_s == pytest.approx((4 * 5e-6 + 28 * 1e-6) / 32)


def test_two_nodes_all_gather_time_is_the_nccl_bound():
    """2 nodes x 8 GPUs, DGX H100 (8x 400 Gb/s NICs): a 1 GiB bf16 all-gather moves (n-1)/n of it per rank at
    min(NVLink busbw 370, 8 x 45 GB/s = 360) GB/s: the old per-GPU-NIC bound (45 GB/s) was 8x slower."""
    from ztune.profiles import load_hardware

    hw = load_hardware("dgx-h100")
    link = ring_link(hw, num_nodes=2)
    payload = 1 << 30
    t = collective_time_s(op=ALL_GATHER, payload_bytes=payload, world_size=16, link=link)
    bound_s = payload * 15 / 16 / min(hw.intra_node_bw_bytes_per_s, 8 * hw.inter_node_bw_bytes_per_s)
    assert t == pytest.approx(bound_s + 15 * link.latency_s)
    assert t < payload * 15 / 16 / hw.inter_node_bw_bytes_per_s / 7


def test_all_reduce_uses_a_tree_across_many_nodes():
    link = ring_link(_hw(), num_nodes=64)  # 512 ranks: ring 1022 steps, tree 2 (6 + 7) = 26
    assert latency_steps(ALL_REDUCE, 512, link) == 26
    assert latency_steps(ALL_GATHER, 512, link) == 511  # ring only
    assert latency_steps(ALL_REDUCE, 8, ring_link(_hw(), num_nodes=1)) == 14


def _comm(stage, accum, compression=Compression.NONE, n=16, grad_bytes=2):
    return comm_estimate(num_params=PSI, world_size=n, stage=stage, grad_accum=accum, link=Link(1e10, 1e-5),
                         param_bytes=2, grad_bytes=grad_bytes, reduce_bucket_numel=25_000_000,
                         allgather_bucket_numel=50_000_000, num_units=82, compression=compression)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_comm_estimate_bytes_equal_traffic_formula(stage):
    est = _comm(stage, 4)
    assert est.bytes_per_rank == pytest.approx(2 * zero_traffic_elements(PSI, 16, stage, 4))
    assert est.time_s >= est.bytes_per_rank / 1e10
    assert all(o.calls > 0 for o in est.ops)


def test_launch_counts_follow_buckets_and_units():
    s0 = _comm(0, 1)
    assert [(o.op, o.calls) for o in s0.ops] == [(ALL_REDUCE, 40)]  # 1e9 / 25e6 buckets
    s1 = _comm(1, 1)
    assert [(o.op, o.calls) for o in s1.ops] == [(REDUCE_SCATTER, 40), (ALL_GATHER, 20)]
    s3 = _comm(3, 2)
    assert [o.calls for o in s3.ops] == [2 * 82, 2 * 82, 2 * 82]  # per unit, per micro-step


def test_compression_ratios_and_only_gradients_are_compressed():
    fp32 = 4.0
    assert wire_bytes_per_element(method=Compression.BF16, grad_bytes=4) / fp32 == 0.5
    assert wire_bytes_per_element(method=Compression.INT8, grad_bytes=4) / fp32 <= 0.27  # DESIGN.md target
    assert wire_bytes_per_element(method=Compression.ONEBIT, grad_bytes=4) / fp32 <= 0.04
    assert wire_bytes_per_element(method=Compression.TOPK, grad_bytes=4, topk_ratio=0.01) == pytest.approx(0.08)
    plain = _comm(2, 1, grad_bytes=4)
    int8 = _comm(2, 1, Compression.INT8, grad_bytes=4)
    for a, b in zip(plain.ops, int8.ops, strict=True):
        if a.kind == "grad":
            assert b.bytes_per_rank == pytest.approx(a.bytes_per_rank * (1 + 4 / 512) / 4)
        else:
            assert b.bytes_per_rank == a.bytes_per_rank
