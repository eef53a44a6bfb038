"""DeepSpeed 0.19.8 on 2 CPU ranks is the reference for the `csv_monitor` block: the same model, config
(WarmupLR schedule, 2 accumulation steps, ZeRO stage 2) and data under deepspeed.initialize and
ztune.initialize write the same CSV files (names, header, steps; values within 1e-6), on rank 0 only."""

from __future__ import annotations

import copy
import csv
import os

import pytest
import torch
from torch import nn

from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.dist

WORLD_SIZE, MICRO_STEPS, MICRO, WIDTH = 2, 6, 4, 8
CONFIG = {
    "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 2,
    "zero_optimization": {"stage": 2}, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
    "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True, "weight_decay": 0.0}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 2e-2,
                                                 "warmup_num_steps": 4, "warmup_type": "linear"}},
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))


def _train(engine, rank: int) -> None:
    for step in range(MICRO_STEPS):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(MICRO, WIDTH, generator=g), torch.randn(MICRO, WIDTH, generator=g)
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()


def _config(root: str, side: str) -> dict:
    cfg = copy.deepcopy(CONFIG)
    cfg["csv_monitor"] = {"enabled": True, "output_path": os.path.join(root, side), "job_name": "job"}
    return cfg


def _both(rank: int, world_size: int, root: str) -> dict:
    import torch.distributed as dist

    from tests.helpers.deepspeed_cpu import init_deepspeed_distributed

    deepspeed = init_deepspeed_distributed()
    model = _model()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=_config(root, "deepspeed"))
    _train(engine, rank)
    del engine
    dist.barrier()
    import ztune

    engine, _, _, _ = ztune.initialize(_model(), _config(root, "ztune"))
    _train(engine, rank)
    dist.barrier()
    return {"writers": len(engine.monitor.writers)}


def _read(folder: str) -> dict[str, list[list[str]]]:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), newline="") as f:
            out[name] = list(csv.reader(f))
    return out


def test_csv_monitor_matches_deepspeed(tmp_path):
    results = run_ranks(_both, world_size=WORLD_SIZE, args=(str(tmp_path),), timeout_s=600)
    assert [r["writers"] for r in results] == [1, 0]  # rank 0 writes, as DeepSpeed's MonitorMaster
    ds = _read(str(tmp_path / "deepspeed" / "job"))
    zt = _read(str(tmp_path / "ztune" / "job"))
    assert list(ds) == ["Train_Samples_lr.csv"]  # fp32: DeepSpeed writes the lr only
    assert list(zt) == list(ds)
    for name, ds_rows in ds.items():
        zt_rows = zt[name]
        assert zt_rows[0] == ds_rows[0] == ["step", "lr"]
        assert len(ds_rows) == 1 + MICRO_STEPS // 2  # one row per optimizer step
        assert [r[0] for r in zt_rows] == [r[0] for r in ds_rows]  # x = global samples: 16, 32, 48
        for (_, zv), (_, dv) in zip(zt_rows[1:], ds_rows[1:], strict=True):
            assert float(zv) == pytest.approx(float(dv), rel=1e-6, abs=0)
        assert len({r[1] for r in ds_rows[1:]}) > 1  # the warm-up moves the lr: the rows are not constant
