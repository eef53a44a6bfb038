"""DeepSpeed's monitor blocks (runtime/compat/monitor.py): the CSV layout of DeepSpeed 0.19.8's csvMonitor,
the config blocks, and the one-line errors when tensorboard / wandb are enabled without their package."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from ztune.config.deepspeed import from_deepspeed, to_deepspeed
from ztune.config.schema import LogDirMonitor, MonitorConfig
from ztune.errors import ConfigError
from ztune.runtime.compat.monitor import CsvWriter, Monitor, step_events


def test_csv_writer_layout(tmp_path):
    w = CsvWriter(LogDirMonitor(enabled=True, output_path=str(tmp_path), job_name="job"))
    w.write_events(step_events(lr=0.5, loss_scale=65536.0, global_samples=8))
    w.write_events(step_events(lr=0.25, loss_scale=32768.0, global_samples=16))
    folder = tmp_path / "job"
    assert sorted(p.name for p in folder.iterdir()) == ["Train_Samples_loss_scale.csv", "Train_Samples_lr.csv"]
    # Python's csv module: "\r\n" line ends, as DeepSpeed's csv.writer writes them
    assert (folder / "Train_Samples_lr.csv").read_bytes() == b"step,lr\r\n8,0.5\r\n16,0.25\r\n"
    assert (folder / "Train_Samples_loss_scale.csv").read_text() == "step,loss_scale\n8,65536.0\n16,32768.0\n"
    # a new writer (a new process) appends and starts with a header again, as DeepSpeed's does
    CsvWriter(LogDirMonitor(enabled=True, output_path=str(tmp_path), job_name="job")).write_events(
        step_events(lr=0.125, loss_scale=None, global_samples=24))
    assert (folder / "Train_Samples_lr.csv").read_text().splitlines()[3:] == ["step,lr", "24,0.125"]


def test_events_without_fp16_are_lr_only():
    assert step_events(lr=1e-3, loss_scale=None, global_samples=4) == [("Train/Samples/lr", 1e-3, 4)]


def test_blocks_read_with_deepspeeds_defaults_and_listed_when_disabled():
    cfg, ignored = from_deepspeed({"train_batch_size": 4, "csv_monitor": {"enabled": True},
                                   "tensorboard": {"enabled": False, "output_path": "tb"}, "wandb": {}})
    assert cfg.monitor.csv_monitor == LogDirMonitor(enabled=True, output_path="", job_name="DeepSpeedJobName")
    assert not cfg.monitor.tensorboard.enabled and cfg.monitor.wandb.project == "deepspeed"
    assert "tensorboard" in ignored and "wandb" in ignored and "csv_monitor" not in ignored
    assert from_deepspeed(to_deepspeed(cfg))[0].monitor == cfg.monitor


@pytest.mark.parametrize(("block", "message"), [
    ({"csv_monitor": {"enabled": "yes"}}, "csv_monitor.enabled: expected true or false"),
    ({"csv_monitor": {"path": "x"}}, "unknown key 'csv_monitor.path'; allowed here: enabled, job_name, output_path"),
    ({"wandb": {"team": 3}}, "wandb.team: expected a string"),
])
def test_bad_blocks_name_the_key(block, message):
    with pytest.raises(ConfigError, match=message):
        from_deepspeed({"train_batch_size": 4, **block})


@pytest.mark.parametrize(("key", "module"), [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_enabled_without_package_fails_at_initialize(monkeypatch, tmp_path, key, module):
    import ztune

    monkeypatch.setitem(sys.modules, module, None)  # import fails as when the package is not installed
    config = {"train_batch_size": 2, key: {"enabled": True}}
    if key == "tensorboard":
        config[key]["output_path"] = str(tmp_path)
    expected = f"{key}.enabled is true but the {key} package is not installed: pip install {key}"
    with pytest.raises(ConfigError, match=expected):
        ztune.initialize(nn.Linear(2, 2), config)
    with pytest.raises(ConfigError, match=expected):
        Monitor(MonitorConfig(**{key: type(getattr(MonitorConfig(), key))(enabled=True)}), rank=1)


def test_one_rank_initialize_writes_lr_rows(tmp_path):
    import ztune

    torch.manual_seed(0)
    config = {"train_batch_size": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "j"}}
    engine, *_ = ztune.initialize(nn.Linear(2, 2), config)
    for _ in range(2):
        engine.backward(engine(torch.ones(2, 2)).sum())
        engine.step()
    assert (tmp_path / "j" / "Train_Samples_lr.csv").read_text().splitlines() == ["step,lr", "2,0.1", "4,0.1"]


def test_ztune_yaml_monitor_block_round_trips():
    from ztune.config.io import load, to_dict

    cfg = load({"monitor": {"csv_monitor": {"enabled": True, "output_path": "logs"}}})
    assert cfg.monitor.csv_monitor == LogDirMonitor(enabled=True, output_path="logs")
    assert load(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown key 'monitor.comet'"):
        load({"monitor": {"comet": {"enabled": True}}})
