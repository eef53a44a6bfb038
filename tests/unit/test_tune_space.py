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


def test_zeropp_is_varied_only_at_stage_3_across_hosts_and_keeps_old_keys() -> None:
    import dataclasses

    from ztune.profiles import load_hardware, load_model
    from ztune.tune.rank import Workload, local_hardware, zeropp_reason
    from ztune.tune.space import Candidate
    from ztune.tune.tuner import TrialRecord

    old = Constraints(num_ranks=4, global_batch=8, seq_len=64, vary=("stage", "micro"))
    multi = dataclasses.replace(old, vary=("stage", "micro", "zeropp"), num_nodes=2, ranks_per_node=2)
    plain = build_space(old)
    space = build_space(multi)
    # The candidates of a space without the knob are unchanged, keys included (old journals resume).
    assert [x.key for x in space if not x.zeropp] == [x.key for x in plain]
    assert "z3-bf16-mb2" in [x.key for x in plain]
    zpp = [x for x in space if x.zeropp]
    assert [x.key for x in zpp] == ["z3-bf16-zpp-mb1", "z3-bf16-zpp-mb2"]
    # One host, or one rank per host: nothing crosses a host boundary, no ZeRO++ candidate.
    for one in (dataclasses.replace(multi, num_nodes=1), dataclasses.replace(multi, ranks_per_node=1)):
        assert not any(x.zeropp for x in build_space(one))
    # A journal record written before the knob existed reads back as the same candidate.
    rec = {"index": 1, "candidate": {k: v for k, v in zpp[0].__dict__.items() if k != "zeropp"}, "status": "ok",
           "reason": "", "step_time_s": 1.0, "peak_memory_bytes": 1, "prior_step_time_s": 1.0,
           "estimated_memory_bytes": 1, "wall_s": 1.0}
    assert TrialRecord.from_journal(rec).candidate == dataclasses.replace(zpp[0], zeropp=False)
    # DeepSpeed's three keys, hpZ over one host's ranks; the estimate sees them and the reason compares with
    # plain stage 3 on a slow link (cpu-local between hosts).
    hw = local_hardware(load_hardware("cpu-local"), num_ranks=2)
    w = Workload(model=load_model("tiny-llama"), hardware=hw, base=TrainConfig(), global_batch=8, seq_len=64,
                 num_nodes=2)
    z = w.config(zpp[1]).zero
    assert (z.stage, z.quantized_weights, z.hpz_partition_size, z.quantized_gradients) == (3, True, 2, True)
    assert w.config(Candidate(3, False, "none", "bf16", "none", 2)).zero.hpz_partition_size == 1
    from ztune.cost.compute import DEFAULT_EFFICIENCY

    why = zeropp_reason(w, zpp[1], efficiency=DEFAULT_EFFICIENCY,
                        measured_s={"z3-bf16-zpp-mb2": 1.0, "z3-bf16-mb2": 1.5})
    assert "plain stage 3 (z3-bf16-mb2)" in why and "measured medians 1,000 ms against 1,500 ms" in why
    assert w.estimate(zpp[1]).comm.bytes_per_rank < w.estimate(plain[-1]).comm.bytes_per_rank
    assert zeropp_reason(w, plain[-1], efficiency=DEFAULT_EFFICIENCY) == ""
