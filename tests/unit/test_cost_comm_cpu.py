"""The collectives' CPU work on CPU ranks (cost/comm.py collective_cpu_s, cost/estimate.py comm_cpu_wall_s,
cost/compute.py step_time): measured CPU per byte x the bytes a rank sends and receives, charged (x the measured
contention) where the ranks fill the cores, as the larger of it and the exposed communication."""

import dataclasses

import pytest

from ztune import probe
from ztune.config.schema import TrainConfig
from ztune.cost.comm import (
    ALL_GATHER,
    ALL_REDUCE,
    REDUCE_SCATTER,
    Hierarchy,
    Link,
    collective_cpu_s,
    hierarchical_level_bytes,
)
from ztune.cost.compute import OffloadTime, step_time
from ztune.cost.estimate import comm_cpu_wall_s, estimate
from ztune.profiles import list_hardware, load_hardware, load_model

TINY = load_model("tiny-llama")
C_TCP, C_SHM = 4e-10, 5e-11  # CPU s per byte sent or received: the order measured in the box (gloo/TCP, shm)
CPU = dataclasses.replace(load_hardware("cpu-local"), gpus_per_node=2, cpu_cores=2, inter_node_cpu_s_per_byte=C_TCP,
                          intra_node_cpu_s_per_byte=C_SHM, cpu_contention=2.0, name="cpu-box",
                          optimizer_step_elements_per_s=2e8)


def _cfg_io(stage: int, hierarchical: bool) -> TrainConfig:
    from ztune.config.io import from_dict

    return from_dict({"zero": {"stage": stage}, "comm": {"hierarchical": hierarchical},
                      "batch": {"micro": 1, "grad_accum": 1}, "seq_len": 128, "precision": "bf16"})


@pytest.mark.parametrize("op, factor", [(ALL_REDUCE, 2 * 3 / 4), (REDUCE_SCATTER, 3 / 4), (ALL_GATHER, 3 / 4)])
def test_flat_cpu_is_the_ring_bytes_sent_and_received_at_the_links_rate(op, factor):
    link = Link(bw_bytes_per_s=1e9, latency_s=1e-5, num_nodes=2, gpus_per_node=2, gloo=True, cpu_s_per_byte=C_TCP)
    assert collective_cpu_s(op, 1e8, world_size=4, link=link) == pytest.approx(2 * factor * 1e8 * C_TCP)
    assert collective_cpu_s(op, 1e8, world_size=1, link=link) == 0.0
    assert collective_cpu_s(op, 1e8, world_size=4, link=dataclasses.replace(link, cpu_s_per_byte=0.0)) == 0.0


def test_hierarchical_cpu_charges_each_level_at_its_own_transport():
    h = Hierarchy(intra=Link(1e10, 1e-6, cpu_s_per_byte=C_SHM), inter=Link(1e9, 1e-5, cpu_s_per_byte=C_TCP),
                  num_nodes=2, ranks_per_node=2, gloo=True)
    flat = Link(1e9, 1e-5, num_nodes=2, gpus_per_node=2, gloo=True, cpu_s_per_byte=C_TCP)
    intra, inter = hierarchical_level_bytes(ALL_REDUCE, 1e8, num_nodes=2, ranks_per_node=2)
    got = collective_cpu_s(ALL_REDUCE, 1e8, world_size=4, link=flat, hierarchy=h)
    assert got == pytest.approx(2 * (intra * C_SHM + inter * C_TCP))
    # the shared-memory level is cheaper per byte, so two levels cost less CPU than the flat TCP ring
    assert got < collective_cpu_s(ALL_REDUCE, 1e8, world_size=4, link=flat)


