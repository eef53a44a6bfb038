"""cost/gloo.py: bytes across hosts of the runtime's gloo collectives (gloo's reduce and broadcast algorithms),
checked by hand and against the veth counters of the cluster in a box (docs/bench/cluster.md); and the estimate's
use of it (hierarchical per comm.hierarchical, gloo on CPU profiles). Pure python."""

from __future__ import annotations

import dataclasses

import pytest

from ztune.config.schema import BatchConfig, CommConfig, Hierarchical, Precision, TrainConfig, ZeroConfig
from ztune.cost.comm import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, is_gloo_profile, ring_factor, zero_collectives
from ztune.cost.compute import OffloadTime, first_bucket_fraction, step_time
from ztune.cost.estimate import estimate, uses_hierarchical
from ztune.cost.gloo import broadcast_transfers, host_egress_bytes, reduce_transfers, serial_egress_bytes
from ztune.profiles import load_hardware, load_model


def test_gloo_reduce_and_broadcast_patterns_by_hand():
    # reduce of 8 bytes over 4 ranks to root 1: ring to rank - 1 carrying 3/4 of it, then 2 bytes to the root
    ring = [(0, 3, 6.0), (1, 0, 6.0), (2, 1, 6.0), (3, 2, 6.0)]
    assert reduce_transfers(4, 1, 8.0) == ring + [(0, 1, 2.0), (2, 1, 2.0), (3, 1, 2.0)]
    # binomial tree from root 1 over virtual ranks (r - 1) mod 4: 1->2, then 1->3 and 2->0
    assert broadcast_transfers(4, 1, 5.0) == [(1, 2, 5.0), (1, 3, 5.0), (2, 0, 5.0)]
    assert sorted(broadcast_transfers(5, 0, 1.0)) == [(0, 1, 1.0), (0, 2, 1.0), (0, 4, 1.0), (1, 3, 1.0)]


def test_two_hosts_of_two_match_the_box_counters():
    # docs/bench/cluster.md, 2 hosts x 2 ranks, tiny-llama bf16 (S = 2 x 30,941,696 bytes): flat stages 1-2
    # sent 273.7 MiB across (both hosts) per step = 4.6 S, flat stage 3 414.2 MiB = 7.0 S, DDP's fp32 all-reduce
    # 354.9 MiB = 3.0 x 2 S; ring accounting says 3.0 S, 4.5 S and 3.0 x 2 S.
    kw = dict(num_nodes=2, ranks_per_node=2)
    rs, ag, ar = (host_egress_bytes(op, 1.0, **kw) for op in (REDUCE_SCATTER, ALL_GATHER, ALL_REDUCE))
    assert (rs, ag, ar) == pytest.approx((1.0, 1.25, 1.5))
    assert 2 * (rs + ag) == pytest.approx(4.5)  # stage 1/2: both hosts' egress, in S
    assert 2 * (rs + 2 * ag) == pytest.approx(7.0)  # stage 3: two gathers
    assert ar == pytest.approx(ring_factor(ALL_REDUCE, 4))  # gloo's all_reduce is the ring
    # ZeRO++ on the box: hierarchical int8 forward gather (0.5 P per host) is what its 44.5 MiB holds
    assert host_egress_bytes(ALL_GATHER, 1.0, level="inter", **kw) == pytest.approx(0.5)
    # hierarchical reduce-scatter's inter level: 2-rank reduces move 1.5x the ideal (N-1)/N
    assert host_egress_bytes(REDUCE_SCATTER, 1.0, level="inter", **kw) == pytest.approx(0.75)
    assert host_egress_bytes(ALL_REDUCE, 1.0, level="inter", **kw) == pytest.approx(1.0)


