"""Every usage error of every `ztune` command (unknown option, missing argument, bad choice, a number that is
not one) is one line on stderr naming what is wrong, with the --help hint, exit code 2, no traceback or box.

The class: typer/click usage errors, which typer prints as a multi-line rich box in standalone mode;
ztune.cli.main runs the app with standalone_mode=False and renders them itself (ztune.cli.usage_error_line).
"""

import pytest

from ztune.cli import _COMMANDS, main

# (argv, words the one line must contain)
CASES = [
    (["--nosuchflag"], ["No such option: --nosuchflag", "'ztune --help'"]),
    (["nosuchcommand"], ["No such command 'nosuchcommand'", "'ztune --help'"]),
    # unknown option, one per command that rejects unknown options (launch passes them to the script)
    *[([name, "--nosuchflag"], ["No such option: --nosuchflag", f"'ztune {name} --help'"])
      for name, _ in _COMMANDS if name != "launch"],
    # missing argument, with the choices folded onto the same line
    (["launch"], ["Missing argument 'script'", "'ztune launch --help'"]),
    (["checkpoint"], ["Missing argument 'action'", "inspect, consolidate", "'ztune checkpoint --help'"]),
    (["checkpoint", "inspect"], ["Missing argument 'directory'"]),
    # bad choice
    (["checkpoint", "nope", "somewhere"], ["'nope' is not one of 'inspect', 'consolidate'"]),
    # not a number: the option and the value given, in both spellings
    (["estimate", "--micro-batch", "abc"], ["'--micro-batch'", "'abc' is not an integer"]),
    (["estimate", "--hardware", "cpu-local", "--seq=1k"], ["'--seq'", "'1k' is not an integer"]),
    (["autotune", "--steps", "1.5"], ["'--steps'", "'1.5' is not an integer"]),
    # 0 is a value, not "not given" (it used to become the profile's GPUs per node)
    (["autotune", "--nproc", "0"], ["--nproc must be between 1 and", "got 0"]),
    (["launch", "--master-port", "http", "train.py"], ["'--master-port'", "'http' is not an integer"]),
    (["probe", "--inter-node-gbps", "fast"], ["'--inter-node-gbps'", "'fast' is not a number"]),
    (["estimate", "--seq", "1\x1b[2J\n2"], ["'--seq'", "\\x1b[2J"]),  # control characters escaped
    (["checkpoint", "inspect", "d", "--json", "--verify", "--tag"], ["--tag", "requires an argument"]),
    # launch passes unknown options on (they belong to the script when they follow it); before the script
    # one is named as an unknown option, not as a missing script file '--nosuchflag'.
    (["launch", "--nosuchflag=1", "train.py"], ["no such option '--nosuchflag' for ztune launch",
                                                 "'ztune launch --help'"]),
]


@pytest.mark.parametrize(("argv", "words"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_usage_error_is_one_line_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err and "╭" not in err + out, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert out == ""


def test_every_command_is_covered():
    covered = {argv[0] for argv, _ in CASES}
    assert {name for name, _ in _COMMANDS} <= covered


def test_help_and_no_arguments_unchanged(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["checkpoint", "--help"])
    assert exc.value.code == 0 and "Usage" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and "Usage" in out and err == ""


def test_command_exit_codes_pass_through(monkeypatch, capsys):
    import typer

    import ztune.cli as cli

    toy = typer.Typer()

    @toy.command()
    def fail(code: int = 3) -> None:
        raise typer.Exit(code)

    @toy.command()
    def done() -> None:
        pass

    monkeypatch.setattr(cli, "build_app", lambda names=None: toy)
    with pytest.raises(SystemExit) as exc:
        main(["fail"])
    assert exc.value.code == 3
    with pytest.raises(SystemExit) as exc:
        main(["done"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        main(["fail", "--code", "x"])
    assert exc.value.code == 2 and "(got 'x')" in capsys.readouterr().err