def test_hierarchical_reduce_scatter_charges_its_inter_level_at_the_measured_reduce_cpu():
    """The inter level of a gloo hierarchical reduce_scatter is gloo reduces of each rank's column (payload / L):
    where the probe measured a reduce's CPU per byte of its buffer, the column costs that, not the bytes rule's
    2 x inter bytes x the all_reduce's CPU per byte (measured 2.3x the latter on 2 hosts)."""
    c_reduce = 2.3 * C_TCP
    inter_link = Link(1e9, 1e-5, cpu_s_per_byte=C_TCP, reduce_cpu_s_per_byte=c_reduce)
    h = Hierarchy(intra=Link(1e10, 1e-6, cpu_s_per_byte=C_SHM), inter=inter_link, num_nodes=2, ranks_per_node=2,
                  gloo=True)
    flat = Link(1e9, 1e-5, num_nodes=2, gpus_per_node=2, gloo=True, cpu_s_per_byte=C_TCP)
    intra, inter = hierarchical_level_bytes(REDUCE_SCATTER, 1e8, num_nodes=2, ranks_per_node=2)
    got = collective_cpu_s(REDUCE_SCATTER, 1e8, world_size=4, link=flat, hierarchy=h)
    assert got == pytest.approx(2 * intra * C_SHM + 1e8 / 2 * c_reduce)
    # the bytes rule where no reduce was measured, for the all_reduce and all_gather (no reduces across hosts),
    # and on NCCL (reduce_scatter is its own ring there)
    unmeasured = dataclasses.replace(h, inter=dataclasses.replace(inter_link, reduce_cpu_s_per_byte=0.0))
    bytes_rule = 2 * (intra * C_SHM + inter * C_TCP)
    assert collective_cpu_s(REDUCE_SCATTER, 1e8, world_size=4, link=flat, hierarchy=unmeasured) == \
        pytest.approx(bytes_rule)
    assert collective_cpu_s(REDUCE_SCATTER, 1e8, world_size=4, link=flat, hierarchy=dataclasses.replace(
        h, gloo=False)) == pytest.approx(bytes_rule)
    for op in (ALL_REDUCE, ALL_GATHER):
        assert collective_cpu_s(op, 1e8, world_size=4, link=flat, hierarchy=h) == \
            collective_cpu_s(op, 1e8, world_size=4, link=flat, hierarchy=unmeasured)


def test_estimate_takes_the_profiles_reduce_cpu_for_hierarchical_stages():
    """A profile with the probe's reduce CPU charges hierarchical reduce-scatters more CPU (stages 1-3), the
    flat path and the hierarchical all_reduce of stage 0 alike."""
    measured = dataclasses.replace(CPU, inter_node_reduce_cpu_s_per_byte=2.3 * C_TCP)
    for stage in range(4):
        for hierarchical in (False, True):
            cfg = _cfg_io(stage, hierarchical)
            before = estimate(TINY, CPU, cfg, num_nodes=2).comm.cpu_s
            after = estimate(TINY, measured, cfg, num_nodes=2).comm.cpu_s
            if hierarchical and stage >= 1:
                assert after > before * 1.2, (stage, before, after)
            else:
                assert after == pytest.approx(before), (stage, hierarchical)


def test_cpu_is_charged_only_where_the_ranks_fill_the_cores_and_it_is_measured():
    assert comm_cpu_wall_s(0.1, CPU) == pytest.approx(0.2)  # x contention 2
    assert comm_cpu_wall_s(0.1, dataclasses.replace(CPU, cpu_cores=16)) == 0.0  # spare cores run gloo's threads
    assert comm_cpu_wall_s(0.1, dataclasses.replace(CPU, cpu_contention=0.0)) == 0.0  # not measured
    assert comm_cpu_wall_s(0.1, dataclasses.replace(CPU, cpu_cores=0)) == 0.0  # cores unknown


def test_step_takes_the_larger_of_exposed_communication_and_its_cpu():
    base = dict(compute_s=1.0, grad_accum=1, comm_micro_s=0.0, comm_boundary_s=0.2, comm_after_step_s=0.0,
                offload=OffloadTime(), overlap=0.8)
    plain = step_time(**base)
    small, large = step_time(**base, comm_cpu_s=plain.exposed_comm_s / 2), step_time(**base, comm_cpu_s=0.5)
    assert small.step_s == pytest.approx(plain.step_s)  # its CPU runs while the rank waits on the link
    assert large.step_s == pytest.approx(plain.step_s - plain.exposed_comm_s + 0.5)
    assert large.comm_cpu_s == 0.5 and large.exposed_comm_s == plain.exposed_comm_s


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("hierarchical", [False, True])
def test_estimate_charges_the_measured_cpu_and_says_so(stage, hierarchical):
    cfg = _cfg_io(stage, hierarchical)
    with_cpu = estimate(TINY, CPU, cfg, num_nodes=2)
    without = estimate(TINY, dataclasses.replace(CPU, cpu_contention=0.0), cfg, num_nodes=2)
    assert with_cpu.comm.cpu_s > 0 and without.step.comm_cpu_s == 0.0
    assert with_cpu.step.comm_cpu_s == pytest.approx(2.0 * with_cpu.comm.cpu_s)
    extra = max(0.0, with_cpu.step.comm_cpu_s - with_cpu.step.exposed_comm_s)
    assert with_cpu.step.step_s == pytest.approx(without.step.step_s + extra)
    assert any(n.startswith("communication CPU:") for n in with_cpu.notes)
    assert not any(n.startswith("communication CPU:") for n in without.notes)


