"""Checkpoints with several optimizer param groups (model_parameters, runtime/compat/optimizers.py): each
group's hyperparameters come back into its own group (they used to be saved from group 0 only and restored
into every group), and a param-group count mismatch is one CheckpointError naming both counts."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.dist

STEPS, SAVE_AT = 4, 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def _engine(*, grouped: bool = True):
    import ztune

    m = _model()
    cfg = {"zero": {"stage": 1}, "precision": "fp32", "batch": {"micro": 2, "grad_accum": 1},
           "optimizer": {"type": "AdamW", "lr": 1e-2, "weight_decay": 0.1}}
    groups = [{"params": [m[0].weight, m[2].weight], "weight_decay": 0.1},
              {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0, "lr": 5e-3}] if grouped else None
    engine, _, _, _ = ztune.initialize(m, cfg, model_parameters=groups)
    return engine


def _train(engine, rank: int, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x = torch.randn(2, 6, generator=torch.Generator().manual_seed(100 * step + rank))
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _hyper(engine) -> list[tuple[float, float]]:
    return [(g["lr"], g["weight_decay"]) for g in engine.optimizer.param_groups]


def group_cases(rank: int, world_size: int, root: str) -> dict:
    from ztune.errors import UserError

    whole = _engine()
    _train(whole, rank, range(SAVE_AT))
    whole.save_checkpoint(root)
    rest = _train(whole, rank, range(SAVE_AT, STEPS))
    resumed = _engine()
    resumed.load_checkpoint(root)
    hyper_after_load = _hyper(resumed)
    resumed_losses = _train(resumed, rank, range(SAVE_AT, STEPS))
    try:
        _engine(grouped=False).load_checkpoint(root)
        mismatch = None
    except UserError as exc:
        mismatch = str(exc)
    return {"rest": rest, "resumed": resumed_losses, "hyper_after_load": hyper_after_load,
            "whole_state": whole.full_state_dict(), "resumed_state": resumed.full_state_dict(),
            "mismatch": mismatch}


@pytest.mark.timeout(300)  # safety net for the shared 2-core machine
def test_param_groups_resume_bitwise(tmp_path):
    (r,) = run_ranks(group_cases, world_size=1, args=(str(tmp_path),), timeout_s=240)
    assert r["hyper_after_load"] == [(1e-2, 0.1), (5e-3, 0.0)]
    assert r["resumed"] == r["rest"]
    for k, v in r["whole_state"].items():
        assert torch.equal(v, r["resumed_state"][k]), k
    assert r["mismatch"] is not None and "saved with 2 optimizer param group(s), this run has 1" in r["mismatch"]
    assert "\n" not in r["mismatch"]


def test_restore_hyper_old_single_dict_and_per_group():
    from ztune.runtime.state.capture import capture_hyper, restore_hyper
    from ztune.runtime.state.files import CheckpointError

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    one = torch.optim.AdamW([a], lr=1e-3)
    restore_hyper(one, {"lr": 0.5, "weight_decay": 0.25})  # the format before per-group saving
    assert (one.param_groups[0]["lr"], one.param_groups[0]["weight_decay"]) == (0.5, 0.25)
    two = torch.optim.AdamW([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2, "weight_decay": 0.0}])
    saved = capture_hyper(two)
    fresh = torch.optim.AdamW([{"params": [a]}, {"params": [b]}], lr=1.0)
    restore_hyper(fresh, saved)
    assert [(g["lr"], g["weight_decay"]) for g in fresh.param_groups] == [(0.1, 0.01), (0.2, 0.0)]
    with pytest.raises(CheckpointError, match="saved with 1 optimizer param group"):
        restore_hyper(fresh, {"lr": 0.5}, where="ck")


# -- the optimizer kind a client optimizer brings (OptimizerPlan.kind) -------------------------------------
def kind_cases(rank: int, world_size: int, root: str) -> dict:
    import json

    import ztune
    from ztune.errors import UserError

    cfg = {"zero": {"stage": 1}, "precision": "fp32", "batch": {"micro": 2, "grad_accum": 1},
           "optimizer": {"type": "AdamW", "lr": 1e-2}}
    m = _model()
    sgd, _, _, _ = ztune.initialize(m, cfg, optimizer=torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    _train(sgd, rank, range(1))
    sgd.save_checkpoint(root, tag="t")
    with open(f"{root}/t/rank00000.json") as f:
        meta = json.load(f)["body"]["optimizer"]
    adam = _engine(grouped=False)
    try:
        adam.load_checkpoint(root)
        error = None
    except UserError as exc:
        error = str(exc)
    m2 = _model()
    sgd2, _, _, _ = ztune.initialize(m2, cfg, optimizer=torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9))
    sgd2.load_checkpoint(root)  # same kind: loads
    return {"name": sgd.optimizer_name(), "adam_name": adam.optimizer_name(), "kind": meta["kind"], "error": error,
            "steps": sgd2.global_steps}


@pytest.mark.timeout(300)  # safety net for the shared 2-core machine
def test_client_optimizer_kind_in_name_metadata_and_load_check(tmp_path):
    (r,) = run_ranks(kind_cases, world_size=1, args=(str(tmp_path),), timeout_s=240)
    assert (r["name"], r["adam_name"], r["kind"]) == ("sgd", "adamw", "SGD")
    assert r["error"] is not None and "saved with optimizer SGD, this run uses AdamW" in r["error"]
    assert "\n" not in r["error"]
    assert r["steps"] == 1


# -- a client scheduler bridged onto the shard optimizer (SchedulerBridge) ---------------------------------
def bridge_cases(rank: int, world_size: int, root: str) -> dict:
    import ztune

    cfg = {"zero": {"stage": 1}, "precision": "fp32", "batch": {"micro": 2, "grad_accum": 1}}

    def engine():
        m = _model()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        e, _, _, _ = ztune.initialize(m, cfg, optimizer=opt,
                                      lr_scheduler=torch.optim.lr_scheduler.ExponentialLR(opt, 0.5))
        return e

    whole = engine()
    _train(whole, rank, range(3))
    whole.save_checkpoint(root)
    rest = _train(whole, rank, range(3, 4))
    resumed = engine()
    resumed.load_checkpoint(root)
    resumed_losses = _train(resumed, rank, range(3, 4))
    return {"lr": resumed.get_lr(), "whole_lr": whole.get_lr(), "rest": rest, "resumed": resumed_losses,
            "whole_state": whole.full_state_dict(), "resumed_state": resumed.full_state_dict()}


@pytest.mark.timeout(300)  # safety net for the shared 2-core machine
def test_bridged_client_scheduler_resumes_its_lr(tmp_path):
    (r,) = run_ranks(bridge_cases, world_size=1, args=(str(tmp_path),), timeout_s=240)
    assert r["lr"] == r["whole_lr"] == [6.25e-5]  # 1e-3 * 0.5**4: it went on from step 3, not from 1e-3
    assert r["resumed"] == r["rest"]
    for k, v in r["whole_state"].items():
        assert torch.equal(v, r["resumed_state"][k]), k
