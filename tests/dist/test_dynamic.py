"""Parity when ranks do different things between steps: data-dependent routing (MoE: each rank runs its own
subset of experts, of unequal sizes; a parameter used on one rank only), several backward calls before one
step, and evaluation forwards whose count differs by rank (stage 3).

Reference: one process, torch.optim, on the mean over ranks of each rank's loss, summed over the backward
calls of a step (torch's accumulation). Every rank's inputs and routes are a function of (rank, step, call),
so the reference rebuilds them. fp32 within 1e-5 relative, as in tests/dist/test_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.dist

SEED, HIDDEN = 11, 8
FP32_RTOL = 1e-5
ALL_SHARED = {"ZTUNE_SHM_MIN_BYTES": "0"}
GLOO_ONLY = {"ZTUNE_SHM": "0"}


# -- models ---------------------------------------------------------------------------------------------------
class FlatMoE(nn.Module):
    """The issue's model: `inp`, then the experts of this rank's route, each h = tanh(expert(h))."""

    def __init__(self, bias=(True, True)):
        super().__init__()
        torch.manual_seed(SEED)
        self.inp = nn.Linear(HIDDEN, HIDDEN)
        # bias False: an expert of the same type and another size (64 parameters instead of 72)
        self.experts = nn.ModuleList([nn.Linear(HIDDEN, HIDDEN, bias=b) for b in bias])

    def forward(self, x, route):
        h = torch.tanh(self.inp(x))
        for e in route:
            h = torch.tanh(self.experts[e](h))
        return h.square().mean()


class Block(nn.Module):
    def __init__(self, widths):
        super().__init__()
        self.inp = nn.Linear(HIDDEN, HIDDEN)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(HIDDEN, w), nn.Tanh(), nn.Linear(w, HIDDEN))
                                      for w in widths])
        self.rare = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, h, route, rare):
        h = torch.tanh(self.inp(h))
        for e in route:
            h = h + self.experts[e](h)
        return torch.tanh(self.rare(h)) if rare else h


class BlockMoE(nn.Module):
    """Two blocks (the stage-3 units), each with experts of unequal widths and a parameter (`rare`) that
    only some ranks and steps use."""

    def __init__(self, widths=(4, 12, 8)):
        super().__init__()
        torch.manual_seed(SEED)
        self.blocks = nn.ModuleList([Block(widths) for _ in range(2)])
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x, routes, rare):
        h = x
        for block, route in zip(self.blocks, routes, strict=True):
            h = block(h, route, rare)
        return self.head(h).square().mean()


class Mlp(nn.Module):
    """The issue's second model: Linear(8, 8) -> Tanh -> Linear(8, 1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(SEED)
        self.net = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))

    def forward(self, x):
        return self.net(x).square().mean()


# -- cases: model, per-(rank, step, call) forward arguments, optimizer ----------------------------------------
def inputs(rank: int, step: int, call: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + call)
    return torch.randn(3, HIDDEN, generator=g)


def forward_args(c: dict, rank: int, step: int, call: int) -> tuple:
    x = inputs(rank, step, call)
    if c["model"] == "flat":
        return x, c["routes"][rank % len(c["routes"])]
    if c["model"] == "mlp":
        return (x,)
    # BlockMoE: routes differ by rank, step and call; some ranks use no expert in a block; `rare` only on
    # rank 1 at even steps.
    num = 3
    k = (rank + step + call) % (num + 1)
    routes = [list(range(k)), [(rank + 2 * step + call) % num] if (rank + step) % 3 else []]
    return x, routes, rank == 1 and step % 2 == 0


def build(c: dict) -> nn.Module:
    if c["model"] == "flat":
        return FlatMoE(c.get("bias", (True, True)))
    return Mlp() if c["model"] == "mlp" else BlockMoE()


def config(c: dict) -> dict:
    opt = {"type": c["opt"], "lr": c["lr"], "weight_decay": 0.0}
    if c["opt"] == "SGD":
        opt["momentum"] = c.get("momentum", 0.0)
    return {"zero": {"stage": c["stage"], "reduce_bucket_numel": c["bucket"]}, "optimizer": opt,
            "batch": {"micro": 1, "grad_accum": c["accum"]}, "precision": "fp32"}


def case(model, stage, *, steps=1, calls=1, accum=1, opt="SGD", lr=1.0, bucket=72, **kw) -> dict:
    return dict(model=model, stage=stage, steps=steps, calls=calls, accum=accum, opt=opt, lr=lr, bucket=bucket, **kw)


