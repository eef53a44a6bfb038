"""The `ztune` command: this file only assembles the per-command modules and maps errors to exit codes.

Exit codes: 0 success; 1 the job itself failed or a check said no (e.g. `estimate --check`); 2 bad input
(config, profile, hostfile, flags), always as one line on stderr without a traceback.

typer is imported only when an app is built: `ztune estimate` with plain flags runs without it
(estimate_run.parse_fast), since typer's parameter coercion (pydantic adapters) costs more than the estimate.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING

from ztune.errors import UserError

if TYPE_CHECKING:
    import typer

# (command name, module under ztune.cli). A module that does not exist yet is not shown.
_COMMANDS = (
    ("estimate", "estimate"),
    ("probe", "probe"),
    ("autotune", "autotune"),
    ("launch", "launch"),
    ("checkpoint", "checkpoint"),
)


def _root_callback():
    """The root callback (--version), defined once typer is imported."""
    import typer

    from ztune import __version__

    def _version(value: bool) -> None:
        if value:
            typer.echo(f"ztune {__version__}")
            raise typer.Exit()

    def _root(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                     help="Print the version."),
    ) -> None:
        """ztune: will it fit, what is fastest here, run it."""

    return _root


def build_app(names: tuple[str, ...] | None = None) -> typer.Typer:
    """The `ztune` app with the commands in `names` (all built ones when None). Each command's module is
    imported here, so an app holding one command costs only that command's imports."""
    import typer

    built = typer.Typer(
        name="ztune",
        help="Estimate, autotune and launch sharded data-parallel training (ZeRO 0-3, offload, compression).",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    built.callback()(_root_callback())
    for name, module in _COMMANDS:
        if names is not None and name not in names:
            continue
        if importlib.util.find_spec(f"ztune.cli.{module}") is not None:
            mod = importlib.import_module(f"ztune.cli.{module}")
            built.command(name, **getattr(mod, "COMMAND_SETTINGS", {}))(getattr(mod, name))
    return built


def _command_named(argv: list[str]) -> str | None:
    """The command `argv` runs, if it names one before any other word (root options come first)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if any(arg == name for name, _ in _COMMANDS) else None
    return None


def __getattr__(name: str):
    # `from ztune.cli import app` (tests, benchmarks) gets every command; `main` builds only the one it runs.
    if name == "app":
        return build_app()
    raise AttributeError(f"module 'ztune.cli' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. Usage errors (unknown command or flag) are typer's: a short message and exit 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    command = _command_named(args)
    try:
        if command == "estimate" and _run_estimate_fast(args):
            return
        build_app((command,) if command else None)(args=args, prog_name="ztune")
    except UserError as exc:
        from ztune.console import error

        error(str(exc))
        sys.exit(2)


def _run_estimate_fast(args: list[str]) -> bool:
    """Run `ztune estimate` without typer when estimate_run.parse_fast understands `args`; False otherwise
    (typer then parses them). Exits 1 where the command says so (--check on a config that does not fit)."""
    from ztune.cli.estimate_run import parse_fast, run_estimate

    kwargs = parse_fast(args)
    if kwargs is None:
        return False
    code = run_estimate(**kwargs)
    if code:
        sys.exit(code)
    return True
