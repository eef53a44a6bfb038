"""Checkpoints (runtime/state/): exact resume and resharding on gloo ranks.

Exact resume: a run trains STEPS steps and saves after SAVE_AT; a fresh engine (new model, new optimizer)
loads `latest` and trains the remaining steps on the same data. Its losses and final parameters must be
bitwise equal to the uninterrupted run's: every piece of state that feeds the next step (masters, moments,
step counts, lr schedule, loss scale, counters) came back exactly. Each case also draws from every RNG right
after the save and right after the load: equal draws mean the streams were restored.
Kill -9 trials are in test_checkpoint_kill.py; corruption and the offline tools in test_checkpoint_files.py.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from tests.dist.test_parity import MICRO, SEED, SEQ, build, case, config_for, corpus
from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.dist

STEPS, SAVE_AT = 6, 3


def _draws() -> list:
    import numpy as np

    return [torch.rand(4).tolist(), random.random(), float(np.random.rand())]


def _scheduler(c: dict):
    if not c.get("sched"):
        return None
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))


def full_states(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Collective: {parameter name: {"master": fp32 values, optimizer state key: values}} gathered from the
    shards (the reference the resharding test compares), plus {"step": tensor} per parameter."""
    from ztune.runtime.partition import views_of
    from ztune.runtime.state.capture import canonical_names, shard_state_keys

    names = canonical_names(engine.module)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for g in engine.groups:
        state = engine.optimizer.state.get(g.master, {})
        tensors = {"master": g.master, **{k: state[k] for k in shard_state_keys(engine.optimizer, g.master)}}
        for key, t in tensors.items():
            full = t.detach()
            if t.numel() != g.layout.padded_numel:
                full = torch.empty(g.layout.padded_numel, dtype=t.dtype)
                engine.comm.all_gather(full, t.detach().cpu().contiguous())
            for p, v in zip(g.params, views_of(full, g.layout), strict=True):
                out.setdefault(names[id(p)], {})[key] = v.clone()
        if "step" in state:
            for p in g.params:
                out[names[id(p)]]["step"] = torch.tensor(float(state["step"]))
    return out


def train(rank: int, world_size: int, c: dict, *, save_dir: str, resume: bool, steps: int = STEPS,
          save_at: int | None = SAVE_AT) -> dict:
    import ztune
    from ztune.runtime.data import batches

    engine, _, _, _ = ztune.initialize(build(c), config_for(c, world_size), lr_scheduler=_scheduler(c))
    result: dict = {}
    start = 0
    if resume:
        path, client = engine.load_checkpoint(save_dir)
        assert path is not None, "nothing to resume from"
        result.update(client=client, draws_after_load=_draws())
        start = engine.global_steps
    data = batches(corpus(), batch_size=MICRO, seq_len=SEQ, rank=rank, world_size=world_size, seed=SEED)
    data = itertools.islice(data, start * c["accum"], None)
    losses = []
    for step in range(start, steps):
        for micro in range(c["accum"]):
            ids, labels = next(data)
            loss = engine(ids, labels=labels)
            if c["overflow"] and step == 1 and micro == 0 and rank == 0:
                loss = loss * math.inf  # the fp16 scaler halves its scale and skips this step
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        if save_at is not None and step + 1 == save_at and not resume:
            engine.save_checkpoint(save_dir, client_state={"step": step + 1, "note": "hi", "t": torch.arange(3)})
            result["draws_after_save"] = _draws()
    result.update(losses=losses, state=engine.full_state_dict(), scale=engine.scaler.scale,
                  steps=engine.global_steps, skipped=engine.skipped_steps,
                  lr=engine.optimizer.param_groups[0]["lr"], full=full_states(engine))
    return result


def resume_cases(rank: int, world_size: int, cases: list[dict], root: str) -> list[tuple[dict, dict]]:
    out = []
    for i, c in enumerate(cases):
        save_dir = f"{root}/case{i}"
        whole = train(rank, world_size, c, save_dir=save_dir, resume=False)
        resumed = train(rank, world_size, c, save_dir=save_dir, resume=True)
        out.append((whole, resumed))
    return out


def _assert_same(whole: dict, resumed: dict, c: dict) -> None:
    n = SAVE_AT * c["accum"]
    assert resumed["losses"] == whole["losses"][n:], c
    assert resumed["draws_after_load"] == whole["draws_after_save"], c
    assert resumed["client"]["step"] == SAVE_AT and torch.equal(resumed["client"]["t"], torch.arange(3))
    assert (resumed["steps"], resumed["skipped"], resumed["scale"], resumed["lr"]) == (
        whole["steps"], whole["skipped"], whole["scale"], whole["lr"]), c
    if whole["state"] is not None:
        assert whole["state"].keys() == resumed["state"].keys()
        for k, v in whole["state"].items():
            assert torch.equal(v, resumed["state"][k]), (c, k)
    for name, states in whole["full"].items():
        for key, v in states.items():
            assert torch.equal(v, resumed["full"][name][key]), (c, name, key)


