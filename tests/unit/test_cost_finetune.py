"""Partial fine-tuning (frozen parameters, LoRA) and the stage-3 init peak in the cost model: the formulas on
a small hand-counted model, and their wiring through `estimate`."""

import dataclasses

import pytest

from ztune.config.schema import (
    ActivationConfig,
    BatchConfig,
    Checkpointing,
    Offload,
    OptimizerType,
    Precision,
    TrainConfig,
    ZeroConfig,
)
from ztune.cost.comm import REDUCE_SCATTER, zero_collectives
from ztune.cost.estimate import Framework, estimate
from ztune.cost.finetune import (
    init_peak,
    init_unit_numel,
    lora_numel_per_layer,
    trainable_split,
    training_flops_per_token,
)
from ztune.cost.memory import buffer_memory, model_state_memory, state_bytes_per_param
from ztune.profiles import load_hardware, load_model
from ztune.specs import Architecture, ModelSpec, count_params

# h 64, 4 heads of 16, 2 KV heads (kv width 32), 2 layers, SwiGLU 128, vocab 100, untied head.
SMALL = ModelSpec(name="small", architecture=Architecture.LLAMA, vocab_size=100, hidden_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=256)
LLAMA70 = load_model("llama-2-70b")
H100 = load_hardware("dgx-h100")
BF16_ADAM = state_bytes_per_param(precision=Precision.BF16, optimizer=OptimizerType.ADAMW)


def cfg(stage=3, **zero):
    return TrainConfig(zero=ZeroConfig(stage=stage, **zero), precision=Precision.BF16, seq_len=4096,
                       batch=BatchConfig(micro=1, global_=None),
                       activations=ActivationConfig(checkpointing=Checkpointing.FULL))


def test_small_model_counts_by_hand():
    c = count_params(SMALL)
    # attention 64*64 + 2*64*32 + 64*64 = 12288, mlp 3*64*128 = 24576, two RMSNorms 128
    assert c.per_layer == 12288 + 24576 + 128
    assert c.total == 100 * 64 + 2 * c.per_layer + 64 + 100 * 64
    assert init_unit_numel(c) == c.per_layer  # a layer (36992) is larger than the root unit (12864)
    big_vocab = count_params(dataclasses.replace(SMALL, vocab_size=1000))
    assert init_unit_numel(big_vocab) == 1000 * 64 + 64 + 1000 * 64  # embedding + final norm + head


def test_lora_counts_follow_pefts_formula():
    # PEFT's LoRA adds A (r x in) and B (out x r) per target: r (in + out). Llama targets q_proj (64 -> 64) and
    # v_proj (64 -> 32): 4 (64 + 64) + 4 (64 + 32) = 896 per layer at rank 4.
    assert lora_numel_per_layer(SMALL, rank=4) == 896
    split = trainable_split(SMALL, count_params(SMALL), lora_rank=4)
    assert split.trainable == 2 * 896 and split.frozen == count_params(SMALL).total
    # GPT-2 targets the fused c_attn (768 -> 2304): r (768 + 2304) per layer, 12 layers.
    gpt2 = load_model("gpt2")
    assert trainable_split(gpt2, count_params(gpt2), lora_rank=8).trainable == 12 * 8 * (768 + 2304) == 294_912


def test_fraction_split_and_bad_values():
    c = count_params(SMALL)
    s = trainable_split(SMALL, c, fraction=0.25)
    assert s.trainable == round(0.25 * c.total) and s.total == c.total and not s.is_full
    assert trainable_split(SMALL, c).is_full
    for kwargs in ({"fraction": 0.0}, {"fraction": 1.5}, {"fraction": float("nan")}, {"lora_rank": -1},
                   {"fraction": 0.5, "lora_rank": 4}):
        with pytest.raises(ValueError):
            trainable_split(SMALL, c, **kwargs)


def test_frozen_parameters_hold_only_the_sharded_compute_dtype_param():
    s3 = model_state_memory(num_params=100, frozen_params=900, world_size=4, stage=3, per_param=BF16_ADAM)
    assert (s3.params_bytes, s3.grads_bytes, s3.optimizer_bytes) == ((25 + 225) * 2, 25 * 2, 25 * 12)
    s2 = model_state_memory(num_params=100, frozen_params=900, world_size=4, stage=2, per_param=BF16_ADAM)
    assert (s2.params_bytes, s2.grads_bytes, s2.optimizer_bytes) == (1000 * 2, 25 * 2, 25 * 12)
    full = model_state_memory(num_params=1000, world_size=4, stage=3, per_param=BF16_ADAM)
    assert s3.device_bytes < full.device_bytes


def test_frozen_parameters_are_gathered_but_send_no_gradients():
    ops = zero_collectives(num_params=1000, trainable_params=100, stage=3, grad_accum=2)
    assert [(o.op, o.payload_numel) for o in ops] == [("all_gather", 1000), ("all_gather", 1000),
                                                      (REDUCE_SCATTER, 100)]
    for stage in (0, 1, 2):
        assert {o.payload_numel for o in zero_collectives(num_params=1000, trainable_params=100, stage=stage,
                                                          grad_accum=1)} == {100}


