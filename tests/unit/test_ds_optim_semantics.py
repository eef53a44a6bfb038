"""DeepSpeed's optimizer semantics in one process: the config mapping (Adam means AdamW unless adam_w_mode is
false, weight_decay defaults to 0), Adam without bias correction in the fused CPU kernel and its torch
fallback, the optimizer class the shards get, and what `initialize` accepts as model_parameters / optimizer /
lr_scheduler (runtime/compat/optimizers.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ztune
from ztune.config import from_dict
from ztune.config.schema import OptimizerType
from ztune.errors import ConfigError
from ztune.runtime.ops import adam_step_, kernel_backend, torch_adam_step
from ztune.runtime.optim_shard import FusedCpuAdamW, TorchOpsAdam, TorchOpsAdamW, build_shard_optimizer


def _opt(params: dict, type_: str = "Adam"):
    return from_dict({"train_batch_size": 2, "optimizer": {"type": type_, "params": params}}).optimizer


def test_deepspeed_optimizer_block_means_what_it_means_in_deepspeed():
    assert _opt({"weight_decay": 0.1}).type is OptimizerType.ADAMW  # adam_w_mode defaults to true
    assert _opt({"weight_decay": 0.1, "adam_w_mode": False}).type is OptimizerType.ADAM
    assert _opt({"adam_w_mode": False}, "AdamW").type is OptimizerType.ADAMW  # AdamW always decouples
    assert _opt({}, "AdamW").weight_decay == 0.0 and _opt({}).weight_decay == 0.0
    assert _opt({}, "SGD").weight_decay == 0.0
    assert _opt({"bias_correction": False}).bias_correction is False
    assert _opt({"amsgrad": False}).type is OptimizerType.ADAMW  # the "off" value is accepted
    o = _opt({})
    assert (o.lr, o.betas, o.eps) == (1e-3, (0.9, 0.999), 1e-8)  # FusedAdam / DeepSpeedCPUAdam defaults
    for params, type_, message in (({"adam_w_mode": 1}, "Adam", "adam_w_mode: expected true or false"),
                                   ({"bias_correction": False}, "SGD", "bias_correction: SGD has no bias_correction"),
                                   ({"amsgrad": True}, "Adam", "optimizer.params.amsgrad: True is not supported"),
                                   ({"nesterov": True}, "SGD", "optimizer.params.nesterov: True is not supported"),
                                   ({"eps2": 1.0}, "Adam", "unknown key 'optimizer.params.eps2'")):
        with pytest.raises(ConfigError, match=message):
            _opt(params, type_)


def _reference_no_bias_correction(p, g, m, v, *, lr, b1, b2, eps, wd, adamw):
    """DeepSpeed's CPU Adam with bias_correction false (deepspeed/ops/csrc/includes/cpu_adam.h): both
    corrections are 1."""
    p, m, v = p.double().clone(), m.double().clone(), v.double().clone()
    g = g.double()
    if wd and not adamw:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    if wd and adamw:
        p = p - lr * wd * p
    return p - lr * m / (v.sqrt() + eps), m, v


@pytest.mark.parametrize("adamw", [True, False])
@pytest.mark.parametrize("path", ["kernel", "torch-ops"])
def test_adam_without_bias_correction(path, adamw):
    if path == "kernel" and kernel_backend() != "cpp":
        pytest.fail("the fused C++ kernel did not build on this machine (see CppAdamFallbackWarning)")
    step_fn = adam_step_ if path == "kernel" else torch_adam_step
    torch.manual_seed(0)
    n = 1000
    p, m, v = torch.randn(n), torch.randn(n) * 0.1, torch.rand(n) * 0.01
    want_p, want_m, want_v = p.clone(), m.clone(), v.clone()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, adamw=adamw)
    for step in range(1, 4):
        g = torch.randn(n)
        want_p, want_m, want_v = _reference_no_bias_correction(want_p, g, want_m, want_v, lr=kw["lr"], b1=0.9,
                                                               b2=0.999, eps=1e-8, wd=0.1, adamw=adamw)
        step_fn(p, g, m, v, step=step, grad_scale=1.0, out=None, bias_correction=False, **kw)
    assert torch.allclose(p.double(), want_p, rtol=1e-6, atol=1e-7)
    assert torch.allclose(m.double(), want_m, rtol=1e-5, atol=1e-7)
    # With correction the first step is ~lr * sign(g); without it the step is (1 - b1) / sqrt(1 - b2) ~ 3x
    # larger: the flag must change the result.
    q, mq, vq = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    r, mr, vr = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    g = torch.ones(4)
    step_fn(q, g, mq, vq, step=1, grad_scale=1.0, out=None, bias_correction=True, **kw)
    step_fn(r, g, mr, vr, step=1, grad_scale=1.0, out=None, bias_correction=False, **kw)
    assert torch.allclose(q, torch.full((4,), -1e-2), rtol=1e-4)
    assert torch.allclose(r, torch.full((4,), -1e-2 * 0.1 / 0.001**0.5), rtol=1e-4)


def test_shard_optimizer_class_follows_bias_correction():
    masters = [torch.zeros(8), torch.zeros(8)]
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum=0.0)
    assert isinstance(build_shard_optimizer(masters, kind=OptimizerType.ADAMW, fused_cpu=False, **kw),
                      torch.optim.AdamW)
    off = build_shard_optimizer(masters, kind=OptimizerType.ADAMW, fused_cpu=False, bias_correction=False, **kw)
    assert type(off) is TorchOpsAdamW and off.param_groups[0]["bias_correction"] is False
    groups = [{"params": [masters[0]], "bias_correction": False}, {"params": [masters[1]], "lr": 5e-3}]
    mixed = build_shard_optimizer(masters, kind=OptimizerType.ADAM, fused_cpu=False, param_groups=groups, **kw)
    assert type(mixed) is TorchOpsAdam
    assert [g["bias_correction"] for g in mixed.param_groups] == [False, True]
    assert [g["lr"] for g in mixed.param_groups] == [1e-3, 5e-3]
    fused = build_shard_optimizer(masters, kind=OptimizerType.ADAMW, fused_cpu=True, param_groups=groups, **kw)
    assert type(fused) is FusedCpuAdamW and [g["lr"] for g in fused.param_groups] == [1e-3, 5e-3]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x.square().mean()


def _split(model):
    return ([p for n, p in model.named_parameters() if n.endswith("weight")],
            [p for n, p in model.named_parameters() if n.endswith("bias")])


def test_client_optimizer_is_taken_over_with_its_groups():
    model = Tiny()
    w, b = _split(model)
    client = torch.optim.SGD([{"params": w, "lr": 0.3}, {"params": b, "momentum": 0.5}], lr=0.1, momentum=0.9,
                             weight_decay=0.01)
    engine, optimizer, _, _ = ztune.initialize(model, {"precision": "fp32", "zero": {"stage": 1}}, optimizer=client)
    assert isinstance(optimizer, torch.optim.SGD)
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in optimizer.param_groups] == \
        [(0.3, 0.9, 0.01), (0.1, 0.5, 0.01)]
    assert engine.optimizer is optimizer


def test_client_scheduler_on_the_client_optimizer_drives_the_shards():
    model = Tiny()
    client = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(client, step_size=1, gamma=0.5)
    engine, optimizer, _, scheduler = ztune.initialize(model, {"precision": "fp32"}, optimizer=client,
                                                       lr_scheduler=sched)
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 4)))
        engine.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert scheduler.get_last_lr() == pytest.approx([0.025])


def test_config_scheduler_is_returned_and_stepped_only_on_applied_steps():
    import math

    model = Tiny()
    cfg = {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True, "hysteresis": 1, "initial_scale_power": 4},
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-2, "warmup_num_steps": 10,
                                                        "warmup_type": "linear"}}}
    engine, optimizer, _, scheduler = ztune.initialize(model, cfg)
    assert type(scheduler).__name__ == "WarmupLR" and optimizer.param_groups[0]["lr"] == 0.0
    lrs, scales = [], []
    for step in range(4):
        loss = engine(torch.randn(2, 4))
        engine.backward(loss * math.inf if step == 1 else loss)  # step 1 overflows: skipped
        applied = engine.step()
        assert applied == (step != 1)
        lrs.append(optimizer.param_groups[0]["lr"])
        scales.append(engine.scaler.scale)
    assert lrs == pytest.approx([0.0, 0.0, 1e-3, 2e-3])  # WarmupLR linear: it / N * max; no step for the skip
    assert scales == [16.0, 8.0, 8.0, 8.0]
    assert engine.skipped_steps == 1


def test_overflow_at_the_minimum_scale_stops_training():
    import math

    from ztune.runtime.precision import LossScaleError

    model = Tiny()
    cfg = {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True, "initial_scale_power": 3,
                                                          "min_loss_scale": 4, "hysteresis": 1}}
    engine, _, _, _ = ztune.initialize(model, cfg)
    with pytest.raises(LossScaleError, match="minimum loss scale 4"):
        for _ in range(25):
            engine.backward(engine(torch.randn(2, 4)) * math.inf)
            engine.step()
    assert engine.global_steps == 1 and engine.scaler.scale == 4.0  # the second overflow raised


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"optimizer": "rmsprop"}, "cannot shard torch.optim.rmsprop.RMSprop"),
    ({"optimizer": "amsgrad"}, "amsgrad=True is not supported"),
    ({"optimizer": "stateful"}, "state from earlier steps"),
    ({"model_parameters": "mixed"}, "mixes parameter groups"),
    ({"model_parameters": "betas-sgd"}, "'betas' is not a hyper-parameter of SGD"),
    ({"lr_scheduler": "wrong-groups"}, "drives an optimizer with 2 parameter groups"),
])
def test_what_initialize_cannot_honour_is_one_config_error(kwargs, message):
    model = Tiny()
    w, b = _split(model)
    cfg = {"precision": "fp32"}
    arg, value = next(iter(kwargs.items()))
    if value == "rmsprop":
        value = torch.optim.RMSprop(model.parameters())
    elif value == "amsgrad":
        value = torch.optim.Adam(model.parameters(), amsgrad=True)
    elif value == "stateful":
        value = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(2, 4)).backward()
        value.step()
    elif value == "mixed":
        value = [{"params": w}, *b]
    elif value == "betas-sgd":
        cfg["optimizer"] = {"type": "SGD"}
        value = [{"params": w, "betas": (0.9, 0.99)}, {"params": b}]
    elif value == "wrong-groups":
        other = torch.optim.AdamW([{"params": w}, {"params": b}])
        value = torch.optim.lr_scheduler.StepLR(other, 1)
    with pytest.raises(ConfigError, match=message):
        ztune.initialize(model, cfg, **{arg: value})


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_no_bias_correction_and_group_lrs_through_the_optimizer_step(offload):
    """Adam without bias correction, with a per-group lr, through the fused kernel (CPU run) and the offload
    pipeline, against DeepSpeed's CPU-Adam formula (tests/helpers/deepspeed_cpu.py DsCpuAdamFormula)."""
    from tests.helpers.deepspeed_cpu import DsCpuAdamFormula

    cfg = {"zero": {"stage": 1, "offload_optimizer": offload}, "precision": "fp32",
           "optimizer": {"type": "AdamW", "lr": 1e-2, "weight_decay": 0.1, "bias_correction": False}}
    torch.manual_seed(0)
    model = Tiny()
    torch.manual_seed(0)
    ref = Tiny()
    w, b = _split(model)
    rw, rb = _split(ref)
    engine, optimizer, _, _ = ztune.initialize(model, cfg, model_parameters=[{"params": w, "lr": 3e-2},
                                                                             {"params": b}])
    assert {g["bias_correction"] for g in optimizer.param_groups} == {False}
    ref_opt = DsCpuAdamFormula([{"params": rw, "lr": 3e-2}, {"params": rb}], lr=1e-2, weight_decay=0.1,
                               bias_correction=False)
    for step in range(4):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(step))
        engine.backward(engine(x))
        engine.step()
        ref(x).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    state = engine.full_state_dict()
    for n, q in ref.named_parameters():
        assert torch.allclose(state[n], q.detach(), rtol=1e-5, atol=1e-7), n


