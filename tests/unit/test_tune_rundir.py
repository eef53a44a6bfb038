"""An earlier autotune run's results are never overwritten or deleted (ztune/tune/rundir.py).

The class: a command whose output folder already holds another run's results. `autotune --smoke --out DIR`
deleted DIR/trials and replaced its journal; `--fresh` kept the journal but overwrote trials/ and best.yaml;
results without a journal were overwritten trial by trial. (probe --output needs --force, checkpoint
consolidate refuses earlier weights, estimate --plot writes only a .png, launch --log-dir appends.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ztune.cli import main
from ztune.tune import rundir


def _real_run(out: Path, *, smoke: bool = False, trials: int = 2) -> dict[str, bytes]:
    """A folder as a finished tuning run leaves it; returns its files' bytes by relative path."""
    (out / "trials").mkdir(parents=True)
    space = {"model": "tiny-gpt", "workload": {"script": "built-in", **({rundir.SMOKE_MARK: True} if smoke else {})}}
    lines = [{"kind": "header", "version": 1, "fingerprint": "f" * 16, "space": space}]
    lines += [{"kind": "trial", "key": f"s{i}", "status": "ok"} for i in range(trials)]
    (out / "journal.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
    for i in range(trials):
        (out / "trials" / f"s{i}.log").write_text(f"trial {i} log\n")
    (out / "best.yaml").write_text("zero: {stage: 2}\n")
    return {k: v for k, v in _snapshot(out).items() if not k.startswith(rundir.PREVIOUS + "/")}


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code or 0, capsys.readouterr().err


def test_smoke_refuses_a_real_runs_folder_and_leaves_it_whole(tmp_path, capsys):
    before = _real_run(tmp_path / "run")
    code, err = _cli(["autotune", "--smoke", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert str(tmp_path / "run") in err and "journal with 2 trial(s)" in err and "new or empty folder" in err
    assert _snapshot(tmp_path / "run") == before


def test_smoke_refuses_results_without_a_journal(tmp_path):
    out = tmp_path / "run"
    _real_run(out)
    (out / "journal.jsonl").unlink()
    with pytest.raises(rundir.UserError, match="autotune results: trials, best.yaml"):
        rundir.check_out(out, smoke=True, fresh=False)


@pytest.mark.parametrize("state", ["missing", "empty", "unrelated files", "smoke run"])
def test_smoke_takes_new_empty_unrelated_or_smoke_folders(tmp_path, state):
    out = tmp_path / "out"
    if state != "missing":
        out.mkdir()
    if state == "unrelated files":
        (out / "notes.txt").write_text("mine")
    if state == "smoke run":
        _real_run(out, smoke=True)
    rundir.check_out(out, smoke=True, fresh=False)
    assert rundir.is_smoke_run(out)


def test_smoke_journals_from_before_the_mark(tmp_path, monkeypatch):
    """Taken as smoke runs: the same search as this smoke run (e.g. `make demo` rerun), or any journal in the
    default smoke folder; not another search elsewhere."""
    monkeypatch.chdir(tmp_path)
    _real_run(rundir.DEFAULT_SMOKE_OUT)
    rundir.check_out(rundir.DEFAULT_SMOKE_OUT, smoke=True, fresh=False)
    _real_run(tmp_path / "elsewhere")
    assert not rundir.is_smoke_run(tmp_path / "elsewhere")
    same = {"model": "tiny-gpt", "workload": {"script": "built-in", rundir.SMOKE_MARK: True}}
    assert rundir.is_smoke_run(tmp_path / "elsewhere", describe=same)
    other = {"model": "tiny-llama", "workload": {"script": "built-in", rundir.SMOKE_MARK: True}}
    assert not rundir.is_smoke_run(tmp_path / "elsewhere", describe=other)


def test_results_without_a_journal_need_fresh(tmp_path, capsys):
    out = tmp_path / "run"
    before = _real_run(out)
    (out / "journal.jsonl").unlink()
    del before["journal.jsonl"]
    code, err = _cli(["autotune", "--hardware", "dgx-h100", "--nproc", "2", "--out", str(out)], capsys)
    assert code == 2 and "no journal.jsonl to resume from; pass --fresh" in err, err
    assert _snapshot(out) == before
    rundir.check_out(out, smoke=False, fresh=True)  # allowed: --fresh keeps them aside
    rundir.check_out(tmp_path / "run2", smoke=False, fresh=False)  # a new folder


def test_fresh_keeps_the_previous_run_whole(tmp_path, capsys):
    """`--fresh` through the CLI (no trial: --max-trials 0, a GPU profile so that no CPU timing runs): the
    previous journal, trials and best.yaml end up byte for byte in previous/<stamp>/."""
    out = tmp_path / "run"
    before = _real_run(out)
    code, err = _cli(["autotune", "--fresh", "--hardware", "dgx-h100", "--nproc", "2", "--max-trials", "0",
                      "--no-plot", "--out", str(out)], capsys)
    assert code == 1, err  # nothing trained (no trials allowed)
    [kept] = (out / "previous").iterdir()
    assert f"was kept in {kept}" in err
    assert _snapshot(kept) == before
    header = json.loads((out / "journal.jsonl").read_text().splitlines()[0])
    assert header["kind"] == "header" and rundir.SMOKE_MARK not in header["space"]


def test_keep_previous_run_never_overwrites_an_earlier_keep(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = _real_run(out)
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260101-000000")
    kept1 = rundir.keep_previous_run(out)
    second = _real_run(out, trials=1)
    kept2 = rundir.keep_previous_run(out)
    assert kept1 != kept2 and kept2.name == "20260101-000000-2"
    assert _snapshot(kept1) == first and _snapshot(kept2) == second
    assert rundir.keep_previous_run(out) is None and rundir.run_files(out) == []
