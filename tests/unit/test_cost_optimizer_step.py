"""The optimizer step on device-resident states (cost/compute.py optimizer_step_s): stage 0 steps every trainable
parameter on every rank, stages 1-3 the rank's 1/n shard, at the profile's measured rate; 0 = not charged."""

import dataclasses

import pytest

from ztune.config.schema import BatchConfig, Offload, TrainConfig, ZeroConfig
from ztune.cost.compute import OffloadTime, optimizer_step_s, step_time
from ztune.cost.estimate import estimate
from ztune.cost.memory import shard_numel
from ztune.profiles import load_hardware, load_model
from ztune.specs import count_params

TINY = load_model("tiny-llama")
RATE = 2e8  # elements/s
CPU = dataclasses.replace(load_hardware("cpu-local"), optimizer_step_elements_per_s=RATE)


def _cfg(stage: int, **zero) -> TrainConfig:
    return TrainConfig(zero=ZeroConfig(stage=stage, **zero), batch=BatchConfig(micro=1, grad_accum=1), seq_len=128)


def test_optimizer_step_s_is_elements_over_rate_and_zero_when_unknown():
    assert optimizer_step_s(owned_numel=10**8, elements_per_s=2e8) == pytest.approx(0.5)
    assert optimizer_step_s(owned_numel=10**8, elements_per_s=0.0) == 0.0


def test_step_time_adds_the_optimizer_serially():
    base = dict(compute_s=1.0, grad_accum=1, comm_micro_s=0.0, comm_boundary_s=0.2, comm_after_step_s=0.0,
                offload=OffloadTime(), overlap=0.8)
    without, with_opt = step_time(**base), step_time(**base, optimizer_s=0.3)
    assert with_opt.optimizer_s == 0.3
    assert with_opt.step_s == pytest.approx(without.step_s + 0.3)  # nothing hides it
    assert with_opt.exposed_comm_s == without.exposed_comm_s


@pytest.mark.parametrize("nodes", [1, 2])
def test_stage0_charges_every_parameter_and_sharded_stages_their_shard(nodes):
    trainable = count_params(TINY).total
    world = nodes * CPU.gpus_per_node
    s0 = estimate(TINY, CPU, _cfg(0), num_nodes=nodes).step
    assert s0.optimizer_s == pytest.approx(trainable / RATE)  # independent of the world size
    for stage in (1, 2, 3):
        s = estimate(TINY, CPU, _cfg(stage), num_nodes=nodes).step
        assert s.optimizer_s == pytest.approx(shard_numel(trainable, world) / RATE)
        assert s.optimizer_s < s0.optimizer_s or world == 1
    # twice the rate, half the time; the rest of the step unchanged
    fast = estimate(TINY, dataclasses.replace(CPU, optimizer_step_elements_per_s=2 * RATE), _cfg(0), num_nodes=nodes)
    assert fast.step.optimizer_s == pytest.approx(s0.optimizer_s / 2)
    assert fast.step.step_s == pytest.approx(s0.step_s - s0.optimizer_s / 2)


def test_accumulation_does_not_multiply_the_optimizer_step():
    one = estimate(TINY, CPU, _cfg(1), num_nodes=1).step.optimizer_s
    cfg = dataclasses.replace(_cfg(1), batch=BatchConfig(micro=1, grad_accum=4))
    assert estimate(TINY, CPU, cfg, num_nodes=1).step.optimizer_s == pytest.approx(one)


def test_offloaded_optimizer_is_not_charged_twice_and_unknown_rate_changes_nothing():
    off = estimate(TINY, CPU, _cfg(2, offload_optimizer=Offload.CPU), num_nodes=1)
    assert off.step.optimizer_s == 0.0 and off.offload.cpu_optimizer_s > 0  # offload_time's CPU Adam has it
    unknown = dataclasses.replace(CPU, optimizer_step_elements_per_s=0.0)
    for stage in range(4):
        with_rate, without = (estimate(TINY, hw, _cfg(stage), num_nodes=2) for hw in (CPU, unknown))
        assert without.step.optimizer_s == 0.0
        assert without.step.step_s == pytest.approx(with_rate.step.step_s - with_rate.step.optimizer_s)
        assert any(n.startswith("optimizer step:") for n in with_rate.notes)
        assert not any(n.startswith("optimizer step:") for n in without.notes)


def test_shipped_profiles_charge_no_optimizer_step():
    # No shipped profile has a measured rate (only `ztune probe --model` writes one): their estimates are unchanged.
    from ztune.profiles import list_hardware

    for name in list_hardware():
        assert load_hardware(name).optimizer_step_elements_per_s == 0, name
    assert estimate(load_model("llama-2-7b"), load_hardware("dgx-h100"), _cfg(0), num_nodes=1).step.optimizer_s == 0


def test_recommendation_names_the_optimizer_when_it_decides():
    # a link so fast that communication costs nothing: stage 1 beats stage 0 only by stepping a quarter of the masters
    from ztune.cost.estimate import recommend

    fast = dataclasses.replace(CPU, gpus_per_node=4, intra_node_bw_bytes_per_s=1e15, intra_node_latency_s=1e-12)
    ests = [estimate(TINY, fast, _cfg(stage), num_nodes=1) for stage in (0, 1)]
    best, why = recommend(ests)
    assert best.config.zero.stage == 1 and "less optimizer compute" in why


def test_onebit_adam_is_charged_at_its_own_measured_rate_else_adamws_as_a_lower_bound():
    from ztune.config.schema import OptimizerConfig, OptimizerType

    trainable = count_params(TINY).total
    cfg = dataclasses.replace(_cfg(0), optimizer=OptimizerConfig(type=OptimizerType.ONEBIT_ADAM, freeze_step=10))
    slow = dataclasses.replace(CPU, onebit_step_elements_per_s=RATE / 5)
    measured = estimate(TINY, slow, cfg, num_nodes=2)
    assert measured.step.optimizer_s == pytest.approx(5 * trainable / RATE)
    assert any("1-bit Adam's compression-stage update" in n for n in measured.notes)
    fallback = estimate(TINY, CPU, cfg, num_nodes=2)  # no 1-bit rate: AdamW's, and the note says it is a lower bound
    assert fallback.step.optimizer_s == pytest.approx(trainable / RATE)
    assert any("a lower bound" in n for n in fallback.notes)
    assert measured.step.step_s == pytest.approx(fallback.step.step_s + 4 * trainable / RATE)
    # AdamW's step does not use the 1-bit rate
    assert estimate(TINY, slow, _cfg(0), num_nodes=2).step.optimizer_s == pytest.approx(trainable / RATE)
