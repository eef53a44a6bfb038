"""Parity: the sharded runtime (ZeRO stages 0-3, 2 and 4 gloo ranks) against one process running
torch.optim on the unsharded model with the same global batches.

Each rank gets rows [r*b, (r+1)*b) of the global batch (runtime/data.py `batches`), the reference the whole
batch, so both optimise the same objective; the only differences are floating-point summation orders
(rank-local means, then a sum over ranks). All cases of one world size run in a single spawn: each spawn
of 4 processes costs seconds of imports on a 2-core machine.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.spawn import run_ranks
from ztune.specs import Architecture, ModelSpec

pytestmark = pytest.mark.dist

GPT2 = ModelSpec(name="tiny-gpt2", architecture=Architecture.GPT2, vocab_size=64, hidden_size=32, num_layers=2,
                 num_heads=4, num_kv_heads=4, intermediate_size=64, max_seq_len=16, tied_embeddings=True)
LLAMA = ModelSpec(name="tiny-llama", architecture=Architecture.LLAMA, vocab_size=64, hidden_size=32,
                  num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, max_seq_len=16)
SPECS = {"gpt2": GPT2, "llama": LLAMA}
MICRO, SEQ, STEPS, SEED, LR = 2, 16, 5, 7, 3e-3
# fp32: only summation order differs (~1e-7 relative per gradient element), and Adam's update is a smooth
# function of the gradient wherever the gradient is not ~0.
FP32_RTOL = 1e-5
# 16-bit: forward and backward run in bf16 (8-bit mantissa, unit roundoff 2^-9 ~ 2e-3) or fp16 (11-bit,
# 2^-12), from an fp32 master that starts at the exact fp32 weights. Adam normalises each update, so the
# per-element update error is about the gradient's relative error. The metric is ||master - ref|| /
# ||ref - init||: the error relative to how far training moved the weights. A single process running the
# same 16-bit recipe (no distribution at all) measures bf16 0.034 (gpt2) / 0.030 (llama), fp16 0.010 / 0.012,
# so these are precision, not sharding; the tolerances leave ~3x headroom. A real bug (a missing reduction,
# a wrong shard, a dropped micro-step) is off by a whole update: ratio ~1.
BF16_UPDATE_RTOL = 0.1
FP16_UPDATE_RTOL = 0.03


def case(model="gpt2", stage=0, precision="fp32", accum=1, clip=0.0, optimizer="AdamW", offload="none",
         overflow=False, unused=False, ckpt="none", sometimes=False) -> dict:
    return dict(model=model, stage=stage, precision=precision, accum=accum, clip=clip, optimizer=optimizer,
                offload=offload, overflow=overflow, unused=unused, ckpt=ckpt, sometimes=sometimes)


def build(c: dict):
    """The case's model; `unused` adds a parameter that forward never touches, `sometimes` one that only the
    even optimizer steps use (`extra_loss`): its buffer slot must not carry an old gradient into a step
    where it gets none."""
    from ztune.runtime.models import build_model

    model = build_model(SPECS[c["model"]], seed=SEED)
    if c["unused"]:
        torch.manual_seed(SEED)
        model.unused = torch.nn.Linear(8, 8)
    if c["sometimes"]:
        torch.manual_seed(SEED + 1)
        model.sometimes = torch.nn.Linear(4, 4, bias=False)
    return model


def extra_loss(c: dict, model, step: int, loss):
    if not c["sometimes"] or step % 2:
        return loss
    return loss + model.sometimes.weight.float().square().sum() * 0.1


def config_for(c: dict, world_size: int) -> dict:
    opt = {"type": c["optimizer"], "lr": LR, "weight_decay": 0.01}
    if c["optimizer"] == "SGD":
        opt["momentum"] = 0.9
    return {"zero": {"stage": c["stage"], "offload_optimizer": c["offload"], "reduce_bucket_numel": 3000},
            "precision": c["precision"], "batch": {"micro": MICRO, "grad_accum": c["accum"]},
            "optimizer": opt, "gradient_clipping": c["clip"], "activations": {"checkpointing": c["ckpt"]},
            # hysteresis 1: the one injected overflow halves the scale at once (DeepSpeed's default, 2, would
            # keep 2**16 for one more step, which then overflows on its own in fp16 on 4 ranks).
            "loss_scaling": {"hysteresis": 1}}


def corpus():
    from ztune.runtime.data import synthetic_corpus

    return synthetic_corpus(vocab_size=64, num_tokens=64 * 1024, seed=SEED)


def _train_case(rank: int, world_size: int, c: dict) -> dict:
    import ztune
    from ztune.runtime.data import batches

    model = build(c)
    engine, _, _, _ = ztune.initialize(model, config_for(c, world_size))
    data = batches(corpus(), batch_size=MICRO, seq_len=SEQ, rank=rank, world_size=world_size, seed=SEED)
    norms = []
    for step in range(STEPS):
        for micro in range(c["accum"]):
            ids, labels = next(data)
            loss = extra_loss(c, engine.module, step, engine(ids, labels=labels))
            if c["overflow"] and step == 0 and micro == 0 and rank == 0:
                loss = loss * math.inf  # one rank overflows: every rank must skip (all-reduced flag)
            engine.backward(loss)
            engine.step()
        norms.append(engine.last_grad_norm)
    local = None
    if c["stage"] < 3:  # every rank holds the full compute-dtype parameters: they must agree exactly
        local = torch.cat([p.detach().float().reshape(-1) for p in engine.module.parameters()])
    return {"state": engine.full_state_dict(), "local": local, "skipped": engine.skipped_steps,
            "steps": engine.global_steps, "norms": norms, "scale": engine.scaler.scale}


def train_cases(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    return [_train_case(rank, world_size, c) for c in cases]


# (case, world size) -> reference(): the shared-memory, gloo-only and mixed-transport runs of one case at 2 ranks
# (and test_offload's, test_gpu's) compare against the same single-process run; compute it once per session.
_REFERENCES: dict[tuple, tuple[dict, dict, list[float]]] = {}


def cached_reference(c: dict, world_size: int) -> tuple[dict, dict, list[float]]:
    """reference(c, world_size), computed once per session; the dicts are fresh copies (callers pop from them),
    the tensors shared (nobody writes to them)."""
    key = (tuple(sorted(c.items())), world_size)
    if key not in _REFERENCES:
        _REFERENCES[key] = reference(c, world_size)
    init, final, norms = _REFERENCES[key]
    return dict(init), dict(final), list(norms)


def reference(c: dict, world_size: int) -> tuple[dict, dict, list[float]]:
    """(initial state, final state, clip norms) of torch.optim on one process, global batch per micro-step."""
    from ztune.runtime.data import batches

    model = build(c)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    if c["optimizer"] == "SGD":
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    data = batches(corpus(), batch_size=MICRO * world_size, seq_len=SEQ, rank=0, world_size=1, seed=SEED)
    norms = []
    for step in range(STEPS):
        for _ in range(c["accum"]):
            ids, labels = next(data)
            if c["overflow"] and step == 0:
                continue  # the engine skipped this step
            (extra_loss(c, model, step, model(ids, labels=labels)) / c["accum"]).backward()
        if c["overflow"] and step == 0:
            continue
        if c["clip"]:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), c["clip"])))
        opt.step()
        # A flat-buffer engine steps every parameter, with a zero gradient where none arrived (as DDP does);
        # torch.optim skips a None .grad, so keep zeros for the parameter that some steps do not use.
        opt.zero_grad(set_to_none=not c["sometimes"])
    return init, model.state_dict(), norms


def rel(delta: torch.Tensor, ref: torch.Tensor) -> float:
    return float(delta.norm() / ref.norm().clamp_min(1e-30))


def _zero_grad_elements(name: str, t: torch.Tensor) -> torch.Tensor:
    """Mask out the elements whose true gradient is zero. GPT-2's key bias (middle third of c_attn.bias)
    adds q.b_k to every score of a query row, which softmax ignores: its gradient is 0 up to rounding, and
    Adam divides that rounding noise by its own tiny magnitude, turning it into full-size steps of random
    sign. Those elements are excluded from per-tensor checks (they still count in the global norm, where
    they are negligible at fp32; at 16-bit they are excluded from the update-relative metric too)."""
    if name.endswith("attn.c_attn.bias"):
        h = t.numel() // 3
        return torch.cat([t[:h], t[2 * h:]])
    return t


def check(c: dict, results: list[dict], world_size: int) -> None:
    init, ref, ref_norms = cached_reference(c, world_size)
    r0 = results[0]
    got = dict(r0["state"])
    assert set(got) == set(ref)
    if c["unused"]:
        # torch.optim skips a parameter without .grad; the engine reduces it as a zero gradient (every rank
        # must issue the same collectives), so AdamW's decoupled weight decay still shrinks it: Adam's own
        # update is 0 / (0 + eps) = 0.
        for k in ("unused.weight", "unused.bias"):
            want = init[k] * (1 - LR * 0.01) ** STEPS
            assert torch.allclose(got.pop(k), want, rtol=1e-6, atol=0), k
            ref.pop(k)
    names = sorted(ref)
    if c["overflow"]:
        assert [r["skipped"] for r in results] == [1] * world_size, "every rank must skip the overflow step"
        assert r0["scale"] == 2.0**15
    else:
        assert [r["skipped"] for r in results] == [0] * world_size
    assert r0["steps"] == STEPS
    flat_got = torch.cat([got[k].float().reshape(-1) for k in names])
    flat_ref = torch.cat([ref[k].float().reshape(-1) for k in names])
    flat_init = torch.cat([init[k].float().reshape(-1) for k in names])
    if c["precision"] == "fp32":
        assert rel(flat_got - flat_ref, flat_ref) < FP32_RTOL, c
        for k in names:
            g, r = _zero_grad_elements(k, got[k]), _zero_grad_elements(k, ref[k])
            if r.norm() > 0:
                assert rel(g - r, r) < FP32_RTOL, (k, rel(g - r, r), c)
    else:
        tol = BF16_UPDATE_RTOL if c["precision"] == "bf16" else FP16_UPDATE_RTOL
        flat_got, flat_ref, flat_init = (torch.cat([_zero_grad_elements(k, d[k]).float().reshape(-1) for k in names])
                                         for d in (got, ref, init))
        err = rel(flat_got - flat_ref, flat_ref - flat_init)
        assert err < tol, (err, c)
    if c["clip"]:
        got_norms = r0["norms"][1:] if c["overflow"] else r0["norms"]
        # 16-bit gradients carry their own rounding (see the tolerances above): ~1e-3 on the norm.
        norm_rtol = FP32_RTOL if c["precision"] == "fp32" else 1e-2
        assert got_norms == pytest.approx(ref_norms, rel=norm_rtol), "global grad norm across shards"
        assert min(ref_norms) > c["clip"], "the case must actually clip"
    if results[0]["local"] is not None:
        for r in results[1:]:
            assert torch.equal(r["local"], results[0]["local"]), "ranks disagree on the gathered parameters"


CASES = (
    [case(stage=s) for s in range(4)]
    + [case(model="llama", stage=s, accum=4) for s in range(4)]
    + [case(stage=s, clip=0.05) for s in range(4)]
    + [case(model="llama", stage=s, optimizer="SGD") for s in (0, 1, 2, 3)]
    + [case(stage=s, precision="bf16") for s in range(4)]
    + [case(model="llama", stage=s, precision="bf16", accum=2, clip=0.05) for s in (1, 3)]
    + [case(stage=2, precision="fp16", overflow=True, clip=0.05), case(stage=3, precision="fp16", accum=2)]
    + [case(stage=2, offload="cpu"), case(stage=3, precision="bf16", offload="cpu")]
    + [case(stage=s, unused=True, accum=2) for s in (0, 2, 3)]
    + [case(stage=s, sometimes=True, accum=2) for s in (0, 1, 2)]
    # Stage 3 re-gathers a unit from its output's grad hook; checkpointing recomputes inside that window.
    + [case(model="llama", stage=3, accum=2, ckpt="full"), case(stage=3, ckpt="selective")]
)


# These models are small: without ZTUNE_SHM_MIN_BYTES=0 most of their collectives would go through gloo
# (runtime/comm/shm.py MIN_BYTES); here every one goes through shared memory, below (GLOO_CASES) none does.
ALL_SHARED = {"ZTUNE_SHM_MIN_BYTES": "0"}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def world_results(request):
    n = request.param
    # The offload cases run the fused C++ Adam kernel: a rank loads the cached library directly (runtime/ops.py,
    # ~10 ms). tests/dist/test_offload.py has the offload cases, including one on the torch fallback.
    return n, run_ranks(train_cases, world_size=n, args=(CASES,), timeout_s=240, env=ALL_SHARED)


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{c['model']}-s{c['stage']}-{c['precision']}-acc{c['accum']}-clip{c['clip']}-"
                              f"{c['optimizer']}-off{c['offload']}{'-overflow' if c['overflow'] else ''}"
                         f"{'-unused' if c['unused'] else ''}{'-sometimes' if c['sometimes'] else ''}{'-ckpt-' + c['ckpt'] if c['ckpt'] != 'none' else ''}"
                              for c in CASES])
def test_parity(world_results, index):
    n, results = world_results
    check(CASES[index], [per_rank[index] for per_rank in results], n)


# The same training through gloo alone (ZTUNE_SHM=0): on one host the engine otherwise moves gradient and
# parameter buffers (stage 3: parameter shards) through shared memory (runtime/comm/shm.py); ranks on different
# hosts use the gloo path, which must stay right.
GLOO_CASES = [c for c in CASES if c["offload"] == "none" and not c["overflow"]
              and (c["model"] == "llama" or c["precision"] == "bf16" or c["clip"] or c["sometimes"])]


@pytest.fixture(scope="module")
def gloo_results():
    return run_ranks(train_cases, world_size=2, args=(GLOO_CASES,), timeout_s=240, env={"ZTUNE_SHM": "0"})


@pytest.mark.parametrize("index", range(len(GLOO_CASES)),
                         ids=[f"{c['model']}-s{c['stage']}-{c['precision']}-acc{c['accum']}" for c in GLOO_CASES])
def test_parity_gloo_only(gloo_results, index):
    check(GLOO_CASES[index], [per_rank[index] for per_rank in gloo_results], 2)


# The default threshold sends small buffers through gloo and large ones through shared memory; with a
# threshold between this model's bucket sizes (2048 fp32 elements: most 3000-element buckets above, the
# rest below) one step mixes both, asynchronous gloo collectives in flight across shared-memory barriers.
MIXED_CASES = [c for c in CASES if c["offload"] == "none" and not c["overflow"] and c["ckpt"] == "none"
               and c["precision"] != "fp16" and (c["model"] == "llama" or c["clip"] == 0.0)
               and not c["unused"] and not c["sometimes"]]


@pytest.fixture(scope="module")
def mixed_results():
    return run_ranks(train_cases, world_size=2, args=(MIXED_CASES,), timeout_s=240,
                     env={"ZTUNE_SHM_MIN_BYTES": "8192"})


@pytest.mark.parametrize("index", range(len(MIXED_CASES)),
                         ids=[f"{c['model']}-s{c['stage']}-{c['precision']}-acc{c['accum']}-{c['optimizer']}"
                              for c in MIXED_CASES])
def test_parity_mixed_transports(mixed_results, index):
    check(MIXED_CASES[index], [per_rank[index] for per_rank in mixed_results], 2)
