"""Value objects the cost model, tuner and runtime share: the model's shape and the cluster's hardware.

Both are plain frozen dataclasses of numbers; loading them from YAML / config.json lives in
`ztune.profiles`. Parameter counting lives here because it follows from the shape alone and must equal
transformers' own count exactly (tests/unit/test_profiles.py builds each model on the meta device).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Architecture(str, enum.Enum):
    GPT2 = "gpt2"  # learned positions, LayerNorm with bias, GeLU MLP, biases on every linear
    LLAMA = "llama"  # RoPE, RMSNorm, SwiGLU MLP, grouped-query attention
    MIXTRAL = "mixtral"  # llama attention + top-k routed SwiGLU experts


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's shape. Sizes are counts (elements), not bytes."""

    name: str
    architecture: Architecture
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_seq_len: int
    tied_embeddings: bool = False
    # Bias on the q/k/v projections (gpt2: on every linear, always; qwen2: q/k/v only).
    attention_bias: bool = False
    # Bias on the attention output projection (llama's `attention_bias` sets both; qwen2 has none).
    attention_out_bias: bool = False
    num_experts: int = 1
    top_k: int = 1
    head_dim: int | None = None
    # Where the shape came from: a profile, a config.json, or "derived from --params 70B".
    source: str = ""

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def kv_size(self) -> int:
        """Width of the K (and V) projection output: num_kv_heads * head_size."""
        return self.num_kv_heads * self.head_size

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (elements). `total` is what is stored; `active_per_token` is what one token uses
    (differs for MoE: only top_k experts run), which is what the FLOP count needs."""

    embedding: int
    per_layer: int
    final_norm: int
    lm_head: int
    total: int
    active_per_token: int
    # Largest single layer (block), which bounds ZeRO-3's gather buffer.
    largest_layer: int


def _attention_params(m: ModelSpec) -> int:
    h, kv, q = m.hidden_size, m.kv_size, m.num_heads * m.head_size
    if m.architecture is Architecture.GPT2:
        # One fused c_attn (h -> 3h) and c_proj (h -> h), both with bias.
        return h * 3 * h + 3 * h + h * h + h
    weights = h * q + 2 * h * kv + q * h
    bias = (q + 2 * kv) if m.attention_bias else 0
    bias += h if m.attention_out_bias else 0
    return weights + bias


def _mlp_params(m: ModelSpec) -> int:
    h, i = m.hidden_size, m.intermediate_size
    if m.architecture is Architecture.GPT2:
        return h * i + i + i * h + h  # c_fc and c_proj with bias
    return 3 * h * i  # SwiGLU: gate, up, down; no bias


def _norm_params(m: ModelSpec) -> int:
    # LayerNorm has weight and bias; RMSNorm only weight.
    return 2 * m.hidden_size if m.architecture is Architecture.GPT2 else m.hidden_size


def count_params(m: ModelSpec) -> ParamCounts:
    """Exact parameter count of the Hugging Face implementation of `m` (GPT2LMHeadModel,
    LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM)."""
    h = m.hidden_size
    embedding = m.vocab_size * h
    if m.architecture is Architecture.GPT2:
        embedding += m.max_seq_len * h  # learned position embeddings (wpe)
    attn = _attention_params(m)
    mlp = _mlp_params(m)
    norms = 2 * _norm_params(m)
    if m.is_moe:
        router = h * m.num_experts  # gate linear, no bias
        per_layer = attn + norms + router + m.num_experts * mlp
        active_layer = attn + norms + router + m.top_k * mlp
    else:
        per_layer = active_layer = attn + norms + mlp
    final_norm = _norm_params(m)
    lm_head = 0 if m.tied_embeddings else m.vocab_size * h
    total = embedding + m.num_layers * per_layer + final_norm + lm_head
    active = embedding + m.num_layers * active_layer + final_norm + lm_head
    return ParamCounts(
        embedding=embedding,
        per_layer=per_layer,
        final_norm=final_norm,
        lm_head=lm_head,
        total=total,
        active_per_token=active,
        largest_layer=max(per_layer, embedding, lm_head),
    )


def _own_unit_tables(m: ModelSpec) -> tuple[list[int], list[int]]:
    """(token/position embedding sizes, head size) of the modules outside the blocks that are ZeRO-3 units of
    their own: runtime/param_gather.py find_units takes a leaf holding at least a block's parameters and sharing
    none (a tied embedding and head stay in the root unit)."""
    h, block = m.hidden_size, count_params(m).per_layer
    tables = [] if m.tied_embeddings else [m.vocab_size * h]
    if m.architecture is Architecture.GPT2:
        tables.append(m.max_seq_len * h)
    head = [] if m.tied_embeddings else [m.vocab_size * h]
    return [n for n in tables if n >= block], [n for n in head if n >= block]


def zero3_units(m: ModelSpec) -> int:
    """How many units the runtime gathers `m` in at stage 3 (runtime/param_gather.py): the blocks, each embedding
    or head that is a unit of its own (`_own_unit_tables`), and the root unit holding every other parameter
    (the final norm at least)."""
    tables, head = _own_unit_tables(m)
    return m.num_layers + len(tables) + len(head) + 1


def no_backward_gather_units(m: ModelSpec) -> tuple[int, ...]:
    """Elements of each ZeRO-3 unit of `m` that the runtime gathers for forward but not again for backward.

    Mirrors runtime/param_gather.py: `find_units` makes a module outside the blocks its own unit when it holds
    at least a block's parameters and shares none (a tied embedding stays in the root unit), and a unit that is a
    plain nn.Embedding is not re-gathered in backward (its gradient needs only the indices and the output's
    gradient). So: the untied token embedding (vocab_size x hidden_size) and GPT-2's learned position embedding
    (max_seq_len x hidden_size), each when it reaches a block's size. Empty when nothing is skipped."""
    return tuple(_own_unit_tables(m)[0])