def test_frozen_flops_skip_the_weight_gradient():
    s = trainable_split(SMALL, count_params(SMALL), fraction=0.25)
    attn = 12.0 * 2 * 64 * 128
    assert training_flops_per_token(split=s, num_layers=2, attention_width=64, seq_len=128) == \
        6.0 * s.trainable_active + 4.0 * s.frozen_active + attn
    full = trainable_split(SMALL, count_params(SMALL))
    assert training_flops_per_token(split=full, num_layers=2, attention_width=64, seq_len=128) == \
        6.0 * count_params(SMALL).active_per_token + attn


def test_trainable_100_percent_is_the_full_fine_tune():
    for stage in (0, 2, 3):
        assert estimate(LLAMA70, H100, cfg(stage), num_nodes=4, framework=Framework(trainable_fraction=1.0)) == \
            estimate(LLAMA70, H100, cfg(stage), num_nodes=4)


def test_partial_fine_tune_estimate():
    full = estimate(LLAMA70, H100, cfg(3), num_nodes=4)
    part = estimate(LLAMA70, H100, cfg(3), num_nodes=4, framework=Framework(trainable_fraction=0.02))
    n, psi = full.world_size, full.num_params
    t = round(0.02 * psi)
    shard_t, shard_frozen = -(-t // n), -(-(psi - t) // n)  # separate flat groups, each padded
    m = part.memory_per_gpu
    assert (m.params, m.grads, m.optimizer) == ((shard_t + shard_frozen) * 2, shard_t * 2, shard_t * 12)
    assert part.trainable_params == t and part.num_params == psi
    gathers = [o for o in part.comm.ops if o.op == "all_gather"]
    assert gathers == [o for o in full.comm.ops if o.op == "all_gather"]
    rs_full, rs_part = (next(o for o in e.comm.ops if o.op == REDUCE_SCATTER) for e in (full, part))
    assert rs_part.bytes_per_rank == pytest.approx(rs_full.bytes_per_rank * t / psi)
    assert part.model_flops_per_step < full.model_flops_per_step
    assert any("0.02" in note or "2.00%" in note for note in part.notes)
    lora = estimate(LLAMA70, H100, cfg(3), num_nodes=4, framework=Framework(lora_rank=16))
    assert lora.num_params == psi + lora.trainable_params


def test_init_peak_formula_and_when_it_is_reported():
    c = count_params(LLAMA70)
    for construction, model_bytes in (("meta", 0), ("eager", 4 * c.total)):
        e = estimate(LLAMA70, H100, cfg(3), num_nodes=4, framework=Framework(construction=construction))
        m = e.memory_per_gpu
        assert e.init.total == (m.params + m.grads + m.optimizer + 4 * init_unit_numel(c) + model_bytes
                                + m.reserve)
    meta = estimate(LLAMA70, H100, cfg(3), num_nodes=4)
    assert meta.init.total < meta.memory_per_gpu.total and meta.init_peak_bytes is None
    # Eager: the whole fp32 model (276 GB) on every rank: above the steady state, and no H100 holds it.
    eager = estimate(LLAMA70, H100, cfg(3), num_nodes=4, framework=Framework(construction="eager"))
    assert eager.init_peak_bytes == eager.init.total > eager.memory_per_gpu.total
    assert not eager.fits and "zero_init" in eager.reason
    # A 7B model on 8 GPUs: eager init (27 GB of fp32 model) above steady state but it fits; the peak is still reported.
    small = estimate(load_model("llama-2-7b"), H100, cfg(3), num_nodes=1, framework=Framework(construction="eager"))
    assert small.fits and small.init_peak_bytes is not None
    for stage in (0, 1, 2):  # stages 0-2 hold the full model anyway: no stage-3 init peak
        assert estimate(LLAMA70, H100, cfg(stage, offload_optimizer=Offload.CPU if stage else Offload.NONE),
                        num_nodes=4).init is None
    with pytest.raises(ValueError):
        init_peak(construction="lazy", num_params=1, unit_numel=1, states_bytes=0, reserve_bytes=0)


def test_init_peak_falls_with_more_ranks():
    peaks = [estimate(LLAMA70, H100, cfg(3), num_nodes=nodes).init.total for nodes in (1, 2, 4)]
    assert peaks[0] > peaks[1] > peaks[2]


def test_frozen_parameters_need_no_gradient_buffers():
    kw = dict(stage=3, num_params=10_000, largest_unit_numel=1000, reduce_bucket_numel=5000, prefetch_units=1,
              param_bytes=2, grad_bytes=2, reserve_bytes=0)
    full, part = buffer_memory(**kw), buffer_memory(**kw, trainable_params=100)
    assert full.reduce_bucket_bytes == (2 * 5000 + 1000) * 2
    assert part.reduce_bucket_bytes == (2 * 100 + 100) * 2  # buckets and the unit's gradient: trainable only
    assert part.gather_bytes == full.gather_bytes == 2 * 1000 * 2  # frozen weights are still gathered
