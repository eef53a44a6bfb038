"""The autotune search space."""

from __future__ import annotations

import pytest

from ztune.config.schema import Checkpointing, Offload, Precision, TrainConfig
from ztune.config.validate import resolve_batch
from ztune.tune.space import Constraints, SpaceError, build_space, micro_choices


def test_micro_choices_divide_the_per_rank_batch() -> None:
    assert micro_choices(global_batch=24, num_ranks=2) == [1, 2, 3, 4, 6, 12]
    assert micro_choices(global_batch=24, num_ranks=2, max_micro=4) == [1, 2, 3, 4]
    with pytest.raises(SpaceError, match="does not divide"):
        micro_choices(global_batch=16, num_ranks=2, allowed=[3])
    with pytest.raises(SpaceError, match="multiple of --nproc"):
        micro_choices(global_batch=7, num_ranks=2)


def test_space_skips_invalid_combinations_and_keys_are_unique() -> None:
    c = Constraints(num_ranks=2, global_batch=8, seq_len=64, vary=("stage", "offload", "checkpointing", "micro"))
    space = build_space(c)
    # stage 0 has no optimizer offload: (1 + 3 * 2) offload/stage pairs x 2 checkpointing x 3 micro-batches
    assert len(space) == 7 * 2 * 3
    assert not any(x.stage == 0 and x.offload_optimizer for x in space)
    assert len({x.key for x in space}) == len(space)


def test_knobs_not_varied_keep_their_first_value() -> None:
    space = build_space(Constraints(num_ranks=2, global_batch=8, seq_len=64, vary=("stage",)))
    assert {x.micro for x in space} == {4}  # the largest micro-batch when micro is fixed
    assert {x.checkpointing for x in space} == {"none"}
    with pytest.raises(SpaceError, match="unknown knob"):
        build_space(Constraints(num_ranks=2, global_batch=8, seq_len=64, vary=("stages",)))


def test_candidate_config_resolves_to_the_fixed_global_batch() -> None:
    space = build_space(Constraints(num_ranks=2, global_batch=16, seq_len=64,
                                    vary=("stage", "offload", "checkpointing", "micro")))
    cand = next(x for x in space if x.stage == 2 and x.offload_optimizer and x.checkpointing == "full")
    cfg = cand.to_config(TrainConfig(), global_batch=16, seq_len=64)
    assert cfg.zero.stage == 2 and cfg.zero.offload_optimizer is Offload.CPU
    assert cfg.activations.checkpointing is Checkpointing.FULL and cfg.precision is Precision.BF16
    batch = resolve_batch(cfg.batch, 2)
    assert batch.global_ == 16 and batch.micro * batch.grad_accum * 2 == 16