def test_scheduler_and_loss_scaling_round_trip_through_yaml_form():
    from ztune.config import to_dict

    cfg = from_dict({"train_batch_size": 8, "fp16": {"enabled": True, "loss_scale": 0, "hysteresis": 3},
                     "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": [1e-4, 2e-4], "cycle_max_lr": 1e-2}},
                     "optimizer": {"type": "Adam", "params": {"bias_correction": False}}})
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(("bf16_block", "want", "skips"), [
    ({"enabled": True}, True, True),  # DeepSpeed's default: true (precision_config.py)
    ({"enabled": True, "check_grad_overflow": False}, False, False),
    ({"enabled": False, "check_grad_overflow": True}, False, False),  # a disabled block is read by no one
])
def test_bf16_check_grad_overflow_skips_a_non_finite_step_as_in_deepspeed(bf16_block, want, skips):
    """DeepSpeed's bf16 check_grad_overflow (on when absent) skips an optimizer step whose gradients are not
    finite; it was listed as ignored, so such a step was applied (NaN weights) unless gradient_clipping > 0."""
    import math

    cfg = from_dict({"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0, "bf16": bf16_block})
    assert cfg.check_grad_overflow is want
    model = Tiny()
    engine, _, _, _ = ztune.initialize(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    engine.backward(engine(torch.randn(2, 4)).float() * math.inf)
    engine.step()
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    assert engine.skipped_steps == (1 if skips else 0)
    assert finite is skips
    if skips:
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_check_grad_overflow_config_values():
    assert from_dict({"precision": "bf16"}).check_grad_overflow is False  # ztune's own default
    assert from_dict({"check_grad_overflow": True}).check_grad_overflow is True
    with pytest.raises(ConfigError, match="bf16.check_grad_overflow: expected true or false, got 'yes'"):
        from_dict({"train_batch_size": 2, "bf16": {"enabled": True, "check_grad_overflow": "yes"}})
    from ztune.config.deepspeed import to_deepspeed

    doc = to_deepspeed(from_dict({"train_batch_size": 2, "bf16": {"enabled": True}}))
    assert doc["bf16"] == {"enabled": True, "check_grad_overflow": True}
