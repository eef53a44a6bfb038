"""The `ztune` CLI called in-process, as a test sees it: its exit code and what it printed."""

from __future__ import annotations

from ztune.cli import main as cli_main


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `ztune argv` (cli.main exits with SystemExit; 0 when it returns)."""
    try:
        cli_main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out + cap.err
