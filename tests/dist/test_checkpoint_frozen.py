"""Checkpoints with stage 3's frozen parameters (runtime/construct/shards.py FrozenGroup, runtime/state/frozen.py).

Their module tensors are views of freed buffers between uses; save, load and load_module_state_dict must go
through the shards (they used to read or write the freed views and crash). A run saves after SAVE_AT steps;
a fresh engine built from *another seed* (so its frozen weights differ) loads and trains on: its losses and
final state, frozen weights included, must be bitwise equal to the uninterrupted run's.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.dist

STEPS, SAVE_AT = 4, 2


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                            torch.nn.Linear(8, 2))
    m[0].requires_grad_(False)
    return m


def _engine(seed: int, *, stage: int = 3):
    import ztune

    cfg = {"zero": {"stage": stage}, "precision": "fp32", "batch": {"micro": 2, "grad_accum": 1},
           "optimizer": {"type": "AdamW", "lr": 1e-2}}
    engine, _, _, _ = ztune.initialize(_model(seed), cfg)
    assert len(engine.frozen_groups) == (1 if stage == 3 else 0)
    return engine


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(2, 8, generator=torch.Generator().manual_seed(100 * step + rank))


def _train(engine, rank: int, steps: range) -> list[float]:
    losses = []
    for step in steps:
        loss = engine(_batch(rank, step)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def frozen_cases(rank: int, world_size: int, root: str) -> dict:
    whole = _engine(0)
    first = _train(whole, rank, range(SAVE_AT))
    whole.save_checkpoint(root)
    saved = whole.full_state_dict(rank0_only=False)
    rest = _train(whole, rank, range(SAVE_AT, STEPS))
    final = whole.full_state_dict(rank0_only=False)

    resumed = _engine(1)
    resumed.load_checkpoint(root)
    resumed_losses = _train(resumed, rank, range(SAVE_AT, STEPS))

    loaded = _engine(1)
    result = loaded.load_module_state_dict(final)
    with torch.no_grad():
        probe = loaded(_batch(rank, 99))
        probe_ref = whole(_batch(rank, 99))
    return {"saved": saved, "first": first, "rest": rest, "final": final, "resumed_losses": resumed_losses,
            "resumed_final": resumed.full_state_dict(rank0_only=False), "initial": _model(1).state_dict(),
            "loaded_final": loaded.full_state_dict(rank0_only=False), "missing": list(result.missing_keys),
            "probe": probe, "probe_ref": probe_ref}


@pytest.mark.timeout(600)  # safety net: 3 engines x 2 ranks on the shared 2-core machine
def test_stage3_frozen_exact_resume_and_load_state_dict(tmp_path):
    for r in run_ranks(frozen_cases, world_size=2, args=(str(tmp_path),), timeout_s=300):
        assert r["resumed_losses"] == r["rest"]
        assert not torch.equal(r["initial"]["0.weight"], r["final"]["0.weight"])  # the load really changed it
        for k, v in r["final"].items():
            assert torch.equal(v, r["resumed_final"][k]), k
            assert torch.equal(v, r["loaded_final"][k]), k
        assert r["missing"] == []
        assert torch.equal(r["probe"], r["probe_ref"])
    # The same checkpoint into 1 rank at stage 1, where the frozen weight is a plain module tensor.
    (restaged,) = run_ranks(load_stage1, world_size=1, args=(str(tmp_path),), timeout_s=120)
    for k, v in r["saved"].items():
        assert torch.equal(v, restaged[k]), k


def load_stage1(rank: int, world_size: int, root: str) -> dict:
    engine = _engine(1, stage=1)
    engine.load_checkpoint(root)
    return engine.full_state_dict()
