"""`ztune autotune` inputs that are one line and exit 2. List flags given as an empty string are an error, not a
silent default: --stages '' meant stage 0 only, --micro '' every micro-batch, --vary '' the default knobs (and
then minutes of trials). A hand-edited journal is named with its line and field (ztune/tune/records.py)."""

import pytest

from ztune.cli import main


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--stages", "", "--stages: empty"),
    ("--stages", " , ", "--stages: empty"),
    ("--micro", "", "--micro: empty"),
    ("--vary", "", "--vary: unknown knob ''"),
])
def test_empty_list_flag_is_one_line_exit_2(flag, value, says, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["autotune", "--hardware", "dgx-h100", "--nproc", "2", flag, value, "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and says in err, err
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("pgid", ['"abc"', "1.5", "true", '"１２"'])
def test_a_hand_edited_journal_is_one_line_exit_2_and_left_whole(pgid, tmp_path, capsys):
    """Resuming a journal whose start record's pgid was "abc" was a traceback (int() in the stale-trial
    cleanup); 1.5, true and "１２" were taken for process groups 1, 1 and 12."""
    out = tmp_path / "out"
    argv = ["autotune", "--hardware", "dgx-h100", "--nproc", "2", "--max-trials", "0", "--no-plot", "--out", str(out)]
    with pytest.raises(SystemExit):
        main(argv)  # a run with no trials: a journal holding this run's header
    capsys.readouterr()
    journal = out / "journal.jsonl"
    with open(journal, "a", encoding="utf-8") as fh:
        fh.write(f'{{"kind": "start", "key": "z0-bf16-mb1", "index": 1, "pgid": {pgid}, "report": "r", '
                 '"marker": "r"}\n')
    before = journal.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert f"{str(journal)!r} line 2: pgid " in err and "--fresh" in err, err
    assert journal.read_bytes() == before
