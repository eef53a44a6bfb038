"""1-bit Adam on 2 gloo ranks (runtime/onebit_adam.py), one spawn for every check:

- warm-up: the engine's masters against torch.optim.AdamW on the averaged gradient, fp32 within 1e-5;
- every step, before and after freeze_step: against tests/helpers/onebit_ref.py, a single-process reference of
  the same equations fed every rank's gradient, within 1e-6 (it keeps both error feedbacks, so an engine
  without either one fails this);
- bytes after the warm-up: exactly the all-to-all + all-gather of 1-bit pieces, and under 0.05x an fp32
  all-reduce of the same gradients;
- checkpoint: saved after the freeze, loaded into a fresh engine, the next steps are bitwise the
  uninterrupted run's (momentum, frozen variance, both error buffers and the step restored);
- fp16 with gradient accumulation: an overflow on one rank after the freeze skips the step on both;
- local_momentum (equation (4')): every step against the reference with each worker's own momentum, within 1e-6,
  and resumed from a checkpoint after the freeze bitwise (each rank's own momentum restored as its own);
- step_bound (equation (9)), on batches whose feature 0 is 1e-4 of its size in the warm-up: every step against
  the reference with its own clamp, within 1e-6, and far from the unbounded reference (the clamp engages).
A second spawn (test_warmup_is_bitwise_the_engines_adamw): in bf16 with a moving lr, every warm-up step's
masters and parameters equal the engine's AdamW's bit for bit, and a run resumed from a checkpoint saved inside
the warm-up continues bitwise as the uninterrupted one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.dist

FREEZE, STEPS, SAVE_AT = 3, 8, 5
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.01


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 12, generator=gen), torch.randn(6, 3, generator=gen)


def _grown_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_batch with input feature 0 at 1e-4 of its size during the warm-up: fc1's column 0 gets a gradient after
    the freeze ~1e4 x what set its frozen variance (what equation (9) is for)."""
    x, y = _batch(step, rank)
    if step < FREEZE:
        x[:, 0] *= 1e-4
    return x, y


def _loss(out, y):
    return (out - y).pow(2).mean()


def _config(*, step_bound: bool = False, local_momentum: bool = False) -> dict:
    return {"zero": {"stage": 0}, "precision": "fp32", "batch": {"micro": 6, "grad_accum": 1},
            "optimizer": {"type": "OneBitAdam", "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD,
                          "freeze_step": FREEZE, "step_bound": step_bound, "local_momentum": local_momentum}}


def _flat(engine) -> torch.Tensor:
    return torch.cat([g.master.detach().clone() for g in engine.groups])


def _train(engine, rank: int, steps: range, batch=_batch) -> list[torch.Tensor]:
    out = []
    for step in steps:
        x, y = batch(step, rank)
        engine.backward(_loss(engine(x), y))
        engine.step()
        out.append(_flat(engine))
    return out


