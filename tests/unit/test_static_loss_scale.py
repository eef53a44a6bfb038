"""Under a static fp16 loss scale (loss_scale > 0) the dynamic scaler's settings have no effect (DeepSpeed builds
no dynamic scaler): each one given is type- and range-checked as for dynamic scaling, then listed once as
ignored; with dynamic scaling they are read and not listed."""

import pytest

from ztune.config import from_deepspeed, from_dict
from ztune.errors import ConfigError

DYNAMIC = {"initial_scale_power": 12, "loss_scale_window": 500, "hysteresis": 3, "min_loss_scale": 2,
           "consecutive_hysteresis": True}


def _fp16(**block):
    return from_deepspeed({"train_batch_size": 8, "fp16": {"enabled": True, **block}})


def test_dynamic_settings_under_a_static_scale_are_listed_once_as_ignored():
    cfg, ignored = _fp16(loss_scale=128, **DYNAMIC)
    assert cfg.loss_scaling.loss_scale == 128
    assert sorted(ignored) == sorted(f"fp16.{k}" for k in DYNAMIC)
    _, ignored = _fp16(loss_scale=0, **DYNAMIC)
    assert ignored == []


@pytest.mark.parametrize("key, value, message", [
    ("hysteresis", -3, "fp16.hysteresis: got -3; must be > 0"),
    ("loss_scale_window", 0, "fp16.loss_scale_window: got 0; must be > 0"),
    ("min_loss_scale", -1, "fp16.min_loss_scale: got -1.0; must be > 0"),
    ("initial_scale_power", 500, "fp16.initial_scale_power: got 500; must be in [-126, 127]"),
    ("hysteresis", "2", "fp16.hysteresis: expected an integer"),
    ("consecutive_hysteresis", "yes", "fp16.consecutive_hysteresis: expected true or false"),
])
def test_nonsense_dynamic_settings_are_refused_under_a_static_scale(key, value, message):
    with pytest.raises(ConfigError) as info:
        _fp16(loss_scale=128, **{key: value})
    assert str(info.value).startswith(message), str(info.value)


def test_ztune_yaml_checks_them_under_a_static_scale_too():
    with pytest.raises(ConfigError, match=r"^loss_scaling\.hysteresis: got -3; must be > 0"):
        from_dict({"precision": "fp16", "loss_scaling": {"loss_scale": 128, "hysteresis": -3}})
