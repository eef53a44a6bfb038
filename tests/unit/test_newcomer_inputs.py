"""Inputs a user coming from DeepSpeed writes by mistake, each with its one-line error (exit 2 in the CLI):
a key given twice (JSON or YAML), dotted keys ("zero_optimization.stage": 3), "auto" under such keys or in
lists, `ztune checkpoint consolidate --out` onto earlier weights, and a DeepSpeed checkpoint folder."""

from __future__ import annotations

import json

import pytest

from ztune.cli import main
from ztune.config.io import load, load_detailed
from ztune.errors import ConfigError, ProfileError
from ztune.profiles import load_hardware

BATCH = {"train_batch_size": 8}


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code or 0, capsys.readouterr().err


@pytest.mark.parametrize("text, key", [
    ('{"train_batch_size": 8, "zero_optimization": {"stage": 3}, "zero_optimization": {"stage": 1}}',
     "zero_optimization"),
    ('{"train_batch_size": 8, "zero_optimization": {"stage": 3, "stage": 1}}', "stage"),
    ('{"train_batch_size": 8, "fp16": {"enabled": true, "loss_scale_window": 10, "loss_scale_window": 20}}',
     "loss_scale_window"),
])
def test_json_key_given_twice_is_refused(tmp_path, text, key) -> None:
    # DeepSpeed refuses these too (config_utils.dict_raise_error_on_duplicate_keys); json keeps the last one.
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"key '{key}' is given twice"):
        load(path)


@pytest.mark.parametrize("text, line", [
    ("zero: {stage: 2}\nprecision: bf16\nzero: {stage: 3}\n", 3),
    ("zero:\n  stage: 2\n  stage: 3\n", 3),
    ("zero: {stage: 2, stage: 3}\n", 1),
])
def test_yaml_key_given_twice_is_refused(tmp_path, text, line) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"at line {line}, .*'(zero|stage)' is given twice"):
        load(path)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {stage: 2, offload_optimizer: none}\nzero:\n  <<: *b\n  stage: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'base'"):  # merge accepted; only the extra key is wrong
        load(path)
    path.write_text("zero: {<<: {stage: 1}, stage: 3}\n")
    assert load(path).zero.stage == 3


def test_hardware_profile_key_given_twice_is_refused(tmp_path) -> None:
    path = tmp_path / "hw.yaml"
    path.write_text("name: x\ngpus_per_node: 8\ngpus_per_node: 4\n")
    with pytest.raises(ProfileError, match="'gpus_per_node' is given twice"):
        load_hardware(str(path))


@pytest.mark.parametrize("doc, named", [
    ({"zero_optimization.stage": 3}, "zero_optimization.stage"),
    ({"fp16.enabled": True}, "fp16.enabled"),
    ({"zero_optimization": {"offload_optimizer.device": "cpu"}}, "zero_optimization.offload_optimizer.device"),
    # a dotted name that matches an ignored key must not pass as ignored either
    ({"zero_optimization": {"stage": 3, "offload_param.pin_memory": True}},
     "zero_optimization.offload_param.pin_memory"),
    ({"zero_optimization.reduce_bucket_size": "auto"}, "zero_optimization.reduce_bucket_size"),
])
def test_dotted_keys_are_refused_by_name(doc, named) -> None:
    # DeepSpeed silently ignores an unknown top-level key, so "zero_optimization.stage": 3 would train at stage 0.
    with pytest.raises(ConfigError, match=f"unknown key '{named}': DeepSpeed config keys are nested, not dotted"):
        load({**BATCH, **doc})


@pytest.mark.parametrize("doc, named", [
    ({"optimizer": [{"type": "auto"}]}, r"optimizer\[0\].type: \"auto\""),
    ({"optimizer": {"type": "AdamW", "params": {"betas": ["auto", 0.99]}}}, r"optimizer.params.betas\[0\]: \"auto\""),
])
def test_auto_inside_lists_is_one_error(doc, named) -> None:
    with pytest.raises(ConfigError, match=named):
        load_detailed({**BATCH, **doc})


def test_auto_still_resolves_where_it_did() -> None:
    cfg = load_detailed({"train_batch_size": 8, "gradient_accumulation_steps": "auto",
                         "zero_optimization": {"stage": 2, "stage3_prefetch_bucket_size": "auto"}}).config
    assert cfg.batch.global_ == 8 and cfg.batch.grad_accum is None and cfg.zero.stage == 2