def test_ops_run_in_turn_so_each_pays_its_busiest_uplink():
    # 2 hosts x 2 ranks, payload 4 (chunks of 1). all_gather = 4 broadcasts; by hand (binomial trees): root 0 sends
    # 0->2 and 1->3 (2 from host 0), root 1 sends 1->2, 1->3 (2 from host 0) and 2->0 (1 from host 1), roots 2 and 3
    # mirror them: busiest uplink per op 2 + 2 + 2 + 2 = 8 = 2.0 x the payload (host totals: 5 each = 1.25 x).
    assert serial_egress_bytes(ALL_GATHER, 4.0, num_nodes=2, ranks_per_node=2) == pytest.approx(8.0)
    assert host_egress_bytes(ALL_GATHER, 4.0, num_nodes=2, ranks_per_node=2) == pytest.approx(5.0)
    # reduce_scatter = 4 reduces: the ring sends 3/4 each way, then the other host's two ranks send 1/4 each to the
    # root: 0.75 + 0.5 = 1.25 per op, 5.0 = 1.25 x the payload (host totals 4.0 = 1.0 x)
    assert serial_egress_bytes(REDUCE_SCATTER, 4.0, num_nodes=2, ranks_per_node=2) == pytest.approx(5.0)
    # all_reduce is one ring: the same either way
    assert serial_egress_bytes(ALL_REDUCE, 4.0, num_nodes=2, ranks_per_node=2) == host_egress_bytes(
        ALL_REDUCE, 4.0, num_nodes=2, ranks_per_node=2)
    # inter level on 2 hosts (one rank per host, the 2 groups on 2 of payload each, chunks of 1): each group runs its
    # 2 ops at once (2 gloo worker threads), one root per host. A broadcast is one send and the jobs run two at once
    # at the uplink's pace (module docstring): all_gather's broadcasts 0->1 and 1->0 of 1 each load each uplink
    # with 1; x 2 groups = 2, the host totals.
    assert serial_egress_bytes(ALL_GATHER, 4.0, num_nodes=2, ranks_per_node=2, level="inter") == pytest.approx(2.0)
    assert host_egress_bytes(ALL_GATHER, 4.0, num_nodes=2, ranks_per_node=2, level="inter") == pytest.approx(2.0)
    # Between two ranks gloo's reduce takes turns (module docstring: measured 205-216 ms for one 16 MiB reduce, its
    # 24 MiB in turn): the pair's bytes both ways.
    # reduce_scatter: each reduce's ring 0.5 each way + 0.5 to its root = 1.5 on the pair, two roots 3.0; x 2 = 6
    # (host totals 3: the busiest uplink carries 1.5 per group)
    assert serial_egress_bytes(REDUCE_SCATTER, 4.0, num_nodes=2, ranks_per_node=2, level="inter") == \
        pytest.approx(6.0)
    assert host_egress_bytes(REDUCE_SCATTER, 4.0, num_nodes=2, ranks_per_node=2, level="inter") == pytest.approx(3.0)
    # the ring all_reduce sends and receives at once: its inter level stays the uplink's
    assert serial_egress_bytes(ALL_REDUCE, 4.0, num_nodes=2, ranks_per_node=2, level="inter") == pytest.approx(
        host_egress_bytes(ALL_REDUCE, 4.0, num_nodes=2, ranks_per_node=2, level="inter"))
    # 4 hosts of 1 rank, all_gather of chunks of 1: roots (0, 1) run at once, then (2, 3). Root 0 sends 0->1, 0->2,
    # 1->3, root 1 sends 1->2, 1->3, 2->0: host 1's uplink carries 1 + 2 = 3, the set's busiest; (2, 3) likewise
    # host 3's: 6, where the busiest host's total is 3
    assert serial_egress_bytes(ALL_GATHER, 4.0, num_nodes=4, ranks_per_node=1) == pytest.approx(6.0)
    for op in (ALL_REDUCE, REDUCE_SCATTER, ALL_GATHER):
        for nodes, per in ((2, 2), (4, 2), (3, 4)):
            # never less than the total egress: the ops of a batch do not share out one host's bytes
            for level in ("flat", "inter"):
                assert serial_egress_bytes(op, 6.0, num_nodes=nodes, ranks_per_node=per, level=level) >= \
                    host_egress_bytes(op, 6.0, num_nodes=nodes, ranks_per_node=per, level=level) - 1e-9
        assert serial_egress_bytes(op, 6.0, num_nodes=1, ranks_per_node=4) == 0.0
    with pytest.raises(ValueError):
        serial_egress_bytes(ALL_GATHER, 4.0, num_nodes=2, ranks_per_node=2, level="diagonal")


def test_flat_gloo_stage1_refresh_takes_the_serial_bytes():
    # the after-step all_gather of flat stage 1 on a 2 x 2 gloo profile: 2.0 x the bf16 parameters over the uplink
    hw = dataclasses.replace(load_hardware("cpu-local"), gpus_per_node=2, inter_node_latency_s=0.0)
    model = load_model("tiny-llama")
    cfg = TrainConfig(zero=ZeroConfig(stage=1), precision=Precision.BF16, batch=BatchConfig(micro=1, grad_accum=1),
                      seq_len=128, comm=CommConfig(hierarchical=Hierarchical.OFF))
    e = estimate(model, hw, cfg, num_nodes=2)
    ag = next(o for o in e.comm.ops if o.op == ALL_GATHER)
    numel = e.num_params
    node_bw = 2 * hw.inter_node_bw_bytes_per_s  # the node's NICs together
    want = serial_egress_bytes(ALL_GATHER, 2 * numel, num_nodes=2, ranks_per_node=2) / node_bw
    assert ag.time_s == pytest.approx(want, rel=0.01)  # padding to the world size aside
    assert want == pytest.approx(2.0 * 2 * numel / node_bw)


def test_one_host_and_bad_input():
    assert host_egress_bytes(REDUCE_SCATTER, 1e6, num_nodes=1, ranks_per_node=4) == 0.0
    with pytest.raises(ValueError, match="level"):
        host_egress_bytes(ALL_GATHER, 1.0, num_nodes=2, ranks_per_node=2, level="ring")
    with pytest.raises(ValueError, match="collective"):
        host_egress_bytes("scatter", 1.0, num_nodes=2, ranks_per_node=2)


