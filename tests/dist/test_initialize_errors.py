"""Bad input to ztune.initialize fails there, with one ConfigError that names the problem. Most cases run
in this process (world size 1, no process group); the batch-split cases need real ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ztune
from tests.helpers.spawn import run_ranks
from ztune.errors import ConfigError

pytestmark = pytest.mark.dist


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x).sum()


def _frozen() -> nn.Module:
    m = Tiny()
    m.requires_grad_(False)
    return m


@pytest.mark.parametrize(
    ("make_model", "config", "kwargs", "message"),
    [
        (lambda: nn.ReLU(), {"zero": {"stage": 3}}, {}, "has no parameters"),
        (_frozen, {"zero": {"stage": 2}}, {}, "no trainable parameters"),
        (lambda: "not a model", None, {}, "must be a torch.nn.Module"),
        (Tiny, {"zero": {"stag": 1}}, {}, "unknown key 'zero.stag'"),
        (Tiny, {"zero": {"stage": 5}}, {}, "zero.stage"),
        (Tiny, {"compression": {"method": "topk", "topk_ratio": 2}}, {}, "topk_ratio"),
        (Tiny, "/nonexistent/ztune.yaml", {}, "does not exist"),
        (Tiny, {"zero": {"stage": 3}}, {"units": [nn.Linear(2, 2)]}, "submodule of the model"),
        (Tiny, {"zero": {"stage": 3}}, {"units": "self"}, "must not overlap"),
        (Tiny, {"zero": {"stage": 3}}, {"units": "list"}, "a ModuleList is never called itself"),
        (Tiny, None, {"model_parameters": "two-groups"}, "more than one parameter group"),
        (Tiny, None, {"model_parameters": [nn.Parameter(torch.zeros(1))]}, "parameter of the model"),
    ],
    ids=["no-params", "all-frozen", "not-a-module", "unknown-key", "bad-stage", "bad-topk-ratio", "missing-file",
         "foreign-unit", "overlapping-units", "module-list-unit", "param-groups", "foreign-param"],
)
def test_bad_input_raises_config_error(make_model, config, kwargs, message):
    model = make_model()
    if kwargs.get("units") == "self":
        kwargs = {"units": [model.blocks[0], model.blocks[0]]}
    if kwargs.get("units") == "list":
        kwargs = {"units": [model.blocks]}
    if kwargs.get("model_parameters") == "two-groups":
        kwargs = {"model_parameters": [{"params": model.head.parameters()}, {"params": [model.head.bias]}]}
    with pytest.raises(ConfigError, match=message):
        ztune.initialize(model, config, **kwargs)


def test_unsupported_16bit_precision_is_a_config_error(monkeypatch):
    import ztune.runtime.precision as precision

    monkeypatch.setattr(precision, "dtype_supported", lambda dtype, *, device: False)
    with pytest.raises(ConfigError, match="precision: fp16 is not supported on cpu"):
        ztune.initialize(Tiny(), {"precision": "fp16"})


def test_config_from_env_path_and_dataloader_and_scheduler(tmp_path, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text("zero: {stage: 1}\nprecision: fp32\nbatch: {micro: 3, grad_accum: 2}\noptimizer: {lr: 0.5}\n")
    monkeypatch.setenv("ZTUNE_CONFIG", str(path))
    data = torch.utils.data.TensorDataset(torch.randn(12, 4))
    engine, optimizer, loader, scheduler = ztune.initialize(
        Tiny(), training_data=data, lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    assert engine.plan.stage == 1 and engine.grad_accum == 2
    assert [len(x) for (x,) in loader] == [3, 3, 3, 3]
    for (x,) in loader:
        engine.backward(engine(x))
        engine.step()
    assert engine.global_steps == 2
    assert scheduler.get_last_lr() == [0.5 * 0.5**2]  # stepped once per optimizer step, not per micro-step
    assert optimizer.param_groups[0]["lr"] == 0.125


def _batch_errors(rank: int, world_size: int) -> list[str]:
    messages = []
    for cfg in ({"batch": {"micro": 1, "global": 3}},
                {"train_batch_size": 6, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2}):
        try:
            ztune.initialize(Tiny(), cfg)
            messages.append("no error")
        except ConfigError as exc:
            messages.append(str(exc))
    return messages


def test_global_batch_must_split_over_ranks():
    results = run_ranks(_batch_errors, world_size=2, timeout_s=60)
    for messages in results:
        assert "batch.global 3 is not divisible by batch.micro 1 x 2 ranks" in messages[0]
        # A DeepSpeed config's error names DeepSpeed's keys.
        assert ("train_micro_batch_size_per_gpu 1 x gradient_accumulation_steps 2 x 2 ranks = 4, but "
                "train_batch_size is 6") in messages[1]
