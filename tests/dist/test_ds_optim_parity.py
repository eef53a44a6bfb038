"""DeepSpeed 0.19.8 on 2 CPU ranks is the reference for what a DeepSpeed config and DeepSpeed-style
`initialize` arguments train: after 5 steps (fp32, ZeRO stage 2 on both sides) the parameters agree within
1e-6 relative for
- a WarmupLR `scheduler` block (issue 11 input 3), with the lr sequence equal;
- `"optimizer": {"type": "Adam", "params": {"weight_decay": 0.1}}` with adam_w_mode true (DeepSpeed's default:
  decoupled decay) and false (L2), and bias_correction false (input 4);
- parameter groups with their own weight_decay and lr (input 10), given as `model_parameters` and as a client
  torch.optim.AdamW.
The same DeepSpeed config dict goes to both (DeepSpeed reads `torch_adam: true` so that it uses torch's Adam
instead of JIT-building its FusedAdam op; ztune ignores that implementation switch). DeepSpeed's Adam without
bias correction exists only as its C++ ops, so that case gives DeepSpeed a client optimizer with the formula of
deepspeed/ops/csrc/includes/cpu_adam.h (bias corrections 1, step size lr, AdamW decay p -= lr * wd * p).

Then parameter groups at ZeRO stages 0-3 against one process running torch.optim on the same global batches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.helpers.deepspeed_cpu import DsCpuAdamFormula
from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.dist

WORLD_SIZE, STEPS, MICRO, WIDTH = 2, 5, 4, 16
PARAM_RTOL = 1e-6
LR = 1e-2


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return nn.functional.mse_loss(x, y)


def _model() -> MLP:
    torch.manual_seed(0)
    return MLP()


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(MICRO, WIDTH, generator=g), torch.randn(MICRO, WIDTH, generator=g)


def _groups(model: nn.Module, *, decay: float = 0.01, decay_lr: float | None = None) -> list[dict]:
    """The BERT/GPT split: weights decay, biases do not (here also with their own lr)."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    first = {"params": weights, "weight_decay": decay}
    if decay_lr is not None:
        first["lr"] = decay_lr
    return [first, {"params": biases, "weight_decay": 0.0}]


def _ds_config(optimizer: dict | None, *, stage: int = 2, scheduler: dict | None = None) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
    if optimizer is not None:
        cfg["optimizer"] = optimizer
    if scheduler is not None:
        cfg["scheduler"] = scheduler
    return cfg


WARMUP = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 100}}
FAST_WARMUP = {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 2e-2, "warmup_num_steps": 4,
                                              "warmup_type": "linear"}}


def _adam(**params) -> dict:
    return {"type": "Adam", "params": {"lr": LR, "torch_adam": True, **params}}


# name -> (DeepSpeed config, how initialize is called). "groups": model_parameters=_groups(model, ...);
# "client": a client torch.optim.AdamW over those groups (ztune side only; its DeepSpeed twin is "groups").
DS_CASES = {
    "warmup-input3": (_ds_config(_adam(weight_decay=0.0), scheduler=WARMUP), None),
    "warmup-fast": (_ds_config(_adam(weight_decay=0.0), scheduler=FAST_WARMUP), None),
    "adam-wd-adamw-mode": (_ds_config(_adam(weight_decay=0.1)), None),
    "adam-wd-l2-mode": (_ds_config(_adam(weight_decay=0.1, adam_w_mode=False)), None),
    "adam-no-bias-correction": (_ds_config(_adam(weight_decay=0.1, bias_correction=False)), "formula"),
    "param-groups-input10": (_ds_config(_adam(weight_decay=0.05)), "groups"),
}


def _train(engine, rank: int, module: nn.Module) -> tuple[list[float], list[list[float]]]:
    losses, lrs = [], []
    for step in range(STEPS):
        lrs.append([g["lr"] for g in engine.optimizer.param_groups])
        loss = engine(*_batch(step, rank))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses, lrs