def _reference(rank: int, world_size: int, model: nn.Module, engine, init: torch.Tensor, *, step_bound: bool = False,
               local_momentum: bool = False, batch=_batch):
    """The reference trajectory (masters after each step) and torch AdamW's for the warm-up steps."""
    from tests.helpers.onebit_ref import ReferenceOneBitAdam

    names = {id(p): n for n, p in engine.module.named_parameters()}
    ref_params = dict(model.named_parameters())
    slots = []  # (flat offset, numel, reference parameter), in the engine's flat order
    base = 0
    for g in engine.groups:
        for p, slot in zip(g.params, g.layout.slots, strict=True):
            slots.append((base + slot.offset, slot.numel, ref_params[names[id(p)]]))
        base += g.layout.padded_numel

    def grads_at(x: torch.Tensor, step: int) -> list[torch.Tensor]:
        with torch.no_grad():
            for off, numel, p in slots:
                p.copy_(x[off:off + numel].view_as(p))
        out = []
        for r in range(world_size):
            model.zero_grad(set_to_none=True)
            xb, yb = batch(step, r)
            _loss(model(xb), yb).backward()
            flat = torch.zeros_like(x)
            for off, numel, p in slots:
                flat[off:off + numel] = p.grad.reshape(-1)
            out.append(flat)
        return out

    assert len(engine.groups) == 1  # one flat vector: the reference keeps its padding's momentum at zero
    ref = ReferenceOneBitAdam(init.clone(), world_size=world_size, freeze_step=FREEZE, lr=LR, betas=BETAS, eps=EPS,
                              weight_decay=WD, valid_numel=engine.groups[0].layout.numel, step_bound=step_bound,
                              local_momentum=local_momentum)
    adamw_x = init.clone().requires_grad_(True)
    adamw = torch.optim.AdamW([adamw_x], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    ref_traj, adamw_traj = [], []
    for step in range(STEPS):
        if step < FREEZE:
            grads = grads_at(adamw_x.detach(), step)
            adamw_x.grad = (grads[0] + grads[1]) / 2
            adamw.step()
            adamw_traj.append(adamw_x.detach().clone())
        ref.step(grads_at(ref.x, step))
        ref_traj.append(ref.x.clone())
    return ref_traj, adamw_traj


def _run(rank: int, world_size: int, ckpt_dir: str) -> dict:
    import ztune

    torch.manual_seed(0)
    model = _Net()
    ref_model = copy.deepcopy(model)
    engine, *_ = ztune.initialize(model, _config())
    init = _flat(engine)
    traj = _train(engine, rank, range(SAVE_AT))
    state = engine.optimizer.state[engine.groups[0].master]
    errors_nonzero = bool(state["worker_error"].abs().sum() > 0 and state["server_error"].abs().sum() > 0)
    engine.save_checkpoint(ckpt_dir)
    engine.comm.reset()  # bytes of compression-stage steps only
    traj += _train(engine, rank, range(SAVE_AT, STEPS))
    report = engine.comm_report()
    padded = report["padded_params"]

    torch.manual_seed(123)  # the fresh engine starts elsewhere: everything must come from the checkpoint
    resumed, *_ = ztune.initialize(_Net(), _config())
    resumed.load_checkpoint(ckpt_dir)
    resumed_traj = _train(resumed, rank, range(SAVE_AT, STEPS))
    ref_traj, adamw_traj = _reference(rank, world_size, ref_model, engine, init)
    mixed = _mixed_precision(rank)
    torch.manual_seed(0)
    bounded_model = _Net()
    bounded_ref_model = copy.deepcopy(bounded_model)
    bounded, *_ = ztune.initialize(bounded_model, _config(step_bound=True))
    bounded_traj = _train(bounded, rank, range(STEPS), batch=_grown_batch)
    bounded_ref, _ = _reference(rank, world_size, bounded_ref_model, bounded, init.clone(), step_bound=True,
                                batch=_grown_batch)
    unbounded_ref, _ = _reference(rank, world_size, copy.deepcopy(bounded_ref_model), bounded, init.clone(),
                                  batch=_grown_batch)
    local = _local_momentum(rank, world_size, ckpt_dir + "-local")
    return {"local": local, "mixed": mixed, "bounded": bounded_traj, "bounded_ref": bounded_ref, "unbounded_ref": unbounded_ref,
            "traj": traj, "ref": ref_traj, "adamw": adamw_traj, "resumed": resumed_traj, "ops": report["ops"],
            "sent_per_step": report["bytes_sent_total"] / (STEPS - SAVE_AT), "padded": padded,
            "num_params": report["num_params"],
            "num_groups": len(engine.groups), "errors_nonzero": errors_nonzero,
            "compressing": engine.optimizer.compressing}


def _local_momentum(rank: int, world_size: int, ckpt_dir: str) -> dict:
    """local_momentum (equation (4')): the trajectory, the reference's, each rank's own momentum, and a run resumed
    from a checkpoint saved after the freeze (each rank's own momentum is rank-local state)."""
    import ztune

    torch.manual_seed(0)
    model = _Net()
    ref_model = copy.deepcopy(model)
    engine, *_ = ztune.initialize(model, _config(local_momentum=True))
    init = _flat(engine)
    traj = _train(engine, rank, range(SAVE_AT))
    engine.save_checkpoint(ckpt_dir)
    traj += _train(engine, rank, range(SAVE_AT, STEPS))
    own = engine.optimizer.state[engine.groups[0].master]["local_momentum"].clone()
    torch.manual_seed(123)
    resumed, *_ = ztune.initialize(_Net(), _config(local_momentum=True))
    resumed.load_checkpoint(ckpt_dir)
    resumed_traj = _train(resumed, rank, range(SAVE_AT, STEPS))
    ref_traj, _ = _reference(rank, world_size, ref_model, engine, init, local_momentum=True)
    return {"traj": traj, "ref": ref_traj, "own": own, "resumed": resumed_traj,
            "resumed_own": resumed.optimizer.state[resumed.groups[0].master]["local_momentum"].clone()}


def _mixed_precision(rank: int) -> dict:
    """fp16 with dynamic loss scaling and 2 micro-steps per step: local gradients accumulate unreduced after
    the freeze, an overflow on one rank (inf in its batch) is skipped on both, and the memory report counts
    the error buffers."""
    import ztune

    torch.manual_seed(0)
    cfg = _config()
    cfg.update(precision="fp16", batch={"micro": 3, "grad_accum": 2})
    engine, *_ = ztune.initialize(_Net(), cfg)
    applied = []
    for step in range(6):
        for micro in range(2):
            x, y = _batch(10 * step + micro, rank)
            if step == 4 and rank == 1 and micro == 0:
                x[0, 0] = float("inf")
            engine.backward(_loss(engine(x), y))
            applied.append(engine.step())
    master = engine.groups[0].master
    state = engine.optimizer.state[master]
    return {"applied": applied, "flat": _flat(engine), "step": int(state["step"]),
            "memory_optimizer": engine.memory_report()["optimizer"],
            "state_bytes": sum(t.numel() * t.element_size() for t in (master, state["exp_avg"], state["exp_avg_sq"],
                                                                       state["worker_error"], state["server_error"])),
            "norm": engine.last_grad_norm}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_onebit_adam_two_ranks(tmp_path):
    from ztune.cost.comm import ONEBIT_CHUNK_NUMEL

    results = run_ranks(_run, world_size=2, args=(str(tmp_path / "ckpt"),), timeout_s=300)
    r0, r1 = results
    for step in range(STEPS):
        torch.testing.assert_close(r0["traj"][step], r1["traj"][step], rtol=0, atol=0)  # replicas identical
        assert _rel(r0["traj"][step], r0["ref"][step]) <= 1e-6, f"step {step + 1} differs from the reference"
    for step in range(FREEZE):
        assert _rel(r0["traj"][step], r0["adamw"][step]) <= 1e-5, f"warm-up step {step + 1} differs from AdamW"
    # The compression stage moved the parameters away from plain AdamW's path: the test sees the algorithm.
    assert r0["compressing"] and r0["errors_nonzero"] and r1["errors_nonzero"]
    assert r0["traj"][-1][r0["num_params"]:].abs().max() == 0  # the flat buffer's padding never moves
    for step in range(STEPS):  # step_bound: equation (9) against the reference's own clamp
        torch.testing.assert_close(r0["bounded"][step], r1["bounded"][step], rtol=0, atol=0)
        assert _rel(r0["bounded"][step], r0["bounded_ref"][step]) <= 1e-6, f"step_bound: step {step + 1} differs"
    # The clamp engaged (fc1's column 0 would have moved ~lr x 1e2 per step): the test sees the mechanism.
    assert (r0["unbounded_ref"][-1] - r0["bounded"][-1]).abs().max() > 0.1
    for step in range(SAVE_AT, STEPS):
        for r in results:
            torch.testing.assert_close(r["resumed"][step - SAVE_AT], r["traj"][step], rtol=0, atol=0)
    l0, l1 = r0["local"], r1["local"]
    for step in range(STEPS):  # local_momentum: equation (4') against the reference's own momenta
        torch.testing.assert_close(l0["traj"][step], l1["traj"][step], rtol=0, atol=0)
        assert _rel(l0["traj"][step], l0["ref"][step]) <= 1e-6, f"local_momentum: step {step + 1} differs"
        for r in results:
            if step >= SAVE_AT:
                torch.testing.assert_close(r["local"]["resumed"][step - SAVE_AT], r["local"]["traj"][step], rtol=0,
                                           atol=0)
    assert (l0["own"] - l1["own"]).abs().max() > 0  # each rank's own momentum, restored as its own
    for r in results:
        torch.testing.assert_close(r["local"]["resumed_own"], r["local"]["own"], rtol=0, atol=0)
    assert (l0["traj"][-1] - r0["traj"][-1]).abs().max() > 0  # not the default algorithm's path
    # Bytes per rank per compression-stage step: one all-to-all and one all-gather of 1-bit pieces (sign bits
    # + one fp32 scale per block, padded to 4 bytes) per flat group, (n - 1)/n of each on the wire; nothing else.
    assert set(r0["ops"]) == {"all_to_all", "all_gather"}
    m0, m1 = r0["mixed"], r1["mixed"]
    assert m0["applied"] == m1["applied"] and m0["applied"][1::2] == [True] * 4 + [False, True]
    assert m0["step"] == 5 and m0["norm"] is None  # no global gradient norm exists after the freeze
    torch.testing.assert_close(m0["flat"], m1["flat"], rtol=0, atol=0)
    assert bool(torch.isfinite(m0["flat"]).all())
    assert m0["memory_optimizer"] == m0["state_bytes"]  # fp32 master, m, v, both error buffers
    piece = r0["padded"] // 2  # one group here
    assert r0["num_groups"] == 1
    piece_bytes = -(-(4 * -(-piece // ONEBIT_CHUNK_NUMEL) + -(-piece // 8)) // 4) * 4
    assert r0["sent_per_step"] == pytest.approx(2 * 0.5 * 2 * piece_bytes)
    fp32_allreduce = 2 * 0.5 * 4 * r0["padded"]
    assert r0["sent_per_step"] / fp32_allreduce < 0.1  # tiny model: the per-block scales weigh more than at scale


# -- the warm-up is the engine's Adam, bit for bit ------------------------------------------------------------
WARMUP_STEPS = 6  # < the freeze below: every step compared is a warm-up step
WARMUP_SAVE_AT = 3  # a checkpoint inside the warm-up (the warm-up AdamW shares the state load_state_dict replaces)


class _Wider(nn.Module):
    """~10K parameters: enough elements that a 1-ulp rounding difference in any op of the update shows up."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(48, 160)
        self.fc2 = nn.Linear(160, 12)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _wide_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7000 + 1000 * step + rank)
    return torch.randn(8, 48, generator=gen), torch.randn(8, 12, generator=gen)


def _warmup_vs_adamw(rank: int, world_size: int, ckpt_dir: str) -> dict:
    """AdamW and OneBitAdam (freeze after the run) engines from one initialisation, bf16 (the box bench's
    precision) with a WarmupLR schedule (lr moves every step): fp32 masters and bf16 parameters after each step;
    and OneBitAdam resumed from a checkpoint saved inside the warm-up: its masters after the later steps."""
    import ztune

    out = {}
    torch.manual_seed(0)
    init = _Wider()
    for kind in ("AdamW", "OneBitAdam", "resumed"):
        opt = {"type": "AdamW" if kind == "AdamW" else "OneBitAdam", "lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8,
               "weight_decay": 0.01}
        if kind != "AdamW":
            opt["freeze_step"] = WARMUP_STEPS + 4
        cfg = {"zero": {"stage": 0}, "precision": "bf16", "batch": {"micro": 8, "grad_accum": 1}, "optimizer": opt,
               "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3,
                                                            "warmup_num_steps": 4, "warmup_type": "linear"}}}
        engine, *_ = ztune.initialize(copy.deepcopy(init) if kind != "resumed" else _Wider(), cfg)
        if kind == "resumed":
            engine.load_checkpoint(ckpt_dir)
        masters, params = [], []
        for step in range(WARMUP_SAVE_AT if kind == "resumed" else 0, WARMUP_STEPS):
            x, y = _wide_batch(step, rank)
            engine.backward(_loss(engine(x.bfloat16()).float(), y))
            engine.step()
            masters.append(_flat(engine))
            params.append(torch.cat([p.detach().reshape(-1).clone() for p in engine.module.parameters()]))
            if kind == "OneBitAdam" and step + 1 == WARMUP_SAVE_AT:
                engine.save_checkpoint(ckpt_dir)
        out[kind] = {"masters": masters, "params": params, "compressing": getattr(engine.optimizer, "compressing",
                                                                                    None)}
    return out


def test_warmup_is_bitwise_the_engines_adamw(tmp_path):
    """Before freeze_step 1-bit Adam is plain Adam (Tang et al. 2021, Algorithm 1), and the engine runs it through
    the very optimizer its AdamW runs use (runtime/onebit_adam.py, "The warm-up"): after every warm-up step the
    fp32 masters and the bf16 parameters equal AdamW's bit for bit (ranks 2, bf16, a moving lr, weight decay).
    Any difference in the reduction, the gradient unscaling, the update's arithmetic or the lr fails this; with
    a different rounding it fails within a few steps (measured: an update written as torch ops against the C++
    kernel differed in ~0.1% of the masters by step 3)."""
    r0, r1 = run_ranks(_warmup_vs_adamw, world_size=2, args=(str(tmp_path / "ckpt"),), timeout_s=180)
    for r in (r0, r1):
        assert r["OneBitAdam"]["compressing"] is False
        for step in range(WARMUP_STEPS):
            for what in ("masters", "params"):
                a, b = r["AdamW"][what][step], r["OneBitAdam"][what][step]
                differ = int((a != b).sum())
                assert differ == 0, f"warm-up step {step + 1}: {differ} of {a.numel()} {what} differ from AdamW's"
    assert not torch.equal(r0["AdamW"]["masters"][0], r0["AdamW"]["masters"][-1])  # training moved them
    for r in (r0, r1):  # resumed inside the warm-up: the uninterrupted run's masters, bit for bit
        for got, want in zip(r["resumed"]["masters"], r["OneBitAdam"]["masters"][WARMUP_SAVE_AT:], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
