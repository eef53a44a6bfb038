"""Activation memory of one micro-batch: what autograd keeps for backward, per transformer block and in all.

Starting point: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
sec. 4.1: a GPT block at 16-bit keeps s*b*h*(34 + 5*a*s/h) bytes (MLP 4h, multi-head attention, dropout
masks); fused (flash) attention removes the 5*a*s/h term; full recomputation keeps only the block input,
2*s*b*h bytes. Here every term is re-derived for the blocks `runtime/models.py` actually builds (no dropout,
so no mask bytes) by listing each tensor an op saves for backward and counting each storage once.
tests/unit/test_activations.py checks the result against torch.autograd.graph.saved_tensors_hooks.

Notation (per token, so each term is later multiplied by s*b): h hidden, q = heads*head_size (query width),
kv = kv_heads*head_size, I intermediate, nh heads, V vocab, d = dtype_bytes (compute dtype); statistics
that kernels keep in fp32 cost FP32_BYTES whatever d is. With I = 4h, d = 2 and fused attention, the GPT-2
block below gives 32*s*b*h: Korthikanti's 34 minus the two s*b*h dropout masks.

Pure Python: no torch import, so `ztune estimate` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ztune.config.schema import Checkpointing, Offload
from ztune.errors import UserError
from ztune.specs import Architecture, ModelSpec, count_params

FP32_BYTES = 4  # layer-norm mean/rstd, RMSNorm rstd, attention log-sum-exp, router softmax, log-probs
INDEX_BYTES = 8  # int64 token ids, targets, routing indices

# Selective checkpointing policies, as people use them:
# - "attention" (Korthikanti et al. 2022, Megatron's `--recompute-granularity selective`; ztune's runtime):
#   recompute the attention core only. With fused attention that core saves almost nothing (q, k, v are
#   kept as its inputs), so the trade is poor; it pays off with unfused attention.
# - "op" (torchtitan `activation_checkpoint.selective_ac_option: op`, torchtitan/parallelisms/
#   parallelize_llama.py at 9dec370, Dec 2024): inside each checkpointed block, save the outputs of matmuls
#   and of the fused attention kernel, "except every second mm" (counted per block in forward order), and
#   recompute everything else (norms, RoPE, activations, the skipped matmuls).
SELECTIVE_POLICIES = ("attention", "op")

# How a fully checkpointed block is re-run in backward (PyTorch's CheckpointImpl names):
# - "non_reentrant" (torch.utils.checkpoint(use_reentrant=False); ztune's runtime, torchtitan, llm-foundry's
#   `activation_checkpointing_reentrant: false` in its MPT yamls, fms-fsdp's CheckpointImpl.NO_REENTRANT):
#   recomputation stops as soon as the last tensor the block saved has been rebuilt ("early stop", on by
#   default; torch.utils.checkpoint.set_checkpoint_early_stop). An op saves its inputs before it runs, so
#   the block's last matmul (the MLP down projection, whose input is the last saved tensor) is never re-run:
#   the recomputation is one block forward less that matmul (measured with FlopCounterMode on CPU in
#   tests/unit/test_checkpoint_recompute.py: 2/3 of a GPT-2 block's matmul FLOPs, 1 - w2's share for Llama).
# - "reentrant" (use_reentrant=True, DeepSpeed's and Megatron's activation checkpointing): the whole block
#   forward runs again.
CHECKPOINT_IMPLS = ("non_reentrant", "reentrant")

# Cross-entropy over V classes, per token, computed the way PyTorch trainers write it
# (F.cross_entropy(logits.float(), targets); torchtitan train.py, llm-foundry, HF): log_softmax saves its
# fp32 output (V x 4 bytes, counted in logits_bytes). Its backward holds that saved output, the incoming
# fp32 gradient (nll_loss backward, V x 4) and the fp32 input gradient it produces (V x 4): 12 bytes per
# class at the loss's peak, 8 of them on top of what is saved. The forward peak is lower (bf16 logits 2 +
# fp32 upcast 4 + log-probs 4 = 10). tests/unit/test_loss_head.py measures this on CPU.
LOSS_SAVED_BYTES_PER_CLASS = FP32_BYTES
LOSS_PEAK_BYTES_PER_CLASS = 3 * FP32_BYTES
# Chunked / fused linear + cross-entropy (e.g. Liger's FusedLinearCrossEntropy, torchtune's chunked CE):
# per chunk of tokens the bf16 logits (d), their fp32 upcast and its gradient exist at once; nothing of
# vocabulary size is saved for backward (the gradient is formed in forward, chunk by chunk).
CHUNKED_LOSS_PEAK_BYTES_PER_CLASS = 2 * FP32_BYTES


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes of activations for one micro-batch of `micro_batch` sequences of `seq_len` tokens."""

    per_layer_bytes: int  # one transformer block, no recomputation, per micro-batch
    kept_per_layer_bytes: int  # what a checkpointed block keeps (= per_layer_bytes when checkpointing none)
    layers_bytes: int  # all blocks under the chosen checkpointing (device memory unless offloaded)
    recompute_peak_bytes: int  # transient: one block's rebuilt activations during backward (0 if none)
    # Head: final-norm input and stats, lm_head input, the fp32 log-probs the loss keeps (s*b*V*4, the
    # logits are upcast to fp32 before cross-entropy whatever the compute dtype) and the int64 targets.
    logits_bytes: int
    embedding_bytes: int  # token (and position) ids the embeddings keep; RoPE cos/sin tables
    # Transient on top of `logits_bytes` at the loss's peak (cross-entropy backward, before any block's
    # backward): see loss_head_bytes.
    loss_peak_bytes: int
    device_bytes: int  # held on the GPU at the activation peak
    host_bytes: int  # moved to host memory by activation offload (0 without offload)
    # Extra forward FLOPs of the blocks, as a fraction of one forward of all blocks.
    recompute_fraction: float

    @property
    def saved_bytes(self) -> int:
        """Everything autograd holds for backward after the forward (layers + head + embeddings)."""
        return self.layers_bytes + self.logits_bytes + self.embedding_bytes