def test_shipped_profiles_charge_no_communication_cpu():
    for name in list_hardware():
        hw = load_hardware(name)
        assert hw.inter_node_cpu_s_per_byte == hw.intra_node_cpu_s_per_byte == hw.cpu_contention == 0, name
        assert hw.inter_node_cpu_s_per_step == hw.intra_node_cpu_s_per_step == 0, name


def test_probe_cpu_per_byte_is_the_largest_sizes_cpu_over_bytes_sent_and_received():
    sizes, times = (1 << 20, 64 << 20), (0.001, 0.06)
    fit = probe.fit_alpha_beta(sizes, times, world_size=2)
    link = probe.CollectiveResult("gloo", 2, sizes, times, fit, cpu_s=(0.0005, 0.05))
    # a 2-rank ring all_reduce of S sends S and receives S per rank
    assert link.cpu_s_per_byte() == pytest.approx(0.05 / (2 * (64 << 20)))
    assert probe.CollectiveResult("gloo", 2, sizes, times, fit).cpu_s_per_byte() == 0.0  # not measured
    four = probe.CollectiveResult("gloo", 4, sizes, times, fit, cpu_s=(0.0005, 0.05))
    assert four.cpu_s_per_byte() == pytest.approx(0.05 / (2 * 1.5 * (64 << 20)))
    # a reduce's CPU per byte of its buffer; 0 where not measured
    assert dataclasses.replace(link, reduce_cpu=(64 << 20, 0.07)).reduce_cpu_s_per_byte() == \
        pytest.approx(0.07 / (64 << 20))
    assert link.reduce_cpu_s_per_byte() == 0.0


def _probed(*, gpu: bool, sizes: tuple[int, int], link_cpu: tuple[float, float], local_cpu: tuple[float, float],
            reduce_cpu: tuple[int, float] | None = None):
    """(profile, provenance notes, inter-host result, in-host result) of a probe on a 2-rank host (with GPUs or
    not) whose 2-size all_reduces took `link_cpu` / `local_cpu` CPU seconds per op between the hosts / inside."""
    host = probe.HostInfo("h", 2, 8 << 30)
    gpus = probe.GpuScan((probe.GpuInfo(0, "GPU-X", 80 << 30), probe.GpuInfo(1, "GPU-X", 80 << 30)) if gpu else (),
                         "x")
    mem = probe.MemoryBandwidth(10e9, 12e9, 2)
    flops = probe.FlopRates(fp32_flops_per_s=1e11, bf16_flops_per_s=1e11, device="cpu", matrix_size=512)
    times = (0.01, 0.07)
    fit = probe.fit_alpha_beta(sizes, times, world_size=2)
    link = probe.CollectiveResult("gloo", 2, sizes, times, fit, cpu_s=link_cpu, reduce_cpu=reduce_cpu)
    local = probe.CollectiveResult("gloo", 2, sizes, times, fit, cpu_s=local_cpu)
    hd = probe.HostDeviceBandwidth(25e9, 20e9) if gpu else None
    m = probe.Measurements(host, gpus, 2, mem, flops, local, hd, inter_node=link)
    return probe.build_profile(m), probe.field_notes(m), link, local


