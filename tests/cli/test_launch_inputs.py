"""`ztune launch` output paths refused before anything starts (one line, exit 2): --log-dir on a file was a
FileExistsError traceback once the hosts were being started; --run-root '' or '/' put each run's files in the
filesystem root of every host; --preflight-cache (below)."""

from pathlib import Path

import pytest

from ztune.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("extra", "says"), [
    (["--log-dir", "{file}", "--dry-run"], "is a file; give a folder"),
    (["--log-dir", "{file}"], "is a file; give a folder"),
    (["--log-dir", "{file}/sub"], "cannot be created (Not a directory)"),
    (["--run-root", "", "--dry-run"], "--run-root '': give a directory"),
    (["--run-root", "/", "--dry-run"], "--run-root '/': give a directory"),
    # --preflight-cache: a folder or a missing folder were tracebacks after the preflight; a file that is not
    # a cache (a hostfile given by mistake) was silently replaced.
    (["--preflight-cache", "{dir}"], "is a folder; give a file name"),
    (["--preflight-cache", "{dir}/nope/p.json"], "does not exist"),
    (["--preflight-cache", "{file}"], "is not a ztune preflight cache"),
    # a host name with a space was accepted as the rendezvous address of every host
    (["--master-addr", "a b", "--dry-run"], "--master-addr: 'a b' is not a host name"),
])
def test_bad_output_path_is_one_line_exit_2(extra, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    argv = ["launch", "--nproc-per-node", "1", *[a.format(file=afile, dir=tmp_path) for a in extra],
            "examples/train_tiny.py"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and err.count("\n") == 1 and says in err, err
    assert "preflight" not in out and afile.read_text() == "keep me\n"


@pytest.mark.parametrize(("nproc", "doc", "says"), [
    # the launcher knows the job's shape: what the ranks would refuse is refused before anything starts
    ("3", {"train_batch_size": 16}, "train_batch_size 16 is not divisible by gradient_accumulation_steps 1 x 3"),
    ("2", {"train_batch_size": 16, "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 3}},
     "zero_optimization.zero_hpz_partition_size=3 must divide the ranks per host (2)"),
    ("2", {"train_batch_size": 16}, None),
    ("2", {"train_batch_size": 16, "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}, None),
])
def test_config_is_checked_against_the_jobs_shape(nproc, doc, says, tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.chdir(REPO)
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(doc))
    argv = ["launch", "--nproc-per-node", nproc, "--config", str(config), "--dry-run", "examples/train_tiny.py"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    if says is None:
        assert exc.value.code == 0 and "ztune launch dry run" in out, err
        return
    assert exc.value.code == 2 and err.count("\n") == 1 and says in err and str(config) in err, err
