"""runtime/models.py and runtime/data.py: exact parameter counts, seeded determinism, Hugging Face parity,
a short training run whose loss falls, and the rank sharding of the synthetic batches."""

from __future__ import annotations

import itertools

import pytest
import torch

from ztune.errors import UserError
from ztune.profiles import load_model
from ztune.runtime.data import batches, synthetic_corpus
from ztune.runtime.models import build_model
from ztune.specs import Architecture, ModelSpec, count_params

SMALL_GPT = ModelSpec(name="small-gpt", architecture=Architecture.GPT2, vocab_size=128, hidden_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=256, max_seq_len=64,
                      tied_embeddings=True, attention_bias=True, attention_out_bias=True)
SMALL_LLAMA = ModelSpec(name="small-llama", architecture=Architecture.LLAMA, vocab_size=128, hidden_size=64,
                        num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176, max_seq_len=64)
SMALL_QWEN = ModelSpec(name="small-qwen", architecture=Architecture.LLAMA, vocab_size=128, hidden_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176, max_seq_len=64,
                       attention_bias=True, tied_embeddings=True)
SMALL_MIXTRAL = ModelSpec(name="small-mixtral", architecture=Architecture.MIXTRAL, vocab_size=128,
                          hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                          max_seq_len=64, num_experts=4, top_k=2)


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are yielded once


@pytest.mark.parametrize("spec", [SMALL_GPT, SMALL_LLAMA, SMALL_QWEN, SMALL_MIXTRAL], ids=lambda s: s.name)
def test_param_count_small(spec):
    assert _numel(build_model(spec, seed=0)) == count_params(spec).total


@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-llama", "gpt2", "llama-2-7b", "mixtral-8x7b", "qwen2.5-7b"])
def test_param_count_profiles_on_meta(name):
    spec = load_model(name)
    model = build_model(spec, device="meta")
    assert _numel(model) == count_params(spec).total
    if name == "llama-2-7b":
        assert _numel(model) == 6_738_415_616  # transformers' own count (DESIGN.md)


def test_seeded_build_is_deterministic():
    a, b, c = (build_model(SMALL_LLAMA, seed=s) for s in (3, 3, 4))
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(),
                                  strict=True):
        assert torch.equal(pa, pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name
    half = build_model(SMALL_LLAMA, seed=3, dtype=torch.bfloat16)
    for pa, ph in zip(a.parameters(), half.parameters(), strict=True):
        assert ph.dtype is torch.bfloat16 and torch.equal(pa.to(torch.bfloat16), ph)


def test_tied_embeddings_share_storage():
    model = build_model(SMALL_GPT, seed=0)
    assert model.lm_head.weight is model.embed.weight
    untied = build_model(SMALL_LLAMA, seed=0)
    assert untied.lm_head.weight is not untied.embed.weight


def test_forward_shapes_and_loss_convention():
    model = build_model(SMALL_LLAMA, seed=0)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    assert logits.shape == (2, 16, 128)
    loss = model(ids, labels=ids)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want)
    with pytest.raises(UserError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def _copy_gpt2_into_hf(ours, hf):
    # HF GPT-2 uses Conv1D, whose weight is (in, out): transpose our Linear weights.
    t = hf.transformer
    with torch.no_grad():
        t.wte.weight.copy_(ours.embed.weight)
        t.wpe.weight.copy_(ours.pos_embed.weight)
        for mine, theirs in zip(ours.blocks, t.h, strict=True):
            for a, b in ((mine.ln_1, theirs.ln_1), (mine.ln_2, theirs.ln_2)):
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)
            for a, b in ((mine.attn.c_attn, theirs.attn.c_attn), (mine.attn.c_proj, theirs.attn.c_proj),
                         (mine.mlp.c_fc, theirs.mlp.c_fc), (mine.mlp.c_proj, theirs.mlp.c_proj)):
                b.weight.copy_(a.weight.t())
                b.bias.copy_(a.bias)
        t.ln_f.weight.copy_(ours.norm.weight)
        t.ln_f.bias.copy_(ours.norm.bias)


