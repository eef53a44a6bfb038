"""`ztune.initialize` with DeepSpeed's signature and meanings: the headline example, args / add_config_arguments,
config_params, the ignored-keys line, refused arguments, the dataloader's micro-batches and collate_fn,
init_distributed, zero_grad and load_state_dict. Most cases run in this process (a world of one); the
dataloader case for the issue's inputs 1 and 2 runs on 2 gloo ranks."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import ztune
from tests.helpers.spawn import run_ranks
from ztune.errors import ConfigError, UserError

pytestmark = pytest.mark.dist


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(x).pow(2).mean()


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def _x(i: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(i))


FP32 = {"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "weight_decay": 0.0}}}


def test_headline_example_takes_optimizer_steps_on_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, optimizer, _, _ = ztune.initialize_engine(model=model, config={
        "train_batch_size": 256, "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}})
    assert engine.train_micro_batch_size_per_gpu() == 256 and engine.gradient_accumulation_steps() == 1
    ids = torch.randint(0, 64, (256, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # one step per batch, as the example's loop does
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        assert engine.was_step_applied()
    assert engine.global_steps == 2 and engine.global_samples == 512
    after = engine.full_state_dict()
    assert any((after[n] - before[n]).abs().max() > 0 for n in before)


def test_args_deepspeed_config_and_ztune_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**FP32, "train_micro_batch_size_per_gpu": 5}))
    parser = ztune.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", str(path)])
    assert args.deepspeed is True
    engine, *_ = ztune.initialize(args=args, model=_tiny())
    assert engine.train_micro_batch_size_per_gpu() == 5
    args = parser.parse_args(["--ztune_config", str(path)])
    engine, *_ = ztune.initialize(args=args, model=_tiny())
    assert engine.train_micro_batch_size_per_gpu() == 5
    with pytest.raises(ConfigError, match="given twice, as config= and as args.deepspeed_config"):
        ztune.initialize(args=parser.parse_args(["--deepspeed_config", str(path)]), model=_tiny(), config=FP32)
    engine, *_ = ztune.initialize(model=_tiny(), config_params={**FP32, "train_micro_batch_size_per_gpu": 7})
    assert engine.train_micro_batch_size_per_gpu() == 7


def test_ignored_keys_are_listed_once_at_start_up(capsys):
    ztune.initialize(model=_tiny(), config={**FP32, "steps_per_print": 10, "zero_optimization": {
        "stage": 1, "overlap_comm": True, "contiguous_gradients": True}})
    out = capsys.readouterr().out
    assert out.count("ignored DeepSpeed keys: ") == 1
    assert "ignored DeepSpeed keys: zero_optimization.overlap_comm, zero_optimization.contiguous_gradients, " \
           "steps_per_print\n" in out  # in the order written


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mpu": object()}, "mpu= (model parallelism) is not supported"),
    ({"mesh_param": (1, 2)}, "mesh_param= "),
    ({"optimizer": torch.optim.RMSprop([nn.Parameter(torch.zeros(1))], lr=0.1)},
     "optimizer: ztune cannot shard torch.optim.rmsprop.RMSprop"),
    ({"config": FP32, "config_params": FP32}, "both config and config_params"),
    ({"config": {"train_batch_size": 8, "pipeline": {"stages": 2}}}, "pipeline: pipeline parallelism"),
])
def test_refused_arguments_raise_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError) as info:
        ztune.initialize(model=_tiny(), **{"config": FP32, **kwargs})
    assert message in str(info.value)


def test_dataloader_yields_derived_micro_batches_with_collate_fn():
    data = TensorDataset(torch.arange(64.0).reshape(32, 2))
    seen = []

    def collate(rows):
        seen.append(len(rows))
        return torch.stack([r[0] for r in rows])

    _, _, loader, _ = ztune.initialize(model=_tiny(), training_data=data, collate_fn=collate,
                                       config={"train_batch_size": 16, "gradient_accumulation_steps": 2})
    batches = list(loader)
    assert [b.shape[0] for b in batches] == [8] * 4 and seen == [8] * 4


def test_init_distributed_world_of_one_and_dist_init_required(monkeypatch):
    import torch.distributed as dist

    ztune.init_distributed()
    assert not dist.is_initialized()  # a world of one needs no group
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="dist_init_required=False but no process group exists"):
        ztune.init_distributed(dist_init_required=False)


@pytest.mark.parametrize("stage", [0, 1])
def test_zero_grad_drops_the_accumulated_gradients(stage):
    cfg = {**FP32, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": stage}}
    a, *_ = ztune.initialize(model=_tiny(), config=cfg)
    a.backward(a(_x(1)))
    a.step()
    a.zero_grad()  # drops micro-step 1's gradient: the step uses micro-step 2's only
    a.backward(a(_x(2)))
    a.step()
    b, *_ = ztune.initialize(model=_tiny(), config=cfg)
    b.backward(b(_x(1)) * 0.0)
    b.step()
    b.backward(b(_x(2)))
    b.step()
    assert a.was_step_applied() and b.was_step_applied()
    for (n, p), (_, q) in zip(a.module.named_parameters(), b.module.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0, msg=n)
    c, *_ = ztune.initialize(model=_tiny(), config=cfg)  # without zero_grad the result differs
    for i in (1, 2):
        c.backward(c(_x(i)))
        c.step()
    assert any((p - q).abs().max() > 1e-6 for p, q in zip(a.module.parameters(), c.module.parameters(), strict=True))


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_load_state_dict_sets_the_weights_the_optimizer_steps(stage):
    cfg = {**FP32, "zero_optimization": {"stage": stage}}
    source, *_ = ztune.initialize(model=_tiny(seed=5), config=cfg)
    saved = source.state_dict() if stage < 3 else {"module." + k: v for k, v in source.full_state_dict().items()}
    assert all(k.startswith("module.") for k in saved)
    engine, *_ = ztune.initialize(model=_tiny(seed=0), config=cfg)
    result = engine.load_state_dict(saved)
    assert not result.missing_keys and not result.unexpected_keys
    fresh, *_ = ztune.initialize(model=_tiny(seed=5), config=cfg)
    for e in (engine, fresh):
        e.backward(e(_x(3)))
        e.step()
    got, want = engine.full_state_dict(), fresh.full_state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0, msg=k)
    with pytest.raises(UserError, match="unexpected keys"):
        engine.load_state_dict({"blocks.0.weight": torch.zeros(4, 4)})


def _loader_sizes(rank: int, world_size: int) -> list:
    out = []
    data = TensorDataset(torch.arange(128.0).reshape(64, 2))
    for cfg in ({"train_batch_size": 32}, {"train_batch_size": 16, "gradient_accumulation_steps": 2}):
        engine, _, loader, _ = ztune.initialize(model=_tiny(), config=cfg, training_data=data)
        out.append((engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(),
                    {b[0].shape[0] for b in loader}))
    return out


def test_issue_inputs_1_and_2_on_two_ranks():
    for sizes in run_ranks(_loader_sizes, world_size=2, timeout_s=120):
        assert sizes == [(16, 1, {16}), (4, 2, {4})]  # DeepSpeed 0.19.8's derivation


def test_client_reduce_lr_on_plateau_steps_with_lr_kwargs():
    # DeepSpeed: engine.step(lr_kwargs={"metrics": m}) passes the metric to the scheduler's step after an
    # applied optimizer step. The lr must follow torch's own ReduceLROnPlateau driven the same way.
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    engine, _, _, got = ztune.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                         config={"train_micro_batch_size_per_gpu": 3,
                                                 "zero_optimization": {"stage": 0}})
    ref_opt = torch.optim.AdamW(_tiny().parameters(), lr=0.05, weight_decay=0.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, factor=0.5, patience=1)
    metrics = [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]  # plateaus, so the lr halves twice
    for i, m in enumerate(metrics):
        engine.backward(engine(_x(i)))
        engine.step(lr_kwargs={"metrics": m})
        ref.step(m)
        assert engine.get_lr() == [g["lr"] for g in ref_opt.param_groups], i
    assert engine.get_lr()[0] == pytest.approx(0.05 / 4)