@dataclass(frozen=True)
class _BlockTerms:
    """Per-token sizes of one block in units of d bytes, split by what selective checkpointing does."""

    outside_core: float  # norms, projections' inputs, MLP: kept under none and selective
    core_inputs: float  # q, k, v as handed to attention_core: kept by selective (its checkpoint inputs)
    core_output: float  # attention output = output-projection input: kept under none and selective
    core_internal: float  # saved inside the attention kernel: dropped by selective, rebuilt in backward
    core_inputs_held: float  # what of q, k, v stays saved without selective (all of it when fused)


def _attention_terms(m: ModelSpec, *, seq_len: int, d: int, flash: bool) -> tuple[float, ...]:
    """(core_inputs, core_output, core_internal, core_inputs_held) per token, in units of d bytes."""
    h, q, kv, nh = m.hidden_size, m.num_heads * m.head_size, m.kv_size, m.num_heads
    gpt2 = m.architecture is Architecture.GPT2
    # q, k, v handed to the kernel. GPT-2: views of the one fused c_attn output (3h). Llama: RoPE makes new
    # q (q) and k (kv) tensors; v is a view of the v_proj output (kv).
    core_inputs = 3 * h if gpt2 else q + 2 * kv
    # Attention output, laid out (b, s, heads, d) by fused kernels, so the output projection's input is a
    # view of it; the unfused path returns (b, heads, s, d) and the reshape copies: q either way.
    core_output = q
    if flash:
        # Fused kernels (flash / memory-efficient; CPU flash in tests) save q, k, v, output and the fp32
        # log-sum-exp per head and token; K/V stay at kv width with enable_gqa.
        return core_inputs, core_output, nh * FP32_BYTES / d, core_inputs
    # Unfused: SDPA's math backend (the fallback when no fused kernel applies, e.g. fp32 + GQA on CUDA).
    # It keeps the softmax output, one row of s per head and token (Korthikanti's 2*a*s^2*b term, no
    # dropout), plus q and k scaled by sqrt(scale) and v, all three reshaped to (b*heads, s, d) copies with
    # k and v expanded to every head; q, k, v themselves are not kept. By default (torch.backends.cuda.
    # allow_fp16_bf16_reduction_math_sdp(False)) it computes in fp32, so these are fp32 whatever d is.
    internal = (3 * q + nh * seq_len) * FP32_BYTES / d
    return core_inputs, core_output, internal, 0


