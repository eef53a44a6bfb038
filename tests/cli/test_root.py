"""The `ztune` entry point: help lists exactly the built commands; bad flags are one line and exit 2."""

import importlib.util
import subprocess
import sys

from tests.helpers.load import scaled_limit_s
from ztune.cli import _COMMANDS


def run(*args):
    return subprocess.run([sys.executable, "-m", "ztune", *args], capture_output=True, text=True,
                          timeout=scaled_limit_s(60))


def test_help_lists_every_built_command_and_nothing_else():
    out = run("--help")
    assert out.returncode == 0
    for name, module in _COMMANDS:
        built = importlib.util.find_spec(f"ztune.cli.{module}") is not None
        listed = any(line.strip("│ ").startswith(name + " ") for line in out.stdout.splitlines())
        assert listed == built, name


def test_no_arguments_shows_help():
    out = run()
    # typer/click convention: help on stdout, exit 2 (no command given).
    assert out.returncode == 2 and "Usage" in out.stdout and "Traceback" not in out.stderr


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("ztune ")


def test_unknown_command_and_flag_exit_2_without_traceback():
    for args in (["nosuchcommand"], ["--nosuchflag"]):
        out = run(*args)
        assert out.returncode == 2, out
        assert "Traceback" not in out.stderr + out.stdout
        assert ("No such command" in out.stderr) or ("No such option" in out.stderr)
