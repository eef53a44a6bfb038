"""Hierarchical collectives without processes: the per-level byte and alpha-beta formulas (ztune/cost/comm.py),
the runtime's per-level accounting (runtime/comm/collectives.py split_levels), when the runtime turns the two
levels on (runtime/comm/hierarchical.py wants_hierarchy), and the comm.hierarchical config key."""

from __future__ import annotations

import pytest

from ztune.config.io import from_dict, load, save
from ztune.config.schema import Hierarchical
from ztune.cost.comm import (
    ALL_GATHER,
    ALL_REDUCE,
    REDUCE_SCATTER,
    Hierarchy,
    Link,
    comm_estimate,
    hierarchical_collective_time_s,
    hierarchical_level_bytes,
    ring_factor,
)
from ztune.errors import ConfigError
from ztune.runtime.comm.collectives import split_levels
from ztune.runtime.comm.hierarchical import level_bytes, wants_hierarchy
from ztune.runtime.comm.topology import NodeLayout

MB = 1_000_000


def test_level_bytes_by_hand():
    # 4 nodes x 8 ranks, 64 MB: all_reduce intra 2 x 7/8 x 64 = 112 MB, inter 2 x 3/4 x 64/8 = 12 MB
    # (Jia et al. 2018, section 4.2: intra reduce-scatter, inter all-reduce of 1/L, intra all-gather).
    assert hierarchical_level_bytes(ALL_REDUCE, 64 * MB, num_nodes=4, ranks_per_node=8) == (112 * MB, 12 * MB)
    for op in (REDUCE_SCATTER, ALL_GATHER):
        assert hierarchical_level_bytes(op, 64 * MB, num_nodes=4, ranks_per_node=8) == (56 * MB, 6 * MB)
    # 2 x 2 (the tests' layout): reduce-scatter of B sends B/2 inside and B/4 across
    assert hierarchical_level_bytes(REDUCE_SCATTER, 8.0, num_nodes=2, ranks_per_node=2) == (4.0, 2.0)


@pytest.mark.parametrize("op", [ALL_REDUCE, REDUCE_SCATTER, ALL_GATHER])
@pytest.mark.parametrize("nodes,per_node", [(2, 2), (4, 8), (16, 4), (3, 5)])
def test_levels_sum_to_the_flat_ring_and_runtime_agrees(op, nodes, per_node):
    intra, inter = hierarchical_level_bytes(op, 1e9, num_nodes=nodes, ranks_per_node=per_node)
    assert intra + inter == pytest.approx(1e9 * ring_factor(op, nodes * per_node), rel=1e-12)
    layout = NodeLayout(world_size=nodes * per_node, ranks_per_node=per_node)
    assert level_bytes(op, 1e9, layout) == pytest.approx((intra, inter), rel=1e-12)
    for rank in (0, nodes * per_node - 1):
        assert split_levels(op, 1e9, layout=layout, rank=rank, hierarchical=True) == pytest.approx((intra, inter))


def test_flat_levels_follow_the_ring_successor():
    layout = NodeLayout(world_size=4, ranks_per_node=2)  # ranks 0,1 on host 0; 2,3 on host 1
    sent = 0.75 * 100
    # rank 0 sends to rank 1 (same host); rank 1 to rank 2 (other host); rank 3 to rank 0 (other host)
    assert split_levels(REDUCE_SCATTER, 100, layout=layout, rank=0, hierarchical=False) == (sent, 0.0)
    assert split_levels(REDUCE_SCATTER, 100, layout=layout, rank=1, hierarchical=False) == (0.0, sent)
    assert split_levels(REDUCE_SCATTER, 100, layout=layout, rank=3, hierarchical=False) == (0.0, sent)
    # all-to-all: a 1/n piece to each other rank, one of them on this host
    assert split_levels("all_to_all", 100, layout=layout, rank=0, hierarchical=True) == (25.0, 50.0)
    # broadcast has no hierarchical form: flat ring even when the Comm is hierarchical
    assert split_levels("broadcast", 100, layout=layout, rank=1, hierarchical=True) == (0.0, sent)
    one_host = NodeLayout(world_size=4, ranks_per_node=4)
    assert split_levels(ALL_REDUCE, 100, layout=one_host, rank=3, hierarchical=False) == (150.0, 0.0)


