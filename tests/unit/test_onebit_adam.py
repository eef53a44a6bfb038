"""1-bit Adam's pure math (runtime/onebit_adam.py) and its config surface (native YAML and DeepSpeed JSON).

The multi-process behaviour (parity with a single-process reference, bytes, checkpoints) is in
tests/dist/test_onebit_adam.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.onebit_ref import ReferenceOneBitAdam, compress_roundtrip, exchange
from ztune.config import from_dict
from ztune.config.deepspeed import to_deepspeed
from ztune.config.schema import Compression, OptimizerType
from ztune.errors import ConfigError
from ztune.runtime.comm import Comm
from ztune.runtime.onebit_adam import (
    OneBitAdam,
    adam_step_bound,
    adam_update_,
    bias_corrections,
    bounded_update_,
    momentum_,
    variance_,
)


def _grads(steps: int, numel: int, *, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_warmup_equations_are_torch_adamw(weight_decay):
    """Equations (1)-(3) with bias correction: torch.optim.AdamW's update, step by step (fp32, 1e-6)."""
    x0 = torch.randn(300, generator=torch.Generator().manual_seed(1))
    ref = x0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    x, m, v = x0.clone(), torch.zeros(300), torch.zeros(300)
    for t, g in enumerate(_grads(5, 300), start=1):
        ref.grad = g.clone()
        opt.step()
        momentum_(m, g, beta1=0.9)
        variance_(v, g, beta2=0.99)
        c1, c2 = bias_corrections(step=t, variance_step=t, beta1=0.9, beta2=0.99, enabled=True)
        adam_update_(x, m, v, lr=1e-2, eps=1e-8, weight_decay=weight_decay, c1=c1, c2=c2)
        torch.testing.assert_close(x, ref.detach(), rtol=1e-6, atol=1e-7)


