"""Offload on CUDA (runtime/offload.py): pinned host states, side-stream D2H/H2D, stage-3 parameter upload.

Runs on NCCL with min(2, GPUs) ranks (one rank on a single-GPU machine, where the collectives are no-ops but
every copy between host and device is real). Each case trains the offloaded engine and the same engine without
offload on the GPU, and compares both with test_parity's torch reference and tolerances; memory_report must
put the states where ztune/cost/memory.py says, and the host buffers must be pinned. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import test_parity as tp
from tests.helpers.spawn import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CASES = (
    [dict(stage=s, precision=p, params=False) for s in (1, 2, 3) for p in ("fp32", "bf16")]
    + [dict(stage=3, precision=p, params=True) for p in ("fp32", "bf16")]
)


def _ids(c: dict) -> str:
    return f"s{c['stage']}-{c['precision']}" + ("-params" if c["params"] else "")


def _run(rank: int, world_size: int, c: dict, offload: bool) -> dict:
    import ztune
    from ztune.runtime.data import batches

    pc = tp.case(stage=c["stage"], precision=c["precision"], offload="cpu" if offload else "none")
    cfg = tp.config_for(pc, world_size)
    cfg["zero"]["offload_params"] = "cpu" if offload and c["params"] else "none"
    engine, *_ = ztune.initialize(tp.build(pc), cfg)
    assert next(engine.module.parameters()).is_cuda
    data = batches(tp.corpus(), batch_size=tp.MICRO, seq_len=tp.SEQ, rank=rank, world_size=world_size,
                   seed=tp.SEED)
    for _ in range(tp.STEPS):
        ids, labels = next(data)
        engine.backward(engine(ids.cuda(), labels=labels.cuda()))
        engine.step()
    torch.cuda.synchronize()
    pinned = None
    if engine._offload is not None:
        host = engine._offload.host_tensors()
        pinned = all(t.is_pinned() for ts in host.values() for t in ts) and all(
            g.master.is_pinned() for g in engine.groups if g.master.device.type == "cpu")
    state = {k: v.cpu() if v is not None else None for k, v in (engine.full_state_dict() or {}).items()}
    return {"state": state, "local": None, "skipped": engine.skipped_steps, "steps": engine.global_steps,
            "norms": [], "scale": 1.0, "memory": engine.memory_report(), "num_params": engine.num_flat_params,
            "pinned": pinned}


def run_cases(rank: int, world_size: int, cases: list[dict]) -> list[tuple[dict, dict]]:
    return [(_run(rank, world_size, c, True), _run(rank, world_size, c, False)) for c in cases]


@pytest.fixture(scope="module")
def results():
    world = min(2, torch.cuda.device_count())
    # init_process_group=False: ztune.initialize creates the NCCL group and binds each rank to cuda:LOCAL_RANK.
    return world, run_ranks(run_cases, world_size=world, args=(CASES,), timeout_s=300, init_process_group=False)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_ids(c) for c in CASES])
def test_offload_cuda_parity_and_placement(results, index):
    from ztune.config.schema import OptimizerType, Precision
    from ztune.cost.memory import model_state_memory, state_bytes_per_param

    world, per_rank = results
    c = CASES[index]
    pc = tp.case(stage=c["stage"], precision=c["precision"], offload="cpu")
    offloaded = [r[index][0] for r in per_rank]
    plain = [r[index][1] for r in per_rank]
    tp.check(pc, offloaded, world)
    tp.check(pc, plain, world)
    assert all(r["pinned"] for r in offloaded), "offloaded host buffers must be pinned on a CUDA machine"
    precision = Precision(c["precision"])
    per_param = state_bytes_per_param(precision=precision, optimizer=OptimizerType.ADAMW, momentum=0.0)
    for r in offloaded:
        want = model_state_memory(num_params=r["num_params"], world_size=world, stage=c["stage"],
                                  per_param=per_param, offload_optimizer=True, offload_params=c["params"])
        got = r["memory"]
        assert got["optimizer"] == 0
        assert got["params"] == pytest.approx(want.params_bytes, rel=0.02)
        assert got["grads"] == pytest.approx(want.grads_bytes, rel=0.02)
        assert got["host_grads"] == pytest.approx(want.host_grads_bytes, rel=0.02)
        assert got["host_params"] == pytest.approx(want.host_params_bytes, rel=0.02)
        # fp32: the host master is a copy of its own unless it aliases the host parameters (test_offload.py).
        fp32_copy = precision is Precision.FP32 and not c["params"]
        extra_master = 4 * want.host_grads_bytes // per_param.grad if fp32_copy else 0
        assert got["host_optimizer"] == pytest.approx(want.host_optimizer_bytes + extra_master, rel=0.02)
