"""The cost model's orchestrator: one TrainConfig on one cluster -> an `Estimate`; a sweep over stage x
offload x checkpointing x compression; the largest micro-batch that fits; a recommendation.

Leaf formulas live in memory.py, comm.py, compute.py and activations.py; this file only wires them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ztune.config.schema import (
    ActivationConfig,
    BatchConfig,
    Checkpointing,
    Compression,
    CompressionConfig,
    Hierarchical,
    Offload,
    OptimizerType,
    Precision,
    TrainConfig,
)
from ztune.config.validate import resolve_batch
from ztune.cost.activations import ActivationEstimate, activation_memory
from ztune.cost.codec import CodecTime, codec_time, rates_of, step_codec_work
from ztune.cost.comm import (
    CommEstimate,
    Link,
    comm_estimate,
    hierarchy_for,
    is_gloo_profile,
    ring_link,
    wire_bytes_per_element,
)
from ztune.cost.compute import (
    DEFAULT_EFFICIENCY,
    Efficiency,
    OffloadTime,
    StepTime,
    achieved_flops_per_s,
    first_bucket_fraction,
    model_flops_per_token,
    offload_time,
    optimizer_step_s,
    recompute_flops_per_token,
    step_time,
)
from ztune.cost.finetune import (
    InitPeak,
    TrainableSplit,
    init_peak,
    init_unit_numel,
    trainable_split,
    training_flops_per_token,
)
from ztune.cost.memory import (
    GPU_FRAMEWORK_RESERVE_BYTES,
    GiB,
    MemoryBreakdown,
    buffer_memory,
    framework_reserve_bytes,
    host_memory_per_node,
    memory_per_gpu,
    model_state_memory,
    shard_numel,
    state_bytes_per_param,
)
from ztune.errors import UserError
from ztune.specs import Hardware, ModelSpec, ParamCounts, count_params, no_backward_gather_units, zero3_units

# Upper bound when searching for the largest micro-batch with no global batch to divide.
MICRO_BATCH_CAP = 1024
# (offload_optimizer, offload_params) pairs a sweep tries; pairs invalid for a stage are skipped.
OFFLOAD_CHOICES = (
    (Offload.NONE, Offload.NONE),
    (Offload.CPU, Offload.NONE),
    (Offload.NONE, Offload.CPU),
    (Offload.CPU, Offload.CPU),
)
CHECKPOINTING_CHOICES = (Checkpointing.NONE, Checkpointing.SELECTIVE, Checkpointing.FULL)

ASSUMPTIONS = (
    "model states per the ZeRO paper (Rajbhandari et al. 2020)",
    "buffers = 2 reduce buckets + stage-3 gather/prefetch units + a framework reserve "
    f"(CUDA context, NCCL, fragmentation: {GPU_FRAMEWORK_RESERVE_BYTES / GiB:.1f} GiB per GPU, 0 on cpu profiles)",
    "collectives: NCCL-style rings (one per NIC, bounded by min(NVLink busbw, the node's NICs together)) "
    "and trees for all-reduce, alpha-beta",
    "compute at the hardware profile's achieved fraction of peak (train_flops_efficiency)",
    "stages 0/1 reduce gradients once per step, stages 2/3 every micro-step",
    "FLOPs/token = 6*Psi_active + 12*L*h*s; recomputation counted in step time, not in MFU",
    "compression / 1-bit Adam / ZeRO++ codecs: elements each rank encodes and decodes per step (cost/codec.py) at "
    "the profile's measured codec rates, serial with compute (same cores, on the exchange's path)",
)


@dataclass(frozen=True)
class Framework:
    """What the training framework does that a TrainConfig does not say (defaults: ztune's runtime).

    selective_policy: what `checkpointing: selective` recomputes ("attention" or "op";
      activations.SELECTIVE_POLICIES).
    reduce_bytes: bytes per gradient element on the wire in reductions; None = the gradient dtype,
      4 = fp32 reduction (FSDP MixedPrecision(reduce_dtype=torch.float32), llm-foundry's and torchtitan's
      default): reduce-scatter bytes double at bf16, and the unit's gradient buffer is fp32.
    loss_mode: "upcast" (F.cross_entropy(logits.float()), the common way), "fused" (a fused kernel on
      the logits' dtype, llm-foundry's default) or "chunked" (needs loss_chunk_tokens > 0).
    loss_chunk_tokens: tokens per chunk of a chunked / fused linear + cross-entropy.
    trainable_fraction / lora_rank: a partial fine-tune (cost/finetune.py): that fraction of the parameters
      trains, or LoRA adapters of that rank on PEFT's default targets over a frozen base (0: no LoRA).
    construction: how the model is built before `ztune.initialize`, for stage 3's init peak: "meta"
      (`ztune.zero_init`, one unit materialised at a time) or "eager" (the whole model built, then sharded).
    checkpoint_impl: how full checkpointing re-runs a block (activations.CHECKPOINT_IMPLS): "non_reentrant"
      (torch.utils.checkpoint(use_reentrant=False): ztune's runtime, FSDP trainers) stops before the block's
      last matmul; "reentrant" (DeepSpeed / Megatron checkpointing) re-runs the whole block.
    """

    selective_policy: str = "attention"
    reduce_bytes: int | None = None
    loss_mode: str = "upcast"
    loss_chunk_tokens: int = 0
    trainable_fraction: float = 1.0
    lora_rank: int = 0
    construction: str = "meta"
    checkpoint_impl: str = "non_reentrant"


DEFAULT_FRAMEWORK = Framework()


@dataclass(frozen=True)
class Estimate:
    """Everything the cost model says about one config on one cluster. Bytes, seconds, per GPU/rank
    unless named per host; throughput is for the whole job."""

    model: ModelSpec
    hardware: Hardware
    config: TrainConfig
    num_nodes: int
    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    num_params: int  # stored: trainable + frozen (LoRA adapters included)
    memory_per_gpu: MemoryBreakdown
    cpu_memory_per_host: int
    activations: ActivationEstimate
    comm: CommEstimate
    offload: OffloadTime
    step: StepTime
    model_flops_per_step: float  # per GPU, without recomputation
    hardware_flops_per_step: float  # per GPU, with recomputation
    tokens_per_s: float
    samples_per_s: float
    mfu: float
    fits: bool
    reason: str  # why it does not fit; "" when it fits
    notes: tuple[str, ...]
    split: TrainableSplit | None = None  # trainable / frozen parameter counts
    init: InitPeak | None = None  # stage 3 only: device bytes per rank during ztune.initialize
    codec: CodecTime | None = None  # compression codecs' work and seconds (cost/codec.py); None: no codec

    @property
    def codec_unknown(self) -> bool:
        """A codec runs but the profile has no rate for it: its time is missing from the step."""
        return self.codec is not None and bool(self.codec.unknown)

    @property
    def trainable_params(self) -> int:
        return self.split.trainable if self.split is not None else self.num_params

    @property
    def init_peak_bytes(self) -> int | None:
        """The init peak when it exceeds the steady-state peak (memory_per_gpu.total), else None."""
        if self.init is None or self.init.total <= self.memory_per_gpu.total:
            return None
        return self.init.total

    @property
    def comm_bytes_per_step(self) -> float:
        return self.comm.bytes_per_rank

    @property
    def step_time_s(self) -> float:
        return self.step.step_s

    @property
    def label(self) -> str:
        z, c = self.config.zero, self.config
        parts = [f"stage {z.stage}"]
        off = [n for n, o in (("optimizer", z.offload_optimizer), ("params", z.offload_params)) if o is Offload.CPU]
        parts.append("offload " + "+".join(off) if off else "no offload")
        ckpt = c.activations.checkpointing
        parts.append("no checkpointing" if ckpt is Checkpointing.NONE else f"{ckpt.value} checkpointing")
        if c.compression.method is not Compression.NONE:
            parts.append(f"{c.compression.method.value} compression")
        zpp = (["qwZ"] if z.quantized_weights else []) + (
            [f"hpZ {z.hpz_partition_size}"] if z.hpz_partition_size > 1 else []) + (
            ["qgZ"] if z.quantized_gradients else [])
        if z.stage == 3 and zpp:
            parts.append("ZeRO++ " + "+".join(zpp))
        parts.append(f"micro {self.micro_batch}")
        return ", ".join(parts)


def zeropp_intra_link(hw: Hardware, *, bandwidth_efficiency: float = 1.0) -> Link:
    """The in-host link of hpZ's backward all-gather and qgZ's first all-to-all. Both run on plain process groups
    of the host's ranks (runtime/zeropp.py build_hpz_comm, runtime/qgz.py build_qgz_comms), which have no
    shared-memory transport: on CPU ranks their bytes go through gloo's TCP over loopback, so their CPU per byte is
    the TCP link's the probe measured between hosts (Hardware.inter_node_cpu_s_per_byte), not the shared-memory
    collective's (intra_node_cpu_s_per_byte, which the probe's in-host all_reduce measures). Where no inter-host
    figure was measured (a one-host probe) the in-host one stands, an under-estimate. Bandwidth and latency stay
    the in-host link's: loopback TCP's own are not probed."""
    link = ring_link(hw, num_nodes=1, bandwidth_efficiency=bandwidth_efficiency)
    if is_gloo_profile(hw) and hw.inter_node_cpu_s_per_byte > 0:
        return dataclasses.replace(link, cpu_s_per_byte=hw.inter_node_cpu_s_per_byte)
    return link


def comm_cpu_wall_s(cpu_s: float, hw: Hardware) -> float:
    """Wall seconds per step of `cpu_s` CPU seconds per rank of collective work (CommEstimate.cpu_s) on `hw`: x the
    measured contention (Hardware.cpu_contention: wall per CPU second with every rank busy) where the host's ranks
    fill its cores (gpus_per_node >= cpu_cores, CPU ranks), so that the work takes a core from compute; 0 where
    cores are left over for it (gloo's threads run there), or where the profile lacks a measurement."""
    if hw.cpu_cores <= 0 or hw.gpus_per_node < hw.cpu_cores or hw.cpu_contention <= 0:
        return 0.0
    return cpu_s * hw.cpu_contention


def runtime_cpu_wall_s(hw: Hardware, *, stage: int, num_params: int, grad_accum: int, world_size: int = 1) -> float:
    """Wall seconds per step of the runtime's own CPU work on `hw` (Hardware.runtime_*_cpu_s_per_param_stage*,
    measured by `ztune probe --model` on CPU ranks): (an optimizer step's first micro-step + (`grad_accum` - 1) later
    ones + the optimizer step) x `num_params`, x the measured contention (Hardware.cpu_contention) where there is one:
    the work shares the cores as the compute does. At stages 2-3 a later micro-step's excess over the first is the
    reduction into a fresh gradient shard and its addition to the accumulated one (runtime/grad_reduce.py _complete),
    shard-sized: the probe's runs, each rank a world of its own, hold the whole gradient as their shard, so that excess
    is charged / `world_size`. The probe trains a model whose parameters all train; a frozen parameter is charged
    alike (stage 3 gathers it with its unit; its gradient hook, which it lacks, is the smaller part). 0 where the
    profile has no measurement (GPU profiles)."""
    micro, accum, step = hw.runtime_cpu_s_per_param(stage)
    if stage >= 2:
        accum = micro + max(0.0, accum - micro) / max(1, world_size)
    cpu_s = (micro + (grad_accum - 1) * accum + step) * num_params
    return cpu_s * (hw.cpu_contention if hw.cpu_contention > 0 else 1.0)


def uses_hierarchical(setting: Hierarchical, hw: Hardware, *, num_nodes: int) -> bool:
    """Whether the runtime runs this job's collectives in two levels (config/schema.py `Hierarchical`): several
    nodes of several ranks each, and `true`, or `auto` on a gloo (CPU) profile."""
    if num_nodes <= 1 or hw.gpus_per_node <= 1 or setting is Hierarchical.OFF:
        return False
    return setting is Hierarchical.ON or is_gloo_profile(hw)


def _check_cluster(hw: Hardware, num_nodes: int) -> int:
    if num_nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {num_nodes}")
    return num_nodes * hw.gpus_per_node


@dataclass(frozen=True)
class _Memory:
    breakdown: MemoryBreakdown
    host_per_node: int
    activations: ActivationEstimate
    shard_numel: int  # trainable shard (optimizer, gradients)
    param_shard_numel: int  # parameter shard, frozen included
    split: TrainableSplit
    init: InitPeak | None


def _split(model: ModelSpec, counts: ParamCounts, framework: Framework) -> TrainableSplit:
    return trainable_split(model, counts, fraction=framework.trainable_fraction, lora_rank=framework.lora_rank)


def _memory(model: ModelSpec, counts: ParamCounts, hw: Hardware, cfg: TrainConfig, *, world_size: int,
            micro_batch: int, framework: Framework = DEFAULT_FRAMEWORK) -> _Memory:
    z = cfg.zero
    per_param = state_bytes_per_param(precision=cfg.precision, optimizer=cfg.optimizer.type,
                                      local_momentum=cfg.optimizer.local_momentum,
                                      momentum=cfg.optimizer.momentum)
    split = _split(model, counts, framework)
    states = model_state_memory(num_params=split.trainable, world_size=world_size, stage=z.stage,
                                per_param=per_param, offload_optimizer=z.offload_optimizer is Offload.CPU,
                                offload_params=z.offload_params is Offload.CPU, frozen_params=split.frozen)
    act = activation_memory(model, micro_batch=micro_batch, seq_len=cfg.seq_len,
                            checkpointing=cfg.activations.checkpointing, every=cfg.activations.every,
                            offload=cfg.activations.offload, dtype_bytes=cfg.precision.bytes,
                            selective_policy=framework.selective_policy,
                            loss_chunk_tokens=framework.loss_chunk_tokens, loss_mode=framework.loss_mode,
                            checkpoint_impl=framework.checkpoint_impl)
    buffers = buffer_memory(stage=z.stage, num_params=split.total, trainable_params=split.trainable,
                            largest_unit_numel=counts.largest_layer,
                            reduce_bucket_numel=z.reduce_bucket_numel, prefetch_units=z.prefetch_units,
                            param_bytes=per_param.param, grad_bytes=framework.reduce_bytes or per_param.grad,
                            reserve_bytes=framework_reserve_bytes(hw))
    breakdown = memory_per_gpu(states=states, activation_device_bytes=act.device_bytes, buffers=buffers)
    if z.stage == 3 and z.hpz_partition_size > 1:  # hpZ's secondary shards (cost/zeropp.py), with the params
        if hw.gpus_per_node % z.hpz_partition_size:
            raise UserError(f"zero.hpz_partition_size {z.hpz_partition_size} must divide the GPUs per node "
                            f"({hw.gpus_per_node}) of {hw.name}")
        from ztune.cost.zeropp import hpz_secondary_bytes

        breakdown = dataclasses.replace(breakdown, params=breakdown.params + int(hpz_secondary_bytes(
            num_params=split.total, hpz_partition_size=z.hpz_partition_size, param_bytes=per_param.param)))
    init = None
    if z.stage == 3:
        init = init_peak(construction=framework.construction, num_params=split.total,
                         unit_numel=init_unit_numel(counts), states_bytes=states.device_bytes,
                         reserve_bytes=buffers.reserve_bytes)
    return _Memory(
        breakdown=breakdown,
        host_per_node=host_memory_per_node(states=states, activation_host_bytes=act.host_bytes,
                                           gpus_per_node=hw.gpus_per_node),
        activations=act,
        shard_numel=shard_numel(split.trainable, world_size),
        param_shard_numel=shard_numel(split.total, world_size),
        split=split,
        init=init,
    )


def _fit_reason(mem: _Memory, hw: Hardware) -> str:
    if mem.breakdown.total > hw.gpu_memory_bytes:
        return (f"needs {mem.breakdown.total / GiB:.1f} GiB per GPU, {hw.name} has "
                f"{hw.gpu_memory_bytes / GiB:.1f} GiB")
    if mem.init is not None and mem.init.total > hw.gpu_memory_bytes:
        how = ("the whole model in fp32 on every rank: build it under ztune.zero_init"
               if mem.init.model_bytes else "the sharded states plus one unit in fp32")
        return (f"initialisation needs {mem.init.total / GiB:.1f} GiB per GPU ({how}), {hw.name} has "
                f"{hw.gpu_memory_bytes / GiB:.1f} GiB")
    if mem.host_per_node > hw.host_memory_bytes:
        return (f"needs {mem.host_per_node / GiB:.1f} GiB of host memory per node, {hw.name} has "
                f"{hw.host_memory_bytes / GiB:.1f} GiB")
    return ""


def estimate(model: ModelSpec, hw: Hardware, cfg: TrainConfig, *, num_nodes: int,
             efficiency: Efficiency = DEFAULT_EFFICIENCY, framework: Framework = DEFAULT_FRAMEWORK) -> Estimate:
    """Memory, communication and time of `cfg` on `num_nodes` nodes of `hw` (data parallel over all GPUs)."""
    world = _check_cluster(hw, num_nodes)
    batch = resolve_batch(cfg.batch, world)
    accum, micro = int(batch.grad_accum or 1), batch.micro
    counts = count_params(model)
    z = cfg.zero
    mem = _memory(model, counts, hw, cfg, world_size=world, micro_batch=micro, framework=framework)
    per_param = state_bytes_per_param(precision=cfg.precision, optimizer=cfg.optimizer.type,
                                      local_momentum=cfg.optimizer.local_momentum,
                                      momentum=cfg.optimizer.momentum)

    link = ring_link(hw, num_nodes=num_nodes, bandwidth_efficiency=efficiency.bandwidth)
    split = mem.split
    hierarchy = None
    if uses_hierarchical(cfg.comm.hierarchical, hw, num_nodes=num_nodes):
        hierarchy = hierarchy_for(hw, num_nodes=num_nodes)
    if z.stage == 3 and (z.quantized_weights or z.hpz_partition_size > 1 or z.quantized_gradients):  # ZeRO++
        from ztune.cost.zeropp import zeropp_comm_estimate

        comm = zeropp_comm_estimate(
            num_params=split.total, trainable_params=split.trainable, num_nodes=num_nodes,
            ranks_per_node=hw.gpus_per_node, grad_accum=accum, link=link,
            intra_link=zeropp_intra_link(hw, bandwidth_efficiency=efficiency.bandwidth),
            param_bytes=per_param.param, num_units=zero3_units(model), quantized_weights=z.quantized_weights,
            hpz_partition_size=z.hpz_partition_size, quantized_gradients=z.quantized_gradients, hierarchy=hierarchy,
            no_backward_gather=no_backward_gather_units(model),
            grad_bytes=wire_bytes_per_element(method=cfg.compression.method, topk_ratio=cfg.compression.topk_ratio,
                                              grad_bytes=framework.reduce_bytes or per_param.grad))
    else:
        comm = comm_estimate(num_params=split.total, trainable_params=split.trainable, world_size=world,
                             stage=z.stage, grad_accum=accum, link=link, hierarchy=hierarchy,
                             param_bytes=per_param.param, grad_bytes=framework.reduce_bytes or per_param.grad,
                             reduce_bucket_numel=z.reduce_bucket_numel,
                             allgather_bucket_numel=z.allgather_bucket_numel, num_units=zero3_units(model),
                             compression=cfg.compression.method, topk_ratio=cfg.compression.topk_ratio,
                             no_backward_gather=no_backward_gather_units(model))

    width = model.num_heads * model.head_size
    tokens_per_gpu = micro * accum * cfg.seq_len
    if split.is_full:
        model_flops = tokens_per_gpu * model_flops_per_token(
            active_params=counts.active_per_token, num_layers=model.num_layers, attention_width=width,
            seq_len=cfg.seq_len)
    else:  # frozen weights skip their weight-gradient GEMM (cost/finetune.py)
        model_flops = tokens_per_gpu * training_flops_per_token(
            split=split, num_layers=model.num_layers, attention_width=width, seq_len=cfg.seq_len)
    block_active = counts.active_per_token - counts.embedding - counts.lm_head - counts.final_norm
    hw_flops = model_flops + tokens_per_gpu * recompute_flops_per_token(
        block_active_params=block_active, num_layers=model.num_layers, attention_width=width,
        seq_len=cfg.seq_len, recompute_fraction=mem.activations.recompute_fraction)
    peak = hw.peak_flops_fp32 if cfg.precision is Precision.FP32 else hw.peak_flops_bf16
    compute_s = hw_flops / achieved_flops_per_s(peak_flops=peak, train_flops_efficiency=hw.train_flops_efficiency,
                                                compute_scale=efficiency.compute)

    off = offload_time(shard_numel=mem.shard_numel, param_bytes=per_param.param, grad_bytes=per_param.grad,
                       optimizer_bytes=per_param.optimizer, offload_optimizer=z.offload_optimizer is Offload.CPU,
                       offload_params=z.offload_params is Offload.CPU,
                       activation_host_bytes=mem.activations.host_bytes, grad_accum=accum,
                       gpus_per_node=hw.gpus_per_node, host_device_bw_bytes_per_s=hw.host_device_bw_bytes_per_s,
                       host_memory_bw_bytes_per_s=hw.host_memory_bw_bytes_per_s,
                       host_bandwidth_efficiency=efficiency.host_bandwidth,
                       param_shard_numel=mem.param_shard_numel)
    # The groups backward reduces in turn: reduce buckets, or at stage 3 the module units (runtime/engine.py
    # _group_specs; comm_estimate's launch count), each at most one bucket.
    grad_group_numel = z.reduce_bucket_numel
    if z.stage == 3:
        grad_group_numel = min(grad_group_numel, math.ceil(split.trainable / zero3_units(model)))
    codec = _codec(cfg, hw, trainable=split.trainable, num_params=split.total, world=world, grad_accum=accum,
                   backward_gather_numel=split.total - sum(no_backward_gather_units(model)))
    # The optimizer on device-resident states (offloaded states are offload_time's CPU optimizer): stage 0 steps
    # every trainable parameter on every rank, stages 1-3 the rank's shard (ZeRO paper, section 5.1).
    owned = 0 if z.offload_optimizer is Offload.CPU else (split.trainable if z.stage == 0 else mem.shard_numel)
    onebit = cfg.optimizer.type is OptimizerType.ONEBIT_ADAM
    # 1-bit Adam after freeze_step: its own update (OneBitAdam.step), at its own measured rate where there is one
    step_rate = (hw.onebit_step_elements_per_s if onebit and hw.onebit_step_elements_per_s > 0
                 else hw.optimizer_step_elements_per_s)
    optimizer_s = optimizer_step_s(owned_numel=owned, elements_per_s=step_rate)
    comm_micro_grad_s = comm.time_in_phase_s("micro", "grad")
    step = step_time(codec_s=codec.seconds if codec is not None else 0.0, optimizer_s=optimizer_s,
                     compute_s=compute_s, grad_accum=accum,
                     comm_micro_s=comm.time_in_phase_s("micro") - comm_micro_grad_s,
                     comm_micro_grad_s=comm_micro_grad_s, comm_boundary_s=comm.time_in_phase_s("boundary"),
                     comm_after_step_s=comm.time_in_phase_s("after_step"), offload=off,
                     overlap=efficiency.overlap,
                     grad_ready_fraction=first_bucket_fraction(reduce_bucket_numel=grad_group_numel,
                                                               trainable_params=split.trainable),
                     comm_cpu_s=comm_cpu_wall_s(comm.cpu_s, hw),
                     runtime_s=runtime_cpu_wall_s(hw, stage=z.stage, num_params=split.total, grad_accum=accum,
                                                  world_size=world))
    global_batch = int(batch.global_ or micro * accum * world)
    reason = _fit_reason(mem, hw)
    notes = [per_param.description, *ASSUMPTIONS]
    if not split.is_full:
        notes.append(f"{split.description}: frozen parameters hold only the {cfg.precision.value} parameter "
                     "(sharded at stage 3), send no gradients and skip their weight-gradient FLOPs "
                     "(6 Psi_trainable + 4 Psi_frozen)")
    if cfg.activations.checkpointing is Checkpointing.FULL:
        notes.append("full checkpointing re-runs each block's forward in backward" + (
            " less its last matmul (non-reentrant torch.utils.checkpoint stops early)"
            if framework.checkpoint_impl == "non_reentrant" else " (reentrant checkpointing)"))
    if codec is not None and codec.unknown:
        notes.append(codec_unknown_note(hw.name, codec.unknown))
    if optimizer_s > 0 and onebit and hw.onebit_step_elements_per_s > 0:
        notes.append(f"optimizer step: {owned:,} owned fp32 master elements per rank at the measured "
                     f"{step_rate / 1e6:,.0f} M elements/s of 1-bit Adam's compression-stage update (momentum, "
                     "mask, frozen-variance update; its exchange and codec are charged apart), serial")
    elif optimizer_s > 0:
        notes.append(f"optimizer step: {owned:,} owned fp32 master elements per rank at the measured "
                     f"{step_rate / 1e6:,.0f} M elements/s (gradient norm + fused AdamW), serial"
                     + ("; 1-bit Adam's own update is charged at that rate, a lower bound (this profile has no "
                        "onebit_step_elements_per_s: re-run `ztune probe --model`)" if onebit else ""))
    if step.comm_cpu_s > 0:
        launches = sum(o.calls for o in comm.ops)
        per_step = (f" and per message step ({launches:,} launches)"
                    if hw.inter_node_cpu_s_per_step > 0 or hw.intra_node_cpu_s_per_step > 0 else "")
        notes.append(f"communication CPU: {comm.cpu_s * 1e3:,.0f} ms of CPU per rank per step at the probe's measured "
                     f"CPU per byte{per_step}, x {hw.cpu_contention:.2f} contention = {step.comm_cpu_s * 1e3:,.0f} ms, "
                     f"since the {hw.gpus_per_node} ranks fill the {hw.cpu_cores} cores: the step charges the larger "
                     "of it and the exposed communication")
    if step.runtime_s > 0:
        notes.append(f"runtime CPU: the runtime's own work at stage {z.stage} (gradient hooks' bucket copies, unit "
                     f"gathers, parameter refresh) at the probe's measured CPU per parameter = "
                     f"{step.runtime_s * 1e3:,.0f} ms, serial")
    if cfg.optimizer.type is OptimizerType.ONEBIT_ADAM:
        notes.append(f"1-bit Adam: a step after freeze_step ({cfg.optimizer.freeze_step}): 1-bit momentum exchange "
                     "and its codec; the warm-up's steps all-reduce full-precision gradients and encode nothing")
    if cfg.seq_len > model.max_seq_len:
        notes.append(f"seq_len {cfg.seq_len} exceeds {model.name}'s max_seq_len {model.max_seq_len}")
    return Estimate(
        model=model, hardware=hw, config=cfg, num_nodes=num_nodes, world_size=world, micro_batch=micro,
        grad_accum=accum, global_batch=global_batch, num_params=split.total,
        memory_per_gpu=mem.breakdown, cpu_memory_per_host=mem.host_per_node, activations=mem.activations,
        comm=comm, offload=off, step=step, model_flops_per_step=model_flops, hardware_flops_per_step=hw_flops,
        tokens_per_s=global_batch * cfg.seq_len / step.step_s,
        samples_per_s=global_batch / step.step_s,
        mfu=model_flops / (step.step_s * peak),
        fits=not reason, reason=reason, notes=tuple(notes), split=split, init=mem.init, codec=codec,
    )


def codec_unknown_note(hardware_name: str, formats: Iterable[str]) -> str:
    """The assumption line for codecs whose rate a profile lacks (Estimate.codec_unknown)."""
    return (f"codec time unknown: {hardware_name} has no measured rate for {', '.join(formats)} "
            "(codec_*_elements_per_s; `ztune probe` measures them on CPU ranks): a step time with that codec leaves "
            "its compute out, so a sweep does not recommend it")


def _codec(cfg: TrainConfig, hw: Hardware, *, trainable: int, num_params: int, world: int, grad_accum: int,
           backward_gather_numel: int | None = None) -> CodecTime | None:
    """The codec work of `cfg` per step and its time at `hw`'s rates (cost/codec.py); None when no codec runs.
    1-bit Adam is charged for its compression stage (after freeze_step), the steady state of a long run."""
    z = cfg.zero
    work = step_codec_work(method=cfg.compression.method, onebit_adam=cfg.optimizer.type is OptimizerType.ONEBIT_ADAM,
                           stage=z.stage, trainable_params=trainable, num_params=num_params, world_size=world,
                           ranks_per_node=hw.gpus_per_node, grad_accum=grad_accum,
                           quantized_weights=z.quantized_weights, hpz=z.hpz_partition_size > 1,
                           quantized_gradients=z.quantized_gradients, backward_gather_numel=backward_gather_numel)
    return codec_time(work, rates=rates_of(hw)) if work else None


def _micro_candidates(cfg: TrainConfig, world_size: int) -> list[int]:
    """Micro-batches to consider, ascending: divisors of the per-rank samples per step when a global batch
    is set, else 1..MICRO_BATCH_CAP."""
    total = cfg.batch.global_
    if total is None:
        return list(range(1, MICRO_BATCH_CAP + 1))
    if total % world_size:
        raise UserError(f"global batch {total} is not divisible by {world_size} GPUs; pick a multiple of "
                        f"{world_size}")
    per_rank = total // world_size
    return [d for d in range(1, per_rank + 1) if per_rank % d == 0]


def max_micro_batch(model: ModelSpec, hw: Hardware, cfg: TrainConfig, *, num_nodes: int,
                    framework: Framework = DEFAULT_FRAMEWORK) -> int:
    """Largest micro-batch for which `cfg` fits (GPU and host memory); a divisor of global/world when the
    config sets a global batch. 0 if not even the smallest fits. Memory grows with the micro-batch
    (activations are linear in it), so a binary search over the candidates is exact."""
    world = _check_cluster(hw, num_nodes)
    counts = count_params(model)
    candidates = _micro_candidates(cfg, world)
    lo, hi, best = 0, len(candidates) - 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        mem = _memory(model, counts, hw, cfg, world_size=world, micro_batch=candidates[mid], framework=framework)
        if _fit_reason(mem, hw):
            hi = mid - 1
        else:
            best, lo = candidates[mid], mid + 1
    return best


def sweep(model: ModelSpec, hw: Hardware, *, num_nodes: int, seq_len: int, global_batch: int | None,
          micro_batch: int | None = None, stages: Iterable[int] = (0, 1, 2, 3),
          offload: Sequence[tuple[Offload, Offload]] = OFFLOAD_CHOICES,
          checkpointing: Sequence[Checkpointing] = CHECKPOINTING_CHOICES,
          compression: Sequence[Compression] = (Compression.NONE,), precision: Precision = Precision.BF16,
          base: TrainConfig | None = None, efficiency: Efficiency = DEFAULT_EFFICIENCY,
          framework: Framework = DEFAULT_FRAMEWORK, zeropp: Sequence[bool] = (False,)) -> list[Estimate]:
    """Estimates for every valid combination, fitting ones first, fastest first.

    `offload` holds (offload_optimizer, offload_params) pairs; pairs a stage cannot run (params offload
    below stage 3, optimizer offload at stage 0) are not generated, nor is bf16 compression of gradients
    that are already 16-bit. With `micro_batch` None each candidate gets the largest micro-batch that fits
    (and divides global_batch / GPUs); if none fits it is shown at micro-batch 1. Fields not swept (the
    optimizer, bucket sizes) come from `base`. zeropp (True): also stage 3 with ZeRO++ qwZ + hpZ over each
    node's GPUs + qgZ, where it can pay: several nodes of several GPUs, no parameter offload, no other gradient
    compression (cost/zeropp.py).
    """
    base = base or TrainConfig()
    results = []
    for stage in stages:
        for off_opt, off_par in offload:
            if (off_par is Offload.CPU and stage != 3) or (off_opt is Offload.CPU and stage == 0):
                continue
            for ckpt in checkpointing:
                for method, pp in itertools.product(compression, zeropp):
                    if method is Compression.BF16 and precision is not Precision.FP32:
                        continue
                    if pp and (stage != 3 or off_par is Offload.CPU or num_nodes < 2 or hw.gpus_per_node < 2
                               or method is not Compression.NONE):
                        continue
                    cfg = dataclasses.replace(
                        base,
                        zero=dataclasses.replace(base.zero, stage=stage, offload_optimizer=off_opt,
                                                 offload_params=off_par, quantized_weights=pp,
                                                 hpz_partition_size=hw.gpus_per_node if pp else 1,
                                                 quantized_gradients=pp),
                        precision=precision,
                        seq_len=seq_len,
                        batch=BatchConfig(micro=micro_batch or 1, global_=global_batch),
                        activations=ActivationConfig(checkpointing=ckpt, every=base.activations.every,
                                                     offload=base.activations.offload),
                        compression=CompressionConfig(method=method, topk_ratio=base.compression.topk_ratio),
                    )
                    if micro_batch is None:
                        best = max_micro_batch(model, hw, cfg, num_nodes=num_nodes, framework=framework)
                        cfg = dataclasses.replace(cfg, batch=BatchConfig(micro=max(best, 1), global_=global_batch))
                    results.append(estimate(model, hw, cfg, num_nodes=num_nodes, efficiency=efficiency,
                                            framework=framework))
    # Rows whose codec time is unknown (the profile has no rate: their step time is a lower bound) after the
    # priced ones that fit.
    results.sort(key=lambda e: (not e.fits, e.codec_unknown, -e.tokens_per_s))
    return results


def recommend(estimates: Sequence[Estimate]) -> tuple[Estimate | None, str]:
    """The fastest estimate that fits and one line saying why it beats the runner-up (or why none fits).
    Estimates whose codec time is unknown (Estimate.codec_unknown) are recommended only when nothing priced fits:
    their step time leaves out work that can cost more than it saves (docs/bench/compression.md)."""
    if not estimates:
        return None, "no configurations to compare"
    fitting = sorted((e for e in estimates if e.fits), key=lambda e: -e.tokens_per_s)
    priced = [e for e in fitting if not e.codec_unknown]
    unpriced = [e for e in fitting if e.codec_unknown] if priced else []
    fitting = priced or fitting
    if not fitting:
        least = min(estimates, key=lambda e: e.memory_per_gpu.total)
        return None, (f"nothing fits: the smallest ({least.label}) {least.reason}; add nodes, "
                      "enable offload or checkpointing, or shorten the sequence")
    best = fitting[0]
    used = f"{best.memory_per_gpu.total / GiB:.1f} of {best.hardware.gpu_memory_bytes / GiB:.0f} GiB per GPU"
    if best.init_peak_bytes is not None:
        used += f" (initialisation peaks higher, at {best.init_peak_bytes / GiB:.1f} GiB)"
    if len(fitting) == 1:
        return best, f"the only configuration that fits ({used})" + _unpriced_why(best, unpriced)
    runner = fitting[1]
    gain_pct = 100 * (best.tokens_per_s / runner.tokens_per_s - 1)
    why = _why(best, runner)
    margin = f"{gain_pct:.1f}% more than" if gain_pct >= 0.05 else "within 0.05% of"
    return best, (f"{best.tokens_per_s:,.0f} tokens/s, {margin} the runner-up ({runner.label}): {why}; {used}"
                  + _network_why(best, fitting) + _unpriced_why(best, unpriced))


def _unpriced_why(best: Estimate, unpriced: Sequence[Estimate]) -> str:
    """What the configurations whose codec time is unknown (not recommended) would need to beat `best`: the
    fastest of them without its codec, and the codec time per step below which it would win."""
    if not unpriced:
        return ""
    fastest = max(unpriced, key=lambda e: e.tokens_per_s)
    formats = ", ".join(dict.fromkeys(f for e in unpriced for f in e.codec.unknown))
    head = (f"; {len(unpriced)} configuration(s) with codecs ({formats}) not considered: {best.hardware.name} has no "
            "measured codec rate to price them")
    if fastest.step_time_s >= best.step_time_s:
        return head + " (none is faster even with a free codec)"
    headroom_ms = (best.step_time_s - fastest.step_time_s) * 1e3
    return (head + f"; the fastest of them ({fastest.label}) pays only if its codec costs under {headroom_ms:,.3g} "
            "ms/step (give the profile its codec_*_elements_per_s rates; on CPU ranks `ztune probe` and "
            "`ztune autotune` measure them, on GPUs nothing does yet)")


def _saves_traffic(est: Estimate) -> bool:
    """Gradient compression or any part of ZeRO++ (qwZ, hpZ, qgZ) on: the choices that trade compute or
    memory for fewer bytes on the network."""
    z = est.config.zero
    zeropp = z.stage == 3 and (z.quantized_weights or z.hpz_partition_size > 1 or z.quantized_gradients)
    return zeropp or est.config.compression.method is not Compression.NONE


def _network_why(best: Estimate, fitting: Sequence[Estimate]) -> str:
    """Where the sweep held both kinds: why compression / ZeRO++ pays for the network here, or why not.
    `fitting` is sorted fastest first."""
    plain = next((e for e in fitting if not _saves_traffic(e)), None)
    saver = next((e for e in fitting if _saves_traffic(e)), None)
    if plain is None or saver is None:
        return ""
    mib = 2**20
    if best is saver:
        ms = (plain.step.exposed_comm_s - best.step.exposed_comm_s) * 1e3
        return (f"; the network makes it pay: against the fastest configuration without compression or ZeRO++ "
                f"({plain.label}) it sends {best.comm_bytes_per_step / mib:,.0f} instead of "
                f"{plain.comm_bytes_per_step / mib:,.0f} MiB per GPU per step and exposes {ms:,.0f} ms/step less "
                f"communication for {best.step.codec_s * 1e3:,.0f} ms/step of codec")
    pct = 100 * (1 - saver.tokens_per_s / best.tokens_per_s)
    saved_ms = (best.step.exposed_comm_s - saver.step.exposed_comm_s) * 1e3
    return (f"; compression and ZeRO++ do not pay here: the fastest of them ({saver.label}) is {pct:.1f}% "
            f"slower: its codec costs {saver.step.codec_s * 1e3:,.0f} ms/step and it exposes {saved_ms:,.0f} ms/step "
            "less communication")


def _why(best: Estimate, runner: Estimate) -> str:
    """Which part of the step time makes the difference."""
    b, r = best.step, runner.step
    parts = {
        "less recomputation": r.compute_s - b.compute_s,
        "less exposed communication": r.exposed_comm_s - b.exposed_comm_s,
        "less offload time": r.offload_s - b.offload_s,
        "less optimizer compute": r.optimizer_s - b.optimizer_s,  # stage 0 steps every parameter, 1-3 a shard
        "less runtime CPU": r.runtime_s - b.runtime_s,  # e.g. stage 3's unit gathers on CPU ranks
    }
    name, gain = max(parts.items(), key=lambda kv: kv[1])
    if gain < 5e-4:  # under half a millisecond, as printed: no part makes the difference
        gain = 0.0
    if best.micro_batch != runner.micro_batch and gain <= 0:
        return f"micro-batch {best.micro_batch} vs {runner.micro_batch}"
    if gain <= 0:
        return "equal step time; smaller memory" if best.memory_per_gpu.total <= runner.memory_per_gpu.total \
            else "same step time"
    return f"{name} ({gain * 1e3:.0f} ms/step saved)"
