"""Memory per GPU and per host: model states (ZeRO stages, precisions, optimizers, offload), communication
buffers and a framework reserve.

Source for the model-state accounting: Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models" (SC'20), section 3 and figure 1. With Psi parameters, n data-parallel ranks and
K optimizer bytes per parameter (K = 12 for mixed-precision Adam), bytes per GPU are:

    stage 0: (2 + 2 + K) Psi     stage 1: 4 Psi + K Psi / n
    stage 2: 2 Psi + (2 + K) Psi / n     stage 3: (4 + K) Psi / n

Here "2 + 2" is generalised to (param bytes + grad bytes) of the training precision, and K to the optimizer.
All functions are pure; sizes are in bytes unless the name says `_numel`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ztune.config.schema import OptimizerType, Precision
from ztune.specs import Hardware

GiB = 1 << 30

# Framework reserve per GPU: memory the cost model cannot attribute to a tensor but that a training
# process holds. CUDA context ~0.7-0.8 GiB (PyTorch forum, "High gpu memory overhead",
# discuss.pytorch.org/t/81330: "~700+MB" allocated by the context before any tensor), plus NCCL
# communicator buffers (NCCL docs, NCCL_BUFFSIZE: 4 MiB per channel per peer) and the cuBLAS workspace,
# plus slack for caching-allocator fragmentation. 1.5 GiB in all; an assumption, not a measurement:
# the autotuner's trials replace it with what the runtime reports.
GPU_FRAMEWORK_RESERVE_BYTES = int(1.5 * GiB)
# A CPU-only "device" (the cpu-local profile used by tests) has no CUDA context and no NCCL buffers.
CPU_FRAMEWORK_RESERVE_BYTES = 0

# Gradient reduction buckets are double buffered: one bucket is on the wire while backward fills the
# next (the overlap PyTorch DDP and DeepSpeed's ipg buckets rely on), so two buckets are live at once.
REDUCE_BUCKET_BUFFERS = 2

# fp32 bytes: master weights and Adam/SGD moments are always kept in fp32 (Micikevicius et al. 2018,
# "Mixed Precision Training", section 3.1: fp32 master copy of weights).
FP32_BYTES = 4


@dataclass(frozen=True)
class StateBytesPerParam:
    """Bytes per parameter of each model-state category before sharding (the ZeRO paper's 2, 2 and K)."""

    param: int
    grad: int
    optimizer: int  # K: fp32 master (mixed precision only) + optimizer moments
    description: str

    @property
    def total(self) -> int:
        return self.param + self.grad + self.optimizer


def state_bytes_per_param(*, precision: Precision, optimizer: OptimizerType, momentum: float = 0.0,
                          local_momentum: bool = False) -> StateBytesPerParam:
    """Bytes per parameter for (precision, optimizer).

    - bf16/fp16 + Adam(W): 2 + 2 + K=12 (fp32 master 4 + m 4 + v 4): the ZeRO paper's 16 bytes/param.
    - fp32 + Adam(W): 4 + 4 + K=8 (m, v; the params themselves are the fp32 master, no copy).
    - OneBitAdam: Adam's plus the fp32 worker error-feedback buffer (K = 16 at bf16/fp16, 12 at fp32), plus with
      `local_momentum` (ztune's option, runtime/onebit_adam.py equation (4')) each rank's own fp32 momentum (K + 4).
    - SGD: one fp32 momentum buffer when momentum > 0, none otherwise; mixed precision adds the fp32 master
      (K = 8 or 4 at bf16/fp16; K = 4 or 0 at fp32).
    """
    low = precision is not Precision.FP32
    param = grad = precision.bytes
    master = FP32_BYTES if low else 0
    if optimizer is OptimizerType.SGD:
        moments = FP32_BYTES if momentum > 0 else 0
        name = "SGD" + (" with momentum" if momentum > 0 else "")
    else:
        moments = 2 * FP32_BYTES  # Adam's m and v (Kingma & Ba 2015), fp32
        if optimizer is OptimizerType.ONEBIT_ADAM:
            # 1-bit Adam's worker error-feedback buffer, fp32 over every parameter (Tang et al. 2021, Algorithm
            # 1; runtime/onebit_adam.py). Its server buffer adds 4/n bytes/param, left out of this per-param K.
            moments += FP32_BYTES
            if local_momentum:  # each rank's own momentum beside the exchanged one (equation (4'))
                moments += FP32_BYTES
        name = optimizer.value + (" with local_momentum" if optimizer is OptimizerType.ONEBIT_ADAM and local_momentum
                                  else "")
    k = master + moments
    what = "fp32 master + moments" if low else "moments (params are the fp32 master)"
    return StateBytesPerParam(
        param=param,
        grad=grad,
        optimizer=k,
        description=f"{precision.value} {name}: params {param} + grads {grad} + optimizer {k} ({what}) bytes/param",
    )


def shard_numel(num_params: int, world_size: int) -> int:
    """Elements of one rank's 1/n shard (flat buffers are padded to a multiple of n, hence the ceiling)."""
    return -(-num_params // world_size)


@dataclass(frozen=True)
class ModelStateMemory:
    """Model-state bytes one rank holds, on its GPU and (when offloaded) in host memory."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    host_params_bytes: int = 0
    host_grads_bytes: int = 0
    host_optimizer_bytes: int = 0

    @property
    def device_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def host_bytes(self) -> int:
        return self.host_params_bytes + self.host_grads_bytes + self.host_optimizer_bytes


def model_state_memory(*, num_params: int, world_size: int, stage: int, per_param: StateBytesPerParam,
                       offload_optimizer: bool = False, offload_params: bool = False,
                       frozen_params: int = 0) -> ModelStateMemory:
    """Bytes per rank for params, grads and optimizer state at `stage` (ZeRO paper, section 3).

    num_params are the trainable parameters; `frozen_params` more hold only their compute-dtype parameter
    (per_param.param bytes, sharded at stage 3 like the others: cost/finetune.py): no grad, master or moments.

    offload_optimizer (stages 1-3; ZeRO-Offload, Ren et al. 2021): the optimizer shard (fp32 master +
    moments) lives in host memory, and so does the gradient shard the CPU optimizer reads (staged there
    in the gradient dtype). At stage 1 the full gradient still accumulates on the GPU during backward;
    at stages 2/3 reduced gradient buckets go straight to the host, so no gradient shard stays on the GPU.
    offload_params (stage 3 only): the parameter shard lives in host memory and is uploaded per unit.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0-3, got {stage}")
    if offload_params and stage != 3:
        raise ValueError("offload_params needs stage 3")
    if offload_optimizer and stage == 0:
        raise ValueError("offload_optimizer needs stage 1-3")
    full, shard = num_params, shard_numel(num_params, world_size)
    frozen = shard_numel(frozen_params, world_size) if stage == 3 else frozen_params
    params = ((shard if stage == 3 else full) + frozen) * per_param.param
    grads = (shard if stage >= 2 else full) * per_param.grad
    optimizer = (full if stage == 0 else shard) * per_param.optimizer
    host_params = host_grads = host_optimizer = 0
    # At fp32 the parameters are their own master (K holds only the moments). Once the optimizer and the
    # parameters sit on different sides of PCIe, the side without the parameters needs an fp32 master copy.
    fp32_master = per_param.param == FP32_BYTES and per_param.optimizer > 0
    if offload_optimizer:
        host_optimizer, optimizer = optimizer, 0
        host_grads = shard * per_param.grad
        if stage >= 2:
            grads = 0
        if fp32_master and not offload_params:
            host_optimizer += shard * FP32_BYTES
    if offload_params:
        host_params, params = params, 0
        if fp32_master and not offload_optimizer:
            optimizer += shard * FP32_BYTES
    return ModelStateMemory(
        params_bytes=params,
        grads_bytes=grads,
        optimizer_bytes=optimizer,
        host_params_bytes=host_params,
        host_grads_bytes=host_grads,
        host_optimizer_bytes=host_optimizer,
    )


@dataclass(frozen=True)
class BufferMemory:
    """Transient buffers one GPU holds at peak, besides model states and activations."""

    reduce_bucket_bytes: int
    gather_bytes: int
    reserve_bytes: int

    @property
    def comm_bytes(self) -> int:
        return self.reduce_bucket_bytes + self.gather_bytes

    @property
    def total_bytes(self) -> int:
        return self.comm_bytes + self.reserve_bytes


def framework_reserve_bytes(hw: Hardware) -> int:
    """GPU_FRAMEWORK_RESERVE_BYTES on GPU profiles; 0 on a CPU-only profile (name starting with 'cpu')."""
    return CPU_FRAMEWORK_RESERVE_BYTES if hw.name.lower().startswith("cpu") else GPU_FRAMEWORK_RESERVE_BYTES


def buffer_memory(*, stage: int, num_params: int, largest_unit_numel: int, reduce_bucket_numel: int,
                  prefetch_units: int, param_bytes: int, grad_bytes: int, reserve_bytes: int,
                  trainable_params: int | None = None) -> BufferMemory:
    """Communication buffers per GPU.

    - Gradient reduction: REDUCE_BUCKET_BUFFERS buckets of `reduce_bucket_numel` gradient elements (never
      more than the model holds). At stage 3 the gathered unit's full gradient also exists before it is
      reduce-scattered into the shard, so one unit of gradients is added.
    - Stage 3 parameter gathers: the unit in use plus `prefetch_units` prefetched, each at most the largest
      unit (a transformer block, or the embedding / LM head when larger).
    Stage 1/2 refresh parameters in place in the flat parameter buffer after the step: no extra buffer.
    trainable_params (default all): only these have gradients, which bounds the buckets and the unit's
    gradient (frozen parameters are gathered but produce none).
    """
    grad_numel = num_params if trainable_params is None else trainable_params
    bucket_numel = min(reduce_bucket_numel, grad_numel)
    reduce = REDUCE_BUCKET_BUFFERS * bucket_numel * grad_bytes
    gather = 0
    if stage == 3:
        unit = min(largest_unit_numel, num_params)
        gather = unit * (1 + prefetch_units) * param_bytes
        reduce += min(unit, grad_numel) * grad_bytes
    return BufferMemory(reduce_bucket_bytes=reduce, gather_bytes=gather, reserve_bytes=reserve_bytes)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak bytes per GPU by category. `buffers` includes the framework reserve (also given alone)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    buffers: int
    reserve: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers

    def as_dict(self) -> dict[str, int]:
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "buffers": self.buffers,
            "total": self.total,
        }


def memory_per_gpu(*, states: ModelStateMemory, activation_device_bytes: int, buffers: BufferMemory
                   ) -> MemoryBreakdown:
    """Sum of the categories one GPU holds at peak (activations peak at the start of backward, when the
    model states, the buckets and the gather buffers are all live too)."""
    return MemoryBreakdown(
        params=states.params_bytes,
        grads=states.grads_bytes,
        optimizer=states.optimizer_bytes,
        activations=activation_device_bytes,
        buffers=buffers.total_bytes,
        reserve=buffers.reserve_bytes,
    )


def host_memory_per_node(*, states: ModelStateMemory, activation_host_bytes: int, gpus_per_node: int) -> int:
    """Host bytes per node: every rank on the node holds its offloaded states and activations there."""
    return gpus_per_node * (states.host_bytes + activation_host_bytes)
