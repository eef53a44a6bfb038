"""The shared-memory transport (runtime/comm/shm.py) against gloo, its fallbacks, and that it leaves nothing behind.

Every collective must give what gloo gives on the same inputs (exactly for sums of two, within fp32 rounding
for four, since the summation order differs) and identical bytes on every rank.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.dist

N = 1000  # not a multiple of 16 x ranks: the chunking must cope with a ragged last chunk


def _filled(shape: int, *, rank: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randn(shape, generator=gen).to(dtype)


def collectives(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from ztune.runtime.comm.shm import SharedMemoryTransport

    tr = SharedMemoryTransport.connect(group=None, rank=rank, world_size=world_size)
    assert tr is not None, "ranks of one host must be able to share memory"
    out: dict = {"prefix": tr.prefix}

    # all-reduce of a whole buffer and of a piece at an offset (a bucket inside a larger flat buffer)
    buf = tr.zeros(N + 48, dtype=torch.float32)
    buf.copy_(_filled(N + 48, rank=rank, seed=1))
    ref = buf.clone()
    dist.all_reduce(ref)
    tr.all_reduce(buf)
    out["all_reduce"] = (buf.clone(), ref)
    piece = buf[32:32 + 640]
    piece.copy_(_filled(640, rank=rank, seed=2))
    ref = piece.clone()
    dist.all_reduce(ref)
    tr.all_reduce(piece)
    out["all_reduce_piece"] = (piece.clone(), ref)

    # reduce-scatter in place (into this rank's slice) and into a separate tensor
    size = 64 * world_size
    full = tr.zeros(size, dtype=torch.float32)
    full.copy_(_filled(size, rank=rank, seed=3))
    src = full.clone()
    ref = torch.empty(size // world_size)
    dist.reduce_scatter_tensor(ref, src.clone())
    own = full[rank * 64:(rank + 1) * 64]
    tr.reduce_scatter(own, full)
    out["reduce_scatter_in_place"] = (own.clone(), ref)
    full.copy_(src)
    separate = torch.empty(64)
    tr.reduce_scatter(separate, full)
    out["reduce_scatter_out"] = (separate, ref)

    # all-gather in place and from a separate shard
    shard = _filled(64, rank=rank, seed=4)
    ref = torch.empty(size)
    dist.all_gather_into_tensor(ref, shard)
    gathered = tr.zeros(size, dtype=torch.float32)
    tr.all_gather(gathered, shard)
    out["all_gather_out"] = (gathered.clone(), ref)
    gathered.zero_()
    gathered[rank * 64:(rank + 1) * 64].copy_(shard)
    tr.all_gather(gathered, gathered[rank * 64:(rank + 1) * 64])
    out["all_gather_in_place"] = (gathered.clone(), ref)

    # bf16: summed in bf16 as gloo does
    half = tr.zeros(N, dtype=torch.bfloat16)
    half.copy_(_filled(N, rank=rank, seed=5, dtype=torch.bfloat16))
    ref = half.float()
    dist.all_reduce(ref)
    tr.all_reduce(half)
    out["bf16"] = (half.float(), ref)
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_collectives_match_gloo(world_size):
    results = run_ranks(collectives, world_size=world_size, timeout_s=120)
    for name in ("all_reduce", "all_reduce_piece", "reduce_scatter_in_place", "reduce_scatter_out",
                 "all_gather_out", "all_gather_in_place", "bf16"):
        for rank, res in enumerate(results):
            got, ref = res[name]
            if name.startswith("all_gather") or (world_size == 2 and name != "bf16"):
                assert torch.equal(got, ref), f"{name} rank {rank}"  # copies, or a + b in either order
            elif name == "bf16":
                # Each bf16 add rounds to 8 bits of mantissa; the fp32 reference rounds once.
                torch.testing.assert_close(got, ref, rtol=2 ** -8 * (world_size - 1), atol=0.05)
            else:
                torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        if not name.startswith("reduce_scatter"):
            for res in results[1:]:
                assert torch.equal(res[name][0], results[0][name][0]), f"{name}: ranks disagree"
    prefix = results[0]["prefix"]
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(prefix)], "shared-memory files left behind"


def separate_roots(rank: int, world_size: int, base: str) -> bool:
    from ztune.runtime.comm.shm import SharedMemoryTransport

    root = os.path.join(base, f"host{rank}")  # as if each rank had its own /dev/shm (another host)
    os.makedirs(root, exist_ok=True)
    return SharedMemoryTransport.connect(group=None, rank=rank, world_size=world_size, root=root) is None


def test_ranks_that_cannot_see_each_other_fall_back(tmp_path):
    assert run_ranks(separate_roots, world_size=2, args=(str(tmp_path),)) == [True, True]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "probe files left behind"


def full_shm_on_one_rank(rank: int, world_size: int) -> dict:
    import errno

    from ztune.runtime.comm.shm import SharedMemoryTransport

    tr = SharedMemoryTransport.connect(group=None, rank=rank, world_size=world_size)
    if rank == 1:
        def no_space(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")
        os.posix_fallocate = no_space
    got = tr.zeros(4096, dtype=torch.float32)
    return {"none": got is None, "prefix": tr.prefix}


def test_full_shm_falls_back_on_every_rank():
    results = run_ranks(full_shm_on_one_rank, world_size=2)
    assert [r["none"] for r in results] == [True, True]
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(results[0]["prefix"])]


def engine_transport(rank: int, world_size: int, stage: int) -> dict:
    import ztune
    from ztune.runtime.models import build_model
    from ztune.specs import Architecture, ModelSpec

    spec = ModelSpec(name="shm-gpt2", architecture=Architecture.GPT2, vocab_size=64, hidden_size=32,
                     num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64, max_seq_len=8,
                     tied_embeddings=True)
    engine, *_ = ztune.initialize(build_model(spec, seed=1), {"zero": {"stage": stage}, "batch": {"micro": 1}})
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(ids, labels=ids))
    engine.step()
    shm = engine.comm.shm
    g = engine.groups[0]
    # Stage 1: gradient and parameter buffers are shared; stage 3: the parameter shards (gathered per unit).
    shared = [g.grad_full, g.param_full] if stage == 1 else [g.param_shard]
    report = engine.comm_report()
    import resource

    from ztune.runtime.trial_report import _peak_memory_bytes

    page = os.sysconf("SC_PAGE_SIZE")
    peer_bytes = sum(-(-t.numel() * t.element_size() // page) * page for t in shm.peer_mappings()) if shm else 0
    # The peak RSS bracketing the call, taken again until it did not move meanwhile: gloo's threads may still
    # allocate (a full make test once saw the peak grow by 144 KiB between two reads: "excluded" -147456).
    for _ in range(20):
        raw_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = _peak_memory_bytes(engine)
        if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 == raw_peak:
            break
    return {"transport": report["transport"], "prefix": shm.prefix if shm else None,
            "peak_excluded": raw_peak - peak, "peer_bytes": peer_bytes,
            "shared": shm is not None and all(shm.owns(t) for t in shared),
            "all_gather_calls": report["ops"]["all_gather"]["calls"]}


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize("env", [{"ZTUNE_SHM_MIN_BYTES": "0"}, {"ZTUNE_SHM": "0"}],
                         ids=["shared", "ZTUNE_SHM=0"])
def test_engine_transport(env, stage):
    results = run_ranks(engine_transport, world_size=2, args=(stage,), env=env)
    env = env.get("ZTUNE_SHM") == "0"  # True: gloo only
    gathers = {r["all_gather_calls"] for r in results}
    assert len(gathers) == 1 and gathers.pop() > 0, "every rank counts the same all-gathers, shared or not"
    for r in results:  # autotune's CPU peak memory leaves out the peers' pages this rank has read
        assert 0 <= r["peak_excluded"] <= r["peer_bytes"]
        assert (r["peak_excluded"] > 0) == (not env)
    if env:
        assert results[0]["transport"] == "process group" and results[0]["prefix"] is None
        assert not results[0]["shared"]
    else:
        assert results[0]["transport"] == "shared memory + process group"
        assert results[0]["shared"]
        assert not [f for f in os.listdir("/dev/shm") if f.startswith(results[0]["prefix"])]


def threshold(rank: int, world_size: int) -> dict:
    from ztune.runtime.comm import Comm
    from ztune.runtime.comm.shm import MIN_BYTES, SharedMemoryTransport

    tr = SharedMemoryTransport.connect(group=None, rank=rank, world_size=world_size)
    import torch.distributed as dist

    comm = Comm(group=dist.group.WORLD, rank=rank, world_size=world_size, shm=tr)
    small = comm.zeros(MIN_BYTES // 4 - 16, dtype=torch.float32, device=torch.device("cpu"))
    big = comm.zeros(MIN_BYTES // 4, dtype=torch.float32, device=torch.device("cpu"))
    calls = []
    tr.all_reduce = lambda t, **kw: calls.append(t.numel())  # record which ones come here
    for t in (small, big):
        comm.all_reduce(t.fill_(rank + 1))
    return {"shm_calls": calls, "small": small[:4].tolist(), "owned": tr.owns(small) and tr.owns(big)}


def test_small_collectives_go_through_gloo():
    from ztune.runtime.comm.shm import MIN_BYTES

    for r in run_ranks(threshold, world_size=2):
        assert r["owned"] and r["shm_calls"] == [MIN_BYTES // 4]
        assert r["small"] == [3.0] * 4  # summed by gloo


def bad_min_bytes(rank: int, world_size: int) -> str:
    from ztune.errors import ConfigError
    from ztune.runtime.comm.shm import SharedMemoryTransport

    try:
        SharedMemoryTransport.connect(group=None, rank=rank, world_size=world_size)
    except ConfigError as exc:
        return str(exc)
    return "no error"


def test_bad_min_bytes_is_a_config_error():
    out = run_ranks(bad_min_bytes, world_size=2, env={"ZTUNE_SHM_MIN_BYTES": "lots"})
    assert out[0] == out[1] and out[0].startswith("ZTUNE_SHM_MIN_BYTES='lots': expected a byte count")
