"""Checkpoint files: a transformers Llama trained at ZeRO-3 on 2 gloo ranks and saved three times
(checkpoint.keep_last 2), then, in this process without a process group:
- consolidate -> model.safetensors (one file, or sharded with an index) that `from_pretrained` loads with
  parameters equal to engine.full_state_dict(); bf16 output equal to the fp32 values rounded;
- corruption (a flipped byte in each kind of file, a missing rank file, a truncated file): loading and the
  CLI fail with one line naming the file (exit 2), and the previous tag still loads;
- `ztune checkpoint inspect --json`, save_16bit_model, pruning and a stale staging folder.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.dist.test_hf_client import MICRO, SEQ, VOCAB, build
from tests.helpers.spawn import run_ranks
from ztune.cli import main

# Safety net per test (the module fixture spawns 2 ranks that train and save three times): minutes when the
# shared 2-core machine is loaded.
pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]

CONFIG = {"zero": {"stage": 3}, "precision": "fp32", "batch": {"micro": MICRO, "grad_accum": 1},
          "optimizer": {"type": "AdamW", "lr": 2e-3}, "checkpoint": {"keep_last": 2}}


def save_three(rank: int, world_size: int, root: str) -> dict:
    import ztune

    engine, _, _, _ = ztune.initialize(build("llama"), CONFIG)
    states = {}
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        ids = torch.randint(0, VOCAB, (world_size * MICRO, SEQ), generator=gen)[rank * MICRO:(rank + 1) * MICRO]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        engine.save_checkpoint(f"{root}/ckpt", client_state={"step": step + 1})
        states[step + 1] = engine.full_state_dict()
    engine.save_16bit_model(f"{root}/export", "model.safetensors")
    return states


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    states = run_ranks(save_three, world_size=2, args=(str(root),), timeout_s=300)[0]
    return root, states


def _cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


def _load_engine():
    import ztune

    engine, _, _, _ = ztune.initialize(build("llama"), {**CONFIG, "zero": {"stage": 0}})
    return engine


def test_keep_last_prunes_and_latest_names_newest(saved):
    root, _ = saved
    names = sorted(p.name for p in (root / "ckpt").iterdir())
    assert names == ["global_step2", "global_step3", "latest"]
    assert (root / "ckpt" / "latest").read_text().strip() == "global_step3"


def test_consolidate_loads_in_transformers(saved, tmp_path, capsys):
    import transformers

    root, states = saved
    final = states[3]
    for dtype, limit, expect_index in (("fp32", "20KB", True), ("bf16", "5GB", False)):
        out = tmp_path / dtype
        code, _, err = _cli(["checkpoint", "consolidate", str(root / "ckpt"), "--out", str(out), "--dtype", dtype,
                             "--max-shard-size", limit], capsys)
        assert code == 0, err
        assert (out / "model.safetensors.index.json").exists() == expect_index
        build("llama").config.save_pretrained(out)
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch_dtype)
        loaded = model.state_dict()
        assert loaded.keys() == final.keys()
        for k, v in final.items():
            assert torch.equal(loaded[k], v.to(torch_dtype)), (dtype, k)
    index = json.loads((tmp_path / "fp32" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def load_consolidated(rank: int, world_size: int, sharded_dir: str, single_dir: str) -> list[dict]:
    """Stage 3: a zero_init model with weights=<consolidated, sharded with an index>, and an eager model then
    ztune.load_pretrained(engine, <consolidated single file>); each one's full state."""
    import transformers

    import ztune

    with ztune.zero_init():
        model = transformers.LlamaForCausalLM(build("llama").config)
    engine, _, _, _ = ztune.initialize(model, CONFIG, weights=sharded_dir)
    out = [engine.full_state_dict()]
    engine, _, _, _ = ztune.initialize(build("llama"), CONFIG)
    ztune.load_pretrained(engine, single_dir)
    out.append(engine.full_state_dict())
    return out


def test_consolidated_checkpoint_loads_through_weights_and_load_pretrained(saved, tmp_path, capsys):
    """`ztune checkpoint consolidate` output is a pretrained-weights directory for ztune too: 2 ranks at stage 3
    each read their shards' slices of it and hold exactly the saved parameters."""
    root, states = saved
    for name, limit in (("sharded", "20KB"), ("single", "5GB")):
        code, _, err = _cli(["checkpoint", "consolidate", str(root / "ckpt"), "--out", str(tmp_path / name),
                             "--max-shard-size", limit], capsys)
        assert code == 0, err
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert (tmp_path / "single" / "model.safetensors").exists()
    got = run_ranks(load_consolidated, world_size=2, args=(str(tmp_path / "sharded"), str(tmp_path / "single")),
                    timeout_s=300)[0]
    for state in got:
        assert state.keys() == states[3].keys()
        differ = [k for k, v in states[3].items() if not torch.equal(state[k], v)]
        assert not differ, differ[:5]


def test_save_16bit_model_matches_full_state(saved):
    from safetensors.torch import load_file

    root, states = saved
    exported = load_file(root / "export" / "model.safetensors")
    for k, v in exported.items():
        assert torch.equal(v, states[3][k]), k