@pytest.mark.parametrize("gpu", [False, True])
def test_probe_profile_takes_the_cpu_measurements_on_cpu_hosts_only(gpu):
    hw, notes, _, _ = _probed(gpu=gpu, sizes=(1 << 20, 8 << 20), link_cpu=(0.001, 0.004), local_cpu=(0.0001, 0.0005),
                              reduce_cpu=(8 << 20, 0.009))
    if gpu:  # a GPU rank's process CPU time says nothing about NCCL's transport
        assert hw.inter_node_cpu_s_per_byte == hw.intra_node_cpu_s_per_byte == 0.0
        assert hw.inter_node_reduce_cpu_s_per_byte == 0.0
        assert notes["inter_node_cpu_s_per_byte"].startswith("assumed: 0")
        assert notes["inter_node_reduce_cpu_s_per_byte"].startswith("assumed: 0")
    else:
        assert hw.inter_node_cpu_s_per_byte == pytest.approx(0.004 / (2 * (8 << 20)))
        assert hw.intra_node_cpu_s_per_byte == pytest.approx(0.0005 / (2 * (8 << 20)))
        assert notes["inter_node_cpu_s_per_byte"].startswith("measured:")
        assert notes["intra_node_cpu_s_per_byte"].startswith("measured:")
        assert hw.inter_node_reduce_cpu_s_per_byte == pytest.approx(0.009 / (8 << 20))
        assert notes["inter_node_reduce_cpu_s_per_byte"].startswith("measured:") and "8 MiB" in \
            notes["inter_node_reduce_cpu_s_per_byte"]
    assert hw.cpu_contention == 0.0 and notes["cpu_contention"].startswith("assumed: 0")  # no --model workload


def test_zeropp_in_host_groups_are_charged_tcp_cpu_where_the_runtime_has_no_shared_memory():
    """hpZ's backward all-gather and qgZ's first all-to-all run on plain gloo groups of the host's ranks
    (runtime/zeropp.py build_hpz_comm, runtime/qgz.py build_qgz_comms: no shared-memory transport), so on CPU
    ranks their bytes cost the TCP link's CPU per byte, not the shared-memory collective's."""
    from ztune.config.io import from_dict
    from ztune.cost.estimate import zeropp_intra_link
    from ztune.cost.zeropp import ALL_TO_ALL

    cfg = from_dict({"zero": {"stage": 3, "quantized_weights": True, "hpz_partition_size": 2,
                              "quantized_gradients": True},
                     "batch": {"micro": 1, "grad_accum": 1}, "seq_len": 128, "precision": "bf16"})
    est = estimate(TINY, CPU, cfg, num_nodes=2)
    hpz = [o for o in est.comm.ops if o.op == ALL_GATHER and o.kind == "param"][1]  # [0]: the flat qwZ gathers
    qgz_intra = [o for o in est.comm.ops if o.op == ALL_TO_ALL][0]
    for op in (hpz, qgz_intra):
        assert op.bytes_per_rank > 0 and op.cpu_s == pytest.approx(2 * op.bytes_per_rank * C_TCP)
    assert zeropp_intra_link(CPU).cpu_s_per_byte == C_TCP
    # no inter-host measurement (a one-host probe): the in-host figure stands
    assert zeropp_intra_link(dataclasses.replace(CPU, inter_node_cpu_s_per_byte=0.0)).cpu_s_per_byte == C_SHM
    # GPU profiles (NCCL inside the host) keep the in-host link's figure
    gpu = dataclasses.replace(load_hardware("dgx-a100-80g"), inter_node_cpu_s_per_byte=C_TCP,
                              intra_node_cpu_s_per_byte=C_SHM)
    assert zeropp_intra_link(gpu).cpu_s_per_byte == C_SHM


# --- CPU per message step (Hardware.*_cpu_s_per_step: the CPU analogue of the alpha-beta model's latency) ---

S_TCP, S_LOCAL = 4e-4, 3e-4  # CPU s per message step: the order measured on 2-4 gloo ranks of the box's 2 cores


def test_message_steps_follow_the_runtimes_gloo_algorithms():
    from ztune.cost.comm import ALL_TO_ALL, barrier_steps, gloo_cpu_steps

    # ring all_reduce 2(n-1); n broadcasts (n-1 messages each, spread over n ranks); n reduces, each a ring
    # reduce-scatter plus n-1 chunks to its root
    assert [gloo_cpu_steps(ALL_REDUCE, n) for n in (1, 2, 4)] == [0, 2, 6]
    assert [gloo_cpu_steps(ALL_GATHER, n) for n in (1, 2, 4)] == [0, 1, 3]
    assert [gloo_cpu_steps(REDUCE_SCATTER, n) for n in (1, 2, 4)] == [0, 3, 15]
    assert gloo_cpu_steps(ALL_TO_ALL, 4) == 3
    with pytest.raises(ValueError, match="unknown collective"):
        gloo_cpu_steps("gather", 4)
    # gloo/barrier.cc: a dissemination barrier, ceil(log2 n) rounds
    assert [barrier_steps(n) for n in (1, 2, 3, 4, 8)] == [0, 1, 2, 2, 3]


