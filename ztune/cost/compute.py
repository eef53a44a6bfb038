"""Compute, offload and step time: FLOPs per step, recomputation, PCIe transfers, the CPU optimizer, the
overlap of communication with compute, and the resulting throughput and MFU.

FLOPs per token for training (Chowdhery et al. 2022, PaLM, appendix B; Narayanan et al. 2021, Megatron-LM
eq. 3): 6 Psi + 12 L h s, where Psi counts the parameters a token uses (top-k experts for MoE), L layers,
h the attention width (heads x head size) and s the sequence length. One forward is a third of that
(2 Psi + 4 L h s); backward the other two thirds (Kaplan et al. 2020, section 2.1).
MFU (PaLM appendix B) counts model FLOPs only, so recomputation lowers it; the step time counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

FORWARD_SHARE = 1 / 3  # forward FLOPs / training FLOPs (2 of 6 per parameter)
BACKWARD_SHARE = 2 / 3


# Achieved fraction of dense peak when a hardware profile does not say (Hardware.train_flops_efficiency 0):
# matmul-heavy transformer steps reach 40-55% of dense bf16 peak at scale (Megatron-LM reports 52% of peak
# for its 1T run, Narayanan et al. 2021, table 1).
GENERIC_TRAIN_FLOPS_EFFICIENCY = 0.5


@dataclass(frozen=True)
class Efficiency:
    """Corrections to the hardware profile's numbers; the autotuner's calibration replaces these defaults.

    compute: multiplies the achieved FLOP rate (peak x the profile's train_flops_efficiency, or
      GENERIC_TRAIN_FLOPS_EFFICIENCY); 1.0 = the profile is right, 0.5 = this machine runs at half of it.
    bandwidth: multiplies the profile's link bandwidths, which are already achievable nccl-tests busbw
      figures (specs.Hardware), hence 1.0.
    overlap: fraction of overlappable communication/transfer that hides behind compute (DDP/ZeRO overlap
      bucketed reduction with backward; 0.8 leaves room for launch gaps and stream contention).
    host_bandwidth: fraction of the host memory bandwidth the CPU optimizer reaches (DESIGN.md's target
      for ztune's CPU Adam is >= 80% of measured bandwidth).
    """

    compute: float = 1.0
    bandwidth: float = 1.0
    overlap: float = 0.8
    host_bandwidth: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 < self.compute <= MAX_COMPUTE_SCALE:
            raise ValueError(f"Efficiency.compute must be in (0, {MAX_COMPUTE_SCALE:g}], got {self.compute}")
        for name in ("bandwidth", "host_bandwidth"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"Efficiency.{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"Efficiency.overlap must be in [0, 1], got {self.overlap}")


# A machine may beat its profile (a newer software stack, higher clocks), but not by more than 2x: beyond
# that the profile, not the calibration, is wrong.
MAX_COMPUTE_SCALE = 2.0


def achieved_flops_per_s(*, peak_flops: float, train_flops_efficiency: float, compute_scale: float) -> float:
    """FLOP/s a training step reaches: peak x the profile's achieved fraction (generic 0.5 when the profile
    has none) x the calibration's scale."""
    fraction = train_flops_efficiency or GENERIC_TRAIN_FLOPS_EFFICIENCY
    return peak_flops * fraction * compute_scale


DEFAULT_EFFICIENCY = Efficiency()


def model_flops_per_token(*, active_params: int, num_layers: int, attention_width: int, seq_len: int) -> float:
    """6 Psi + 12 L h s FLOPs per trained token (no recomputation)."""
    return 6.0 * active_params + 12.0 * num_layers * attention_width * seq_len


def recompute_flops_per_token(*, block_active_params: int, num_layers: int, attention_width: int,
                              seq_len: int, recompute_fraction: float) -> float:
    """Extra FLOPs per token spent re-running block forwards: `recompute_fraction` of one block forward
    (2 Psi_blocks + 4 L h s). Full recomputation (fraction 1) gives about x4/3 of the model FLOPs."""
    block_forward = 2.0 * block_active_params + 4.0 * num_layers * attention_width * seq_len
    return recompute_fraction * block_forward


def cpu_optimizer_bytes_per_param(*, param_bytes: int, grad_bytes: int, optimizer_bytes: int) -> int:
    """Host memory traffic per parameter of one CPU optimizer step: read the gradient, read and write
    the fp32 master and moments (K bytes each way), write the low-precision parameter for upload.
    28 bytes/param for bf16 Adam (2 + 2 x 12 + 2)."""
    return grad_bytes + 2 * optimizer_bytes + param_bytes


