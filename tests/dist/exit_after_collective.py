"""One rank of tests/dist/test_exit.py: run one collective (or one training step) and exit at once.

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python tests/dist/exit_after_collective.py OP

OP is a Comm collective on gloo (all_gather, reduce_scatter, all_reduce, all_to_all, broadcast), "engine"
(one stage 1 step through ztune.initialize, whose last collective is the parameter all-gather) or "stage3"
(one stage 3 step, then the script's own `dist.all_gather_object`, as benchmarks/cluster_worker.py ends;
run it with ZTUNE_SHM_MIN_BYTES=0 so that the engine moves everything through shared memory). The tensors
are temporaries, as a caller's often are, and the process ends right after the call returns, with the Comm
(or engine) still alive, as in a training script where it is global or held by a reference cycle.

`dist.destroy_process_group()` must then end the default group (its destructor joins gloo's worker threads):
if anything still holds it, its workers live on into interpreter shutdown and can abort the process there
(runtime/comm/groups.py). The script exits 3, printing why, when the group outlives the call.
"""

from __future__ import annotations

import sys
import weakref

import torch
import torch.distributed as dist
from torch import nn


def main(op: str) -> object:
    if op in ("engine", "stage3"):
        import ztune

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        engine, *_ = ztune.initialize(model, {
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": 3 if op == "stage3" else 1}})
        x = torch.randn(2, 8)
        engine.backward(nn.functional.mse_loss(engine(x), x.sum(dim=1, keepdim=True)))
        engine.step()
        if op == "stage3":
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, {"loss": 0.0})
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
    world_group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    if world_group() is not None:
        print(f"the default process group outlived destroy_process_group() ({sys.getrefcount(world_group()) - 1} "
              "references left)", flush=True)
        sys.exit(3)
    return kept


if __name__ == "__main__":
    KEPT = main(sys.argv[1])
