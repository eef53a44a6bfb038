"""The `ztune` command: this file only assembles the per-command modules and maps errors to exit codes.

Exit codes: 0 success; 1 the job itself failed or a check said no (e.g. `estimate --check`); 2 bad input
(config, profile, hostfile, flags), always as one line on stderr without a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import typer

from ztune import __version__
from ztune.console import error
from ztune.errors import UserError

app = typer.Typer(
    name="ztune",
    help="Estimate, autotune and launch sharded data-parallel training (ZeRO 0-3, offload, compression).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (command name, module under ztune.cli). A module that does not exist yet is not shown.
_COMMANDS = (
    ("estimate", "estimate"),
    ("probe", "probe"),
    ("autotune", "autotune"),
    ("launch", "launch"),
    ("checkpoint", "checkpoint"),
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ztune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """ztune: will it fit, what is fastest here, run it."""


for _name, _module in _COMMANDS:
    if importlib.util.find_spec(f"ztune.cli.{_module}") is not None:
        _mod = importlib.import_module(f"ztune.cli.{_module}")
        app.command(_name, **getattr(_mod, "COMMAND_SETTINGS", {}))(getattr(_mod, _name))


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. Usage errors (unknown command or flag) are typer's: a short message and exit 2."""
    try:
        app(args=argv, prog_name="ztune")
    except UserError as exc:
        error(str(exc))
        sys.exit(2)
