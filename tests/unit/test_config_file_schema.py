"""Which schema a config is read with, and config files with no settings.

A config is DeepSpeed's when it has any top-level key only DeepSpeed configs have (not only a batch key); a
.json file whose keys all belong to both schemas is DeepSpeed's too; a config mixing both schemas is one line
naming a key of each. An empty or null file, or one that is not a mapping, is one line (exit 2 in the CLI)."""

import json

import pytest

from ztune.cli import main
from ztune.config import load, load_detailed
from ztune.config.deepspeed import DEEPSPEED_MARKERS, is_deepspeed
from ztune.errors import ConfigError


@pytest.mark.parametrize("key", sorted(DEEPSPEED_MARKERS))
def test_any_deepspeed_only_key_marks_a_deepspeed_config(key):
    assert is_deepspeed({key: None})


def test_shared_keys_are_deepspeeds_in_a_json_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "gradient_clipping": 1.0,
                                "train_micro_batch_size_per_gpu": 2}))
    assert load_detailed(path).deepspeed
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
    with pytest.raises(ConfigError, match="set train_batch_size or train_micro_batch_size_per_gpu"):
        load(path)  # DeepSpeed's batch-size error, not ztune's "unknown key 'optimizer.params'"
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("optimizer:\n  lr: 0.0001\n")
    assert load(yaml_path).optimizer.lr == 1e-4


@pytest.mark.parametrize("doc", [
    {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 2},
    {"steps_per_print": 10, "train_micro_batch_size_per_gpu": 2},
    {"activation_checkpointing": {}, "wall_clock_breakdown": False, "train_batch_size": 16},
])
def test_deepspeed_json_without_a_marker_of_old_is_read_as_deepspeed(tmp_path, doc):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(doc))
    assert load_detailed(path).deepspeed


def test_deepspeed_keys_without_batch_keys_get_deepspeeds_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "wall_clock_breakdown": True}))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "unknown key" not in str(info.value) and "train_batch_size" in str(info.value)
    with pytest.raises(ConfigError, match="set train_batch_size"):
        load({"steps_per_print": 10})


@pytest.mark.parametrize("doc, theirs, ours", [
    ({"zero_optimization": {"stage": 2}, "batch": {"micro": 2}}, "zero_optimization", "batch"),
    ({"train_batch_size": 8, "precision": "bf16"}, "train_batch_size", "precision"),
    ({"zero": {"stage": 1}, "steps_per_print": 5}, "steps_per_print", "zero"),
])
def test_a_config_mixing_both_schemas_is_one_line(doc, theirs, ours):
    with pytest.raises(ConfigError) as info:
        load(doc)
    text = str(info.value)
    assert "mixes DeepSpeed keys" in text and theirs in text and ours in text and "\n" not in text, text


@pytest.mark.parametrize("name, text", [
    ("c.yaml", ""), ("c.yaml", "\n  \n"), ("c.yaml", "# only a comment\n"), ("c.yaml", "null\n"),
    ("c.yaml", "---\n"), ("c.yaml", "~\n"), ("ds.json", ""), ("ds.json", " \n"), ("ds.json", "null"),
])
def test_a_file_with_no_settings_is_one_line(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match="holds no settings"):
        load(path)


@pytest.mark.parametrize("name, text, what", [
    ("ds.json", "[1, 2]", "a list"), ("c.yaml", "3\n", "a number"), ("ds.json", '"x"', "a string"),
    ("c.yaml", "- zero\n", "a list"), ("c.yaml", "true\n", "a boolean"),
])
def test_a_file_that_is_not_a_mapping_is_one_line(tmp_path, name, text, what):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"expected a mapping of config keys at the top level, got {what};"):
        load(path)


def test_the_cli_exits_2_with_one_line(tmp_path, capfd):
    path = tmp_path / "empty.yaml"
    path.write_text("null\n")
    with pytest.raises(SystemExit) as info:
        main(["estimate", "--hardware", "dgx-h100", "--params", "7B", "--config", str(path)])
    err = capfd.readouterr().err
    assert info.value.code == 2 and "holds no settings" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