def _block_terms(m: ModelSpec, *, seq_len: int, d: int, flash: bool) -> _BlockTerms:
    """Per-token element counts (in units of d bytes) of everything one block saves."""
    h, i = m.hidden_size, m.intermediate_size
    f = FP32_BYTES / d  # one fp32 value, in units of d bytes
    core_inputs, core_output, core_internal, held = _attention_terms(m, seq_len=seq_len, d=d, flash=flash)
    if m.architecture is Architecture.GPT2:
        norms = 2 * (h + 2 * f)  # ln_1, ln_2: each saves its input and fp32 mean + rstd
        proj_inputs = 2 * h  # c_attn input (ln_1 out), c_fc input (ln_2 out)
        mlp = 2 * i  # GeLU input (c_fc out), c_proj input (GeLU out)
    else:
        norms = 2 * (h + f)  # RMSNorm (own autograd Function): its input and fp32 rstd
        proj_inputs = 2 * h  # q/k/v_proj share the input_layernorm output; gate/up share post-norm output
        if m.is_moe:
            mlp = _moe_terms(m, d=d)
        else:
            # SwiGLU: silu input (gate out), silu output and up output (the product's operands), and
            # down_proj's input (the product).
            mlp = 4 * i
    return _BlockTerms(
        outside_core=norms + proj_inputs + mlp,
        core_inputs=core_inputs,
        core_output=core_output,
        core_internal=core_internal,
        core_inputs_held=held,
    )


def _moe_terms(m: ModelSpec, *, d: int) -> float:
    """Mixtral MoE per token, in units of d bytes. Each token is routed to exactly top_k experts, so the sum
    over experts is exact whatever the balance; only empty experts (0 bytes) are ignored."""
    h, i, k, e = m.hidden_size, m.intermediate_size, m.top_k, m.num_experts
    f, idx = FP32_BYTES / d, INDEX_BYTES / d
    # Router (its input is the post-norm output, counted already): fp32 softmax output (e), top-k indices
    # (k int64) and values (k fp32), and the renormalising sum (1 fp32).
    router = e * f + k * idx + k * f + f
    # Per routed token: token+slot index pair from torch.where (2 int64, one storage), the gathered input
    # (h), SwiGLU (4i as dense), the expert output and its routing weight (h + 1), both saved by the mul,
    # and the weighted output (h), which index_add saves as its source.
    per_route = 2 * idx + h + 4 * i + h + 1 + h
    return router + k * per_route


def _block_matmuls(m: ModelSpec) -> list[tuple[float, float]]:
    """(output width, weight elements x routes per token) of each matmul of one block, in forward order."""
    h, i, q, kv = m.hidden_size, m.intermediate_size, m.num_heads * m.head_size, m.kv_size
    if m.architecture is Architecture.GPT2:
        return [(3 * h, 3 * h * h), (h, h * h), (i, h * i), (h, i * h)]  # c_attn, c_proj, c_fc, mlp c_proj
    attention = [(q, h * q), (kv, h * kv), (kv, h * kv), (h, q * h)]  # wq, wk, wv, wo
    k = m.top_k if m.is_moe else 1
    return attention + [(k * i, k * h * i), (k * i, k * h * i), (k * h, k * i * h)]  # w1 (gate), w3 (up), w2


def _last_matmul_flops_per_token(m: ModelSpec) -> float:
    """Forward FLOPs per token of the block's last matmul that an early-stopping recomputation skips (the
    MLP down projection). 0 for MoE blocks: the last op that saves a tensor there is the routed index_add
    after every expert's down projection, so nothing is skipped."""
    if m.is_moe:
        return 0.0
    return 2.0 * _block_matmuls(m)[-1][1]


def _selective_op_terms(m: ModelSpec, *, d: int) -> tuple[float, float]:
    """torchtitan's per-op policy: (kept elements per token in units of d, recomputed matmul FLOPs per token).
    Kept: the block input (the checkpoint's argument), every odd-numbered matmul's output, and the fused
    attention kernel's output and fp32 log-sum-exp. Recomputed: the even-numbered matmuls (2 FLOPs per weight
    element) and every elementwise op (memory-bound; not counted as FLOPs)."""
    matmuls = _block_matmuls(m)
    saved = sum(width for n, (width, _) in enumerate(matmuls, 1) if n % 2)
    recomputed_flops = sum(2 * weight for n, (_, weight) in enumerate(matmuls, 1) if not n % 2)
    attention_out = m.num_heads * m.head_size + m.num_heads * FP32_BYTES / d
    return m.hidden_size + saved + attention_out, recomputed_flops


