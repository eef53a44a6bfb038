"""One rank of tests/dist/test_exit.py: run one collective (or one training step) and exit at once.

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python tests/dist/exit_after_collective.py OP

OP is a Comm collective on gloo (all_gather, reduce_scatter, all_reduce, all_to_all, broadcast) or "engine"
(one stage 1 step through ztune.initialize, whose last collective is the parameter all-gather). The
tensors are temporaries, as a caller's often are, and the process ends right after the call returns, with
the Comm (or engine) still alive, as in a training script where it is global or held by a reference cycle:
the process group's worker threads then live on into interpreter shutdown.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn


def main(op: str) -> object:
    if op == "engine":
        import ztune

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        engine, *_ = ztune.initialize(model, {
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 1}})
        x = torch.randn(2, 8)
        engine.backward(nn.functional.mse_loss(engine(x), x.sum(dim=1, keepdim=True)))
        engine.step()
        kept: object = engine
    else:
        from ztune.runtime.comm import Comm

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        comm = Comm(group=dist.group.WORLD, rank=rank, world_size=world)
        if op == "all_gather":
            out = torch.zeros(64 * world)
            comm.all_gather(out, out[rank * 64:(rank + 1) * 64])
        elif op == "reduce_scatter":
            comm.reduce_scatter(torch.zeros(64), torch.ones(64 * world))
        elif op == "all_reduce":
            comm.all_reduce(torch.ones(64))
        elif op == "all_to_all":
            comm.all_to_all(torch.zeros(64 * world), torch.ones(64 * world))
        elif op == "broadcast":
            comm.broadcast(torch.ones(64))
        else:
            raise SystemExit(f"unknown op {op!r}")
        kept = comm
    dist.destroy_process_group()
    return kept


if __name__ == "__main__":
    KEPT = main(sys.argv[1])
