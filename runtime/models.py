"""Compact decoder-only transformers for the demo architectures (GPT-2, Llama, Mixtral), built from a ModelSpec.

The layout mirrors Hugging Face's module names (`ln_1`, `attn.c_attn`, `q_proj`, `gate_proj`, ...) so that
parameter counts equal `count_params(spec)` and GPT-2 weights can be copied over one to one. No dropout.

Every block calls `self.attention_core(q, k, v)` for the attention itself (scaled dot-product, causal), so
selective activation checkpointing (`runtime/checkpointing.py`) can wrap just that call. What each op saves
for backward is counted term by term in `ztune/cost/activations.py`; change one and you change the other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ztune.errors import UserError
from ztune.specs import Architecture, ModelSpec

# GPT-2 and Llama-2 defaults (HF GPT2Config.layer_norm_epsilon, LlamaConfig.rms_norm_eps / rope_theta).
LAYER_NORM_EPS = 1e-5
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
# GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2L) (Radford et al. 2019, sec 2.3).
INIT_STD = 0.02
IGNORE_INDEX = -100


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm that saves exactly (input, rstd) like a fused kernel does, on every device.

    torch's F.rms_norm is a composite on CPU that saves fp32 copies of the input; a hand-written backward
    keeps the saved-bytes accounting identical on CPU and GPU. Math in fp32, output in the input's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        g = grad.float()
        grad_weight = (g * normed).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype)
        gn = g * weight.float()
        # d/dx of x*rstd: rstd * (gn - normed * mean(gn * normed)).
        grad_x = rstd * (gn - normed * (gn * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = RMS_NORM_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


def rope_cos_sin(*, seq_len: int, head_size: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """cos and sin tables of rotary embeddings (Su et al. 2021), shape (seq_len, head_size), halves repeated
    as in HF's rotate_half convention."""
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (b, heads, s, d). Saves only cos and sin for backward (they do not require grad).
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _Block(nn.Module):
    """Shared block skeleton: pre-norm attention and MLP with residuals."""

    num_heads: int
    num_kv_heads: int
    head_size: int

    def attention_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention. q: (b, heads, s, d), k and v: (b, kv_heads, s, d) -> (b, s, heads * d).

        The fused kernel saves q, k, v, its output and the fp32 log-sum-exp; its output is laid out
        (b, s, heads, d) in memory, so the reshape below is a view, not a copy."""
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )
        b, _, s, _ = q.shape
        return out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_size)

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, n, self.head_size).transpose(1, 2)


class GPT2Attention(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(h, 3 * h)
        self.c_proj = nn.Linear(h, h)


class GPT2MLP(nn.Module):
    def __init__(self, h: int, intermediate: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(h, intermediate)
        self.c_proj = nn.Linear(intermediate, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's "gelu_new" is the tanh approximation.
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(_Block):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h = spec.hidden_size
        self.num_heads = self.num_kv_heads = spec.num_heads
        self.head_size = h // spec.num_heads
        self.ln_1 = nn.LayerNorm(h, eps=LAYER_NORM_EPS)
        self.attn = GPT2Attention(h)
        self.ln_2 = nn.LayerNorm(h, eps=LAYER_NORM_EPS)
        self.mlp = GPT2MLP(h, spec.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(x.shape[-1], dim=-1)
        n = self.num_heads
        attn = self.attention_core(self._heads(q, n), self._heads(k, n), self._heads(v, n))
        x = x + self.attn.c_proj(attn)
        return x + self.mlp(self.ln_2(x))


class LlamaAttention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h, q, kv = spec.hidden_size, spec.num_heads * spec.head_size, spec.kv_size
        self.q_proj = nn.Linear(h, q, bias=spec.attention_bias)
        self.k_proj = nn.Linear(h, kv, bias=spec.attention_bias)
        self.v_proj = nn.Linear(h, kv, bias=spec.attention_bias)
        self.o_proj = nn.Linear(q, h, bias=spec.attention_out_bias)


class SwiGLU(nn.Module):
    def __init__(self, h: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(h, intermediate, bias=False)
        self.up_proj = nn.Linear(h, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (Mixtral): softmax router in fp32, weights renormalised over the top k.
    Every expert runs, on zero tokens if none are routed to it, so every parameter always gets a gradient."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.top_k = spec.top_k
        self.gate = nn.Linear(spec.hidden_size, spec.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(spec.hidden_size, spec.intermediate_size) for _ in range(spec.num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.gate(x).float().softmax(dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        top_w = (top_w / top_w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(top_i == e)
            out = out.index_add(0, tok, expert(x[tok]) * top_w[tok, slot, None])
        return out.view(shape)


class LlamaBlock(_Block):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        self.head_size = spec.head_size
        self.input_layernorm = RMSNorm(spec.hidden_size)
        self.self_attn = LlamaAttention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size)
        self.mlp = MoE(spec) if spec.is_moe else SwiGLU(spec.hidden_size, spec.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a = self.self_attn
        normed = self.input_layernorm(x)
        q = _apply_rope(self._heads(a.q_proj(normed), self.num_heads), cos, sin)
        k = _apply_rope(self._heads(a.k_proj(normed), self.num_kv_heads), cos, sin)
        v = self._heads(a.v_proj(normed), self.num_kv_heads)
        x = x + a.o_proj(self.attention_core(q, k, v))
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token embedding (+ learned positions for GPT-2), `blocks`, final norm, lm_head (tied or not).

    forward(input_ids (b, s) int64, labels=None) -> logits (b, s, V) in the model dtype; with labels (HF
    convention: labels[i] is the token at position i, -100 ignored, the shift happens here) -> mean
    cross-entropy in fp32.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        h = spec.hidden_size
        gpt2 = spec.architecture is Architecture.GPT2
        self.embed = nn.Embedding(spec.vocab_size, h)
        self.pos_embed = nn.Embedding(spec.max_seq_len, h) if gpt2 else None
        block = GPT2Block if gpt2 else LlamaBlock
        self.blocks = nn.ModuleList(block(spec) for _ in range(spec.num_layers))
        self.norm = nn.LayerNorm(h, eps=LAYER_NORM_EPS) if gpt2 else RMSNorm(h)
        self.lm_head = nn.Linear(h, spec.vocab_size, bias=False)
        if spec.tied_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        s = input_ids.shape[1]
        if s > self.spec.max_seq_len:
            raise UserError(f"sequence length {s} exceeds the model's max_seq_len {self.spec.max_seq_len}")
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(s, device=input_ids.device))
            for block in self.blocks:
                x = block(x)
        else:
            cos, sin = rope_cos_sin(seq_len=s, head_size=self.spec.head_size, dtype=x.dtype, device=x.device)
            for block in self.blocks:
                x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        if labels is None:
            return logits
        # Shift the targets, not the logits: logits stay one contiguous (b*s, V) view, no copy.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )


def _init_weights(model: Decoder, *, seed: int | None) -> None:
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    residual_std = INIT_STD / math.sqrt(2 * model.spec.num_layers)
    for name, p in model.named_parameters():  # deterministic order; tied weights appear once
        if p.dim() == 1:
            # The only 1-D weights are norm scales (1); the rest are biases (0).
            p.data.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            std = residual_std if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")) else INIT_STD
            p.data.copy_(torch.randn(p.shape, generator=gen) * std)


def build_model(spec: ModelSpec, *, dtype: torch.dtype = torch.float32, seed: int | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """Build the decoder for `spec` (architectures gpt2, llama, mixtral). Weights are drawn in fp32 on the
    CPU from `seed` (same seed -> same weights for any dtype/device), then cast to `dtype` on `device`.
    device="meta" builds without memory or initialisation (for counting)."""
    if spec.architecture is Architecture.GPT2 and (spec.num_kv_heads != spec.num_heads or spec.is_moe):
        raise UserError(f"model {spec.name!r}: gpt2 has no grouped-query attention or experts; fix the profile")
    if spec.architecture is Architecture.GPT2 and spec.head_dim not in (None, spec.hidden_size // spec.num_heads):
        raise UserError(f"model {spec.name!r}: gpt2 needs head_dim == hidden_size / num_heads")
    if spec.head_size % 2:
        raise UserError(f"model {spec.name!r}: rotary embeddings need an even head size, got {spec.head_size}")
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return Decoder(spec).to(dtype)
    with torch.device("meta"):  # skip nn's default init: _init_weights overwrites every parameter
        model = Decoder(spec)
    model.to_empty(device="cpu")
    if spec.tied_embeddings:
        model.lm_head.weight = model.embed.weight
    _init_weights(model, seed=seed)
    return model.to(device=device, dtype=dtype)
