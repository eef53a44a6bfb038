"""ztune/cost/activations.py against measurement, and runtime/checkpointing.py against the unchanged model.

Measurement: torch.autograd.graph.saved_tensors_hooks sees every tensor an op saves for backward during the
forward of the tiny-gpt and tiny-llama profiles (b=2, s=128, on CPU). Each distinct storage is counted once
(q, k, v are views of one c_attn output; a linear saves a 2-D view of its input) and parameter storages are
excluded: matmul backward saves the weight, but weights are model state, not activations. Under non-reentrant
checkpointing the checkpoint saves its inputs through the outer hooks too, so what it keeps is measured
the same way. fp32 unless a test says bf16 (dtype_bytes matches the model's dtype).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ztune.config.schema import Checkpointing, Offload
from ztune.cost.activations import activation_memory
from ztune.errors import UserError
from ztune.profiles import load_model
from ztune.runtime.checkpointing import apply_activation_checkpointing, find_blocks, offload_activations
from ztune.runtime.models import build_model
from ztune.specs import Architecture, ModelSpec

MICRO_BATCH, SEQ_LEN = 2, 128
# The formula counts what our models save term by term: measured agreement is within 0.05% (the residue:
# the loss's scalar weight, and CPU LayerNorm keeping its mean/rstd in bf16 where CUDA keeps fp32).
REL_TOL = 0.01
MODELS = ["tiny-gpt", "tiny-llama"]
NONE, SELECTIVE, FULL = Checkpointing.NONE, Checkpointing.SELECTIVE, Checkpointing.FULL


@dataclass(frozen=True)
class Run:
    saved_bytes: int  # distinct non-parameter storages saved for backward (0 under offload: not observed)
    host_bytes: int  # what offload_activations copied to host (0 without offload)
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]


_RUNS: dict[tuple, Run] = {}


def run(name: str | ModelSpec, *, mode: Checkpointing = NONE, every: int = 1, dtype: torch.dtype = torch.float32,
        offload: bool = False, flash: bool = True) -> Run:
    """Forward + backward of profile `name` on a fixed batch; cached, the same run serves several tests."""
    spec = name if isinstance(name, ModelSpec) else load_model(name)
    key = (spec, mode, every, dtype, offload, flash)
    if key in _RUNS:
        return _RUNS[key]
    model = build_model(spec, seed=0, dtype=dtype)
    apply_activation_checkpointing(model, mode=mode, every=every)
    ids = torch.randint(0, spec.vocab_size, (MICRO_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t  # keeps the tensor alive, so no address is reused by another saved tensor

    host_bytes = 0
    # The recomputation in backward must use the same attention kernel as the forward.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION if flash else SDPBackend.MATH):
        if offload:
            with offload_activations(True) as stash:
                loss = model(ids, labels=ids)
            host_bytes = stash.host_bytes
        else:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(ids, labels=ids)
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    _RUNS[key] = result = Run(sum(storages.values()), host_bytes, loss.detach(), grads)
    return result


def predicted(name: str | ModelSpec, *, mode: Checkpointing = NONE, every: int = 1, dtype_bytes: int = 4,
              flash: bool = True, offload: Offload = Offload.NONE):
    spec = name if isinstance(name, ModelSpec) else load_model(name)
    return activation_memory(spec, micro_batch=MICRO_BATCH, seq_len=SEQ_LEN, checkpointing=mode,
                             every=every, offload=offload, dtype_bytes=dtype_bytes, flash_attention=flash)


def check(name: str | ModelSpec, measured: int, want: int, label: str) -> None:
    name = name.name if isinstance(name, ModelSpec) else name
    print(f"\n{name:10} {label:28} measured {measured:>12,} B  predicted {want:>12,} B  "
          f"predicted/measured {want / measured:.4f}")
    assert want == pytest.approx(measured, rel=REL_TOL)


@pytest.mark.parametrize("mode,every", [(NONE, 1), (SELECTIVE, 1), (FULL, 1), (FULL, 3), (SELECTIVE, 2)],
                         ids=["none", "selective", "full", "full-every3", "selective-every2"])
@pytest.mark.parametrize("name", MODELS)
def test_saved_bytes_match_formula(name, mode, every):
    got = run(name, mode=mode, every=every).saved_bytes
    check(name, got, predicted(name, mode=mode, every=every).saved_bytes, f"fp32 {mode.value} every={every}")


def narrow(name: str) -> ModelSpec:
    """Profile `name`'s architecture (its attention layout, biases, tying and GQA ratio) at 2 layers, width 128,
    a 1024-token vocabulary: for bf16, whose CPU matmul without AVX512-BF16 runs at ~1 GFLOP/s (the full
    profiles took 10-18 s per bf16 case on an AVX2-only CI machine). The fp32 tests cover the full profiles."""
    spec = load_model(name)
    heads = 2  # head size 64, as in the profiles
    return dataclasses.replace(spec, name=f"{name}-narrow", vocab_size=1024, hidden_size=128, num_layers=2,
                               num_heads=heads, num_kv_heads=max(1, heads * spec.num_kv_heads // spec.num_heads),
                               intermediate_size=384 if spec.architecture is Architecture.LLAMA else 512)


@pytest.mark.parametrize("mode", [NONE, FULL], ids=["none", "full"])
@pytest.mark.parametrize("name", MODELS)
def test_saved_bytes_bf16(name, mode):
    spec = narrow(name)
    got = run(spec, mode=mode, dtype=torch.bfloat16).saved_bytes
    check(spec, got, predicted(spec, mode=mode, dtype_bytes=2).saved_bytes, f"bf16 {mode.value}")


@pytest.mark.parametrize("mode", [NONE, SELECTIVE], ids=["none", "selective"])
@pytest.mark.parametrize("name", MODELS)
def test_saved_bytes_unfused_attention(name, mode):
    # SDPA's math backend keeps the s x s softmax per head: the term selective checkpointing removes.
    got = run(name, mode=mode, flash=False).saved_bytes
    check(name, got, predicted(name, mode=mode, flash=False).saved_bytes, f"fp32 math-sdpa {mode.value}")
    if mode is SELECTIVE:
        assert got < run(name, flash=False).saved_bytes


# Experts see different token counts, but every token goes to exactly top_k of them: the sum is exact.
SMALL_MIXTRAL = ModelSpec(name="small-moe", architecture=Architecture.MIXTRAL, vocab_size=1024, hidden_size=128,
                          num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256, max_seq_len=256,
                          num_experts=4, top_k=2)


@pytest.mark.parametrize("mode", [NONE, SELECTIVE, FULL], ids=["none", "selective", "full"])
def test_saved_bytes_mixtral(mode):
    for dtype in (torch.float32, torch.bfloat16):
        got = run(SMALL_MIXTRAL, mode=mode, dtype=dtype).saved_bytes
        want = predicted(SMALL_MIXTRAL, mode=mode, dtype_bytes=dtype.itemsize).saved_bytes
        check(SMALL_MIXTRAL, got, want, f"{str(dtype)[6:]} {mode.value}")


@pytest.mark.parametrize("name", MODELS)
def test_offload_moves_what_the_formula_says(name):
    host = run(name, offload=True).host_bytes
    check(name, host, predicted(name, offload=Offload.CPU).host_bytes, "fp32 offload host bytes")


@pytest.mark.parametrize(
    "mode,every,offload,flash",
    [(SELECTIVE, 1, False, True), (FULL, 1, False, True), (FULL, 3, False, True), (NONE, 1, True, True),
     (FULL, 1, True, True), (SELECTIVE, 1, False, False)],
    ids=["selective", "full", "full-every3", "offload", "full+offload", "selective-math"],
)
@pytest.mark.parametrize("name", MODELS)
def test_recompute_and_offload_give_identical_loss_and_grads(name, mode, every, offload, flash):
    ref = run(name, flash=flash)
    got = run(name, mode=mode, every=every, offload=offload, flash=flash)
    assert torch.equal(got.loss, ref.loss)
    assert got.grads.keys() == ref.grads.keys()
    for n, g in got.grads.items():
        assert g is not None, n
        torch.testing.assert_close(g, ref.grads[n], rtol=0, atol=1e-6, msg=n)


# ---- the formula on its own --------------------------------------------------------------------------

GPT = ModelSpec(name="gpt", architecture=Architecture.GPT2, vocab_size=50257, hidden_size=1024, num_layers=24,
                num_heads=16, num_kv_heads=16, intermediate_size=4096, max_seq_len=2048, tied_embeddings=True,
                attention_bias=True, attention_out_bias=True)


def test_gpt_block_is_korthikanti_without_dropout_masks():
    s, b, h, a = 2048, 4, 1024, 16
    est = activation_memory(GPT, micro_batch=b, seq_len=s, checkpointing=NONE, dtype_bytes=2)
    # 34*s*b*h less the two s*b*h dropout masks, plus fp32 layer-norm stats (2 x 2 x 4 B) and the
    # attention kernel's fp32 log-sum-exp (a x 4 B) per token.
    assert est.per_layer_bytes == s * b * (32 * h + 16 + 4 * a)
    unfused = activation_memory(GPT, micro_batch=b, seq_len=s, checkpointing=NONE, dtype_bytes=2,
                                flash_attention=False)
    assert unfused.per_layer_bytes > est.per_layer_bytes + 4 * a * s * s * b  # fp32 softmax, a*s^2 per seq
    full = activation_memory(GPT, micro_batch=b, seq_len=s, checkpointing=FULL, dtype_bytes=2)
    assert full.kept_per_layer_bytes == 2 * s * b * h  # the block input only
    assert full.layers_bytes == 24 * 2 * s * b * h
    assert full.recompute_peak_bytes == est.per_layer_bytes - 2 * s * b * h


def test_recompute_fraction_and_every():
    full = activation_memory(GPT, micro_batch=1, seq_len=2048, checkpointing=FULL, checkpoint_impl="reentrant")
    assert full.recompute_fraction == 1.0
    half = activation_memory(GPT, micro_batch=1, seq_len=2048, checkpointing=FULL, every=2,
                             checkpoint_impl="reentrant")
    assert half.recompute_fraction == 0.5
    # Non-reentrant (the default) skips the MLP down projection: 2 * 4h^2 of the block's FLOPs per token.
    early = activation_memory(GPT, micro_batch=1, seq_len=2048, checkpointing=FULL, every=2)
    block = 2 * (12 * 1024**2 + 13 * 1024) + 4 * 2048 * 1024
    assert early.recompute_fraction == pytest.approx(0.5 * (1 - 8 * 1024**2 / block))
    none = activation_memory(GPT, micro_batch=1, seq_len=2048, checkpointing=NONE)
    assert none.recompute_fraction == 0.0
    assert half.layers_bytes == 12 * full.kept_per_layer_bytes + 12 * none.per_layer_bytes
    sel = activation_memory(GPT, micro_batch=1, seq_len=2048, checkpointing=SELECTIVE)
    # Attention core: 4*s*h FLOPs per token, of 2 * (12h^2 + 13h weights) + 4*s*h for the whole block.
    per_layer_params = 12 * 1024**2 + 13 * 1024
    assert sel.recompute_fraction == pytest.approx(4 * 2048 * 1024 / (2 * per_layer_params + 4 * 2048 * 1024))


def test_offload_trades_device_for_host():
    spec = load_model("tiny-llama")
    kw = dict(micro_batch=4, seq_len=256, checkpointing=FULL)
    on_device = activation_memory(spec, **kw)
    offloaded = activation_memory(spec, offload=Offload.CPU, **kw)
    assert on_device.host_bytes == 0
    assert offloaded.host_bytes == on_device.saved_bytes
    # The loss's backward peak (its gradients on top of the saved log-probs) stays on the device.
    assert offloaded.device_bytes == max(on_device.per_layer_bytes,
                                         on_device.logits_bytes + on_device.loss_peak_bytes)
    assert offloaded.device_bytes < on_device.device_bytes


def test_moe_counts_top_k_experts_per_token():
    spec = load_model("mixtral-8x7b")
    one = activation_memory(spec, micro_batch=1, seq_len=4096, checkpointing=NONE)
    dense = activation_memory(load_model("mistral-7b"), micro_batch=1, seq_len=4096, checkpointing=NONE)
    # Two experts per token at the same hidden/intermediate size: more than the dense block, less than 3x.
    assert dense.per_layer_bytes < one.per_layer_bytes < 3 * dense.per_layer_bytes


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="every"):
        activation_memory(GPT, micro_batch=1, seq_len=8, checkpointing=FULL, every=0)
    with pytest.raises(UserError, match="dtype_bytes"):
        activation_memory(GPT, micro_batch=1, seq_len=8, checkpointing=FULL, dtype_bytes=3)


def test_checkpointing_finds_hugging_face_layers_and_rejects_selective_there():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    hf = transformers.LlamaForCausalLM(cfg)
    assert find_blocks(hf) is hf.model.layers
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = hf(ids, labels=ids).loss
    apply_activation_checkpointing(hf, mode=FULL)
    assert torch.equal(hf(ids, labels=ids).loss, ref)
    with pytest.raises(UserError, match="attention_core"):
        apply_activation_checkpointing(transformers.LlamaForCausalLM(cfg), mode=SELECTIVE)
    with pytest.raises(UserError, match="already"):
        apply_activation_checkpointing(hf, mode=FULL)