def test_each_launch_is_charged_its_steps_at_the_links_cpu_per_step():
    from ztune.cost.comm import collective_cpu_steps_s

    flat = Link(1e9, 1e-5, num_nodes=2, gpus_per_node=2, gloo=True, cpu_s_per_byte=C_TCP, cpu_s_per_step=S_TCP)
    assert collective_cpu_steps_s(REDUCE_SCATTER, world_size=4, link=flat) == pytest.approx(15 * S_TCP)
    assert collective_cpu_steps_s(ALL_GATHER, world_size=4, link=flat) == pytest.approx(3 * S_TCP)
    assert collective_cpu_steps_s(ALL_REDUCE, world_size=1, link=flat) == 0.0
    assert collective_cpu_steps_s(ALL_REDUCE, world_size=4, link=dataclasses.replace(flat, cpu_s_per_step=0)) == 0
    # one host: the shared-memory transport's barriers (3 for all_reduce, 2 otherwise) of the host's ranks
    one_host = Link(1e10, 1e-6, num_nodes=1, gpus_per_node=4, cpu_s_per_step=S_LOCAL)
    assert collective_cpu_steps_s(ALL_REDUCE, world_size=4, link=one_host) == pytest.approx(3 * 2 * S_LOCAL)
    # compressed gradients: gloo all-to-all + all-gather on one host too
    assert collective_cpu_steps_s(ALL_REDUCE, world_size=4, link=one_host, gloo_only=True) == \
        pytest.approx(6 * S_LOCAL)
    # two levels: the host's barriers at the in-host figure, the gloo ops of one rank per host at the link's
    h = Hierarchy(intra=Link(1e10, 1e-6, cpu_s_per_step=S_LOCAL), inter=Link(1e9, 1e-5, cpu_s_per_step=S_TCP),
                  num_nodes=2, ranks_per_node=2, gloo=True)
    assert collective_cpu_steps_s(REDUCE_SCATTER, world_size=4, link=flat, hierarchy=h) == \
        pytest.approx(2 * 1 * S_LOCAL + 3 * S_TCP)
    assert collective_cpu_steps_s(ALL_GATHER, world_size=4, link=flat, hierarchy=h) == \
        pytest.approx(2 * S_LOCAL + 1 * S_TCP)
    assert collective_cpu_steps_s(ALL_REDUCE, world_size=4, link=flat, hierarchy=h) == \
        pytest.approx(3 * S_LOCAL + 2 * S_TCP)


@pytest.mark.parametrize("hierarchical", [False, True])
def test_estimate_charges_every_launchs_steps(hierarchical):
    """Stage 3 on tiny-llama (11 units: 11 forward gathers, 10 backward ones (the embedding's backward reads no
    weight) and 11 reduce-scatters per step): the per-step CPU adds exactly their steps at the measured figure, on
    top of the bytes' CPU, and the CPU-bound step grows by that x the contention."""
    cfg = _cfg_io(3, hierarchical)
    per_step = dataclasses.replace(CPU, inter_node_cpu_s_per_step=S_TCP, intra_node_cpu_s_per_step=S_LOCAL)
    before, after = estimate(TINY, CPU, cfg, num_nodes=2), estimate(TINY, per_step, cfg, num_nodes=2)
    if hierarchical:  # gathers: 2 barriers + 1 inter step; reduce-scatters: 2 barriers + 3 inter steps
        added = 21 * (2 * S_LOCAL + S_TCP) + 11 * (2 * S_LOCAL + 3 * S_TCP)
    else:  # gathers: 3 steps; reduce-scatters: 15
        added = (21 * 3 + 11 * 15) * S_TCP
    assert after.comm.cpu_s - before.comm.cpu_s == pytest.approx(added)
    assert after.step.comm_cpu_s - before.step.comm_cpu_s == pytest.approx(2.0 * added)  # x contention 2
    assert after.step.step_s > before.step.step_s
    assert any("and per message step (" in n for n in after.notes)
    assert not any("per message step" in n for n in before.notes)