def test_gpt2_matches_hugging_face():
    transformers = pytest.importorskip("transformers")
    s = SMALL_GPT
    cfg = transformers.GPT2Config(vocab_size=s.vocab_size, n_positions=s.max_seq_len, n_embd=s.hidden_size,
                                  n_layer=s.num_layers, n_head=s.num_heads, n_inner=s.intermediate_size,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    ours = build_model(s, seed=0)
    _copy_gpt2_into_hf(ours, hf)
    ids = torch.randint(0, s.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    out = hf(ids, labels=ids)
    torch.testing.assert_close(ours(ids), out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(ids, labels=ids), out.loss, rtol=1e-5, atol=1e-5)


def test_llama_matches_hugging_face():
    transformers = pytest.importorskip("transformers")
    s = SMALL_LLAMA
    cfg = transformers.LlamaConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size,
                                   intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
                                   num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
                                   max_position_embeddings=s.max_seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   tie_word_embeddings=False, attention_bias=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ours = build_model(s, seed=0)
    # Same layout apart from the prefix: ours has no `model.` and calls the layers `blocks`.
    theirs = {k.removeprefix("model.").replace("layers.", "blocks.").replace("embed_tokens", "embed"): v
              for k, v in hf.state_dict().items()}
    assert theirs.keys() == ours.state_dict().keys()
    with torch.no_grad():
        for k, v in ours.state_dict().items():
            theirs[k].copy_(v)
    ids = torch.randint(0, s.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    out = hf(ids, labels=ids)
    torch.testing.assert_close(ours(ids), out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(ids, labels=ids), out.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [SMALL_GPT, SMALL_LLAMA, SMALL_MIXTRAL], ids=lambda s: s.name)
def test_training_reduces_loss(spec):
    torch.manual_seed(0)
    model = build_model(spec, seed=0)
    corpus = synthetic_corpus(vocab_size=spec.vocab_size, num_tokens=64 * 1024, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for ids, labels in batches(corpus, batch_size=8, seq_len=64, seed=0, steps=40):
        loss = model(ids, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 4.0  # about ln(128) at initialisation
    assert last < 0.7 * first, losses


def test_corpus_is_deterministic_and_structured():
    a = synthetic_corpus(vocab_size=512, num_tokens=10_000, seed=7)
    assert a.dtype is torch.int64 and a.shape == (10_000,) and 0 <= a.min() and a.max() < 512
    assert torch.equal(a, synthetic_corpus(vocab_size=512, num_tokens=10_000, seed=7))
    assert not torch.equal(a, synthetic_corpus(vocab_size=512, num_tokens=10_000, seed=8))
    # Structure: far fewer distinct bigrams than a uniform stream of the same length would have.
    bigrams = {(int(x), int(y)) for x, y in zip(a[:-1], a[1:], strict=True)}
    assert len(bigrams) < 0.3 * (a.numel() - 1)


def test_batches_shard_the_global_batch_by_rank():
    corpus = synthetic_corpus(vocab_size=256, num_tokens=20_000, seed=1)
    steps = 30  # past one epoch (20000 // 32 = 625 windows // 24 rows = 26 steps)
    single = list(batches(corpus, batch_size=24, seq_len=32, seed=5, steps=steps))
    ranks = [list(batches(corpus, batch_size=8, seq_len=32, rank=r, world_size=3, seed=5, steps=steps))
             for r in range(3)]
    assert len(single) == steps and all(len(r) == steps for r in ranks)
    for t in range(steps):
        ids, labels = single[t]
        assert ids.shape == (24, 32) and torch.equal(ids, labels)
        assert torch.equal(torch.cat([ranks[r][t][0] for r in range(3)]), ids)
    again = list(itertools.islice(batches(corpus, batch_size=24, seq_len=32, seed=5), steps))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(single, again, strict=True))
    assert not torch.equal(single[0][0], next(batches(corpus, batch_size=24, seq_len=32, seed=6))[0])


def test_batches_reject_bad_arguments():
    corpus = synthetic_corpus(vocab_size=64, num_tokens=1000, seed=0)
    with pytest.raises(UserError, match="rank"):
        next(batches(corpus, batch_size=2, seq_len=8, rank=2, world_size=2))
    with pytest.raises(UserError, match="larger"):
        next(batches(corpus, batch_size=64, seq_len=64))