RESUME_CASES = [
    case(stage=0),
    case(stage=1, accum=2),
    case(stage=2, clip=1.0),
    case(stage=3, model="llama"),
    case(stage=2, offload="cpu"),
    case(stage=3, offload="cpu", model="llama"),
    {**case(stage=1, optimizer="SGD"), "sched": True},
    {**case(stage=2, precision="fp16", overflow=True), "sched": True},
]


@pytest.mark.timeout(1200)  # safety net: 16 engines in one spawn take minutes on the shared 2-core machine
def test_exact_resume_two_ranks(tmp_path):
    results = run_ranks(resume_cases, world_size=2, args=(RESUME_CASES, str(tmp_path)), timeout_s=600)
    for rank_results in results:
        for c, (whole, resumed) in zip(RESUME_CASES, rank_results, strict=True):
            _assert_same(whole, resumed, c)
    fp16 = results[0][-1][0]
    assert fp16["skipped"] == 1 and fp16["scale"] == 2.0**15  # the overflow really changed the scaler state


# -- resharding --------------------------------------------------------------------------------------------
# Global batch GLOBAL at every world size (micro = GLOBAL / world size): runtime/data.py gives rank r rows
# [r*micro, (r+1)*micro) of the same global batch, so the mean of the ranks' losses is the global loss.
GLOBAL, MORE = 4, 2


def _continue(engine, rank: int, world_size: int, *, start: int) -> list[float]:
    """Mean over ranks of the loss of MORE further steps from global step `start`."""
    import torch.distributed as dist

    from ztune.runtime.data import batches

    micro = GLOBAL // world_size
    data = itertools.islice(batches(corpus(), batch_size=micro, seq_len=SEQ, rank=rank, world_size=world_size,
                                    seed=SEED), start, None)
    losses = []
    for _ in range(MORE):
        ids, labels = next(data)
        loss = engine(ids, labels=labels)
        engine.backward(loss)
        engine.step()
        t = loss.detach().reshape(1).clone()
        if world_size > 1:
            dist.all_reduce(t)
        losses.append(float(t) / world_size)
    return losses


def _engine(c: dict, world_size: int):
    import ztune

    cfg = config_for(c, world_size)
    cfg["batch"]["micro"] = GLOBAL // world_size
    engine, _, _, _ = ztune.initialize(build(c), cfg)
    return engine


def save_for_reshard(rank: int, world_size: int, c: dict, save_dir: str) -> dict:
    from ztune.runtime.data import batches

    engine = _engine(c, world_size)
    data = batches(corpus(), batch_size=GLOBAL // world_size, seq_len=SEQ, rank=rank, world_size=world_size,
                   seed=SEED)
    for _ in range(SAVE_AT):
        ids, labels = next(data)
        engine.backward(engine(ids, labels=labels))
        engine.step()
    engine.save_checkpoint(save_dir)
    out = {"full": full_states(engine), "state": engine.full_state_dict()}
    out["losses"] = _continue(engine, rank, world_size, start=SAVE_AT)
    return out


def load_resharded(rank: int, world_size: int, c: dict, save_dir: str) -> dict:
    engine = _engine(c, world_size)
    path, _ = engine.load_checkpoint(save_dir)
    assert path is not None
    local = None
    if engine.plan.stage < 3:  # the compute-dtype parameters were refreshed from the loaded masters
        local = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    out = {"full": full_states(engine), "state": engine.full_state_dict(), "local": local,
           "steps": engine.global_steps}
    out["losses"] = _continue(engine, rank, world_size, start=engine.global_steps)
    return out


@pytest.mark.timeout(1500)  # safety net: four spawns (2, 4, 1 and 2 ranks) on the shared 2-core machine
def test_reshard_two_ranks_stage3_to_four_stage1_one_stage0_and_offload(tmp_path):
    save_dir = str(tmp_path / "ckpt")
    saved = run_ranks(save_for_reshard, world_size=2, args=(case(stage=3, model="llama"), save_dir),
                      timeout_s=300)[0]
    for world_size, stage, offload in ((4, 1, "none"), (1, 0, "none"), (2, 2, "cpu")):
        loaded = run_ranks(load_resharded, world_size=world_size,
                           args=(case(stage=stage, model="llama", offload=offload), save_dir), timeout_s=300)
        for r in loaded:
            assert r["steps"] == SAVE_AT
            assert r["full"].keys() == saved["full"].keys()
            for name, states in saved["full"].items():
                for key, v in states.items():
                    assert torch.equal(v, r["full"][name][key]), (world_size, name, key)
            for name, v in (r["local"] or {}).items():
                assert torch.equal(v, saved["state"][name]), (world_size, name)
        for k, v in saved["state"].items():
            assert torch.equal(v, loaded[0]["state"][k]), (world_size, k)
        # Training goes on as the uninterrupted 2-rank run does, up to fp32 reduction order.
        assert loaded[0]["losses"] == pytest.approx(saved["losses"], rel=1e-5), world_size
