"""A path that exists but is the wrong kind (a file where a folder is wanted, or a folder where a file is) is
named as what it is, with what to pass instead: never reported as missing, never a traceback, and nothing
already written is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import run_cli
from ztune.launch import LaunchRequest, plan_launch
from ztune.launch.command import LaunchError
from ztune.runtime.state import offline, tags
from ztune.runtime.state.files import CheckpointError
from ztune.runtime.state.reader import TagReader, resolve


def _fake_save_dir(root: Path) -> Path:
    """A save directory as the loaders see it from outside: `latest` and one tag folder with rank 0's metadata."""
    save = root / "ckpt"
    (save / "global_step1").mkdir(parents=True)
    (save / "global_step1" / tags.rank_meta_name(0)).write_text("{}")
    (save / tags.LATEST).write_text("global_step1\n")
    return save


@pytest.mark.parametrize("action", [["inspect"], ["consolidate", "--out", "weights"]])
def test_checkpoint_cli_names_a_file_as_a_file(tmp_path, monkeypatch, capsys, action) -> None:
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("not a checkpoint\n")
    code, out = run_cli(["checkpoint", action[0], "notes.txt", *action[1:]], capsys)
    assert code == 2, out
    assert out.count("\n") == 1 and "Traceback" not in out, out
    assert "notes.txt is a file, not a checkpoint directory" in out and "does not exist" not in out, out
    assert "'latest'" in out  # says what to pass
    assert Path("notes.txt").read_text() == "not a checkpoint\n"
    assert not Path("weights").exists()


def test_consolidate_of_a_missing_folder_says_missing(tmp_path) -> None:
    # was: "... has no 'latest' file; pass --tag", as if the folder existed
    with pytest.raises(CheckpointError, match="does not exist"):
        offline.consolidate(tmp_path / "nope", out_dir=tmp_path / "out")


@pytest.mark.parametrize("inside", [tags.LATEST, f"global_step1/{tags.rank_meta_name(0)}"])
def test_a_file_of_a_checkpoint_points_at_its_save_dir(tmp_path, inside) -> None:
    save = _fake_save_dir(tmp_path)
    with pytest.raises(CheckpointError, match=f"is a file, not a checkpoint directory.*{save} looks like one"):
        offline.inspect(save / inside)


def test_engine_load_of_a_file_is_named(tmp_path) -> None:
    # load_checkpoint resolves through `resolve`: was "cannot be read (NotADirectoryError); pass a tag explicitly"
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 8)
    for tag in (None, "global_step1"):
        with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
            resolve(f, tag)
    assert resolve(tmp_path / "missing", None) is None  # nothing saved yet: a fresh start, as before


def test_tag_reader_names_a_file_as_a_file(tmp_path) -> None:
    f = tmp_path / "global_step1"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a tag folder"):
        TagReader(f)


def test_save_into_a_file_is_refused_and_the_file_kept(tmp_path) -> None:
    f = tmp_path / "ckpt"
    f.write_text("keep me")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        tags.begin(f, "global_step1")
    assert f.read_text() == "keep me"


def test_launch_workdir_file_and_script_folder_are_named(tmp_path) -> None:
    (tmp_path / "train.py").write_text("print(1)\n")
    (tmp_path / "pkg").mkdir()
    with pytest.raises(LaunchError, match="is a file, not a folder"):
        plan_launch(LaunchRequest(script="train.py", workdir=str(tmp_path / "train.py")), environ={})
    with pytest.raises(LaunchError, match="is a folder .* not a file"):
        plan_launch(LaunchRequest(script="pkg", workdir=str(tmp_path)), environ={})


def test_autotune_script_folder_is_named(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    Path("pkg").mkdir()
    code, out = run_cli(["autotune", "--script", "pkg", "--out", "run"], capsys)
    assert code == 2 and out.count("\n") == 1, out
    assert "is a folder, not a file" in out and "does not exist" not in out, out
