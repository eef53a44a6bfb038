"""Stage 3 beyond plain training, on 2 gloo ranks: frozen parameters sharded (a LoRA-style model: the adapters
train like torch.optim on one process, the frozen base is untouched, memory_report counts every parameter
over n); `engine.gathered()` for generation outside forward (same tokens as the unsharded model) and for
writing weights back from one rank; a module called outside both is one clear error naming the context."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.dist.test_parity import FP32_RTOL, rel
from tests.helpers.spawn import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(1200)]

WORLD, DIM, RANK_LORA, BLOCKS, MICRO, STEPS, LR = 2, 64, 4, 4, 4, 4, 1e-2


class LoraBlock(nn.Module):
    """A frozen DIMxDIM linear layer plus a trainable low-rank update B(A x)."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(DIM, DIM)
        self.a = nn.Linear(DIM, RANK_LORA, bias=False)
        self.b = nn.Linear(RANK_LORA, DIM, bias=False)
        nn.init.normal_(self.b.weight, std=0.1)  # (LoRA starts B at 0; nonzero so A trains from step 1)
        self.base.requires_grad_(False)

    def forward(self, x):
        return torch.tanh(self.base(x) + self.b(self.a(x))) + x


class LoraModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(21)
        self.blocks = nn.ModuleList(LoraBlock() for _ in range(BLOCKS))
        self.head = nn.Linear(DIM, 1)
        self.head.requires_grad_(False)

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return (self.head(x).squeeze(-1) - y).square().mean()


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(WORLD * MICRO, DIM, generator=gen), torch.randn(WORLD * MICRO, generator=gen)


def gpt2():
    import transformers

    torch.manual_seed(9)
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                  eos_token_id=0, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.config._attn_implementation = "eager"
    return model.eval()


PROMPT = torch.tensor([[5, 17, 33, 2]])


def run(rank: int, world_size: int) -> dict:
    import ztune
    from ztune.runtime.construct.gathered import ParamsNotGatheredError

    out = {}
    model = LoraModel()
    cfg = {"zero": {"stage": 3}, "precision": "fp32", "batch": {"micro": MICRO},
           "optimizer": {"type": "AdamW", "lr": LR}}
    engine, _, _, _ = ztune.initialize(model, cfg)
    out["lora_frozen_groups"] = len(engine.frozen_groups)
    for step in range(STEPS):
        x, y = data(step)
        engine.backward(engine(x[rank * MICRO:(rank + 1) * MICRO], y[rank * MICRO:(rank + 1) * MICRO]))
        engine.step()
    out["lora_state"] = engine.full_state_dict()
    out["lora_params_bytes"] = engine.memory_report()["params"]

    model = gpt2()
    engine, _, _, _ = ztune.initialize(model, cfg)
    with engine.gathered():
        out["tokens"] = engine.module.generate(PROMPT, max_new_tokens=6, do_sample=False)
    with engine.gathered(engine.module.transformer.h[1]):  # one unit: the others stay sharded
        out["gathered_one"] = [g.gathered for g in engine.groups]
    try:
        engine.module.get_input_embeddings()(PROMPT)
        out["outside"] = None
    except ParamsNotGatheredError as exc:
        out["outside"] = str(exc)
    with engine.gathered(engine.module.transformer.wte, modifier_rank=1), torch.no_grad():
        if rank == 1:
            engine.module.transformer.wte.weight[3].fill_(7.0)
        else:
            engine.module.transformer.wte.weight[4].fill_(-7.0)  # not the modifier: discarded
    out["modified"] = engine.full_state_dict()
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(run, world_size=WORLD, timeout_s=900)


def test_lora_adapters_match_single_process_and_base_stays_frozen(results):
    model = LoraModel()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        model(*data(step)).backward()
        opt.step()
        opt.zero_grad()
    got = results[0]["lora_state"]
    assert results[0]["lora_frozen_groups"] == BLOCKS + 1  # each block's base, and the head in the root
    for k, ref in model.state_dict().items():
        if ".base." in k or k.startswith("head."):
            assert torch.equal(got[k], init[k]), k
        else:
            assert not torch.equal(ref, init[k]), k  # it trained
            assert rel(got[k] - ref, ref) < FP32_RTOL, (k, rel(got[k] - ref, ref))


def test_frozen_parameters_are_sharded_and_counted(results):
    """memory_report()["params"] is every parameter (frozen and trainable) over n, plus padding."""
    total_bytes = sum(p.numel() * 4 for p in LoraModel().parameters())
    groups = 2 * BLOCKS + 1  # per block frozen + adapters; the frozen head in the root
    for r in results:
        assert total_bytes / WORLD <= r["lora_params_bytes"] <= total_bytes / WORLD + groups * 8 * WORLD * 4


def test_generate_inside_gathered_matches_unsharded(results):
    ref = gpt2().generate(PROMPT, max_new_tokens=6, do_sample=False)
    for r in results:
        assert torch.equal(r["tokens"], ref)
        assert r["gathered_one"] == [False, False, True]  # root, h.0, h.1


def test_module_outside_forward_is_a_clear_error(results):
    for r in results:
        assert r["outside"] is not None and "transformer.wte" in r["outside"]
        assert "with engine.gathered(" in r["outside"]


def test_modifier_rank_writes_back_to_every_shard(results):
    ref = gpt2().state_dict()
    got = results[0]["modified"]["transformer.wte.weight"]
    assert torch.equal(got[3], torch.full_like(got[3], 7.0))
    others = [i for i in range(got.shape[0]) if i != 3]
    assert torch.equal(got[others], ref["transformer.wte.weight"][others])
