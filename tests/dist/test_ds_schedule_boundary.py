"""Against DeepSpeed 0.19.8 on the same 2 gloo ranks, one spawn per framework (configs without
gradient_clipping: DeepSpeed's default of 1.0 applies to both):
- `scheduler.type` naming a torch scheduler (OneCycleLR, which also cycles Adam's beta1): DeepSpeed builds it
  from torch.optim.lr_scheduler and steps it after each optimizer step; ztune gives the same lr and beta1 at
  every step (1e-12 relative) and the same parameters (fp32, 1e-6 relative) at stage 0 and at stage 2, where
  DeepSpeed itself raises a TypeError (its ZeRO optimizer is not a torch Optimizer), so stage 2 is compared
  with DeepSpeed's stage 0;
- a loop that drives the boundary with set_gradient_accumulation_boundary, irregularly (forced boundaries
  after 1 and 4 micro-steps with accumulation 3, then back to counting): is_gradient_accumulation_boundary,
  micro_steps, global_steps, global_samples and was_step_applied after every step() call, and the parameters,
  equal DeepSpeed's; a checkpoint saved right after a forced boundary is accepted.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.deepspeed_ref import import_deepspeed
from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.dist

MICRO = 2
LR_RTOL = 1e-12
PARAM_RTOL = 1e-6
SCHEDULER = {"type": "OneCycleLR", "params": {"max_lr": 0.05, "total_steps": 8, "pct_start": 0.25}}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def _batch(i: int, rank: int):
    gen = torch.Generator().manual_seed(1000 * rank + i)
    return torch.randn(MICRO, 6, generator=gen), torch.randn(MICRO, 1, generator=gen)


def _loss(engine, i: int, rank: int):
    x, y = _batch(i, rank)
    return ((engine(x) - y) ** 2).mean()


def _config(stage: int, accum: int, scheduler: dict | None) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": accum,
           "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
           "steps_per_print": 10**9}
    if scheduler is not None:
        cfg["scheduler"] = scheduler
    return cfg


def _params(engine) -> dict:
    return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def _schedule_run(ds, rank: int, stage: int):
    """(lr, beta1) after initialize and after each of 6 optimizer steps, and the parameters; or the error."""
    model = _model()
    try:
        engine, _, _, scheduler = ds.initialize(model=model, model_parameters=model.parameters(),
                                                config=_config(stage, 1, SCHEDULER))
    except TypeError as err:
        return f"TypeError: {err}"
    assert type(scheduler).__name__ == SCHEDULER["type"]
    trace = [(engine.get_lr()[0], engine.optimizer.param_groups[0]["betas"][0])]
    for i in range(6):
        engine.backward(_loss(engine, i, rank))
        engine.step()
        trace.append((engine.get_lr()[0], engine.optimizer.param_groups[0]["betas"][0]))
    return trace, _params(engine)


def _boundary_run(ds, rank: int, save_dir: str):
    model = _model()
    engine, *_ = ds.initialize(model=model, model_parameters=model.parameters(), config=_config(1, 3, None))
    log = []

    def call(i: int):
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(_loss(engine, i, rank))
        engine.step()
        log.append((i, boundary, engine.micro_steps, engine.global_steps, engine.global_samples,
                    engine.was_step_applied()))

    engine.set_gradient_accumulation_boundary(True)
    call(0)  # a boundary after one micro-step
    engine.save_checkpoint(save_dir)  # nothing is pending, though 1 is not a multiple of 3
    engine.set_gradient_accumulation_boundary(None)
    for i in range(1, 4):  # counting again: DeepSpeed's windows end where (micro_steps + 1) % 3 == 0
        call(i)
    engine.set_gradient_accumulation_boundary(False)
    for i in range(4, 7):
        call(i)
    engine.set_gradient_accumulation_boundary(True)
    call(7)  # a boundary after four micro-steps
    engine.set_gradient_accumulation_boundary(None)
    for i in range(8, 12):
        call(i)
    return log, _params(engine)


def _run(rank: int, world_size: int, system: str, save_dir: str):
    if system == "deepspeed":
        ds = import_deepspeed()
        ds.init_distributed(dist_backend="gloo", verbose=False)
    else:
        import ztune as ds

        ds.init_distributed()
    schedules = {stage: _schedule_run(ds, rank, stage) for stage in (0, 2)}
    return schedules, _boundary_run(ds, rank, f"{save_dir}/{system}")


def test_torch_scheduler_and_forced_boundaries_match_deepspeed(tmp_path):
    pytest.importorskip("deepspeed")
    ours = run_ranks(_run, world_size=2, args=("ztune", str(tmp_path)), timeout_s=300)
    theirs = run_ranks(_run, world_size=2, args=("deepspeed", str(tmp_path)), timeout_s=300)
    for (sched_ours, (log_ours, p_ours)), (sched_ds, (log_ds, p_ds)) in zip(ours, theirs, strict=True):
        # DeepSpeed manages a torch scheduler only at stage 0; ztune at every stage, with the same values.
        assert sched_ds[2].startswith("TypeError") and "is not an Optimizer" in sched_ds[2]
        trace_ds, params_ds = sched_ds[0]
        assert len({lr for lr, _ in trace_ds}) > 3 and len({b for _, b in trace_ds}) > 3  # lr and beta1 move
        for stage in (0, 2):
            trace, params = sched_ours[stage]
            assert [v for pair in trace for v in pair] == pytest.approx(
                [v for pair in trace_ds for v in pair], rel=LR_RTOL, abs=0), f"stage {stage}"
            for name, value in params_ds.items():
                torch.testing.assert_close(params[name], value, rtol=PARAM_RTOL, atol=1e-7, msg=f"{stage} {name}")
        assert log_ours == log_ds
        assert sum(applied for *_, applied in log_ds) == 5
        for name, value in p_ds.items():
            torch.testing.assert_close(p_ours[name], value, rtol=PARAM_RTOL, atol=1e-7, msg=name)
            assert not torch.equal(value, _model().state_dict()[name])  # it trained
    assert (tmp_path / "ztune" / "latest").exists()
