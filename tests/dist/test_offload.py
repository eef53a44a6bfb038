"""Offload (runtime/offload.py) on 2 gloo ranks: parity with torch.optim on the unsharded model, and where
memory_report() puts each state, against ztune/cost/memory.py's offload accounting.

Parity reuses test_parity's cases, reference and tolerances (fp32: 1e-5 relative; 16-bit: the update-relative
metric documented there). The offloaded step runs the fused C++ Adam kernel (runtime/ops.py) in every case but
one, which forces the pure-torch fallback. Without a GPU the host and the "device" are the same memory: the
copies run (same-device memcpys) but nothing moves between memories; tests/gpu/test_offload_cuda.py runs the
same cases on CUDA.
"""

from __future__ import annotations

import os

import pytest

from tests.dist import test_parity as tp
from tests.helpers.spawn import run_ranks
from ztune.config.schema import OptimizerType, Precision
from ztune.cost.memory import model_state_memory, state_bytes_per_param

pytestmark = pytest.mark.dist

WORLD = 2
FP32_BYTES = 4


def ocase(*, params: bool = False, fallback: bool = False, **kw) -> dict:
    c = tp.case(offload=kw.pop("offload", "cpu"), **kw)
    c.update(offload_params="cpu" if params else "none", fallback=fallback)
    return c


CASES = (
    [ocase(stage=s) for s in (1, 2, 3)]
    + [ocase(stage=3, params=True), ocase(stage=3, params=True, offload="none")]
    + [ocase(stage=s, precision="bf16") for s in (1, 2, 3)]
    + [ocase(model="llama", stage=3, precision="bf16", accum=2, clip=0.05, params=True),
       ocase(model="llama", stage=3, precision="bf16", params=True, offload="none")]
    + [ocase(stage=2, precision="fp16", overflow=True, clip=0.05)]
    + [ocase(model="llama", stage=2, precision="bf16", accum=2, fallback=True)]
)


def _ids(c: dict) -> str:
    return (f"{c['model']}-s{c['stage']}-{c['precision']}-acc{c['accum']}-opt{c['offload']}-par{c['offload_params']}"
            + ("-fallback" if c["fallback"] else "") + ("-overflow" if c["overflow"] else ""))


def _train(rank: int, world_size: int, c: dict) -> dict:
    import math

    import ztune
    from ztune.runtime import ops
    from ztune.runtime.data import batches

    if c["fallback"]:  # this case only: the kernel's torch fallback (the backend is chosen once per process)
        saved = ops._LOADER.reset()
        os.environ["ZTUNE_DISABLE_CPP_ADAM"] = "1"
    try:
        cfg = tp.config_for(c, world_size)
        cfg["zero"]["offload_params"] = c["offload_params"]
        engine, *_ = ztune.initialize(tp.build(c), cfg)
        data = batches(tp.corpus(), batch_size=tp.MICRO, seq_len=tp.SEQ, rank=rank, world_size=world_size,
                       seed=tp.SEED)
        norms = []
        for step in range(tp.STEPS):
            for micro in range(c["accum"]):
                ids, labels = next(data)
                loss = engine(ids, labels=labels)
                if c["overflow"] and step == 0 and micro == 0 and rank == 0:
                    loss = loss * math.inf
                engine.backward(loss)
                engine.step()
            norms.append(engine.last_grad_norm)
        backend = ops.kernel_backend() if c["offload"] == "cpu" else None
    finally:
        if c["fallback"]:
            ops._LOADER.restore(saved)
            del os.environ["ZTUNE_DISABLE_CPP_ADAM"]
    local = None
    if c["stage"] < 3:
        local = torch_cat_params(engine)
    return {"state": engine.full_state_dict(), "local": local, "skipped": engine.skipped_steps,
            "steps": engine.global_steps, "norms": norms, "scale": engine.scaler.scale,
            "memory": engine.memory_report(), "num_params": engine.num_flat_params, "backend": backend,
            "max_shard_numel": max(g.master.numel() for g in engine.groups)}


