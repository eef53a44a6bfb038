"""The orchestrator: totals add up, FLOPs and traffic follow the formulas, monotonicity (checkpointing,
offload, ranks), max_micro_batch, sweep and recommendation."""

import dataclasses

import pytest

from ztune.config.schema import (
    ActivationConfig,
    BatchConfig,
    Checkpointing,
    Offload,
    Precision,
    TrainConfig,
    ZeroConfig,
)
from ztune.cost.comm import zero_traffic_elements
from ztune.cost.compute import Efficiency, OffloadTime, step_time
from ztune.cost.estimate import Framework, estimate, max_micro_batch, recommend, sweep
from ztune.profiles import load_hardware, load_model
from ztune.specs import count_params

LLAMA70 = load_model("llama-2-70b")
TINY = load_model("tiny-gpt")
H100 = load_hardware("dgx-h100")
CPU = load_hardware("cpu-local")


def cfg(stage=3, micro=1, global_=None, ckpt=Checkpointing.FULL, seq=4096, precision=Precision.BF16, **zero):
    return TrainConfig(zero=ZeroConfig(stage=stage, **zero), precision=precision,
                       batch=BatchConfig(micro=micro, global_=global_), seq_len=seq,
                       activations=ActivationConfig(checkpointing=ckpt))


def test_memory_total_is_the_sum_and_states_follow_the_zero_formula():
    e = estimate(LLAMA70, H100, cfg(stage=3), num_nodes=4)
    m = e.memory_per_gpu
    assert m.total == m.params + m.grads + m.optimizer + m.activations + m.buffers
    psi, n = count_params(LLAMA70).total, 32
    shard = -(-psi // n)
    assert (m.params, m.grads, m.optimizer) == (2 * shard, 2 * shard, 12 * shard)
    assert m.activations == e.activations.device_bytes
    assert m.buffers > m.reserve > 0
    assert e.fits == (m.total <= H100.gpu_memory_bytes) and e.reason == ""


def test_flops_follow_6psi_plus_attention_and_full_recompute_adds_a_forward():
    none = estimate(LLAMA70, H100, cfg(stage=0, ckpt=Checkpointing.NONE, global_=256), num_nodes=4)
    full = estimate(LLAMA70, H100, cfg(stage=0, ckpt=Checkpointing.FULL, global_=256), num_nodes=4)
    c = count_params(LLAMA70)
    per_token = 6 * c.active_per_token + 12 * 80 * 8192 * 4096
    tokens = none.micro_batch * none.grad_accum * 4096
    assert none.model_flops_per_step == pytest.approx(tokens * per_token)
    assert none.hardware_flops_per_step == none.model_flops_per_step
    ratio = full.hardware_flops_per_step / full.model_flops_per_step
    # x4/3 less the embedding/head (not recomputed) and each block's down projection (non-reentrant
    # checkpointing stops before it: tests/unit/test_checkpoint_recompute.py).
    down_proj = 2 * 8192 * 28672 * 80 * tokens
    assert full.hardware_flops_per_step == pytest.approx(
        none.hardware_flops_per_step * 4 / 3 - tokens * 2 * (c.embedding + c.lm_head + c.final_norm)
        - down_proj, rel=1e-3)
    assert 1.20 < ratio < 1.26
    reentrant = estimate(LLAMA70, H100, cfg(stage=0, ckpt=Checkpointing.FULL, global_=256), num_nodes=4,
                         framework=Framework(checkpoint_impl="reentrant"))
    assert 1.30 < reentrant.hardware_flops_per_step / reentrant.model_flops_per_step < 4 / 3
    assert full.step.compute_s == pytest.approx(none.step.compute_s * ratio)
    # Compute-bound at stage 0: recomputation costs step time, and MFU (model FLOPs only) drops.
    assert full.mfu < none.mfu <= 0.5 + 1e-12  # MFU never exceeds the compute efficiency


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_comm_bytes_follow_the_traffic_formula_with_accumulation(stage):
    e = estimate(TINY, CPU, cfg(stage=stage, micro=2, global_=16, seq=128), num_nodes=1)
    assert e.grad_accum == 4
    assert e.comm_bytes_per_step == pytest.approx(2 * zero_traffic_elements(e.num_params, 2, stage, 4))


def test_single_rank_has_no_communication():
    one = dataclasses.replace(CPU, gpus_per_node=1)
    e = estimate(TINY, one, cfg(stage=0, seq=128), num_nodes=1)
    assert e.comm_bytes_per_step == 0 and e.step.exposed_comm_s == 0


def test_checkpointing_lowers_activations():
    acts = [estimate(LLAMA70, H100, cfg(ckpt=c), num_nodes=4).memory_per_gpu.activations
            for c in (Checkpointing.NONE, Checkpointing.SELECTIVE, Checkpointing.FULL)]
    assert acts[0] >= acts[1] > acts[2]


def test_offload_moves_bytes_to_host():
    base = estimate(LLAMA70, H100, cfg(stage=3), num_nodes=4)
    opt = estimate(LLAMA70, H100, cfg(stage=3, offload_optimizer=Offload.CPU), num_nodes=4)
    both = estimate(LLAMA70, H100, cfg(stage=3, offload_optimizer=Offload.CPU, offload_params=Offload.CPU),
                    num_nodes=4)
    assert base.cpu_memory_per_host == 0
    assert base.memory_per_gpu.total > opt.memory_per_gpu.total > both.memory_per_gpu.total
    assert base.cpu_memory_per_host < opt.cpu_memory_per_host < both.cpu_memory_per_host
    moved = base.memory_per_gpu.total - opt.memory_per_gpu.total
    assert opt.cpu_memory_per_host == 8 * moved  # 8 ranks per node, each moved its optimizer + grad shard
    assert opt.offload.cpu_optimizer_s > 0 and opt.step_time_s > base.step_time_s - base.step.exposed_comm_s
    act_off = estimate(LLAMA70, H100, dataclasses.replace(
        cfg(stage=3), activations=ActivationConfig(checkpointing=Checkpointing.FULL, offload=Offload.CPU)),
        num_nodes=4)
    assert act_off.memory_per_gpu.activations < base.memory_per_gpu.activations
    assert act_off.cpu_memory_per_host > 0


def test_more_ranks_less_stage3_memory():
    totals = [estimate(LLAMA70, H100, cfg(stage=3), num_nodes=k).memory_per_gpu.total for k in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4


def test_max_micro_batch_is_the_largest_that_fits():
    c = cfg(stage=3, offload_optimizer=Offload.CPU)
    best = max_micro_batch(LLAMA70, H100, c, num_nodes=4)
    assert best >= 1
    fits = estimate(LLAMA70, H100, dataclasses.replace(c, batch=BatchConfig(micro=best)), num_nodes=4)
    over = estimate(LLAMA70, H100, dataclasses.replace(c, batch=BatchConfig(micro=best + 1)), num_nodes=4)
    assert fits.fits and not over.fits
    # With a global batch, only divisors of global / GPUs count: 96 / 32 = 3 -> 1 or 3.
    assert max_micro_batch(LLAMA70, H100, dataclasses.replace(c, batch=BatchConfig(micro=1, global_=96)),
                           num_nodes=4) in (1, 3)
    assert max_micro_batch(LLAMA70, H100, cfg(stage=0), num_nodes=4) == 0  # 16 bytes x 69B never fits


def test_sweep_skips_invalid_combos_sorts_and_picks_fitting_micro_batches():
    rows = sweep(LLAMA70, H100, num_nodes=4, seq_len=4096, global_batch=1024)
    combos = {(e.config.zero.stage, e.config.zero.offload_optimizer, e.config.zero.offload_params) for e in rows}
    assert all(not (p is Offload.CPU and s != 3) and not (o is Offload.CPU and s == 0) for s, o, p in combos)
    assert len(rows) == 27  # stages 0/1/2/3 have 1/2/2/4 offload pairs, x 3 checkpointing modes
    keys = [(not e.fits, -e.tokens_per_s) for e in rows]
    assert keys == sorted(keys)
    for e in rows:
        assert 1024 // 32 % e.micro_batch == 0 and e.global_batch == 1024
        if e.fits:
            assert e.micro_batch == max_micro_batch(LLAMA70, H100, e.config, num_nodes=4)
    best, reason = recommend(rows)
    assert best is rows[0] and best.fits and "runner-up" in reason
    assert best.tokens_per_s == max(e.tokens_per_s for e in rows if e.fits)


def test_recommend_when_nothing_fits():
    rows = sweep(LLAMA70, CPU, num_nodes=1, seq_len=512, global_batch=2, stages=(0, 1))
    best, reason = recommend(rows)
    assert best is None and reason.startswith("nothing fits")


def test_fp32_uses_the_fp32_peak():
    bf = estimate(TINY, H100, cfg(stage=0, seq=256), num_nodes=1)
    fp = estimate(TINY, H100, cfg(stage=0, seq=256, precision=Precision.FP32), num_nodes=1)
    assert fp.step.compute_s / bf.step.compute_s == pytest.approx(H100.peak_flops_bf16 / H100.peak_flops_fp32,
                                                                  rel=0.01)


def test_overlap_assumption_is_explicit():
    kw = dict(compute_s=10.0, grad_accum=2, comm_boundary_s=0.0, comm_after_step_s=1.0, offload=OffloadTime())
    hidden = step_time(comm_micro_s=4.0, overlap=1.0, **kw)
    serial = step_time(comm_micro_s=4.0, overlap=0.0, **kw)
    assert hidden.step_s == 11.0  # all micro-step comm hidden; the after-step refresh never is
    assert serial.step_s == 15.0
    # Overlap can never hide more than the compute window.
    assert step_time(comm_micro_s=40.0, overlap=1.0, **kw).step_s == 41.0
    with pytest.raises(ValueError):
        Efficiency(compute=0.0)
    # Efficiency.compute scales the profile's achieved FLOP rate (default 1.0 = the profile is right).
    slow = estimate(LLAMA70, H100, cfg(stage=3), num_nodes=4, efficiency=Efficiency(compute=0.5))
    fast = estimate(LLAMA70, H100, cfg(stage=3), num_nodes=4)
    assert slow.step.compute_s == pytest.approx(2 * fast.step.compute_s)
    per_token = fast.hardware_flops_per_step / fast.step.compute_s
    assert per_token == pytest.approx(H100.peak_flops_bf16 * H100.train_flops_efficiency)
