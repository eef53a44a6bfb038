"""A tiny job for `ztune launch`: train a small model for a few steps with gloo and report what arrived.

    ztune launch --hostfile hosts --config ds.json examples/launch_check.py -- --steps 5

Every rank prints one JSON line `LAUNCH_CHECK {...}` with its rank, world size, host interface, pid, the
arguments it got and the ZTUNE_CHECK_* environment variables, then a loss per step and `DONE`. The e2e tests
read these lines (e.g. to prove that `;`, `$(...)`, backticks and quotes arrived literally).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch import nn


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def batch_for(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True)


def train_with_ztune(steps: int, sleep_s: float) -> float:
    import ztune

    # No config argument: ztune.initialize reads the file named by $ZTUNE_CONFIG (set by `ztune launch`).
    engine, _optimizer, _loader, _sched = ztune.initialize(build_model())
    rank = dist.get_rank()
    loss_value = float("nan")
    for step in range(steps):
        x, y = batch_for(step, rank)
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        loss_value = float(loss.detach())
        print(f"step {step} loss {loss_value:.5f}", flush=True)
        time.sleep(sleep_s)
    return loss_value


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sleep-s", type=float, default=0.0, help="pause per step (failure tests)")
    args, extra = parser.parse_known_args()
    report = {
        "rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
        "local_rank": int(os.environ["LOCAL_RANK"]), "pid": os.getpid(), "cwd": os.getcwd(),
        "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"), "config": os.environ.get("ZTUNE_CONFIG"),
        "argv": sys.argv[1:], "extra": extra, "runtime": "ztune",
        "env": {k: v for k, v in os.environ.items() if k.startswith("ZTUNE_CHECK_")},
        "hostname": socket.gethostname(),
    }
    print("LAUNCH_CHECK " + json.dumps(report), flush=True)
    loss = train_with_ztune(args.steps, args.sleep_s)
    print(f"DONE rank={dist.get_rank()} world={dist.get_world_size()} loss={loss:.5f}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