def _run_case(rank: int, world_size: int, c: dict) -> dict:
    import ztune

    model = build(c)
    engine, *_ = ztune.initialize(model, config(c), units=c.get("units"))
    engine.train()
    for step in range(c["steps"]):
        if c.get("evals"):  # no-grad forwards, as many as this rank's entry says
            engine.eval()
            with torch.no_grad():
                for i in range(c["evals"][rank % len(c["evals"])]):
                    engine(*forward_args(c, rank, step, 100 + i))
            engine.train()
        for call in range(c["calls"] * c["accum"]):
            engine.backward(engine(*forward_args(c, rank, step, call)))
            if c["calls"] == 1 or call % c["calls"] == c["calls"] - 1:
                engine.step()
    local = None
    if c["stage"] < 3:  # replicas must agree exactly
        local = torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])
    state = engine.full_state_dict()
    if c.get("evals_after"):  # no-grad forwards after training, as many as this rank's entry says
        engine.eval()
        with torch.no_grad():
            for i in range(c["evals_after"][rank % len(c["evals_after"])]):
                engine(*forward_args(c, rank, c["steps"], 100 + i))
    return {"state": state, "local": local}


def run_cases(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    return [_run_case(rank, world_size, c) for c in cases]


def reference(c: dict, world_size: int) -> dict:
    model = build(c)
    if c["opt"] == "SGD":
        opt = torch.optim.SGD(model.parameters(), lr=c["lr"], momentum=c.get("momentum", 0.0))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=0.0)
    for step in range(c["steps"]):
        for call in range(c["calls"] * c["accum"]):
            loss = sum(model(*forward_args(c, r, step, call)) for r in range(world_size)) / world_size
            (loss / c["accum"]).backward()
        for p in model.parameters():  # the engine steps every parameter, with a zero gradient where none came
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=False)
    return model.state_dict()


# (case, world size) -> reference(): the shared-memory and gloo-only runs at one world size share most cases;
# compute each single-process reference once per session (nobody writes to the tensors).
_REFERENCES: dict[tuple[str, int], dict] = {}


def check(c: dict, results: list[dict], world_size: int) -> None:
    key = (repr(sorted(c.items())), world_size)
    if key not in _REFERENCES:
        _REFERENCES[key] = reference(c, world_size)
    ref = _REFERENCES[key]
    got = results[0]["state"]
    assert set(got) == set(ref)
    for k in ref:
        err = float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
        assert err < FP32_RTOL, (k, err, c)
    if results[0]["local"] is not None:
        for r in results[1:]:
            assert torch.equal(r["local"], results[0]["local"]), "replicas differ"


# The issue's inputs (one step, SGD lr 1), at every stage, and the parity grid: BlockMoE over several steps and
# backward calls (Adam, and SGD with momentum), with gradient accumulation.
ISSUE = (
    [case("flat", s, routes=[[0], [1]]) for s in range(4)]
    + [case("flat", s, routes=[[0, 1], [1, 0]]) for s in range(4)]
    + [case("flat", s, routes=[[0, 1], [0]], bias=(True, False)) for s in range(4)]
    + [case("mlp", s, calls=2, lr=0.1) for s in range(4)]
)
GRID = (
    [case("block", s, steps=3, calls=2, opt="AdamW", lr=1e-2, bucket=60) for s in range(4)]
    + [case("block", s, steps=2, accum=2, calls=2, momentum=0.9, lr=0.1, bucket=200) for s in range(4)]
    + [case("block", s, steps=2, opt="AdamW", lr=1e-2, bucket=10**6) for s in (0, 2)]
)
# Stage 3 with a gloo-only transport needs every rank to gather the same units in the same order: the blocks
# are units (every rank calls both), and the flat model is gathered as a whole (units=[]).
GLOO_STAGE3 = [case("flat", 3, routes=[[0], [1]], units=[]), case("flat", 3, routes=[[0, 1], [0]], bias=(True, False),
                                                                  units=[])]
# Diverging evaluation at stage 3: with shared memory the gathers need no partner, so it works.
SHARED_ONLY = [case("block", 3, steps=2, calls=1, opt="AdamW", lr=1e-2, evals=[3, 2])]


TRANSPORTS = {"shm": ALL_SHARED, "gloo": GLOO_ONLY}


