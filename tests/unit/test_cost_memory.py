"""Model-state bytes vs the ZeRO paper's formulas (DESIGN.md), generalised by precision and optimizer;
offload moves bytes to the host; buffers and reserve."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztune.config.schema import OptimizerType, Precision
from ztune.cost.memory import (
    GPU_FRAMEWORK_RESERVE_BYTES,
    REDUCE_BUCKET_BUFFERS,
    GiB,
    buffer_memory,
    framework_reserve_bytes,
    host_memory_per_node,
    model_state_memory,
    state_bytes_per_param,
)
from ztune.specs import Hardware

PSI = 7 * 8 * 64 * 1000  # divisible by every world size below, so the formulas hold exactly


def _formula(stage, n, p, g, k):
    """Rajbhandari et al. 2020, section 3 (DESIGN.md): (p+g+K)Psi, (p+g)Psi + K Psi/n, p Psi + (g+K) Psi/n,
    (p+g+K) Psi/n."""
    return {0: (p + g + k) * PSI, 1: (p + g) * PSI + k * PSI // n, 2: p * PSI + (g + k) * PSI // n,
            3: (p + g + k) * PSI // n}[stage]


@pytest.mark.parametrize("n", [1, 8, 64])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_mixed_precision_adam_is_the_zero_paper(stage, n):
    for prec in (Precision.BF16, Precision.FP16):
        per = state_bytes_per_param(precision=prec, optimizer=OptimizerType.ADAMW)
        assert (per.param, per.grad, per.optimizer) == (2, 2, 12)
        mem = model_state_memory(num_params=PSI, world_size=n, stage=stage, per_param=per)
        assert mem.device_bytes == _formula(stage, n, 2, 2, 12)
        # The headline numbers, spelled out: 16 Psi, 4 Psi + 12 Psi/n, 2 Psi + 14 Psi/n, 16 Psi/n.
        assert mem.device_bytes == {0: 16 * PSI, 1: 4 * PSI + 12 * PSI // n, 2: 2 * PSI + 14 * PSI // n,
                                    3: 16 * PSI // n}[stage]
        assert mem.host_bytes == 0


@pytest.mark.parametrize("n", [1, 8, 64])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp32_adam_and_sgd(stage, n):
    fp32 = state_bytes_per_param(precision=Precision.FP32, optimizer=OptimizerType.ADAM)
    assert (fp32.param, fp32.grad, fp32.optimizer) == (4, 4, 8)  # no master copy: params are fp32
    mem = model_state_memory(num_params=PSI, world_size=n, stage=stage, per_param=fp32)
    assert mem.device_bytes == _formula(stage, n, 4, 4, 8)
    sgd = state_bytes_per_param(precision=Precision.BF16, optimizer=OptimizerType.SGD, momentum=0.9)
    assert sgd.optimizer == 8  # fp32 master + momentum
    mem = model_state_memory(num_params=PSI, world_size=n, stage=stage, per_param=sgd)
    assert mem.device_bytes == _formula(stage, n, 2, 2, 8)
    plain = state_bytes_per_param(precision=Precision.FP32, optimizer=OptimizerType.SGD, momentum=0.0)
    assert plain.optimizer == 0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_optimizer_moves_the_optimizer_and_grad_shard_to_host(stage):
    n = 8
    per = state_bytes_per_param(precision=Precision.BF16, optimizer=OptimizerType.ADAMW)
    on = model_state_memory(num_params=PSI, world_size=n, stage=stage, per_param=per)
    off = model_state_memory(num_params=PSI, world_size=n, stage=stage, per_param=per, offload_optimizer=True)
    assert off.optimizer_bytes == 0
    assert off.host_optimizer_bytes == on.optimizer_bytes == 12 * PSI // n
    assert off.host_grads_bytes == 2 * PSI // n
    # Stage 1 keeps the full gradient on the GPU during backward; stages 2/3 send reduced buckets to host.
    assert off.grads_bytes == (on.grads_bytes if stage == 1 else 0)
    assert off.device_bytes < on.device_bytes


def test_offload_params_stage3_moves_the_param_shard():
    per = state_bytes_per_param(precision=Precision.BF16, optimizer=OptimizerType.ADAMW)
    both = model_state_memory(num_params=PSI, world_size=8, stage=3, per_param=per, offload_optimizer=True,
                              offload_params=True)
    assert both.device_bytes == 0
    assert both.host_bytes == (2 + 2 + 12) * PSI // 8


def test_invalid_offload_combinations_raise():
    per = state_bytes_per_param(precision=Precision.BF16, optimizer=OptimizerType.ADAMW)
    with pytest.raises(ValueError):
        model_state_memory(num_params=PSI, world_size=8, stage=2, per_param=per, offload_params=True)
    with pytest.raises(ValueError):
        model_state_memory(num_params=PSI, world_size=8, stage=0, per_param=per, offload_optimizer=True)


@given(psi=st.integers(1, 10**12), n=st.integers(1, 4096))
def test_higher_stage_never_uses_more_and_stage3_shrinks_with_ranks(psi, n):
    per = state_bytes_per_param(precision=Precision.BF16, optimizer=OptimizerType.ADAMW)
    totals = [model_state_memory(num_params=psi, world_size=n, stage=s, per_param=per).device_bytes
              for s in range(4)]
    assert totals == sorted(totals, reverse=True)
    more = model_state_memory(num_params=psi, world_size=2 * n, stage=3, per_param=per).device_bytes
    assert more <= totals[3]


def test_buffers():
    b = buffer_memory(stage=2, num_params=10**9, largest_unit_numel=10**7, reduce_bucket_numel=25_000_000,
                      prefetch_units=1, param_bytes=2, grad_bytes=2, reserve_bytes=7)
    assert b.reduce_bucket_bytes == REDUCE_BUCKET_BUFFERS * 25_000_000 * 2 and b.gather_bytes == 0
    assert b.total_bytes == b.reduce_bucket_bytes + 7
    b3 = buffer_memory(stage=3, num_params=10**9, largest_unit_numel=10**7, reduce_bucket_numel=25_000_000,
                       prefetch_units=2, param_bytes=2, grad_bytes=2, reserve_bytes=0)
    assert b3.gather_bytes == 10**7 * 3 * 2  # unit in use + 2 prefetched
    assert b3.reduce_bucket_bytes == REDUCE_BUCKET_BUFFERS * 25_000_000 * 2 + 10**7 * 2
    # A model smaller than a bucket never allocates more than itself.
    tiny = buffer_memory(stage=0, num_params=1000, largest_unit_numel=100, reduce_bucket_numel=25_000_000,
                         prefetch_units=1, param_bytes=4, grad_bytes=4, reserve_bytes=0)
    assert tiny.reduce_bucket_bytes == REDUCE_BUCKET_BUFFERS * 1000 * 4


def _hw(name):
    return Hardware(name=name, gpus_per_node=8, gpu_memory_bytes=80 * GiB, peak_flops_bf16=1e15,
                    peak_flops_fp32=6e13, intra_node_bw_bytes_per_s=3e11, intra_node_latency_s=1e-6,
                    inter_node_bw_bytes_per_s=4e10, inter_node_latency_s=5e-6, host_device_bw_bytes_per_s=5e10,
                    host_memory_bytes=2 << 40, host_memory_bw_bytes_per_s=4e11)


def test_reserve_and_host_per_node():
    assert framework_reserve_bytes(_hw("dgx-h100")) == GPU_FRAMEWORK_RESERVE_BYTES == int(1.5 * GiB)
    assert framework_reserve_bytes(_hw("cpu-local")) == 0
    per = state_bytes_per_param(precision=Precision.BF16, optimizer=OptimizerType.ADAMW)
    off = model_state_memory(num_params=PSI, world_size=8, stage=2, per_param=per, offload_optimizer=True)
    assert host_memory_per_node(states=off, activation_host_bytes=100, gpus_per_node=8) == 8 * (off.host_bytes + 100)


def test_onebit_adam_local_momentum_adds_one_fp32_buffer_and_the_estimate_counts_it():
    from ztune.config.io import from_dict
    from ztune.cost.estimate import estimate
    from ztune.profiles import load_hardware, load_model

    for prec, k in ((Precision.BF16, 16), (Precision.FP32, 12)):
        plain = state_bytes_per_param(precision=prec, optimizer=OptimizerType.ONEBIT_ADAM)
        local = state_bytes_per_param(precision=prec, optimizer=OptimizerType.ONEBIT_ADAM, local_momentum=True)
        assert (plain.optimizer, local.optimizer) == (k, k + 4) and "local_momentum" in local.description
    # AdamW has no such buffer, whatever the flag says (the config refuses it there anyway)
    assert state_bytes_per_param(precision=Precision.BF16, optimizer=OptimizerType.ADAMW,
                                 local_momentum=True).optimizer == 12
    doc = {"zero": {"stage": 0}, "precision": "bf16", "batch": {"micro": 1, "grad_accum": 1}, "seq_len": 128,
           "optimizer": {"type": "OneBitAdam", "freeze_step": 10}}
    model, hw = load_model("tiny-llama"), load_hardware("cpu-local")
    without = estimate(model, hw, from_dict(doc), num_nodes=1)
    doc["optimizer"]["local_momentum"] = True
    with_local = estimate(model, hw, from_dict(doc), num_nodes=1)
    psi = with_local.num_params
    assert with_local.memory_per_gpu.optimizer - without.memory_per_gpu.optimizer == 4 * psi