def test_frozen_variance_update_by_hand():
    """Equation (7): x (1 - lr wd) - lr (m / c1_t) / (sqrt(v / c2_Tw) + eps), and without bias correction
    DeepSpeed's m / (sqrt(v) + eps) + wd x."""
    x, m, v = torch.tensor([1.0, -2.0]), torch.tensor([0.3, -0.1]), torch.tensor([0.04, 0.01])
    c1, c2 = bias_corrections(step=7, variance_step=3, beta1=0.9, beta2=0.999, enabled=True)
    assert c1 == pytest.approx(1 - 0.9 ** 7) and c2 == pytest.approx(1 - 0.999 ** 3)
    want = x * (1 - 0.1 * 0.01) - 0.1 * (m / c1) / ((v / c2).sqrt() + 1e-8)
    got = x.clone()
    adam_update_(got, m, v, lr=0.1, eps=1e-8, weight_decay=0.01, c1=c1, c2=c2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    plain = x.clone()
    adam_update_(plain, m, v, lr=0.1, eps=1e-8, weight_decay=0.01, c1=1.0, c2=1.0)
    torch.testing.assert_close(plain, x - 0.1 * (m / (v.sqrt() + 1e-8) + 0.01 * x), rtol=1e-6, atol=0)


def _cumulative_error(*, worker_feedback: bool, server_feedback: bool, steps: int = 200) -> float:
    """|sum_t received_t - sum_t mean_i m_t^(i)| (max over elements) for constant worker momenta: a 1-bit code
    of a fixed vector makes the same error every step, which only error feedback cancels over time."""
    n, numel = 2, 256
    gen = torch.Generator().manual_seed(3)
    local = [torch.randn(numel, generator=gen) for _ in range(n)]
    worker_err = [torch.zeros(numel) for _ in range(n)]
    server_err = [torch.zeros(numel // n) for _ in range(n)]
    sent, wanted = torch.zeros(numel), torch.zeros(numel)
    for _ in range(steps):
        sent += exchange(local, worker_err, server_err, worker_feedback=worker_feedback,
                         server_feedback=server_feedback)
        wanted += (local[0] + local[1]) / 2
    return float((sent - wanted).abs().max())


def test_error_feedback_cancels_the_compression_bias():
    """With both error feedbacks, what was received over 200 steps tracks what was meant to within the
    bounded residuals; dropping either one lets the per-step bias add up (grows ~linearly with steps)."""
    both = _cumulative_error(worker_feedback=True, server_feedback=True)
    no_worker = _cumulative_error(worker_feedback=False, server_feedback=True)
    no_server = _cumulative_error(worker_feedback=True, server_feedback=False)
    # (measured: 43 with both, 243 without either one of them; without error feedback the bias grows as
    # steps x per-step bias, with it the gap is the residuals, which stop growing)
    assert no_worker > 4 * both and no_server > 4 * both


def test_exchange_residual_identity():
    """Telescoping (Algorithm 1): sum_t mb_t = sum_t mean_i m_t^(i) - mean_i d_T^(i) - e_T, exactly up to fp32."""
    n, numel = 2, 512
    gen = torch.Generator().manual_seed(4)
    worker_err = [torch.zeros(numel) for _ in range(n)]
    server_err = [torch.zeros(numel // n) for _ in range(n)]
    sent, wanted = torch.zeros(numel), torch.zeros(numel)
    for _ in range(20):
        local = [torch.randn(numel, generator=gen) for _ in range(n)]
        sent += exchange(local, worker_err, server_err)
        wanted += (local[0] + local[1]) / 2
    residual = (worker_err[0] + worker_err[1]) / 2 + torch.cat(server_err)
    torch.testing.assert_close(sent, wanted - residual, rtol=0, atol=1e-4)


def test_compress_roundtrip_is_sign_times_block_mean():
    x = torch.tensor([0.5, -1.5, 2.0, 0.0])
    torch.testing.assert_close(compress_roundtrip(x), torch.tensor([1.0, -1.0, 1.0, 1.0]))


def test_rms_scale_keeps_each_blocks_norm():
    """onebit_scale "rms": sign x ||x|| / sqrt(block) per block (the last, short block by its own count), so the
    code has each block's norm; the mean's code has less (sqrt(mean|x|^2 / mean x^2) of it). Same bytes."""
    from ztune.cost.comm import ONEBIT_CHUNK_NUMEL
    from ztune.runtime.comm.compress import Codec

    x = torch.randn(2 * ONEBIT_CHUNK_NUMEL + 40, generator=torch.Generator().manual_seed(11))
    x[:ONEBIT_CHUNK_NUMEL] *= torch.linspace(0.01, 3.0, ONEBIT_CHUNK_NUMEL)  # a heavy-tailed block
    got = compress_roundtrip(x, scale="rms")
    for lo in range(0, x.numel(), ONEBIT_CHUNK_NUMEL):
        block, code = x[lo:lo + ONEBIT_CHUNK_NUMEL], got[lo:lo + ONEBIT_CHUNK_NUMEL]
        torch.testing.assert_close(code, torch.where(block >= 0, 1.0, -1.0) * block.norm() / block.numel() ** 0.5)
        torch.testing.assert_close(code.norm(), block.norm())
    mean_code = compress_roundtrip(x)
    assert float(mean_code[:ONEBIT_CHUNK_NUMEL].norm()) < 0.95 * float(x[:ONEBIT_CHUNK_NUMEL].norm())
    codec = Codec(Compression.ONEBIT, onebit_scale="rms")
    assert codec.payload_bytes(x.numel()) == Codec(Compression.ONEBIT).payload_bytes(x.numel())
    torch.testing.assert_close(codec.decode(codec.encode(x), numel=x.numel()), got)


@pytest.mark.parametrize(("local_momentum", "onebit_scale"), [(False, "mean"), (True, "mean"), (True, "rms")])
def test_optimizer_one_rank_matches_reference(local_momentum, onebit_scale):
    """OneBitAdam on a world of one (Comm without a group: the collectives are copies) against the reference
    for n = 1, across the freeze: the optimizer's own step logic, its state and its exchange bookkeeping."""
    x0 = torch.randn(256, generator=torch.Generator().manual_seed(5))
    master = x0.clone()
    opt = OneBitAdam([master], comm=Comm(group=None, rank=0, world_size=1), freeze_step=3, lr=1e-2,
                     betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, local_momentum=local_momentum,
                     onebit_scale=onebit_scale)
    ref = ReferenceOneBitAdam(x0.clone(), world_size=1, freeze_step=3, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=0.01, local_momentum=local_momentum, onebit_scale=onebit_scale)
    for g in _grads(8, 256, seed=6):
        assert opt.compressing == (ref.step_count >= 3)
        master.grad = g.clone()
        opt.step()
        ref.step([g.clone()])
        # Relative to the largest element (the dist tests' measure): rms's sqrt rounds elements near 0 apart by ulps.
        assert float((master - ref.x).abs().max() / ref.x.abs().max()) <= 1e-6
    state = opt.state[master]
    own = {"local_momentum"} if local_momentum else set()
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "worker_error", "server_error"} | own
    torch.testing.assert_close(state["worker_error"], ref.worker_err[0], rtol=0, atol=0)
    torch.testing.assert_close(state["server_error"], ref.server_err[0], rtol=0, atol=0)
    if local_momentum:
        torch.testing.assert_close(state["local_momentum"], ref.own_m[0], rtol=0, atol=0)


def test_local_momentum_keeps_the_code_error_out_of_the_momentum():
    """Equation (4'): with local_momentum a rank's own momentum after the freeze is b1 m + (1 - b1) g of its own
    gradients exactly, and exp_avg holds the exchanged 1-bit value (one magnitude per block) that the update uses;
    without it (Tang et al.) the exchanged value becomes the momentum, so the code's error enters every later
    momentum: after 5 compressed steps it is off the exact momentum by a large part of its norm."""
    numel, freeze = 256, 2
    grads = _grads(7, numel, seed=8)
    out = {}
    for local in (False, True):
        master = torch.randn(numel, generator=torch.Generator().manual_seed(9))
        opt = OneBitAdam([master], comm=Comm(group=None, rank=0, world_size=1), freeze_step=freeze, lr=1e-2,
                         local_momentum=local)
        exact = torch.zeros(numel)
        for g in grads:
            master.grad = g.clone()
            opt.step()
            momentum_(exact, g, beta1=0.9)
        out[local] = (opt.state[master], exact)
    state, exact = out[True]
    torch.testing.assert_close(state["local_momentum"], exact, rtol=1e-6, atol=1e-7)
    assert torch.unique(state["exp_avg"].abs()).numel() <= 2  # 2 blocks of 128: sign x one scale per block
    state, exact = out[False]
    assert "local_momentum" not in state
    assert float((state["exp_avg"] - exact).norm() / exact.norm()) > 0.3


def test_elements_without_warmup_gradient_keep_zero_momentum():
    """Equation (8): elements whose gradient was zero through the warm-up (an embedding row of a token first
    seen after the freeze) have a frozen variance of 0; without the mask their first update would be
    lr m / eps (the reference shows it: a move of ~1e5), with it they only decay, as Adam leaves an element it
    never saw. The other elements still follow the reference, and two 128-element blocks keep the scales apart."""
    numel, freeze, lr, wd = 256, 3, 1e-2, 0.01
    late = slice(128, 256)  # one whole 1-bit block, so its scale comes from its own (late) gradients
    grads = _grads(7, numel, seed=8)
    for g in grads[:freeze]:
        g[late] = 0.0
    x0 = torch.randn(numel, generator=torch.Generator().manual_seed(9))
    master = x0.clone()
    opt = OneBitAdam([master], comm=Comm(group=None, rank=0, world_size=1), freeze_step=freeze, lr=lr,
                     betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    kw = dict(world_size=1, freeze_step=freeze, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    ref, unmasked = ReferenceOneBitAdam(x0.clone(), **kw), ReferenceOneBitAdam(x0.clone(), **kw)
    for g in grads:
        master.grad = g.clone()
        opt.step()
        ref.step([g.clone()])
        unmasked.step([g.clone()], mask_zero_variance=False)
    torch.testing.assert_close(master, ref.x, rtol=1e-6, atol=0)
    assert (opt.state[master]["exp_avg"][late] == 0).all()
    decayed = x0[late] * (1 - lr * wd) ** len(grads)
    torch.testing.assert_close(master[late], decayed, rtol=1e-6, atol=1e-7)
    assert (unmasked.x[late] - x0[late]).abs().max() > 1e3  # what the mask prevents
    torch.testing.assert_close(unmasked.x[:128], ref.x[:128], rtol=1e-6, atol=0)


def test_bounded_update_by_hand():
    """Equation (9): the per-element step (m / c1) / (sqrt(v / c2) + eps) clamped to +-(1 - b1) / sqrt(1 - b2)
    (3.162 at betas (0.9, 0.999); 1 when 1 - b1 <= sqrt(1 - b2)), then scaled by lr; weight decay as in (7)."""
    assert adam_step_bound(beta1=0.9, beta2=0.999) == pytest.approx(0.1 / 0.001 ** 0.5)
    assert adam_step_bound(beta1=0.99, beta2=0.9) == 1.0
    x, m, v = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, -0.1, 2.0]), torch.tensor([0.04, 1e-10, 1e-4])
    c1, c2 = bias_corrections(step=9, variance_step=4, beta1=0.9, beta2=0.999, enabled=True)
    raw = (m / c1) / ((v / c2).sqrt() + 1e-8)
    assert raw[0].abs() < 3.16 < raw[1:].abs().min()  # one element inside the bound, two beyond it
    got = x.clone()
    bounded_update_(got, m, v, lr=0.1, eps=1e-8, weight_decay=0.01, c1=c1, c2=c2, bound=3.0)
    want = x * (1 - 0.1 * 0.01) - 0.1 * raw.clamp(-3.0, 3.0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    plain = x.clone()
    adam_update_(plain, m, v, lr=0.1, eps=1e-8, weight_decay=0.01, c1=c1, c2=c2)
    assert got[0] == pytest.approx(float(plain[0]), rel=1e-6) and (got[1:] - plain[1:]).abs().min() > 1.0


def test_step_bound_holds_an_element_whose_gradient_grows_after_the_freeze():
    """With step_bound, an element whose warm-up gradient was ~1e-4 of what it becomes after the freeze (an
    output-layer row of a token first seen as a label after the warm-up) moves at most lr (1 - b1) / sqrt(1 - b2)
    per step (plus weight decay), following the reference; without it the frozen variance lets it move ~1e2
    per step. The elements whose gradient stays alike (the first block) are the same with and without it."""
    numel, freeze, lr, wd = 256, 3, 1e-2, 0.01
    grown = slice(128, 256)
    grads = _grads(8, numel, seed=10)
    for g in grads[:freeze]:
        g[grown] *= 1e-4
    x0 = torch.randn(numel, generator=torch.Generator().manual_seed(11))
    master = x0.clone()
    opt = OneBitAdam([master], comm=Comm(group=None, rank=0, world_size=1), freeze_step=freeze, lr=lr,
                     betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, step_bound=True)
    kw = dict(world_size=1, freeze_step=freeze, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    ref, unbounded = ReferenceOneBitAdam(x0.clone(), step_bound=True, **kw), ReferenceOneBitAdam(x0.clone(), **kw)
    bound = lr * adam_step_bound(beta1=0.9, beta2=0.999)
    for t, g in enumerate(grads, start=1):
        before = master.clone()
        master.grad = g.clone()
        opt.step()
        ref.step([g.clone()])
        unbounded.step([g.clone()])
        torch.testing.assert_close(master, ref.x, rtol=1e-6, atol=1e-7)
        if t > freeze:
            assert ((master - before * (1 - lr * wd)).abs() <= bound * (1 + 1e-5)).all()
    assert (unbounded.x[grown] - x0[grown]).abs().max() > 1e2  # what the bound prevents
    assert (master[grown] - x0[grown]).abs().max() < len(grads) * bound
    torch.testing.assert_close(master[:128], unbounded.x[:128], rtol=1e-6, atol=0)


# -- config ------------------------------------------------------------------------------------------------
def test_native_config_selects_onebit_adam():
    cfg = from_dict({"optimizer": {"type": "OneBitAdam", "freeze_step": 50}})
    assert cfg.optimizer.type is OptimizerType.ONEBIT_ADAM and cfg.optimizer.freeze_step == 50
    assert cfg.optimizer.step_bound is False  # Tang et al.'s (and DeepSpeed's) update unless asked
    assert from_dict({"optimizer": {"type": "OneBitAdam", "step_bound": True}}).optimizer.step_bound is True
    assert cfg.compression.method is Compression.ONEBIT  # the wire format after the warm-up, for the cost model


def test_deepspeed_onebit_adam_keys():
    doc = {"train_batch_size": 8, "optimizer": {"type": "OneBitAdam", "params": {
        "lr": 2e-4, "freeze_step": 400, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01,
        "cuda_aware": False, "comm_backend_name": "nccl"}}}
    from ztune.config.deepspeed import from_deepspeed

    cfg, ignored = from_deepspeed(doc)
    o = cfg.optimizer
    assert (o.type, o.lr, o.freeze_step, o.betas, o.eps, o.weight_decay) == (
        OptimizerType.ONEBIT_ADAM, 2e-4, 400, (0.9, 0.98), 1e-6, 0.01)
    assert sorted(ignored) == ["gradient_clipping (DeepSpeed's default 1.0; OneBitAdam has no global gradient norm)",
                               "optimizer.params.comm_backend_name", "optimizer.params.cuda_aware"]
    out = to_deepspeed(cfg)["optimizer"]
    assert out["type"] == "OneBitAdam" and out["params"]["freeze_step"] == 400
    assert from_deepspeed({"train_batch_size": 8, "optimizer": out})[0].optimizer == o


@pytest.mark.parametrize(("doc", "fragment"), [
    ({"train_batch_size": 8, "zero_optimization": {"stage": 2}, "optimizer": {"type": "OneBitAdam"}},
     "optimizer.type: OneBitAdam needs zero_optimization.stage 0, got zero_optimization.stage 2"),
    ({"train_batch_size": 8, "gradient_clipping": 1.0, "optimizer": {"type": "OneBitAdam"}},
     "gradient_clipping: 1.0 with OneBitAdam is not supported"),
    ({"train_batch_size": 8, "optimizer": {"type": "OneBitAdam", "params": {"freeze_step": 0}}},
     "optimizer.params.freeze_step: got 0; must be >= 1"),
    ({"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"freeze_step": 10}}},
     "optimizer.params.freeze_step: Adam has no freeze_step"),
    ({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"cuda_aware": False}}},
     "optimizer.params.cuda_aware: AdamW has no cuda_aware"),
    ({"train_batch_size": 8, "optimizer": {"type": "OneBitAdam", "params": {"max_grad_norm": 1.0}}},
     "optimizer.params.max_grad_norm: not supported"),
    ({"train_batch_size": 8, "optimizer": {"type": "OneBitAdam", "params": {"eps_inside_sqrt": True}}},
     "optimizer.params.eps_inside_sqrt: True is not supported"),
    ({"zero": {"stage": 1}, "optimizer": {"type": "OneBitAdam"}},
     "optimizer.type: OneBitAdam needs zero.stage 0, got zero.stage 1"),
    ({"optimizer": {"type": "OneBitAdam"}, "compression": {"method": "int8"}},
     "compression.method: int8 with OneBitAdam is not supported"),
    ({"optimizer": {"type": "AdamW", "freeze_step": 5}}, "optimizer.freeze_step: AdamW has no freeze_step"),
    ({"optimizer": {"type": "AdamW", "step_bound": True}}, "optimizer.step_bound: AdamW has no step_bound"),
    ({"optimizer": {"type": "Adam", "local_momentum": True}}, "optimizer.local_momentum: Adam has no local_momentum"),
    ({"optimizer": {"type": "OneBitAdam", "onebit_scale": "max"}},
     "optimizer.onebit_scale: got 'max'; must be mean or rms"),
    ({"train_batch_size": 8, "optimizer": {"type": "OneBitAdam", "params": {"step_bound": True}}},
     "unknown key 'optimizer.params.step_bound'"),
])
def test_onebit_adam_config_errors(doc, fragment):
    with pytest.raises(ConfigError) as err:
        from_dict(doc)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("key", "value", "shown"), [("step_bound", True, "true"), ("local_momentum", True, "true"),
                                                     ("onebit_scale", "rms", "rms")])
def test_ztune_options_are_not_exported_to_deepspeed(key, value, shown):
    """DeepSpeed's OnebitAdam has no step bound, no local momentum and no per-block scale: exporting any would
    change training silently, so it is refused."""
    cfg = from_dict({"optimizer": {"type": "OneBitAdam", key: value}})
    assert getattr(cfg.optimizer, key) == value
    with pytest.raises(ConfigError, match=f"optimizer.{key}: {shown} has no DeepSpeed equivalent") as err:
        to_deepspeed(cfg)
    assert "\n" not in str(err.value)


def test_client_optimizer_with_onebit_adam_config_is_an_error():
    from ztune.runtime.compat.optimizers import plan_optimizer

    model = torch.nn.Linear(3, 2)
    cfg = from_dict({"optimizer": {"type": "OneBitAdam", "freeze_step": 5}})
    with pytest.raises(ConfigError, match="the config's optimizer is OneBitAdam"):
        plan_optimizer(model, cfg, optimizer=torch.optim.Adam(model.parameters()))
    assert plan_optimizer(model, cfg).kind is OptimizerType.ONEBIT_ADAM