def torch_cat_params(engine):
    import torch

    return torch.cat([p.detach().float().reshape(-1) for p in engine.module.parameters()])


def train_cases(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    import sys

    out = [_train(rank, world_size, c) for c in cases]
    out[0]["builder_imported"] = "torch.utils.cpp_extension" in sys.modules
    return out


@pytest.fixture(scope="module")
def results():
    from ztune.runtime.ops import kernel_backend

    kernel_backend()  # build (or find) the kernel here, so the ranks start with a warm cache
    return run_ranks(train_cases, world_size=WORLD, args=(CASES,), timeout_s=240, env={"ZTUNE_SHM_MIN_BYTES": "0"})


def test_ranks_load_cached_kernel_without_builder(results):
    """With the library built, a rank loads it directly: torch's builder re-runs ninja in every process, and
    a second ninja version on PATH made that a full ~11.5 s rebuild per rank (runtime/ops.py)."""
    from ztune.runtime.ops import kernel_backend

    if kernel_backend() != "cpp":
        pytest.skip("the C++ kernel cannot be built on this machine (no compiler); the fallback cases still ran")
    assert [r[0]["builder_imported"] for r in results] == [False] * WORLD


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_ids(c) for c in CASES])
def test_offload_parity(results, index):
    c = CASES[index]
    per_rank = [r[index] for r in results]
    tp.check(c, per_rank, WORLD)
    if c["offload"] == "cpu":
        from ztune.runtime.ops import kernel_backend

        # The fused kernel runs wherever this process could build it; the fallback case must not use it.
        want = "torch-fallback" if c["fallback"] else kernel_backend()
        assert [r["backend"] for r in per_rank] == [want] * WORLD


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_ids(c) for c in CASES])
def test_offload_memory_placement(results, index):
    c = CASES[index]
    if c["optimizer"] != "AdamW":
        pytest.fail("memory placement is checked for AdamW cases only; the case list changed")
    precision = Precision(c["precision"])
    per_param = state_bytes_per_param(precision=precision, optimizer=OptimizerType.ADAMW, momentum=0.0)
    for rank, r in enumerate(results):
        got, psi = r[index]["memory"], r[index]["num_params"]
        want = model_state_memory(num_params=psi, world_size=WORLD, stage=c["stage"], per_param=per_param,
                                  offload_optimizer=c["offload"] == "cpu", offload_params=c["offload_params"] == "cpu")
        # At fp32 with the optimizer and the parameters on different sides, the cost model adds the fp32
        # master copy the runtime keeps (4 bytes per shard element).
        host_opt = want.host_optimizer_bytes
        dev_opt = want.optimizer_bytes
        print(f"rank {rank} {_ids(c)}: device {got['params']}/{got['grads']}/{got['optimizer']} host "
              f"{got['host_params']}/{got['host_grads']}/{got['host_optimizer']}/{got['host_buffers']} formula "
              f"device {want.params_bytes}/{want.grads_bytes}/{dev_opt} host "
              f"{want.host_params_bytes}/{want.host_grads_bytes}/{host_opt}")
        for key, expected in (("params", want.params_bytes), ("grads", want.grads_bytes), ("optimizer", dev_opt),
                              ("host_params", want.host_params_bytes), ("host_grads", want.host_grads_bytes),
                              ("host_optimizer", host_opt)):
            assert got[key] == pytest.approx(expected, rel=0.02, abs=0), (key, got, c)
        # Upload staging: two buffers of the largest shard, only where the kernel rounds into one.
        staged = c["offload"] == "cpu" and c["offload_params"] == "none" and precision is not Precision.FP32
        assert got["host_buffers"] == (2 * r[index]["max_shard_numel"] * precision.bytes if staged else 0)
        assert got["host_total"] == sum(got[f"host_{k}"] for k in ("params", "grads", "optimizer", "buffers"))
        assert got["total"] == got["params"] + got["grads"] + got["optimizer"] + got["buffers"]
