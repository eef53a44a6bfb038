"""torchtitan's per-op selective checkpointing (cost/activations.py, selective_policy "op") against
measurement on CPU.

A Llama block in torchtitan's op order (wq, wk, wv, RoPE, SDPA, wo, w1, w3, w2) runs under
torch.utils.checkpoint with the policy torchtitan uses: save the outputs of matmuls and of the fused
attention kernel, except every second matmul counted per block. The bytes the forward leaves live (the
process's resident memory after forward minus before, in a fresh process whose large allocations go to
mmap) must equal the model's kept bytes per block x blocks, plus the last block's output.
"""

import json
import subprocess
import sys

import pytest

from ztune.config.schema import Checkpointing
from ztune.cost.activations import activation_memory
from ztune.specs import Architecture, ModelSpec

H, HEADS, KV_HEADS, INTER, BLOCKS, SEQ = 512, 8, 2, 1408, 4, 2048

_MEASURE = r"""
import json, sys
from collections import defaultdict
import psutil, torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

h, heads, kv_heads, inter, blocks, seq = map(int, sys.argv[1:7])
hd = h // heads
torch.manual_seed(0)
# torchtitan's save list; on CPU the fused attention op is the _for_cpu variant.
SAVE = {torch.ops.aten.mm.default, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}

def policy_fn():
    meta = defaultdict(int)
    def policy(ctx, func, *args, **kwargs):
        key = "recompute" if ctx.is_recompute else "forward"
        if func == torch.ops.aten.mm.default:
            meta[key] += 1
        keep = func in SAVE and not (func == torch.ops.aten.mm.default and meta[key] % 2 == 0)
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)

def rms(x, w):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * w

def rope(x, cos, sin):
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)
        self.wq, self.wk, self.wv, self.wo = lin(h, h), lin(h, kv_heads * hd), lin(h, kv_heads * hd), lin(h, h)
        self.w1, self.w3, self.w2 = lin(h, inter), lin(h, inter), lin(inter, h)
        self.n1, self.n2 = torch.nn.Parameter(torch.ones(h)), torch.nn.Parameter(torch.ones(h))
    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        y = rms(x, self.n1)
        q = self.wq(y).view(b, s, heads, hd)
        k = self.wk(y).view(b, s, kv_heads, hd)
        v = self.wv(y).view(b, s, kv_heads, hd)
        q, k = rope(q, cos, sin).transpose(1, 2), rope(k, cos, sin).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, enable_gqa=True)
        x = x + self.wo(o.transpose(1, 2).reshape(b, s, h))
        y = rms(x, self.n2)
        return x + self.w2(F.silu(self.w1(y)) * self.w3(y))

model = torch.nn.ModuleList(Block() for _ in range(blocks))
for p in model.parameters():
    p.requires_grad_(True)
def tables(n):
    pos = torch.arange(n).float()[:, None] / (10000 ** (torch.arange(hd // 2).float() / (hd // 2)))
    return pos.cos()[None, :, None, :], pos.sin()[None, :, None, :]
def run(x):
    c, s_ = (cos, sin) if x.shape[1] == seq else tables(x.shape[1])
    for blk in model:
        x = checkpoint(blk, x, c, s_, use_reentrant=False, context_fn=policy_fn)
    return x
cos, sin = tables(seq)  # allocated before the measurement, as a trainer's RoPE tables are
run(torch.randn(1, 64, h, requires_grad=True)).sum().backward()  # warm every kernel on a short sequence
model.zero_grad(set_to_none=True)
x = torch.randn(1, seq, h, requires_grad=True)
before = psutil.Process().memory_info().rss
out = run(x)
after = psutil.Process().memory_info().rss
out.sum().backward()  # the policy must also run backward cleanly
print(json.dumps({"held": after - before, "grad_ok": bool(torch.isfinite(x.grad).all())}))
"""


def _spec() -> ModelSpec:
    return ModelSpec(name="sac-probe", architecture=Architecture.LLAMA, vocab_size=1024, hidden_size=H,
                     num_layers=BLOCKS, num_heads=HEADS, num_kv_heads=KV_HEADS, intermediate_size=INTER,
                     max_seq_len=SEQ)


@pytest.fixture(scope="module")
def measured():
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    args = [str(v) for v in (H, HEADS, KV_HEADS, INTER, BLOCKS, SEQ)]
    out = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_bytes_match_torchtitan_policy(measured):
    est = activation_memory(_spec(), micro_batch=1, seq_len=SEQ, checkpointing=Checkpointing.SELECTIVE,
                            selective_policy="op", dtype_bytes=4)
    # x, q, v, SDPA output + fp32 log-sum-exp, w1 output, w2 output per token: 3592 fp32 values at this shape.
    assert est.kept_per_layer_bytes == SEQ * 4 * (H + H + KV_HEADS * H // HEADS + H + HEADS + INTER + H)
    predicted = BLOCKS * est.kept_per_layer_bytes + SEQ * H * 4  # + the last block's output
    assert measured["grad_ok"]
    assert measured["held"] == pytest.approx(predicted, rel=0.10), (measured["held"], predicted)


def test_op_policy_recomputes_every_second_matmul():
    spec = _spec()
    none = activation_memory(spec, micro_batch=1, seq_len=SEQ, checkpointing=Checkpointing.NONE)
    op = activation_memory(spec, micro_batch=1, seq_len=SEQ, checkpointing=Checkpointing.SELECTIVE,
                           selective_policy="op")
    full = activation_memory(spec, micro_batch=1, seq_len=SEQ, checkpointing=Checkpointing.FULL)
    kv = KV_HEADS * H // HEADS
    recomputed = 2 * (H * kv + H * H + H * INTER)  # wk, wo, w3
    block = 2 * (2 * H * H + 2 * H * kv + 3 * H * INTER + 2 * H) + 4 * SEQ * H  # weights (+ norms) and attention
    assert op.recompute_fraction == pytest.approx(recomputed / block, rel=1e-9)
    down_proj = 2 * H * INTER  # non-reentrant full checkpointing stops before w2
    assert full.recompute_fraction == pytest.approx(1 - down_proj / block, rel=1e-9)
    assert 0 < op.recompute_fraction < full.recompute_fraction
    assert full.layers_bytes < op.layers_bytes < none.layers_bytes
