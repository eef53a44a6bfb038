"""DeepSpeed's monitor blocks (`csv_monitor`, `tensorboard`, `wandb`) with DeepSpeed 0.19.8's meaning.

What DeepSpeed writes (deepspeed/runtime/engine.py, DeepSpeedEngine.step; deepspeed/monitor/*.py), and so
what this module writes:
- when: at every step() call that reaches the gradient-accumulation boundary (skipped fp16 steps included),
  after the optimizer and scheduler stepped, on global rank 0 only;
- events, as (name, value, x) with x = global_samples after the step (steps x train_batch_size()):
  "Train/Samples/lr" = get_lr()[0] (the lr of the next step), and with fp16 also "Train/Samples/loss_scale"
  = the loss scale after its update. DeepSpeed's (non-pipeline) engine writes no loss, grad-norm or
  samples-per-second events; its other events are wall-clock timings under `wall_clock_breakdown`, which
  ztune ignores.
- csv_monitor: directory os.path.join(output_path, job_name), made at start-up; one file per event named
  after the event with "/" and " " replaced by "_" plus ".csv"; opened for append; the first write of a file
  in this process adds the header row "step,<last /-component of the name>"; then one "x,value" row per write
  (Python's csv module, str() of the numbers).
- tensorboard: a torch.utils.tensorboard.SummaryWriter(log_dir=os.path.join(output_path, job_name)),
  add_scalar(name, value, x) per event and a flush after each step's events.
- wandb: wandb.init(project=project, group=group, entity=team) at start-up; wandb.log({name: value}, step=x)
  per event.
tensorboard and wandb are optional packages: an enabled block without its package fails at initialize.
"""

from __future__ import annotations

import csv
import importlib
import os
from typing import Any

from ztune.config.schema import LogDirMonitor, MonitorConfig, WandbMonitor
from ztune.errors import ConfigError

Event = tuple[str, float, int]  # (name, value, x = global samples)

LR_EVENT = "Train/Samples/lr"
LOSS_SCALE_EVENT = "Train/Samples/loss_scale"


def step_events(*, lr: float, loss_scale: float | None, global_samples: int) -> list[Event]:
    """The events DeepSpeed writes after one optimizer step; loss_scale None when fp16 is off."""
    events = [(LR_EVENT, float(lr), int(global_samples))]
    if loss_scale is not None:
        events.append((LOSS_SCALE_EVENT, float(loss_scale), int(global_samples)))
    return events


def _require(module: str, *, key: str, package: str) -> Any:
    """Import `module` or fail with one line naming the config key and the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{key}.enabled is true but the {package} package is not installed: "
                          f"pip install {package} (or set {key}.enabled to false)") from None


def check_available(cfg: MonitorConfig) -> None:
    """Fail at initialize (on every rank, before any collective) when an enabled block lacks its package."""
    if cfg.tensorboard.enabled:
        _require("torch.utils.tensorboard", key="tensorboard", package="tensorboard")
    if cfg.wandb.enabled:
        _require("wandb", key="wandb", package="wandb")


class CsvWriter:
    """DeepSpeed's CSV monitor file layout (see the module docstring)."""

    def __init__(self, block: LogDirMonitor):
        self.log_dir = os.path.join(block.output_path, block.job_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self._started: set[str] = set()  # files that got their header in this process

    @staticmethod
    def file_name(event_name: str) -> str:
        return event_name.replace("/", "_").replace(" ", "_") + ".csv"

    def write_events(self, events: list[Event]) -> None:
        for name, value, x in events:
            path = os.path.join(self.log_dir, self.file_name(name))
            with open(path, "a+", newline="") as f:
                writer = csv.writer(f)
                if path not in self._started:
                    self._started.add(path)
                    writer.writerow(["step", name.split("/")[-1]])
                writer.writerow([x, value])


class TensorBoardWriter:
    def __init__(self, block: LogDirMonitor):
        tb = _require("torch.utils.tensorboard", key="tensorboard", package="tensorboard")
        log_dir = os.path.join(block.output_path, block.job_name)
        os.makedirs(log_dir, exist_ok=True)
        self.writer = tb.SummaryWriter(log_dir=log_dir)

    def write_events(self, events: list[Event]) -> None:
        for name, value, x in events:
            self.writer.add_scalar(name, value, x)
        self.writer.flush()


class WandbWriter:
    def __init__(self, block: WandbMonitor):
        self.wandb = _require("wandb", key="wandb", package="wandb")
        self.wandb.init(project=block.project, group=block.group, entity=block.team)

    def write_events(self, events: list[Event]) -> None:
        for name, value, x in events:
            self.wandb.log({name: value}, step=x)


class Monitor:
    """The enabled writers of one rank (none except on rank 0, as in DeepSpeed)."""

    def __init__(self, cfg: MonitorConfig, *, rank: int):
        check_available(cfg)
        self.writers: list = []
        if rank != 0:
            return
        if cfg.tensorboard.enabled:
            self.writers.append(TensorBoardWriter(cfg.tensorboard))
        if cfg.wandb.enabled:
            self.writers.append(WandbWriter(cfg.wandb))
        if cfg.csv_monitor.enabled:
            self.writers.append(CsvWriter(cfg.csv_monitor))

    def after_step(self, engine) -> None:
        """Write the step's events; `engine` is a CompatEngine that just reached an accumulation boundary."""
        if not self.writers:
            return
        scale = engine.scaler.scale if engine.fp16_enabled() else None
        events = step_events(lr=engine.get_lr()[0], loss_scale=scale, global_samples=engine.global_samples)
        for w in self.writers:
            w.write_events(events)
