"""`ztune estimate`'s batch-size errors name each size as the user gave it: --micro-batch / --global-batch where a
flag set it, the config's key as written (ztune YAML or DeepSpeed) where the config did, never ztune's internal
batch.micro for a flag."""

import json

import pytest

from ztune.cli.estimate_run import ESTIMATE_FLAGS, run_estimate
from ztune.errors import UserError

# dgx-h100: 8 GPUs per node, so one node is 8 ranks.
DS = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 2}
YAML = "batch:\n  micro: 2\n  global: 64\n"


def _estimate(**flags):
    kwargs = {name: default for name, _, default in ESTIMATE_FLAGS.values()}
    kwargs.update({"hardware": "dgx-h100", "params": "7B", "json_out": True, **flags})
    return run_estimate(**kwargs)


def _config(tmp_path, name):
    path = tmp_path / name
    path.write_text(json.dumps(DS) if name.endswith(".json") else YAML)
    return path


@pytest.mark.parametrize("config, flags, names, not_named", [
    # the sweep (no config): both sizes are flags
    (None, {"micro_batch": 3, "global_batch": 64}, ["--global-batch 64", "--micro-batch 3"], "batch."),
    (None, {"global_batch": 12}, ["--global-batch 12", "8 GPUs"], "batch."),
    (None, {"global_batch": 4}, ["--global-batch 4"], "batch."),
    # a flag against the config's other size: each named as the user wrote it
    ("ds.json", {"micro_batch": 3}, ["train_batch_size 64", "--micro-batch 3"], "batch.micro"),
    ("ds.json", {"global_batch": 12}, ["--global-batch 12", "train_micro_batch_size_per_gpu 2"], "batch.global"),
    ("c.yaml", {"micro_batch": 3}, ["batch.global 64", "--micro-batch 3"], "batch.micro"),
    ("c.yaml", {"global_batch": 7}, ["--global-batch 7", "batch.micro 2"], "batch.global"),
])
def test_batch_errors_name_the_flag_the_user_typed(tmp_path, config, flags, names, not_named):
    path = _config(tmp_path, config) if config else None
    with pytest.raises(UserError) as info:
        _estimate(config=path, **flags)
    text = str(info.value)
    assert "\n" not in text
    for name in names:
        assert name in text, text
    assert not_named not in text, text


def test_batch_flags_that_fit_still_estimate(tmp_path, capsys):
    assert _estimate(micro_batch=2, global_batch=64) == 0
    assert _estimate(config=_config(tmp_path, "ds.json"), micro_batch=4) == 0
    assert '"rows"' in capsys.readouterr().out


@pytest.mark.parametrize("name, text, key", [
    ("ds.json", json.dumps({**DS, "gradient_accumulation_steps": 4}), "gradient_accumulation_steps 4"),
    ("c.yaml", "batch:\n  micro: 2\n  grad_accum: 4\n  global: 64\n", "batch.grad_accum 4"),
])
def test_a_batch_flag_that_rederives_the_configs_accumulation_says_so(tmp_path, capsys, name, text, key):
    """--micro-batch with a config that sets the gradient accumulation derives it again (global 64 = micro 4 x 2 x
    8 GPUs): the output names the config's value it replaced, in text and JSON; when it stays, nothing."""
    path = tmp_path / name
    path.write_text(text)
    assert _estimate(config=path, micro_batch=4) == 0
    note = json.loads(capsys.readouterr().out)["batch_note"]
    assert note.startswith(f"batch: {key} in {path} is derived again from the flags: 2 "), note
    assert _estimate(config=path, micro_batch=4, json_out=False) == 0
    assert f"{key} in {path} is derived again" in capsys.readouterr().out
    assert _estimate(config=path, micro_batch=2) == 0  # 64 = 2 x 4 x 8: the config's own accumulation stands
    assert "batch_note" not in json.loads(capsys.readouterr().out)