# Hardware.runtime_<kind>_cpu_s_per_param_stage<s>: an optimizer step's first micro-step, each later one, the step
RUNTIME_CPU_KINDS = ("micro", "accum", "step")


@dataclass(frozen=True)
class Hardware:
    """One node type of a cluster. Bandwidths are achievable bytes/s per GPU, FLOP/s are dense peaks."""

    name: str
    gpus_per_node: int
    gpu_memory_bytes: int
    peak_flops_bf16: float
    peak_flops_fp32: float
    # Intra-node collective bus bandwidth per GPU (NVLink/NVSwitch or PCIe), nccl-tests "busbw" sense.
    intra_node_bw_bytes_per_s: float
    intra_node_latency_s: float
    # Inter-node bandwidth available to each GPU (NIC bandwidth / GPUs sharing it).
    inter_node_bw_bytes_per_s: float
    inter_node_latency_s: float
    # Host <-> device copy bandwidth per GPU (PCIe), one direction.
    host_device_bw_bytes_per_s: float
    host_memory_bytes: int
    host_memory_bw_bytes_per_s: float
    cpu_cores: int = 0
    source: str = ""
    # NICs per node that NCCL can build rings on (0: one per GPU). The node's aggregate inter-node bandwidth
    # is gpus_per_node x inter_node_bw_bytes_per_s whatever the split (cost/comm.py).
    nics_per_node: int = 0
    # Achieved fraction of peak_flops_bf16 in a whole training step (GEMMs, fused attention and the
    # memory-bound kernels around them), from independent published runs on this GPU generation;
    # 0 = unknown: cost/compute.py's generic default applies.
    train_flops_efficiency: float = 0.0
    # Codec rates, elements/s per rank, of the runtime's compressors as each rank runs them (cost/codec.py):
    # encode = the sender's call (error-feedback compress for int8 / onebit / topk gradient compression and 1-bit
    # Adam; the quantiser for ZeRO++ qwZ int8 weights and qgZ int4 gradients), decode = the receiver's decode.
    # Measured by `ztune probe` on CPU ranks (ztune/probe_codec.py); 0 = unknown: codec time is then not charged
    # and the estimate says so.
    codec_int8_encode_elements_per_s: float = 0.0
    codec_int8_decode_elements_per_s: float = 0.0
    codec_onebit_encode_elements_per_s: float = 0.0
    codec_onebit_decode_elements_per_s: float = 0.0
    codec_topk_encode_elements_per_s: float = 0.0
    codec_topk_decode_elements_per_s: float = 0.0
    codec_qwz_encode_elements_per_s: float = 0.0
    codec_qwz_decode_elements_per_s: float = 0.0
    codec_qgz_encode_elements_per_s: float = 0.0
    codec_qgz_decode_elements_per_s: float = 0.0
    # Elements/s per rank of one optimizer step over the fp32 master elements the rank owns, as the runtime runs it
    # on device-resident states (runtime/engine.py `step`): the global gradient-norm pass over the owned gradients,
    # then the fused Adam/AdamW update (read the gradient, read and write master, m and v, write the 16-bit
    # parameter). Measured by `ztune probe --model` on CPU ranks with all the host's ranks stepping at once
    # (ztune/probe_workload.py); cost/compute.py `optimizer_step_s` charges owned elements / this rate, serial.
    # 0 = unknown: no optimizer compute is charged (the shipped GPU profiles: on HBM a step streams ~28 bytes per
    # owned parameter at TB/s, milliseconds against a step of seconds).
    optimizer_step_elements_per_s: float = 0.0
    # Elements/s per rank of 1-bit Adam's compression-stage update over the owned fp32 masters, the exchange and its
    # codec aside (those are the communication and codec terms): the runtime's own step, step_shards with OneBitAdam
    # (the gradient's fp32 copy, the momentum (4), the update with the frozen variance and its mask (7)-(8) in one
    # pass, the 16-bit parameter refresh; runtime/onebit_adam.py, the C++ kernel of runtime/onebit_kernels.py where
    # it is built: 2.0x the fused AdamW step's time per element on an AVX2 core, 8M elements, 2.5x without the kernel).
    # Measured by `ztune probe --model` like the rate above; 0 = unknown: the estimate charges 1-bit Adam's step
    # at optimizer_step_elements_per_s and says that is a lower bound.
    onebit_step_elements_per_s: float = 0.0
    # CPU ranks only (gloo): the CPU seconds a rank's process spends per byte it sends or receives, measured by the
    # probe's all_reduce (ztune/probe.py CollectiveResult.cpu_s_per_byte): across hosts on the inter-node link
    # (gloo over TCP: copies, the TCP stack, the sums), inside the host on the runtime's shared-memory transport.
    # `cpu_contention`: wall seconds per CPU second of a training step with every rank of the host busy (probe
    # --model: ~1 with a core per rank, ~ranks / cores where they outnumber the cores). Where the ranks fill the
    # cores (gpus_per_node >= cpu_cores) a collective's CPU work cannot run beside the compute: cost/compute.py
    # step_time charges it (x cpu_contention) when it exceeds the exposed communication. 0 = unknown: not charged.
    inter_node_cpu_s_per_byte: float = 0.0
    intra_node_cpu_s_per_byte: float = 0.0
    # CPU ranks only: the CPU seconds per byte of the buffer a gloo reduce across hosts reduces (busiest rank),
    # measured by the probe between two hosts (CollectiveResult.reduce_cpu_s_per_byte). gloo::reduce runs a ring
    # reduce-scatter on every rank and then sends to the root (cost/gloo.py), measured at 2.2-3.0x the all_reduce's
    # CPU per byte sent or received on 2 hosts: the hierarchical reduce-scatter's inter level is such reduces
    # (cost/comm.py collective_cpu_s). 0 = unknown: charged at inter_node_cpu_s_per_byte's bytes.
    inter_node_reduce_cpu_s_per_byte: float = 0.0
    # CPU ranks only: the CPU seconds a rank spends per message step of a gloo collective whatever its size (one
    # message sent and one received: the wakeups, system calls and bookkeeping; the CPU analogue of the alpha-beta
    # model's latency), measured by the probe's smallest all_reduce (CollectiveResult.cpu_s_per_step): across
    # hosts on the inter-node link, inside the host on the host's ranks. cost/comm.py collective_cpu_steps_s
    # charges each launch its algorithm's steps at it (~0.3-0.4 ms on the cluster in a box: stage 3's ~30
    # launches of n reduces or broadcasts per step cost ~80 ms of CPU per rank there, whatever the bytes).
    # 0 = unknown: not charged.
    inter_node_cpu_s_per_step: float = 0.0
    intra_node_cpu_s_per_step: float = 0.0
    cpu_contention: float = 0.0
    # CPU ranks only: the runtime's own CPU seconds per model parameter beyond what the terms above charge, per ZeRO
    # stage: per micro-step beyond plain forward + backward, the first of an optimizer step (`micro`) and each later
    # one (`accum`: stages 0-1 accumulate in place, stages 2-3 reduce into a fresh shard and add it) -- the gradient
    # hooks' copies into buckets, stage 3's per-unit gathers into fresh buffers and their release; per optimizer step
    # beyond the optimizer update (`step`: the parameter refresh). Measured by `ztune probe --model` with every rank
    # of the host running the runtime at once on a group of its own (ztune/probe_workload.py time_engine_stages: no
    # transport, whose CPU is the per-byte terms'). cost/estimate.py charges (micro + (grad_accum - 1) x accum +
    # step) x parameters x cpu_contention, serial. 0 = unknown: not charged.
    runtime_micro_cpu_s_per_param_stage0: float = 0.0
    runtime_micro_cpu_s_per_param_stage1: float = 0.0
    runtime_micro_cpu_s_per_param_stage2: float = 0.0
    runtime_micro_cpu_s_per_param_stage3: float = 0.0
    runtime_accum_cpu_s_per_param_stage0: float = 0.0
    runtime_accum_cpu_s_per_param_stage1: float = 0.0
    runtime_accum_cpu_s_per_param_stage2: float = 0.0
    runtime_accum_cpu_s_per_param_stage3: float = 0.0
    runtime_step_cpu_s_per_param_stage0: float = 0.0
    runtime_step_cpu_s_per_param_stage1: float = 0.0
    runtime_step_cpu_s_per_param_stage2: float = 0.0
    runtime_step_cpu_s_per_param_stage3: float = 0.0

    def runtime_cpu_s_per_param(self, stage: int) -> tuple[float, float, float]:
        """(an optimizer step's first micro-step, each later micro-step, the optimizer step) runtime CPU seconds per
        parameter at ZeRO `stage` (0-3)."""
        return tuple(getattr(self, f"runtime_{kind}_cpu_s_per_param_stage{stage}") for kind in RUNTIME_CPU_KINDS)