# A fused cross-entropy kernel over low-precision logits (flash-attn's `flash_attn.losses.cross_entropy`,
# llm-foundry's `loss_fn: fused_crossentropy` default): keeps the logits themselves (d bytes per class) and
# an fp32 log-sum-exp per token, and writes a gradient of the logits' dtype in backward; no fp32 copy.
LOSS_MODES = ("upcast", "fused", "chunked")


def loss_head_bytes(*, tokens: int, vocab_size: int, chunk_tokens: int = 0, mode: str = "upcast",
                    dtype_bytes: int = 2) -> tuple[int, int]:
    """(saved, transient) bytes of the cross-entropy over `tokens` x `vocab_size` logits: what it keeps for
    backward, and what it adds on top at its peak. mode "upcast": F.cross_entropy(logits.float());
    "fused": a fused kernel on the logits' dtype; "chunked" (or chunk_tokens > 0): chunked / fused linear."""
    if mode == "fused":
        return tokens * (vocab_size * dtype_bytes + FP32_BYTES), tokens * vocab_size * dtype_bytes
    if chunk_tokens > 0:
        return 0, min(chunk_tokens, tokens) * vocab_size * CHUNKED_LOSS_PEAK_BYTES_PER_CLASS
    saved = tokens * vocab_size * LOSS_SAVED_BYTES_PER_CLASS
    return saved, tokens * vocab_size * LOSS_PEAK_BYTES_PER_CLASS - saved


def _block_flops_per_token(m: ModelSpec, *, seq_len: int) -> tuple[float, float]:
    """(attention-core, whole-block) forward FLOPs per token. Core: QK^T and PV, 2*s*q each, full square as
    in Megatron's accounting (causal kernels skip about half); the rest: 2 FLOPs per active weight."""
    c = count_params(m)
    active_layer = (c.active_per_token - c.embedding - c.final_norm - c.lm_head) / m.num_layers
    core = 4 * seq_len * m.num_heads * m.head_size
    return core, 2 * active_layer + core


