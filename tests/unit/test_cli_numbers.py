"""Every int or float option of every command takes ASCII numbers only (ztune/cli/__init__.py
ascii_number_options). The class: typer converts through pydantic, which reads `--nproc-per-node 1_0` as 10 and
accepts ' 5' (and, for some flags, other scripts' digits); a number a user did not mean to write runs a job."""

from __future__ import annotations

import functools
import importlib
import inspect
import types
import typing

import pytest

from ztune.cli import _COMMANDS, build_app, main


def _number_options() -> list[tuple[str, str, type]]:
    """(command, flag, int or float) for every number option, read from the command functions' signatures."""
    found = []
    for name, module in _COMMANDS:
        fn = getattr(importlib.import_module(f"ztune.cli.{module}"), name)
        for param, hint in typing.get_type_hints(fn, include_extras=True).items():
            if typing.get_origin(hint) is not typing.Annotated:
                continue
            base, *extras = typing.get_args(hint)
            kinds = set(typing.get_args(base)) - {type(None)} if isinstance(base, types.UnionType) else {base}
            info = next((x for x in extras if type(x).__name__ == "OptionInfo"), None)
            if info is None or len(kinds) != 1 or not kinds <= {int, float}:
                continue
            decls = [d for d in (info.param_decls or ()) if d.startswith("--")]
            found.append((name, decls[0] if decls else "--" + param.replace("_", "-"), kinds.pop()))
    return found


OPTIONS = _number_options()


def test_the_scan_sees_the_options():
    flags = {(c, f) for c, f, _ in OPTIONS}
    assert {("launch", "--nproc-per-node"), ("launch", "--grace"), ("estimate", "--micro-batch"),
            ("autotune", "--time-budget"), ("probe", "--inter-node-gbps")} <= flags
    assert len(OPTIONS) >= 30


@pytest.fixture
def bodies_not_run(monkeypatch):
    """The command functions with bodies that only raise: a value the conversion let through (before the fix:
    `probe --ranks ' 5'`) fails the test at once instead of running a probe or a launch."""
    for name, module in _COMMANDS:
        mod = importlib.import_module(f"ztune.cli.{module}")
        original = getattr(mod, name)

        @functools.wraps(original)
        def reached(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name}'s body ran with {kwargs}")

        # typer reads the signature (through __wrapped__, re-evaluating the strings): the original's, with the
        # evaluated annotations that build_app's parsers are attached to
        hints = typing.get_type_hints(original, include_extras=True)
        sig = inspect.signature(original)
        reached.__signature__ = sig.replace(parameters=[p.replace(annotation=hints[p.name])
                                                        for p in sig.parameters.values()])
        reached.__annotations__ = hints
        del reached.__wrapped__
        monkeypatch.setattr(mod, name, reached)


@pytest.mark.parametrize(("command", "flag", "kind"), OPTIONS, ids=[f"{c} {f}" for c, f, _ in OPTIONS])
@pytest.mark.parametrize("bad", ["1_0", "\uff12", " 5", "5 "])
def test_number_option_refuses_what_is_not_ascii(command, flag, kind, bad, capsys, bodies_not_run):
    with pytest.raises(SystemExit) as exc:
        main([command, flag, bad])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert f"'{flag}'" in err and ("not an integer" if kind is int else "not a number") in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_number_option_still_parses_plain_numbers():
    """The parser build_app attaches to each option converts plain numbers as before (the options' own range
    checks follow in the commands)."""
    build_app()
    parsers = 0
    for name, module in _COMMANDS:
        fn = getattr(importlib.import_module(f"ztune.cli.{module}"), name)
        for hint in fn.__annotations__.values():
            for info in typing.get_args(hint)[1:] if typing.get_origin(hint) is typing.Annotated else ():
                parser = getattr(info, "parser", None)
                if parser is None:
                    continue
                parsers += 1
                assert parser("2") == 2 and parser("-3") == -3 and parser("+4") == 4
                assert parser(7) == 7  # a default from the signature
                if isinstance(parser("2"), float):
                    assert parser("2.5") == 2.5 and parser("1e-3") == 0.001
    assert parsers == len(OPTIONS)
