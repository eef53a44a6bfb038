"""A Hugging Face model as a real client: GPT2LMHeadModel and LlamaForCausalLM from tiny configs, wrapped by
ztune.initialize with a DeepSpeed-style config dict, ZeRO stage 3, 2 gloo ranks, against torch.optim.AdamW
on one process with the same global batches. Units are found structurally (transformer.h / model.layers)."""

from __future__ import annotations

import pytest
import torch

from tests.dist.test_parity import FP32_RTOL, _zero_grad_elements, rel
from tests.helpers.spawn import run_ranks

pytestmark = pytest.mark.dist

WORLD, MICRO, SEQ, STEPS, ACCUM, LR, VOCAB = 2, 2, 16, 4, 2, 2e-3, 96


def build(name: str):
    import transformers

    torch.manual_seed(11)
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                       use_cache=False)
        model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    return model


def deepspeed_config() -> dict:
    return {
        "train_batch_size": MICRO * ACCUM * WORLD,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": ACCUM,
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}},
        "bf16": {"enabled": False},
        "gradient_clipping": 0.0,
    }


def batch(step: int, micro: int) -> torch.Tensor:
    """The global micro-batch (WORLD * MICRO rows); rank r trains on rows [r*MICRO, (r+1)*MICRO)."""
    gen = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(0, VOCAB, (WORLD * MICRO, SEQ), generator=gen)


def train(rank: int, world_size: int, names: list[str]) -> dict:
    import torch.distributed as dist

    import ztune

    assert not dist.is_initialized()
    out = {}
    for name in names:
        model = build(name)
        engine, optimizer, _, _ = ztune.initialize(model, deepspeed_config())
        assert isinstance(optimizer, torch.optim.AdamW)
        for step in range(STEPS):
            for micro in range(ACCUM):
                ids = batch(step, micro)[rank * MICRO:(rank + 1) * MICRO]
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()
        out[name] = {"state": engine.full_state_dict(), "units": len(engine.groups),
                     "backend": dist.get_backend(), "world": dist.get_world_size()}
    return out


def reference(name: str) -> dict:
    model = build(name)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    for step in range(STEPS):
        for micro in range(ACCUM):
            ids = batch(step, micro)
            (model(input_ids=ids, labels=ids).loss / ACCUM).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


@pytest.fixture(scope="module")
def results():
    # No process group beforehand: ztune.initialize creates it from torchrun's environment variables.
    return run_ranks(train, world_size=WORLD, args=(["gpt2", "llama"],), timeout_s=240, init_process_group=False)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_model_stage3_parity(results, name):
    got = results[0][name]["state"]
    assert results[1][name]["state"] is None  # gathered on rank 0 only
    assert (results[0][name]["backend"], results[0][name]["world"]) == ("gloo", WORLD)
    assert results[0][name]["units"] == 2 + 1  # two layers + the root (embeddings, final norm, head)
    ref = reference(name)
    assert set(got) == set(ref)
    names = sorted(ref)
    flat = [torch.cat([d[k].float().reshape(-1) for k in names]) for d in (got, ref)]
    assert rel(flat[0] - flat[1], flat[1]) < FP32_RTOL
    for k in names:
        g, r = _zero_grad_elements(k, got[k].float()), _zero_grad_elements(k, ref[k].float())
        if r.norm() > 0:
            assert rel(g - r, r) < FP32_RTOL, (k, rel(g - r, r))