def test_inspect_json(saved, capsys):
    root, _ = saved
    code, out, _ = _cli(["checkpoint", "inspect", str(root / "ckpt"), "--json", "--verify"], capsys)
    report = json.loads(out)
    assert code == 0 and report["latest"] == "global_step3"
    assert [(t["tag"], t["step"], t["world_size"], t["stage"], t["ok"]) for t in report["tags"]] == [
        ("global_step2", 2, 2, 3, True), ("global_step3", 3, 2, 3, True)]
    assert all(b > 0 for b in report["tags"][1]["bytes_per_rank"]) and len(report["tags"][1]["bytes_per_rank"]) == 2


def _flip(path, offset_frac=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_frac)] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "flip rank1 shard": ("rank00001.safetensors", _flip),
    "flip rank0 header": ("rank00000.safetensors", lambda p: _flip(p, 0.001)),
    "flip rank1 metadata": ("rank00001.json", _flip),
    "flip module": ("module.safetensors", _flip),
    "flip objects": ("objects.pt", _flip),
    "missing rank1 shard": ("rank00001.safetensors", lambda p: p.unlink()),
    "missing rank1 metadata": ("rank00001.json", lambda p: p.unlink()),
    "truncated rank0 shard": ("rank00000.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-100])),
}


def test_corruption_names_the_file_and_previous_tag_loads(saved, tmp_path, capsys):
    from ztune.runtime.state import CheckpointError

    root, states = saved
    engine = _load_engine()
    for what, (name, damage) in DAMAGE.items():
        ckpt = tmp_path / what.replace(" ", "_")
        shutil.copytree(root / "ckpt", ckpt)
        damage(ckpt / "global_step3" / name)
        with pytest.raises(CheckpointError) as exc:
            engine.load_checkpoint(ckpt)
        message = str(exc.value)
        assert str(ckpt / "global_step3" / name) in message and "\n" not in message, (what, message)
        code, _, err = _cli(["checkpoint", "consolidate", str(ckpt), "--out", str(tmp_path / "out")], capsys)
        assert code == 2 and name in err and "Traceback" not in err, (what, err)
        path, client = engine.load_checkpoint(ckpt, tag="global_step2")
        assert path.endswith("global_step2") and client == {"step": 2}
        state = engine.full_state_dict()
        for k, v in states[2].items():
            assert torch.equal(state[k], v), (what, k)
        shutil.rmtree(ckpt)


def test_nothing_saved_yet_and_stale_staging(tmp_path, saved, capsys):
    root, states = saved
    engine = _load_engine()
    assert engine.load_checkpoint(tmp_path / "empty") == (None, None)
    # A crash during a save leaves a staging folder: ignored by load and inspect, `latest` unchanged.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt", ckpt)
    shutil.copytree(ckpt / "global_step3", ckpt / ".tmp-global_step4")
    (ckpt / ".tmp-global_step4" / "rank00001.json").unlink()
    path, client = engine.load_checkpoint(ckpt)
    assert path.endswith("global_step3") and client == {"step": 3} and engine.global_steps == 3
    code, out, _ = _cli(["checkpoint", "inspect", str(ckpt), "--json"], capsys)
    assert code == 0 and json.loads(out)["incomplete"] == [".tmp-global_step4"]
    code, _, err = _cli(["checkpoint", "inspect", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = _cli(["checkpoint", "consolidate", str(ckpt), "--out", str(tmp_path / "o"), "--dtype", "int8"],
                        capsys)
    assert code == 2 and "--dtype" in err


def test_frozen_parameters_excluded_need_non_strict_load(tmp_path):
    """DeepSpeed's exclude_frozen_parameters / load_module_strict, one process: a frozen Linear left out of
    the save is an error to load strictly, and keeps its own values when loading with strict=False."""
    import ztune
    from tests.dist.test_parity import build as build_tiny
    from tests.dist.test_parity import case, config_for
    from ztune.errors import UserError
    from ztune.runtime.state import CheckpointError

    c = case(stage=1, unused=True)

    def engine_with_frozen(seed: int):
        model = build_tiny(c)
        model.unused.requires_grad_(False)
        torch.manual_seed(seed)
        torch.nn.init.normal_(model.unused.weight)
        return ztune.initialize(model, config_for(c, 1))[0]

    first = engine_with_frozen(1)
    first.save_checkpoint(tmp_path, exclude_frozen_parameters=True)
    second = engine_with_frozen(2)
    frozen = second.module.unused.weight.detach().clone()
    with pytest.raises(CheckpointError, match="unused.weight"):
        second.load_checkpoint(tmp_path)
    path, _ = second.load_checkpoint(tmp_path, load_module_strict=False)
    assert path.endswith("global_step0") and torch.equal(second.module.unused.weight, frozen)
    for (name, p), q in zip(first.module.named_parameters(), second.module.parameters(), strict=True):
        if p.requires_grad:
            assert torch.equal(p, q), name
    with pytest.raises(UserError, match="custom_load_fn"):
        second.load_checkpoint(tmp_path, custom_load_fn=lambda *a: None)