def _cases_for(transport: str, world_size: int) -> list[dict]:
    """The issue's inputs are 2-rank inputs; 4 ranks run the grid (which covers every stage) to save time.
    Stage 3 over gloo only where every rank calls the same units (GLOO_STAGE3 passes units=[], a plain list:
    module objects cannot travel to the ranks)."""
    base = (ISSUE if world_size == 2 else []) + GRID
    if transport == "shm":
        return base + SHARED_ONLY
    return [c for c in base if c["stage"] < 3 or c["model"] == "block"] + GLOO_STAGE3


@pytest.fixture(scope="module", params=[(2, "shm"), (2, "gloo"), (4, "shm"), (4, "gloo")],
                ids=lambda p: f"{p[0]}ranks-{p[1]}")
def results(request):
    n, transport = request.param
    cases = _cases_for(transport, n)
    return n, cases, run_ranks(run_cases, world_size=n, args=(cases,), timeout_s=900, env=TRANSPORTS[transport])


def test_dynamic_parity(results):
    n, cases, per_rank = results
    for i, c in enumerate(cases):
        check(c, [r[i] for r in per_rank], n)


# -- stage 3 gathers through gloo that cannot pair up: one clear error on every rank, in bounded time ----------
def _diverge(rank: int, world_size: int, c: dict) -> str:
    """Run the case; return the GatherDivergedError message (the test wants every rank's), or 'completed'."""
    from ztune.runtime.lockstep import GatherDivergedError

    try:
        _run_case(rank, world_size, c)
    except GatherDivergedError as e:
        return str(e)
    return "completed"


def _assert_diverged(message: str) -> None:
    assert message.startswith("ztune stage 3:"), message
    assert "\n" not in message
    for remedy in ("units=", "synced_gpus=True", "ZTUNE_GATHER_TIMEOUT_S"):
        assert remedy in message, (remedy, message)


@pytest.mark.parametrize("n", [2, 4])
def test_stage3_diverging_eval_on_gloo_fails_on_every_rank(n):
    """The issue's input: after engine.eval(), rank 0 runs 3 no-grad forwards and the others 2, then a step.
    Before: a silent hang until gloo's 30-minute timeout."""
    c = case("block", 3, steps=1, opt="AdamW", lr=1e-2, evals=[3] + [2] * (n - 1))
    messages = run_ranks(_diverge, world_size=n, args=(c,), timeout_s=600,
                         env={**GLOO_ONLY, "ZTUNE_GATHER_TIMEOUT_S": "30"})
    for m in messages:
        _assert_diverged(m)
        assert "no-grad forward (evaluation)" in m and "training forward" in m, m


def test_stage3_gather_without_partner_times_out():
    """Rank 0 evaluates once more after rank 1 has finished: its gather has no partner; it fails within the
    configured gather timeout (a wide net here: the test's own limit), not gloo's 30 minutes."""
    c = case("block", 3, steps=1, opt="AdamW", lr=1e-2, evals_after=[1, 0])
    messages = run_ranks(_diverge, world_size=2, args=(c,), timeout_s=600,
                         env={**GLOO_ONLY, "ZTUNE_GATHER_TIMEOUT_S": "5"})
    assert messages[1] == "completed"
    _assert_diverged(messages[0])


@pytest.mark.parametrize("routes", [[[0], [1]], [[0, 1], [1, 0]]])
def test_stage3_experts_as_units_on_gloo_fail_with_the_remedy(routes):
    """The issue's MoE at stage 3 over gloo: the default units are the experts, which ranks call differently.
    Before: wrong expert parameters, silently. (units=[] makes it right: GLOO_STAGE3 above.)"""
    c = case("flat", 3, routes=routes)
    messages = run_ranks(_diverge, world_size=2, args=(c,), timeout_s=600,
                         env={**GLOO_ONLY, "ZTUNE_GATHER_TIMEOUT_S": "30"})
    for m in messages:
        _assert_diverged(m)
        assert "'experts.0'" in m or "'experts.1'" in m, m


@pytest.mark.parametrize("raw", ["0", "-1", "soon", "nan", "inf"])
def test_gather_timeout_env_rejects_bad_values(monkeypatch, raw):
    from ztune.errors import ConfigError
    from ztune.runtime.lockstep import TIMEOUT_ENV, timeout_from_env

    monkeypatch.setenv(TIMEOUT_ENV, raw)
    with pytest.raises(ConfigError, match=TIMEOUT_ENV):
        timeout_from_env()
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert timeout_from_env() == 2.5