def test_consolidate_refuses_an_out_folder_holding_weights(tmp_path, capsys) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"earlier weights")
    (tmp_path / "ckpt").mkdir()
    code, err = _cli(["checkpoint", "consolidate", str(tmp_path / "ckpt"), "--out", str(out)], capsys)
    assert code == 2 and "already holds model.safetensors" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert (out / "model.safetensors").read_bytes() == b"earlier weights"
    (tmp_path / "file").write_text("x")
    code, err = _cli(["checkpoint", "consolidate", str(tmp_path / "ckpt"), "--out", str(tmp_path / "file")],
                     capsys)
    assert code == 2 and "is a file" in err


def test_deepspeed_checkpoint_folder_is_named(tmp_path, capsys) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / "global_step5").mkdir(parents=True)
    (ckpt / "global_step5" / "mp_rank_00_model_states.pt").write_bytes(b"\0")
    (ckpt / "global_step5" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0")
    (ckpt / "latest").write_text("global_step5")
    code, err = _cli(["checkpoint", "consolidate", str(ckpt), "--out", str(tmp_path / "hf")], capsys)
    assert code == 2 and "was written by DeepSpeed (mp_rank_00_model_states.pt)" in err, err
    assert "zero_to_fp32.py" in err and len(err.strip().splitlines()) == 1
    # inspect: the tag `latest` names is listed as unusable (was: an empty table and exit 0)
    code = main_exit(["checkpoint", "inspect", str(ckpt), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and [r["tag"] for r in report["tags"]] == ["global_step5"]
    assert "written by DeepSpeed" in report["tags"][0]["error"]


def main_exit(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_dotted_key_hint_shows_the_nesting() -> None:
    with pytest.raises(ConfigError) as exc:
        load({**BATCH, "a.b.c": 1})
    assert str(exc.value).endswith('write {"a": {"b": {"c": ...}}}')


def test_autotune_out_that_is_a_file_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "results").write_text("not a folder")
    for out in (tmp_path / "results", tmp_path / "results" / "below"):
        code, err = _cli(["autotune", "--out", str(out)], capsys)
        assert code == 2 and "cannot be used as the results folder" in err and "Traceback" not in err, err
    assert (tmp_path / "results").read_text() == "not a folder"


@pytest.mark.parametrize("bf16, bfloat16", [(False, True), (True, True), (True, False)])
def test_bf16_and_its_older_name_together_are_refused(bf16, bfloat16) -> None:
    # DeepSpeed reads "bfloat16" only without "bf16": {"bf16": off, "bfloat16": on} trains in fp32 there.
    with pytest.raises(ConfigError, match="bf16 and bfloat16 .* are both given"):
        load({**BATCH, "bf16": {"enabled": bf16}, "bfloat16": {"enabled": bfloat16}})
    assert load({**BATCH, "bfloat16": {"enabled": True}}).precision.value == "bf16"


@pytest.mark.parametrize("text", ['{"train_batch_size": 8, // hjson comment\n "fp16": {"enabled": true}}',
                                  '{"train_batch_size": 8, "fp16": {"enabled": true},}'])
def test_hjson_only_syntax_names_the_difference(tmp_path, text) -> None:
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"not valid JSON at line \d+.*ztune reads strict JSON: no comments, "
                                          r"trailing commas"):
        load(path)


def test_stage3_knobs_by_field_name_are_ignored_like_their_aliases() -> None:
    loaded = load_detailed({**BATCH, "zero_optimization": {"stage": 3, "max_live_parameters": 1e9,
                                                           "prefetch_bucket_size": 5e8,
                                                           "gather_16bit_weights_on_model_save": True}})
    assert loaded.config.zero.stage == 3
    assert set(loaded.ignored) == {"zero_optimization.max_live_parameters", "zero_optimization.prefetch_bucket_size",
                                   "zero_optimization.gather_16bit_weights_on_model_save"}


def test_launch_accepts_auto_values_that_need_the_model(tmp_path) -> None:
    """`ztune launch --config` checks the config before starting anything; the "auto" values ztune.initialize
    derives from the model on the ranks (the Hugging Face ZeRO configs) must pass that check, the others not."""
    from ztune.launch import LaunchRequest, plan_launch

    (tmp_path / "train.py").write_text("")
    cfg = tmp_path / "ds.json"
    doc = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": "auto", "fp16": {"enabled": "auto"},
           "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}
    cfg.write_text(json.dumps(doc))
    req = LaunchRequest(script="train.py", config=str(cfg), workdir=str(tmp_path), nproc_per_node=2)
    assert json.loads(plan_launch(req, environ={}).config_text) == doc  # sent as written: the ranks resolve it
    with pytest.raises(ConfigError, match="fp16.enabled: \"auto\" is derived from the model"):
        load(cfg)  # where no model comes later (the default), it still needs a value
    cfg.write_text(json.dumps({**doc, "gradient_clipping": "auto"}))
    with pytest.raises(ConfigError, match="gradient_clipping: \"auto\" is filled in by the Hugging Face Trainer"):
        plan_launch(req, environ={})


def test_nproc_beyond_the_slots_a_filter_selects_is_refused(tmp_path) -> None:
    from ztune.launch import LaunchRequest, plan_launch
    from ztune.launch.hostfile import HostfileError

    (tmp_path / "train.py").write_text("")
    (tmp_path / "hosts").write_text("node1 slots=4\nnode2 slots=4\n")
    base = {"script": "train.py", "hostfile": str(tmp_path / "hosts"), "workdir": str(tmp_path),
            "master_addr": "10.0.0.1"}
    # was: CUDA_VISIBLE_DEVICES=0,1 on node1, dropping the --include selection of device 1
    with pytest.raises(HostfileError, match=r"--nproc-per-node 2 is more than the 1 slot\(s\) --include leaves on "
                                            r"node1 \[1\]"):
        plan_launch(LaunchRequest(**base, include="node1:1", nproc_per_node=2), environ={})
    with pytest.raises(HostfileError, match="--exclude leaves on node1"):
        plan_launch(LaunchRequest(**base, exclude="node1:0,1,2", nproc_per_node=2), environ={})
    plan = plan_launch(LaunchRequest(**base, include="node1:1,3@node2:0,2", nproc_per_node=2), environ={})
    assert [h.slots for h in plan.hosts] == [(1, 3), (0, 2)]
    plan = plan_launch(LaunchRequest(**base, include="node1:1,2,3", nproc_per_node=2), environ={})
    assert [h.slots for h in plan.hosts] == [(1, 2)]


def test_global_batch_alone_not_divisible_names_what_was_given() -> None:
    from ztune.config import resolve_batch

    loaded = load_detailed({"train_batch_size": 7})
    # was: "train_micro_batch_size_per_gpu 3 x ... = 6, but train_batch_size is 7" (a micro the user never set)
    with pytest.raises(ConfigError, match=r"^train_batch_size 7 is not divisible by gradient_accumulation_steps "
                                          r"1 x 2 ranks = 2; change train_batch_size or set "
                                          r"train_micro_batch_size_per_gpu"):
        resolve_batch(loaded.config.batch, 2, keys=loaded.batch_keys)
    assert resolve_batch(loaded.config.batch, 7, keys=loaded.batch_keys).micro == 1


@pytest.mark.parametrize("extra, named", [(["--model", "llama-3-8b"], "--model"),
                                          (["--global-batch", "64", "--steps", "10"], "--global-batch, --steps")])
def test_smoke_with_a_flag_it_sets_is_refused(tmp_path, capsys, extra, named) -> None:
    # was: the flag was dropped and the smoke search of tiny-gpt ran instead
    code, err = _cli(["autotune", "--smoke", "--out", str(tmp_path), *extra], capsys)
    assert code == 2 and f"--smoke sets {named} itself" in err, err
    assert not (tmp_path / "journal.jsonl").exists()


def test_save_never_replaces_a_folder_that_is_not_a_ztune_tag(tmp_path) -> None:
    from ztune.errors import UserError
    from ztune.runtime.state import tags

    (tmp_path / "global_step5").mkdir()
    (tmp_path / "global_step5" / "mp_rank_00_model_states.pt").write_bytes(b"deepspeed's")
    with pytest.raises(UserError, match="global_step5 exists and is not a ztune checkpoint"):
        tags.begin(tmp_path, "global_step5")
    assert (tmp_path / "global_step5" / "mp_rank_00_model_states.pt").read_bytes() == b"deepspeed's"
    (tmp_path / "global_step6").write_text("x")
    with pytest.raises(UserError, match="global_step6 is a file"):
        tags.begin(tmp_path, "global_step6")
    (tmp_path / "global_step7").mkdir()  # empty: nothing to lose
    assert tags.begin(tmp_path, "global_step7") == tmp_path / ".tmp-global_step7"
