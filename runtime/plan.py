"""The ZeRO stage table: which model states each stage shards (Rajbhandari et al., SC'20, section 5).

The engine reads this table and nothing else to decide where buffers live; there is no per-stage code path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StagePlan:
    """What one ZeRO stage shards across the data-parallel ranks."""

    stage: int
    optimizer_states: bool  # fp32 master + moments: each rank keeps 1/n
    gradients: bool  # reduced gradients: each rank keeps 1/n (reduce-scatter every micro-step)
    parameters: bool  # compute-dtype parameters: each rank keeps 1/n, gathered per module unit

    @property
    def reduce_every_micro_step(self) -> bool:
        """Sharded gradients cannot accumulate a full-size gradient locally, so they reduce every micro-step;
        unsharded ones accumulate in place and reduce once at the accumulation boundary (no_sync style)."""
        return self.gradients

    @property
    def gathers_params_after_step(self) -> bool:
        """Stages 1/2 update only their shard and all-gather the full parameters afterwards; stage 3 keeps only
        the shard (it gathers per unit before use); stage 0 updates everything everywhere."""
        return self.optimizer_states and not self.parameters


STAGES: dict[int, StagePlan] = {
    0: StagePlan(0, optimizer_states=False, gradients=False, parameters=False),
    1: StagePlan(1, optimizer_states=True, gradients=False, parameters=False),
    2: StagePlan(2, optimizer_states=True, gradients=True, parameters=False),
    3: StagePlan(3, optimizer_states=True, gradients=True, parameters=True),
}


def plan_for(stage: int) -> StagePlan:
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    return STAGES[stage]
