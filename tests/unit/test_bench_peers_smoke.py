"""Parity of the systems benchmarks/runtime_vs_peers.py times: on the same seeded MLP and data, DDP,
DDP + ZeroRedundancyOptimizer, FSDP2 (both reshard settings), DeepSpeed ZeRO-1/2/3 and ztune stages 0-3
give the same fp32 losses for 3 steps on 2 gloo ranks. The benchmark's step-time ratios only mean something
if every system trains the same model the same way; this is the check. Needs the `bench` extra (DeepSpeed).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.spawn import run_ranks

pytest.importorskip("deepspeed", reason="the peer parity check needs the bench extra: pip install -e '.[bench]'")

WORLD_SIZE = 2
NUM_STEPS = 3
# fp32 everywhere. Same sums in the same order give identical bits, but the systems divide by the world
# size at different points (before or after the reduction; ztune flattens into padded buffers), which may
# move the last bits.
LOSS_RTOL = 1e-5


class TinyMLP(nn.Module):
    def __init__(self, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return nn.functional.mse_loss(x, y)


def _batch(*, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    # One fixed batch per rank, so three AdamW steps must lower the loss.
    g = torch.Generator().manual_seed(rank)
    return torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)


def _train_all(rank: int, world_size: int) -> dict[str, list[float]]:
    import torch.distributed as dist

    from benchmarks import peers

    systems = (peers.ZTUNE if peers.ztune_available() else ()) + peers.PEERS
    losses = {}
    for system in systems:
        torch.manual_seed(0)
        trainer = peers.build(system, TinyMLP(), bf16=False, micro_batch=4, seq_len=1)
        losses[system.name] = [trainer.step(_batch(rank=rank)) for _ in range(NUM_STEPS)]
        del trainer
        dist.barrier()
    return losses


@pytest.mark.dist
def test_peers_train_identically_in_fp32():
    from benchmarks import peers

    losses = run_ranks(_train_all, world_size=WORLD_SIZE, timeout_s=120)[0]
    expected = {s.name for s in peers.PEERS} | ({s.name for s in peers.ZTUNE} if peers.ztune_available() else set())
    assert set(losses) == expected
    reference = losses["DDP"]
    assert reference[-1] < reference[0], f"DDP did not train: {reference}"
    for name, got in losses.items():
        assert got == pytest.approx(reference, rel=LOSS_RTOL), f"{name}: {got} vs DDP {reference}"
