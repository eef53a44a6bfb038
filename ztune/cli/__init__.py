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
            command = getattr(mod, name)
            ascii_number_options(command)
            built.command(name, **getattr(mod, "COMMAND_SETTINGS", {}))(command)
    return built


def _number_parser(kind: type):
    """A typer `parser` for an int or float option: ASCII forms only (ztune.inputs.ascii_signed_int / ascii_number).
    typer's own conversion (pydantic's int and float) also takes '1_0' as 10, other scripts' digits ('\uff12')
    and surrounding spaces."""
    import typer

    from ztune.inputs import ascii_number, ascii_signed_int, shown

    def parse(value):
        if not isinstance(value, str):  # a default from the signature
            return value
        number = ascii_signed_int(value) if kind is int else ascii_number(value)
        if number is None and kind is int:
            raise typer.BadParameter(f"{shown(value)} is not an integer (ASCII digits 0-9)")
        if number is None:
            raise typer.BadParameter(f"{shown(value)} is not a number (ASCII digits, as in 2.5 or 1e-3)")
        return number

    return parse


def ascii_number_options(command) -> None:
    """Give every int or float option of `command` (a command function: Annotated[int | None, typer.Option(...)]
    parameters) the ASCII-only parser, unless it has a parser of its own. One place for the whole CLI, so that an
    option added later is covered too (tests/unit/test_cli_numbers.py tries every one)."""
    import types
    import typing

    # The modules use `from __future__ import annotations`: each get_type_hints call evaluates the strings again,
    # making new OptionInfo objects, so the evaluated ones, with their parsers, replace the strings.
    hints = typing.get_type_hints(command, include_extras=True)
    command.__annotations__ = hints
    for annotation in hints.values():
        if typing.get_origin(annotation) is not typing.Annotated:
            continue
        base, *extras = typing.get_args(annotation)
        kinds = set(typing.get_args(base)) - {type(None)} if isinstance(base, types.UnionType) else {base}
        if len(kinds) != 1 or not kinds <= {int, float}:
            continue
        for info in extras:
            if type(info).__name__ in ("OptionInfo", "ArgumentInfo") and getattr(info, "parser", None) is None:
                info.parser = _number_parser(kinds.pop())
                break

# Commands whose ranks read the ZTUNE_* variables (ztune/envvars.py) of this environment.
_STARTS_RANKS = ("probe", "autotune", "launch")


def _asks_for_help(args: list[str]) -> bool:
    return "--help" in args[:args.index("--")] if "--" in args else "--help" in args


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
    """Run the CLI. Every usage error (unknown command or option, missing argument, bad choice, a value that
    is not a number) and every `UserError` is one line on stderr and exit 2; `typer.Exit(n)` exits n."""
    args = sys.argv[1:] if argv is None else list(argv)
    command = _command_named(args)
    try:
        if command == "estimate" and _run_estimate_fast(args):
            return
        if command in _STARTS_RANKS and not _asks_for_help(args):
            from ztune.envvars import check_environment

            check_environment()  # a bad ZTUNE_* value: one line here, not a failure in every rank
        app = build_app((command,) if command else None)
        # standalone_mode=False (click's documented switch, passed through by typer): usage errors come back
        # as exceptions instead of typer's multi-line rich box, and typer.Exit(n) as the return value n.
        code = _run_app(app, args)
    except UserError as exc:
        from ztune.console import error

        error(str(exc))
        sys.exit(2)
    # As typer's standalone mode: SystemExit on success too (in-process callers and tests rely on it).
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)


def _run_app(app: typer.Typer, args: list[str]) -> object:
    """Call `app` on `args`; a usage error becomes `UsageError`'s one line (exit 2), Ctrl-D/abort exit 1."""
    import typer

    # click's ClickException, found through typer's public BadParameter: recent typer vendors click as
    # typer._click, older versions use click itself; both keep BadParameter -> UsageError -> ClickException.
    click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        return app(args=args, prog_name="ztune", standalone_mode=False)
    except typer.Abort:
        from ztune.console import error

        error("aborted")
        sys.exit(1)
    except click_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `ztune` alone: the help, as typer shows it, exit 2
            text = exc.format_message() if hasattr(exc, "format_message") else ""
            if text.strip():  # click itself carries the help in the message; typer 0.29 printed it already
                sys.stdout.write(text.rstrip("\n") + "\n")
            sys.exit(2)
        line = usage_error_line(exc, args)
        if line:
            from ztune.console import error

            error(line)
        sys.exit(getattr(exc, "exit_code", 2) or 2)


def usage_error_line(exc: Exception, args: list[str]) -> str:
    """One line for a click/typer usage error: its message with whitespace folded (a choice list arrives one
    choice per line), the value the user gave when the error is about one option's value, and the help hint.
    Empty when the message is empty (the help text was printed instead)."""
    message = " ".join(str(exc.format_message() if hasattr(exc, "format_message") else exc).split())
    # typer's value coercion prefixes a validator's own message with "Value error, ": noise to the user.
    message = message.replace(": Value error, ", ": ").rstrip(".")
    if not message:
        return ""
    given = _value_given(getattr(exc, "param", None), args)
    if given is not None and repr(given) not in message:
        message += f" (got {given!r})"
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or "ztune"
    return str(UserError(f"{message}; try '{path} --help'"))  # control characters from argv escaped


def _value_given(param: object, args: list[str]) -> str | None:
    """What `args` passed to the option `param` (its last occurrence), or None (an argument, or not given)."""
    opts = [o for o in (getattr(param, "opts", None) or ()) if o.startswith("-")]
    if not opts or getattr(param, "is_flag", False):
        return None
    given = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        for opt in opts:
            if arg == opt and i + 1 < len(args):
                given = args[i + 1]
            elif opt.startswith("--") and arg.startswith(opt + "="):
                given = arg[len(opt) + 1:]
    return given


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