def activation_memory(
    model: ModelSpec,
    *,
    micro_batch: int,
    seq_len: int,
    checkpointing: Checkpointing,
    every: int = 1,
    offload: Offload = Offload.NONE,
    dtype_bytes: int = 2,
    flash_attention: bool = True,
    selective_policy: str = "attention",
    loss_chunk_tokens: int = 0,
    loss_mode: str = "upcast",
    checkpoint_impl: str = "non_reentrant",
) -> ActivationEstimate:
    """Activation bytes of one micro-batch (micro_batch sequences of seq_len tokens) of `model`.

    checkpointing: none; selective = every k-th block follows `selective_policy` ("attention": recompute the
    attention core, keep q, k, v; "op": torchtitan's per-op policy, see SELECTIVE_POLICIES); full = every
    k-th block keeps only its input and recomputes the rest in backward (k = `every`).
    loss_chunk_tokens: 0 = cross-entropy over all logits at once; > 0 = chunked / fused (loss_head_bytes).
    loss_mode: how the loss is computed (LOSS_MODES, loss_head_bytes).
    checkpoint_impl: how a fully checkpointed block is recomputed (CHECKPOINT_IMPLS): "non_reentrant"
    skips the block's last matmul, "reentrant" re-runs all of it.
    offload=cpu models `runtime.checkpointing.offload_activations` wrapped around forward and loss:
    everything saved goes to host (host_bytes); the device holds one block's working set at a time, at most
    the larger of a block's full activations (produced in forward, rebuilt or copied back in backward) and
    the head's saved tensors.
    """
    if micro_batch < 1 or seq_len < 1:
        raise UserError(f"micro_batch and seq_len must be >= 1, got {micro_batch} and {seq_len}")
    if every < 1:
        raise UserError(f"activations.every must be >= 1, got {every}")
    if selective_policy not in SELECTIVE_POLICIES:
        raise UserError(f"selective policy {selective_policy!r}: allowed: {', '.join(SELECTIVE_POLICIES)}")
    if loss_mode not in LOSS_MODES:
        raise UserError(f"loss mode {loss_mode!r}: allowed: {', '.join(LOSS_MODES)}")
    if checkpoint_impl not in CHECKPOINT_IMPLS:
        raise UserError(f"checkpoint implementation {checkpoint_impl!r}: allowed: {', '.join(CHECKPOINT_IMPLS)}")
    if loss_mode == "chunked" and loss_chunk_tokens <= 0:
        raise UserError("loss mode 'chunked' needs loss_chunk_tokens > 0 (tokens per chunk)")
    if loss_chunk_tokens < 0:
        raise UserError(f"loss_chunk_tokens must be >= 0 (0 = unchunked), got {loss_chunk_tokens}")
    if dtype_bytes not in (2, 4):
        raise UserError(f"dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {dtype_bytes}")
    m, d, tokens = model, dtype_bytes, micro_batch * seq_len
    t = _block_terms(m, seq_len=seq_len, d=d, flash=flash_attention)

    def to_bytes(elements_per_token: float) -> int:
        return math.ceil(elements_per_token * d * tokens)

    per_layer = to_bytes(t.outside_core + t.core_inputs_held + t.core_internal + t.core_output)
    if checkpointing is Checkpointing.FULL:
        # The checkpoint saves the block input (h); the rest is rebuilt, sharing that input.
        kept = to_bytes(m.hidden_size)
        recompute_peak = per_layer - kept
    elif checkpointing is Checkpointing.SELECTIVE and selective_policy == "op":
        kept_elements, op_recompute_flops = _selective_op_terms(m, d=d)
        kept = min(to_bytes(kept_elements), per_layer)
        recompute_peak = per_layer - kept  # the block's recomputed tensors, rebuilt in its backward
    elif checkpointing is Checkpointing.SELECTIVE:
        kept = to_bytes(t.outside_core + t.core_inputs + t.core_output)
        recompute_peak = to_bytes(t.core_internal + t.core_output)  # the kernel's saves + a fresh output
    else:
        kept, recompute_peak = per_layer, 0
    num_checkpointed = 0 if checkpointing is Checkpointing.NONE else math.ceil(m.num_layers / every)
    layers = num_checkpointed * kept + (m.num_layers - num_checkpointed) * per_layer

    h = m.hidden_size
    norm_stats = 2 * FP32_BYTES if m.architecture is Architecture.GPT2 else FP32_BYTES
    # Final norm input + its stats, lm_head input, int64 targets, and what the loss keeps (fp32 log-probs
    # over every position; nothing vocabulary-sized when chunked, but the fp32 gradient of the hidden).
    loss_saved, loss_peak = loss_head_bytes(tokens=tokens, vocab_size=m.vocab_size, chunk_tokens=loss_chunk_tokens,
                                            mode=loss_mode, dtype_bytes=d)
    if loss_mode != "fused" and loss_chunk_tokens > 0:
        loss_saved = tokens * h * FP32_BYTES
    logits = tokens * (2 * h * d + norm_stats + INDEX_BYTES) + loss_saved
    embedding = tokens * INDEX_BYTES  # token ids kept by the embedding backward
    if m.architecture is Architecture.GPT2:
        embedding += seq_len * INDEX_BYTES  # position ids (one arange shared by the batch)
    else:
        embedding += 2 * seq_len * m.head_size * d  # RoPE cos and sin, shared by all blocks

    if offload is Offload.CPU:
        host = layers + logits + embedding
        device = max(per_layer, logits + loss_peak)
    else:
        host = 0
        # The loss's transient peaks before any block's backward; a block's recomputation after it.
        device = layers + logits + embedding + max(recompute_peak, loss_peak)

    core_flops, block_flops = _block_flops_per_token(m, seq_len=seq_len)
    selective_share = core_flops / block_flops
    if checkpointing is Checkpointing.SELECTIVE and selective_policy == "op":
        selective_share = op_recompute_flops / block_flops
    full_share = 1.0
    if checkpoint_impl == "non_reentrant":
        full_share -= _last_matmul_flops_per_token(m) / block_flops
    share = {Checkpointing.NONE: 0.0, Checkpointing.SELECTIVE: selective_share, Checkpointing.FULL: full_share}
    return ActivationEstimate(
        per_layer_bytes=per_layer,
        kept_per_layer_bytes=kept,
        layers_bytes=layers,
        recompute_peak_bytes=recompute_peak,
        logits_bytes=logits,
        embedding_bytes=embedding,
        loss_peak_bytes=loss_peak,
        device_bytes=device,
        host_bytes=host,
        recompute_fraction=share[checkpointing] * num_checkpointed / m.num_layers,
    )
