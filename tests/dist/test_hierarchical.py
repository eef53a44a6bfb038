"""Hierarchical collectives (runtime/comm/hierarchical.py): 4 local ranks as 2 hosts x 2 (ZTUNE_LOCAL_WORLD_SIZE=2).

One spawn per transport inside the host (shared memory; gloo host groups with ZTUNE_SHM=0) runs, in order:
the three collectives against gloo's flat ones on odd sizes and dtypes; then ZeRO stages 0-3 in fp32 against
the single-process reference of tests/dist/test_parity.py (within 1e-5), each run's comm_report split by level
as ztune.cost.comm's formulas say. A third, 2-rank spawn checks that a one-host job stays flat.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist.test_parity import MICRO, SEED, STEPS, build, case, check, config_for, corpus
from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.dist

TWO_HOSTS = {"ZTUNE_LOCAL_WORLD_SIZE": "2", "ZTUNE_SHM_MIN_BYTES": "0"}
CASES = [case(stage=s) for s in range(4)] + [case(model="llama", stage=3, accum=2)]
# comm.hierarchical: false on the same layout: flat gloo, and no shared memory across the "hosts"
CASES += [dict(case(stage=1), flat=True)]


def _filled(numel: int, *, rank: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randn(numel, generator=gen).to(dtype)


def _collectives(rank: int, world_size: int) -> dict:
    """Each hierarchical collective against gloo's flat one on the same inputs, shared and private buffers."""
    import torch.distributed as dist

    from ztune.runtime.comm import Comm
    from ztune.runtime.comm.hierarchical import TwoLevel
    from ztune.runtime.comm.topology import layout_from_env

    layout = layout_from_env(world_size=world_size)
    comm = Comm(group=dist.group.WORLD, rank=rank, world_size=world_size, layout=layout,
                hierarchy=TwoLevel.connect(layout=layout, rank=rank, use_shm=True))
    out: dict = {"shm": comm.shm is not None}
    n = world_size
    for dtype in (torch.float32, torch.bfloat16):
        for where in ("shared", "private"):
            def buf(numel, dtype=dtype, where=where):
                if where == "shared":
                    return comm.zeros(numel, dtype=dtype, device="cpu")
                return torch.zeros(numel, dtype=dtype)
            key = f"{dtype}-{where}"
            t = buf(1000)  # not a multiple of 16 x ranks: ragged pieces
            t.copy_(_filled(1000, rank=rank, seed=1, dtype=dtype))
            ref = t.clone()
            dist.all_reduce(ref)
            comm.all_reduce(t)
            out[f"all_reduce-{key}"] = (t.clone(), ref)
            full = buf(48 * n)
            full.copy_(_filled(48 * n, rank=rank, seed=2, dtype=dtype))
            ref = torch.empty(48, dtype=dtype)
            dist.reduce_scatter_tensor(ref, full.clone())
            own = full[rank * 48:(rank + 1) * 48]
            work = comm.reduce_scatter(own, full, async_op=True)
            work.wait()
            out[f"reduce_scatter-{key}"] = (own.clone(), ref)
            gathered = buf(40 * n)
            shard = _filled(40, rank=rank, seed=3, dtype=dtype)
            ref = torch.empty(40 * n, dtype=dtype)
            dist.all_gather_into_tensor(ref, shard)
            comm.all_gather(gathered, shard)
            out[f"all_gather-{key}"] = (gathered.clone(), ref)
    out.update(_staged_back_to_back(comm, rank, world_size))
    one = torch.tensor([float(rank + 1)])
    comm.all_reduce(one, op=dist.ReduceOp.MAX)
    out["max"] = float(one)
    out["report"] = comm.report(steps=1)
    return out