def optimizer_step_s(*, owned_numel: int, elements_per_s: float) -> float:
    """Seconds of one optimizer step on device-resident states: the fp32 master elements this rank owns
    (stage 0: every trainable parameter, as each rank steps the whole model; stages 1-3: its 1/n shard, ZeRO
    paper, Rajbhandari et al. 2020, section 5.1) at the profile's measured `elements_per_s`
    (Hardware.optimizer_step_elements_per_s: gradient-norm pass + fused Adam, all ranks stepping at once).
    0 when the rate is unknown (0). Once per optimizer step, whatever the gradient accumulation."""
    if elements_per_s <= 0:
        return 0.0
    return owned_numel / elements_per_s


@dataclass(frozen=True)
class OffloadTime:
    """Seconds per optimizer step spent on host offload, per rank.

    optimizer_transfer_s: parameter shard up over PCIe after the CPU step (serial: nothing left to hide it).
    cpu_optimizer_s: the CPU optimizer over the node's shards (serial, ranks share the host's bandwidth).
    grad_transfer_s: gradient shard down over PCIe; ZeRO-Offload copies each reduced bucket while backward
      continues (Ren et al. 2021, sec. 4.1, "overlapped with backward"), so it hides behind backward.
    prefetch_transfer_s: stage-3 parameter uploads and activation offload copies during forward/backward
      (overlappable with compute).
    """

    optimizer_transfer_s: float = 0.0
    cpu_optimizer_s: float = 0.0
    prefetch_transfer_s: float = 0.0
    grad_transfer_s: float = 0.0

    @property
    def serial_s(self) -> float:
        return self.optimizer_transfer_s + self.cpu_optimizer_s


def offload_time(*, shard_numel: int, param_bytes: int, grad_bytes: int, optimizer_bytes: int,
                 offload_optimizer: bool, offload_params: bool, activation_host_bytes: int, grad_accum: int,
                 gpus_per_node: int, host_device_bw_bytes_per_s: float, host_memory_bw_bytes_per_s: float,
                 host_bandwidth_efficiency: float = 1.0, param_shard_numel: int | None = None) -> OffloadTime:
    """PCIe and CPU time of offload per optimizer step (bytes / bandwidth; PCIe per GPU, one direction).

    `host_memory_bw_bytes_per_s` is the node's: all `gpus_per_node` ranks run their CPU optimizer on it.
    Stage-3 parameter offload uploads the shard twice per micro-step (forward and backward gathers);
    activation offload copies `activation_host_bytes` down in forward and back up in backward.
    `shard_numel` is the trainable shard (optimizer, gradients); `param_shard_numel` (default the same) the
    parameter shard, frozen parameters included, which stage-3 parameter offload uploads.
    """
    transfer = cpu = prefetch = grads = 0.0
    param_shard = shard_numel if param_shard_numel is None else param_shard_numel
    if offload_optimizer:
        transfer = shard_numel * param_bytes / host_device_bw_bytes_per_s
        grads = shard_numel * grad_bytes / host_device_bw_bytes_per_s
        per_param = cpu_optimizer_bytes_per_param(param_bytes=param_bytes, grad_bytes=grad_bytes,
                                                  optimizer_bytes=optimizer_bytes)
        node_bytes = gpus_per_node * shard_numel * per_param
        cpu = node_bytes / (host_memory_bw_bytes_per_s * host_bandwidth_efficiency)
    if offload_params:
        prefetch += 2 * grad_accum * param_shard * param_bytes / host_device_bw_bytes_per_s
        if not offload_optimizer:
            # The GPU optimizer updated the shard: write it back to its home in host memory.
            transfer += shard_numel * param_bytes / host_device_bw_bytes_per_s
    prefetch += 2 * grad_accum * activation_host_bytes / host_device_bw_bytes_per_s
    return OffloadTime(optimizer_transfer_s=transfer, cpu_optimizer_s=cpu, prefetch_transfer_s=prefetch,
                       grad_transfer_s=grads)


