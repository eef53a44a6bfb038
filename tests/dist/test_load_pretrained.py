"""Shard-wise loading of a Hugging Face checkpoint (`initialize(..., weights=dir)`): a model built on meta with
ztune.zero_init, stage 3 on 2 ranks, loads what transformers' save_pretrained wrote (one file, and sharded
with an index) to parameters bitwise equal to from_pretrained (fp32) and the same first loss; a checkpoint
that does not match the model is one error listing the names."""

from __future__ import annotations

import pytest
import torch

from tests.dist.test_zero_init import VOCAB, build
from tests.helpers.spawn import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(1200)]

IDS = torch.arange(2 * 16).reshape(2, 16) % VOCAB


def config(stage: int) -> dict:
    return {"zero": {"stage": stage}, "precision": "fp32", "batch": {"micro": 2},
            "optimizer": {"type": "AdamW", "lr": 1e-3}}


def load(rank: int, world_size: int, cases: list[tuple[str, str]], stage: int) -> dict:
    import ztune

    out = {}
    for name, path in cases:
        model = build(name, "zero_init")
        engine, _, _, _ = ztune.initialize(model, config(stage), weights=path)
        loss = engine(input_ids=IDS, labels=IDS).loss.detach()
        out[(name, path)] = {"state": engine.full_state_dict(), "loss": loss}
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pretrained")
    paths = {}
    for name in ("llama", "gpt2"):
        torch.manual_seed(3)
        model = build(name)
        paths[(name, "single")] = str(root / f"{name}-single")
        model.save_pretrained(paths[(name, "single")])
    torch.manual_seed(3)
    build("llama").save_pretrained(str(root / "llama-sharded"), max_shard_size="20KB")
    paths[("llama", "sharded")] = str(root / "llama-sharded")
    return paths


@pytest.fixture(scope="module")
def loaded(saved) -> dict:
    cases = [(name, path) for (name, _kind), path in saved.items()]
    return run_ranks(load, world_size=2, args=(cases, 3), timeout_s=900)[0]


@pytest.mark.parametrize("key", [("llama", "single"), ("llama", "sharded"), ("gpt2", "single")],
                         ids=lambda k: "-".join(k))
def test_loads_bitwise_what_from_pretrained_loads(saved, loaded, key):
    import os

    import transformers

    path = saved[key]
    if key[1] == "sharded":
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
        assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    cls = transformers.GPT2LMHeadModel if key[0] == "gpt2" else transformers.LlamaForCausalLM
    ref = cls.from_pretrained(path, dtype=torch.float32)
    ref.config._attn_implementation = "eager"
    got = loaded[(key[0], path)]
    want = ref.state_dict()
    assert got["state"].keys() == want.keys()
    differ = [k for k in want if not torch.equal(got["state"][k], want[k])]
    assert not differ, differ[:5]
    assert torch.equal(got["loss"], ref(input_ids=IDS, labels=IDS).loss.detach())


def test_mismatched_checkpoint_is_one_error_listing_names(tmp_path):
    from safetensors.torch import save_file

    import ztune
    from ztune.runtime.construct.pretrained import PretrainedLoadError

    torch.manual_seed(3)
    state = {k: v.clone().contiguous() for k, v in build("llama").state_dict().items()}
    del state["model.norm.weight"]
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(PretrainedLoadError, match=r"missing 1: model\.norm\.weight; unexpected 1: model\.extra"):
        ztune.initialize(build("llama", "zero_init"), config(3), weights=str(tmp_path))
    with pytest.raises(PretrainedLoadError, match="expected a .safetensors file or a directory"):
        ztune.initialize(build("llama", "zero_init"), config(3), weights=str(tmp_path / "nothing"))