def _cfg(stage: int, hierarchical: Hierarchical) -> TrainConfig:
    return TrainConfig(zero=ZeroConfig(stage=stage), precision=Precision.BF16, seq_len=128,
                       batch=BatchConfig(micro=1, grad_accum=1), comm=CommConfig(hierarchical=hierarchical))


def test_estimate_follows_comm_hierarchical_on_cpu_profiles():
    cpu, gpu = load_hardware("cpu-local"), load_hardware("dgx-h100")
    probed = dataclasses.replace(cpu, name="probed-h0", source="ztune probe on h0 (2 CPU ranks on 2 cores)")
    assert is_gloo_profile(cpu) and is_gloo_profile(probed) and not is_gloo_profile(gpu)
    assert uses_hierarchical(Hierarchical.AUTO, probed, num_nodes=2)
    assert not uses_hierarchical(Hierarchical.AUTO, gpu, num_nodes=2)  # NCCL: flat rings
    assert not uses_hierarchical(Hierarchical.ON, cpu, num_nodes=1)
    model = load_model("tiny-llama")
    for stage in (1, 2, 3):
        flat = estimate(model, probed, _cfg(stage, Hierarchical.OFF), num_nodes=2)
        hier = estimate(model, probed, _cfg(stage, Hierarchical.ON), num_nodes=2)
        auto = estimate(model, probed, _cfg(stage, Hierarchical.AUTO), num_nodes=2)
        assert hier.comm.bytes_per_rank == pytest.approx(flat.comm.bytes_per_rank)  # same bytes per rank
        assert hier.comm.time_s < flat.comm.time_s and auto.comm.time_s == hier.comm.time_s, stage


def test_gradient_reduction_hides_only_after_the_first_bucket():
    # tiny-llama (30.9M) in 25M-element buckets: the first bucket is full after 81% of the backward
    assert first_bucket_fraction(reduce_bucket_numel=25_000_000, trainable_params=30_941_696) == pytest.approx(
        25 / 30.941696)
    assert first_bucket_fraction(reduce_bucket_numel=25_000_000, trainable_params=70_000_000_000) < 1e-3
    assert first_bucket_fraction(reduce_bucket_numel=25_000_000, trainable_params=1_000) == 1.0
    kw = dict(compute_s=3.0, grad_accum=1, comm_micro_s=0.0, comm_after_step_s=0.0, offload=OffloadTime(),
              overlap=1.0, comm_boundary_s=1.5)
    assert step_time(**kw).step_s == pytest.approx(3.0)  # the whole backward (2 s) hides it
    assert step_time(**kw, grad_ready_fraction=0.75).step_s == pytest.approx(3.0 + 1.5 - 0.5)
    assert step_time(**kw, grad_ready_fraction=1.0).step_s == pytest.approx(4.5)  # one bucket: nothing hides
    # stage 2 with one micro-step reduces at the boundary; with several, during each micro-step
    phase = {a: zero_collectives(num_params=10, stage=2, grad_accum=a)[0].phase for a in (1, 4)}
    assert phase == {1: "boundary", 4: "micro"}


def test_gradient_reductions_of_every_micro_step_hide_only_behind_their_backward():
    # The runtime waits for every reduction at the end of each backward (runtime/grad_reduce.py finish): a
    # stage-2/3 reduce-scatter per micro-step hides behind the backward after its first bucket, never behind
    # the forward; parameter gathers (stage 3, prefetched) hide behind all compute.
    kw = dict(compute_s=3.0, grad_accum=4, comm_micro_s=0.0, comm_boundary_s=0.0, comm_after_step_s=0.0,
              offload=OffloadTime(), overlap=1.0)
    assert step_time(**kw, comm_micro_grad_s=2.5).step_s == pytest.approx(3.0 + 0.5)  # backward: 2 of the 3 s
    assert step_time(**kw, comm_micro_grad_s=2.5, grad_ready_fraction=1.0).step_s == pytest.approx(5.5)
    assert step_time(**{**kw, "comm_micro_s": 2.5}).step_s == pytest.approx(3.0)  # gathers: the whole compute
    # both kinds together never hide more than the compute window
    assert step_time(**{**kw, "comm_micro_s": 2.0}, comm_micro_grad_s=1.5).step_s == pytest.approx(3.0 + 0.5)
    # tiny-gpt (21M parameters) fits one 25M-element bucket: its stage-2 reduce-scatters at 4 micro-steps hide
    # nothing, the same as stage 0's one all-reduce, so stage 2 (4 of them) is not predicted faster than stage 0
    model, hw = load_model("tiny-gpt"), load_hardware("cpu-local")
    cfg = TrainConfig(precision=Precision.FP32, seq_len=32, batch=BatchConfig(global_=8, micro=1))
    s2 = estimate(model, hw, dataclasses.replace(cfg, zero=ZeroConfig(stage=2)), num_nodes=1)
    s0 = estimate(model, hw, dataclasses.replace(cfg, zero=ZeroConfig(stage=0)), num_nodes=1)
    assert s2.grad_accum == 4 and s2.step.exposed_comm_s == pytest.approx(s2.step.comm_s)
    assert s2.step_time_s > s0.step_time_s