def _run_deepspeed(rank: int, name: str) -> dict:
    from tests.helpers.deepspeed_cpu import init_deepspeed_distributed

    deepspeed = init_deepspeed_distributed()
    config, how = copy.deepcopy(DS_CASES[name])
    model = _model()
    kwargs: dict = {}
    if how == "groups":
        kwargs["model_parameters"] = _groups(model, decay_lr=2 * LR)
    elif how == "formula":
        config = {k: v for k, v in config.items() if k != "optimizer"}
        kwargs["optimizer"] = DsCpuAdamFormula(model.parameters(), lr=LR, weight_decay=0.1, bias_correction=False)
    else:
        kwargs["model_parameters"] = model.parameters()
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, **kwargs)
    losses, lrs = _train(engine, rank, model)
    params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    del engine
    return {"params": params, "losses": losses, "lrs": lrs}


def _run_ztune(rank: int, name: str) -> dict:
    import ztune

    config, how = copy.deepcopy(DS_CASES[name.removesuffix("+client")])
    model = _model()
    kwargs: dict = {}
    if name.endswith("+client"):
        kwargs["optimizer"] = torch.optim.AdamW(_groups(model, decay_lr=2 * LR), lr=LR, weight_decay=0.05)
        config = {k: v for k, v in config.items() if k != "optimizer"}
    elif how == "groups":
        kwargs["model_parameters"] = _groups(model, decay_lr=2 * LR)
    engine, optimizer, _, scheduler = ztune.initialize(model, config, **kwargs)
    losses, lrs = _train(engine, rank, model)
    state = engine.full_state_dict(rank0_only=False)
    return {"params": {n: state[n].float() for n, _ in model.named_parameters()}, "losses": losses, "lrs": lrs,
            "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "optimizer": type(optimizer).__name__, "groups": len(optimizer.param_groups)}


ZTUNE_CASES = list(DS_CASES) + ["param-groups-input10+client"]


def _both(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    out = {}
    for name in DS_CASES:
        out[("deepspeed", name)] = _run_deepspeed(rank, name)
        dist.barrier()
    for name in ZTUNE_CASES:
        out[("ztune", name)] = _run_ztune(rank, name)
        dist.barrier()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def ds_results() -> dict:
    return run_ranks(_both, world_size=WORLD_SIZE, timeout_s=900)[0]


@pytest.mark.parametrize("name", ZTUNE_CASES)
def test_parameters_match_deepspeed(ds_results, name):
    ref = ds_results[("deepspeed", name.removesuffix("+client"))]
    got = ds_results[("ztune", name)]
    init = {n: p.detach().float() for n, p in _model().named_parameters()}
    assert set(got["params"]) == set(ref["params"])
    moved = max(_rel(ref["params"][n], init[n]) for n in init)
    assert moved > 1e-4, f"DeepSpeed's parameters barely moved ({moved}): the case would not show a difference"
    for n in ref["params"]:
        assert _rel(got["params"][n], ref["params"][n]) < PARAM_RTOL, (n, _rel(got["params"][n], ref["params"][n]))
        # The update itself (not just the parameter) within 1e-4: decay and bias-correction errors move it more.
        assert _rel(got["params"][n] - init[n], ref["params"][n] - init[n]) < 1e-4, n
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    assert [lr for step in got["lrs"] for lr in step] == \
        pytest.approx([lr for step in ref["lrs"] for lr in step], rel=1e-12, abs=0)


def test_what_initialize_returns(ds_results):
    assert ds_results[("ztune", "warmup-input3")]["scheduler"] == "WarmupLR"
    assert ds_results[("ztune", "adam-wd-adamw-mode")]["scheduler"] is None
    # DeepSpeed's lr starts at warmup_min_lr (0) and rises logarithmically.
    lrs = [lr[0] for lr in ds_results[("ztune", "warmup-input3")]["lrs"]]
    assert lrs[0] == 0.0 and lrs[1] == 0.0 and 0 < lrs[2] < lrs[3] < lrs[4] < 1e-3
    assert ds_results[("ztune", "param-groups-input10")]["groups"] == 2
    assert ds_results[("ztune", "param-groups-input10+client")]["groups"] == 2


# -- parameter groups at every stage, against single-process torch ------------------------------------------

STAGE_CASES = [(stage, kind) for stage in (0, 1, 2, 3) for kind in ("AdamW", "SGD")] + [(2, "offload")]


def _stage_config(stage: int, kind: str) -> dict:
    opt = {"type": "SGD" if kind == "SGD" else "AdamW", "lr": LR, "weight_decay": 0.01}
    if kind == "SGD":
        opt["momentum"] = 0.9
    return {"zero": {"stage": stage, "offload_optimizer": "cpu" if kind == "offload" else "none",
                     "reduce_bucket_numel": 200},  # small buckets: several flat groups, each split by group
            "precision": "fp32", "batch": {"micro": MICRO, "grad_accum": 1}, "optimizer": opt}


def _stage_groups(model: nn.Module, kind: str) -> list[dict]:
    groups = _groups(model, decay=0.1, decay_lr=3 * LR)
    if kind == "SGD":
        groups[1]["momentum"] = 0.5
    return groups


def _train_stages(rank: int, world_size: int) -> dict:
    import ztune

    out = {}
    for stage, kind in STAGE_CASES:
        model = _model()
        engine, optimizer, _, _ = ztune.initialize(model, _stage_config(stage, kind),
                                                   model_parameters=_stage_groups(model, kind))
        for step in range(STEPS):
            engine.backward(engine(*_batch(step, rank)))
            engine.step()
        state = engine.full_state_dict(rank0_only=False)
        out[(stage, kind)] = ({n: state[n].float() for n, _ in model.named_parameters()},
                              [(len(g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups])
    return out


def _reference(kind: str) -> dict:
    model = _model()
    groups = _stage_groups(model, kind)
    if kind == "SGD":
        opt = torch.optim.SGD(groups, lr=LR, momentum=0.9, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(groups, lr=LR, weight_decay=0.01)
    for step in range(STEPS):
        batches = [_batch(step, r) for r in range(WORLD_SIZE)]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().float() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def stage_results() -> dict:
    return run_ranks(_train_stages, world_size=WORLD_SIZE, timeout_s=600)[0]


@pytest.mark.parametrize(("stage", "kind"), STAGE_CASES)
def test_param_groups_match_torch_at_every_stage(stage_results, stage, kind):
    got, groups = stage_results[(stage, kind)]
    want = _reference(kind)
    init = {n: p.detach().float() for n, p in _model().named_parameters()}
    for n in want:
        assert _rel(got[n], want[n]) < 1e-5, (n, _rel(got[n], want[n]))
        assert _rel(got[n] - init[n], want[n] - init[n]) < 1e-4, n
    # Each shard-optimizer group carries one user group's hyper-parameters (split, never mixed).
    assert {(lr, wd) for _, lr, wd in groups} == {(3 * LR, 0.1), (LR, 0.0)}
    # The groups' own hyper-parameters matter: a run with the config's values everywhere would differ.
    plain = _model()
    opt = torch.optim.AdamW(plain.parameters(), lr=LR, weight_decay=0.01) if kind != "SGD" else \
        torch.optim.SGD(plain.parameters(), lr=LR, momentum=0.9, weight_decay=0.01)
    for step in range(STEPS):
        batches = [_batch(step, r) for r in range(WORLD_SIZE)]
        plain(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])).backward()
        opt.step()
        opt.zero_grad()
    name = "layers.0.weight"
    assert _rel(dict(plain.named_parameters())[name].detach(), want[name]) > 1e-3