class _LaggingDist:
    """torch.distributed for runtime/comm/hierarchical.py, with every barrier returning 30 ms late on this rank: it
    reads its host peer's staging buffer well after the peer went on to its next collectives."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def barrier(self, *args, **kwargs):
        import time

        self._real.barrier(*args, **kwargs)
        time.sleep(0.03)


def _staged_back_to_back(comm, rank: int, world_size: int) -> dict:
    """Several collectives on private buffers (through the lanes' staging buffers) submitted back to back while
    local rank 1 of each host lags after every barrier: fails if a rank could overwrite a staging buffer its
    host peer still reads (each collective's closing barrier, runtime/comm/hierarchical.py; without it, with
    one staging buffer, this fails)."""
    import torch.distributed as dist

    import ztune.runtime.comm.hierarchical as hierarchical

    n, out = world_size, {}
    if rank % 2 == 1:
        hierarchical.dist = _LaggingDist(dist)
    try:
        shards = [_filled(64, rank=rank, seed=10 + i) for i in range(5)]
        outputs = [torch.zeros(64 * n) for _ in shards]
        fulls = [_filled(64 * n, rank=rank, seed=20 + i) for i in range(5)]
        refs_rs = []
        for full in fulls:
            ref = torch.empty(64)
            dist.reduce_scatter_tensor(ref, full.clone())
            refs_rs.append(ref)
        owns = [torch.zeros(64) for _ in fulls]
        works = [comm.all_gather(o, s, async_op=True) for o, s in zip(outputs, shards, strict=True)]
        works += [comm.reduce_scatter(o, f.clone(), async_op=True) for o, f in zip(owns, fulls, strict=True)]
        for w in works:
            w.wait()
    finally:
        hierarchical.dist = dist
    for i, (o, s) in enumerate(zip(outputs, shards, strict=True)):
        ref = torch.empty(64 * n)
        dist.all_gather_into_tensor(ref, s)
        out[f"staged all_gather {i}"] = (o, ref)
    for i, (o, ref) in enumerate(zip(owns, refs_rs, strict=True)):
        out[f"staged reduce_scatter float32 {i}"] = (o, ref)
    return out


def _train(rank: int, world_size: int, cases: list[dict]) -> dict:
    import ztune
    from ztune.runtime.data import batches

    out = {"collectives": _collectives(rank, world_size), "runs": []}
    for c in cases:
        cfg = config_for(c, world_size)
        if c.get("flat"):
            cfg["comm"] = {"hierarchical": False}
        engine, _, _, _ = ztune.initialize(build(c), cfg)
        data = batches(corpus(), batch_size=MICRO, seq_len=16, rank=rank, world_size=world_size, seed=SEED)
        for _ in range(STEPS):
            for _ in range(c["accum"]):
                ids, labels = next(data)
                engine.backward(engine(ids, labels=labels))
                engine.step()
        local = None
        if c["stage"] < 3:
            local = torch.cat([p.detach().float().reshape(-1) for p in engine.module.parameters()])
        out["runs"].append({"state": engine.full_state_dict(), "local": local, "skipped": engine.skipped_steps,
                            "steps": engine.global_steps, "norms": [], "scale": engine.scaler.scale,
                            "report": engine.comm_report(), "shm": engine.comm.shm is not None})
    return out


@pytest.fixture(scope="module", params=["shm", "gloo"])
def two_hosts(request):
    env = dict(TWO_HOSTS, **({"ZTUNE_SHM": "0"} if request.param == "gloo" else {}))
    return request.param, run_ranks(_train, world_size=4, args=(CASES,), timeout_s=300, env=env)


def test_collectives_match_flat(two_hosts):
    transport, results = two_hosts
    for r, res in enumerate(results):
        got = res["collectives"]
        assert got.pop("shm") is (transport == "shm")
        assert got.pop("max") == 4.0
        report = got.pop("report")
        assert report["hierarchical"] and report["num_nodes"] == 2 and report["ranks_per_node"] == 2
        for key, (value, ref) in got.items():
            tol = 0 if "reduce" not in key else (1e-6 if "float32" in key else 2e-2)
            assert torch.allclose(value.float(), ref.float(), rtol=tol, atol=tol), (r, key)
        # every rank holds identical all-reduce results
        for key in got:
            if key.startswith("all_reduce"):
                assert torch.equal(got[key][0], results[0]["collectives"][key][0]), (r, key)


def test_parity_and_level_bytes(two_hosts):
    from ztune.cost.comm import hierarchical_level_bytes, ring_factor

    _, results = two_hosts
    for i, c in enumerate(CASES):
        runs = [res["runs"][i] for res in results]
        check(c, runs, 4)
        for rank, run in enumerate(runs):
            report = run["report"]
            if c.get("flat"):
                assert not report["hierarchical"] and not run["shm"] and report["transport"] == "process group"
                for v in report["ops"].values():  # a ring rank sends to rank + 1: across for ranks 1 and 3
                    want = (0.0, v["sent_bytes"]) if rank % 2 else (v["sent_bytes"], 0.0)
                    assert (v["intra_sent_bytes"], v["inter_sent_bytes"]) == want
                continue
            assert report["hierarchical"], c
            for op, v in report["ops"].items():
                if op not in ("all_reduce", "reduce_scatter", "all_gather"):
                    continue
                intra, inter = hierarchical_level_bytes(op, v["payload_bytes"], num_nodes=2, ranks_per_node=2)
                assert v["intra_sent_bytes"] == pytest.approx(intra, rel=1e-12), (c, op)
                assert v["inter_sent_bytes"] == pytest.approx(inter, rel=1e-12), (c, op)
                assert v["sent_bytes"] == pytest.approx(v["payload_bytes"] * ring_factor(op, 4), rel=1e-12)
            # Per optimizer step, the stage's traffic (DESIGN.md): each host sends (N-1)/N of the padded
            # buffer across per reduce-scatter / all-gather pass, 2x for an all-reduce: L ranks x (N-1)/N x B/L.
            padded_bytes = report["padded_params"] * 4
            passes = {0: 2, 1: 2, 2: 1 + c["accum"], 3: 3 * c["accum"]}[c["stage"]]
            if c["stage"] < 3:
                assert report["inter_node_bytes_sent_per_step"] == pytest.approx(passes * 0.5 * padded_bytes / 2)


def _single_host(rank: int, world_size: int) -> dict:
    import ztune

    c = case(stage=1)
    engine, _, _, _ = ztune.initialize(build(c), config_for(c, world_size))
    data_ids = torch.randint(0, 64, (MICRO, 16), generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(data_ids, labels=data_ids))
    engine.step()
    return {"hierarchy": engine.comm.hierarchy is not None, "shm": engine.comm.shm is not None,
            "report": engine.comm_report()}


def test_single_host_stays_flat():
    """One host (LOCAL_WORLD_SIZE = world size, no override): no hierarchy, shared memory over all ranks, every
    byte intra-host, totals as the flat ring's."""
    from ztune.cost.comm import ring_factor

    for res in run_ranks(_single_host, world_size=2, timeout_s=120, env={"ZTUNE_SHM_MIN_BYTES": "0"}):
        assert not res["hierarchy"] and res["shm"]
        report = res["report"]
        assert not report["hierarchical"] and report["num_nodes"] == 1
        assert report["transport"] == "shared memory + process group"
        assert report["inter_node_bytes_sent_total"] == 0
        for op, v in report["ops"].items():
            assert v["intra_sent_bytes"] == v["sent_bytes"] == pytest.approx(v["payload_bytes"] * ring_factor(op, 2))
