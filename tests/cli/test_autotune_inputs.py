"""`ztune autotune` list flags given as an empty string are an error (exit 2), not a silent default: --stages ''
meant stage 0 only, --micro '' every micro-batch, --vary '' the default knobs (and then minutes of trials)."""

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