def exposed_s(*, work_s: float, window_s: float, overlap: float) -> float:
    """Part of `work_s` not hidden: at most `overlap` of it hides, and never more than the window."""
    return work_s - min(overlap * work_s, window_s)


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step and its parts (per rank; all ranks run in lockstep)."""

    compute_s: float
    comm_s: float
    exposed_comm_s: float
    offload_s: float
    step_s: float
    # Compression codecs (cost/codec.py): serial work on the compute's own cores, on the communication's path.
    codec_s: float = 0.0
    # The optimizer step on device-resident states (optimizer_step_s): serial, after the last reduction.
    optimizer_s: float = 0.0
    # Wall seconds the collectives' CPU work takes where the ranks fill the cores (comm_cpu_s of step_time)
    comm_cpu_s: float = 0.0
    # The runtime's own CPU work on the step's path (runtime_s of step_time), wall seconds
    runtime_s: float = 0.0


def first_bucket_fraction(*, reduce_bucket_numel: int, trainable_params: int) -> float:
    """Share of the backward that passes before the first gradient bucket is full and can go on the wire:
    buckets fill in the order backward produces gradients (reverse registration order, as PyTorch DDP does:
    Li et al. 2020, "PyTorch Distributed", VLDB, section 3.2.3), so only the backward after the first bucket,
    1 - bucket / trainable of it, can hide the reduction. 1 when one bucket holds every gradient."""
    if trainable_params <= 0:
        return 1.0
    return min(1.0, reduce_bucket_numel / trainable_params)


def step_time(*, compute_s: float, grad_accum: int, comm_micro_s: float, comm_boundary_s: float,
              comm_after_step_s: float, offload: OffloadTime, overlap: float, comm_micro_grad_s: float = 0.0,
              grad_ready_fraction: float = 0.0, codec_s: float = 0.0, optimizer_s: float = 0.0,
              comm_cpu_s: float = 0.0, runtime_s: float = 0.0) -> StepTime:
    """Step time = compute + runtime + codec + optimizer + communication not hidden + offload not hidden.

    `runtime_s`: wall seconds of the runtime's own work beyond the model's forward + backward and the optimizer
    update (gradient hooks' bucket copies, stage-3 unit gathers and releases, the parameter refresh; cost/estimate.py
    runtime_cpu_wall_s), added in full: it runs on the computing thread, in the hooks and between the kernels, and
    on no separate core.

    `comm_cpu_s`: wall seconds of the collectives' own CPU work (copies, the TCP stack, the sums) where the ranks
    fill the host's cores (CPU ranks; cost/estimate.py comm_cpu_wall_s). Hidden communication still needs that
    CPU, and no core is free to run it beside the compute, so the step takes at least compute + comm_cpu_s; while
    a rank waits on exposed communication its core is free for that work. So the communication term is the
    larger of the exposed communication and comm_cpu_s (a roofline over the two resources, cores and link).

    `optimizer_s` (optimizer_step_s) is added in full: the step starts once every gradient is reduced (the
    engine waits for the reductions at the end of backward) and the parameter refresh waits for it.

    `codec_s` (cost/codec.py) is added in full: the encoders run in the backward hooks on the computing thread and
    the decoders where the step waits for the exchange, on the cores (SMs) the compute uses, so codec work
    neither overlaps the compute it competes with nor hides behind the transfer whose input or output it is;
    nor does it widen the window the communication hides behind (the window is compute only).

    Overlap windows: per-micro-step parameter collectives (stage-3 gathers, prefetched) and prefetch transfers
    hide behind all the step's compute. Gradient reductions hide only behind the backward that produces them,
    and of each backward only the part after the first bucket (or stage-3 unit) is ready
    (`grad_ready_fraction`, first_bucket_fraction): the runtime waits for every reduction in flight at the end
    of each backward (runtime/grad_reduce.py `finish`), so none hides behind the next forward. That holds for
    the per-micro-step reductions (`comm_micro_grad_s`, stages 2/3, a backward each) and for the once-per-step
    one (`comm_boundary_s`, stages 0/1 and stage 2 with one micro-step: the last backward only). Everything
    hidden per micro-step together never exceeds the compute window. The parameter refresh after the
    optimizer step and the CPU optimizer path (transfers + CPU Adam) are serial.
    """
    micro_compute_s = compute_s / grad_accum
    ready = 1.0 - grad_ready_fraction
    hidden_grad = min(overlap * comm_micro_grad_s, BACKWARD_SHARE * compute_s * ready)
    hidden_micro = min(overlap * comm_micro_s + hidden_grad, compute_s)
    exposed_comm = (
        comm_micro_s + comm_micro_grad_s - hidden_micro
        + exposed_s(work_s=comm_boundary_s, window_s=BACKWARD_SHARE * micro_compute_s * ready, overlap=overlap)
        + comm_after_step_s
    )
    exposed_offload = (exposed_s(work_s=offload.prefetch_transfer_s, window_s=compute_s, overlap=overlap)
                       + exposed_s(work_s=offload.grad_transfer_s, window_s=BACKWARD_SHARE * compute_s,
                                   overlap=overlap))
    offload_s = offload.serial_s + exposed_offload
    return StepTime(
        compute_s=compute_s,
        comm_s=comm_micro_s + comm_micro_grad_s + comm_boundary_s + comm_after_step_s,
        exposed_comm_s=exposed_comm,
        offload_s=offload_s,
        step_s=compute_s + runtime_s + codec_s + optimizer_s + max(exposed_comm, comm_cpu_s) + offload_s,
        codec_s=codec_s,
        optimizer_s=optimizer_s,
        comm_cpu_s=comm_cpu_s,
        runtime_s=runtime_s,
    )