def test_alpha_beta_per_level_by_hand():
    # Thakur et al. 2005: ring reduce-scatter / all-gather (p-1) alpha + (p-1)/p n beta; all-reduce twice.
    h = Hierarchy(intra=Link(bw_bytes_per_s=100e9, latency_s=1e-6), inter=Link(bw_bytes_per_s=10e9, latency_s=5e-6),
                  num_nodes=4, ranks_per_node=8)
    s = 64 * MB
    want_rs = 7 * 1e-6 + 56 * MB / 100e9 + 3 * 5e-6 + 6 * MB / 10e9
    assert hierarchical_collective_time_s(op=REDUCE_SCATTER, payload_bytes=s, hierarchy=h) == pytest.approx(want_rs)
    assert hierarchical_collective_time_s(op=ALL_GATHER, payload_bytes=s, hierarchy=h) == pytest.approx(want_rs)
    want_ar = 14 * 1e-6 + 112 * MB / 100e9 + 6 * 5e-6 + 12 * MB / 10e9
    assert hierarchical_collective_time_s(op=ALL_REDUCE, payload_bytes=s, hierarchy=h) == pytest.approx(want_ar)
    assert hierarchical_collective_time_s(op=ALL_REDUCE, payload_bytes=0, hierarchy=h) == 0.0


def test_comm_estimate_with_hierarchy_beats_flat_on_a_slow_link():
    # 2 hosts x 2 ranks joined by 1 Gbit/s (125 MB/s for the host, 62.5 MB/s per rank), shared memory inside.
    h = Hierarchy(intra=Link(bw_bytes_per_s=5e9, latency_s=20e-6), inter=Link(bw_bytes_per_s=62.5e6, latency_s=1e-4),
                  num_nodes=2, ranks_per_node=2)
    flat_link = Link(bw_bytes_per_s=62.5e6, latency_s=1e-4, num_nodes=2, gpus_per_node=2)
    kw = dict(num_params=10 * MB, world_size=4, grad_accum=1, link=flat_link, param_bytes=2, grad_bytes=2,
              reduce_bucket_numel=25 * MB, allgather_bucket_numel=25 * MB, num_units=4)
    for stage in range(4):
        flat = comm_estimate(stage=stage, **kw)
        hier = comm_estimate(stage=stage, hierarchy=h, **kw)
        assert hier.bytes_per_rank == pytest.approx(flat.bytes_per_rank)  # same bytes, split by level
        assert hier.time_s < flat.time_s / 1.3, stage


def test_when_the_runtime_goes_hierarchical():
    two_by_two = NodeLayout(world_size=4, ranks_per_node=2)
    one_host = NodeLayout(world_size=4, ranks_per_node=4)
    one_per_host = NodeLayout(world_size=4, ranks_per_node=1)
    assert wants_hierarchy(Hierarchical.AUTO, layout=two_by_two, backend="gloo")
    assert not wants_hierarchy(Hierarchical.AUTO, layout=two_by_two, backend="nccl")
    assert not wants_hierarchy(Hierarchical.AUTO, layout=one_host, backend="gloo")
    assert not wants_hierarchy(Hierarchical.AUTO, layout=one_per_host, backend="gloo")
    assert not wants_hierarchy(Hierarchical.OFF, layout=two_by_two, backend="gloo")
    assert wants_hierarchy(Hierarchical.ON, layout=two_by_two, backend="gloo")
    for layout, backend in ((one_host, "gloo"), (one_per_host, "gloo"), (two_by_two, "nccl")):
        with pytest.raises(ConfigError, match="comm.hierarchical: true"):
            wants_hierarchy(Hierarchical.ON, layout=layout, backend=backend)


@pytest.mark.parametrize("value,want", [(True, Hierarchical.ON), (False, Hierarchical.OFF), ("auto", Hierarchical.AUTO),
                                        ("true", Hierarchical.ON), ("False", Hierarchical.OFF)])
def test_config_key(value, want, tmp_path):
    cfg = from_dict({"comm": {"hierarchical": value}})
    assert cfg.comm.hierarchical is want
    assert from_dict({}).comm.hierarchical is Hierarchical.AUTO
    assert load(save(cfg, tmp_path / "c.yaml")).comm.hierarchical is want  # saved and re-loaded


@pytest.mark.parametrize("doc,fragment", [({"comm": {"hierarchical": "yes"}}, "comm.hierarchical"),
                                          ({"comm": {"hierarchical": 1}}, "comm.hierarchical"),
                                          ({"comm": {"flat": True}}, "comm.flat")])
def test_bad_config_names_the_key(doc, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict(doc)


def test_worker_runs_in_issue_order_and_hands_errors_to_the_waiter():
    from ztune.runtime.comm.hierarchical import _Worker

    worker, order = _Worker(), []
    futures = [worker.submit(lambda i=i: (order.append(i),)) for i in range(5)]
    futures[-1].wait()
    assert order == list(range(5)) and all(f.is_completed() for f in futures)
    failed = worker.submit(lambda: (1 / 0,))
    with pytest.raises(ZeroDivisionError):
        failed.wait()
    assert worker.submit(tuple).wait()  # the lane goes on after a failed collective's error reached its waiter