def test_zeropp_launches_are_charged_their_steps_too():
    from ztune.config.io import from_dict

    cfg = from_dict({"zero": {"stage": 3, "quantized_weights": True, "hpz_partition_size": 2,
                              "quantized_gradients": True},
                     "batch": {"micro": 1, "grad_accum": 1}, "seq_len": 128, "precision": "bf16"})
    per_step = dataclasses.replace(CPU, inter_node_cpu_s_per_step=S_TCP, intra_node_cpu_s_per_step=S_LOCAL)
    before, after = estimate(TINY, CPU, cfg, num_nodes=2), estimate(TINY, per_step, cfg, num_nodes=2)
    for b, a in zip(before.comm.ops, after.comm.ops, strict=True):
        assert a.calls == b.calls and (a.cpu_s > b.cpu_s) == (a.calls > 0), a


def test_probe_cpu_per_step_is_the_smallest_sizes_cpu_over_its_ring_steps():
    sizes, times = (4096, 64 << 20), (0.0005, 0.06)
    fit = probe.fit_alpha_beta(sizes, times, world_size=2)
    two = probe.CollectiveResult("gloo", 2, sizes, times, fit, cpu_s=(0.0009, 0.05))
    per_byte = 0.05 / (2 * (64 << 20))
    # 2 ranks: 2 ring steps; the 4 KiB's own bytes (sent and received) at the per-byte figure come off first
    assert two.cpu_s_per_step() == pytest.approx((0.0009 - 2 * 4096 * per_byte) / 2)
    four = probe.CollectiveResult("gloo", 4, sizes, times, fit, cpu_s=(0.002, 0.05))
    assert four.cpu_s_per_step() == pytest.approx((0.002 - 2 * 1.5 * 4096 * four.cpu_s_per_byte()) / 6)
    assert probe.CollectiveResult("gloo", 2, sizes, times, fit).cpu_s_per_step() == 0.0  # not measured


@pytest.mark.parametrize("gpu", [False, True])
def test_probe_profile_takes_the_cpu_per_step_on_cpu_hosts_only(gpu):
    hw, notes, link, local = _probed(gpu=gpu, sizes=(4096, 8 << 20), link_cpu=(0.0008, 0.004),
                                     local_cpu=(0.0006, 0.0005))
    if gpu:
        assert hw.inter_node_cpu_s_per_step == hw.intra_node_cpu_s_per_step == 0.0
        assert notes["inter_node_cpu_s_per_step"].startswith("assumed: 0")
    else:
        assert hw.inter_node_cpu_s_per_step == pytest.approx(link.cpu_s_per_step()) and 3e-4 < \
            hw.inter_node_cpu_s_per_step < 4e-4
        assert hw.intra_node_cpu_s_per_step == pytest.approx(local.cpu_s_per_step())
        assert notes["inter_node_cpu_s_per_step"].startswith("measured:") and "4,096 B" in \
            notes["inter_node_cpu_s_per_step"]
        assert notes["intra_node_cpu_s_per_step"].startswith("measured:")


def test_compressed_gradients_on_one_host_are_charged_gloos_steps_not_the_shared_memory_barriers():
    """A compressed gradient exchange is a gloo all-to-all + all-gather on every layout (runtime/comm/compress.py),
    2(n-1) steps per launch, where an uncompressed one-host all_reduce goes through shared memory: 3 barriers."""
    from ztune.config.io import from_dict

    one_host = dataclasses.replace(CPU, intra_node_cpu_s_per_step=S_LOCAL)
    for method, steps in (("int8", 2 * (2 - 1)), ("none", 3 * 1)):
        cfg = from_dict({"zero": {"stage": 0}, "compression": {"method": method},
                         "batch": {"micro": 1, "grad_accum": 1}, "seq_len": 128, "precision": "bf16"})
        before, after = estimate(TINY, CPU, cfg, num_nodes=1), estimate(TINY, one_host, cfg, num_nodes=1)
        launches = sum(o.calls for o in after.comm.ops)
        assert launches > 0
        assert after.comm.cpu_s - before.comm.cpu_s == pytest.approx(launches * steps * S_LOCAL), method
