"""`ztune estimate` without typer (ztune/cli/estimate_run.py): the fast parser hands run_estimate exactly what
typer would, falls back to typer for anything else, and the composed table equals rich's Table rendering."""

from __future__ import annotations

import inspect
import io
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ztune.cli.estimate as estimate_cli
from ztune.cli import build_app, estimate_run
from ztune.cli.estimate_run import ESTIMATE_FLAGS, parse_fast, render_table

LLAMA = ["--model", "llama-2-70b", "--hardware", "dgx-h100", "--nodes", "4", "--seq", "4096", "--global-batch", "1024"]
KINDS = {bool: "flag", int: "int", str: "str", Path: "path"}


def _option_table() -> dict[str, tuple[str, str, object]]:
    """ESTIMATE_FLAGS as read from the typer command's signature."""
    hints = typing.get_type_hints(estimate_cli.estimate, include_extras=True)
    table = {}
    for name, param in inspect.signature(estimate_cli.estimate).parameters.items():
        base, option = typing.get_args(hints[name])[:2]
        (kind,) = {KINDS[t] for t in typing.get_args(base) or (base,) if t is not type(None)}
        (flag,) = option.param_decls or (option.default,)  # Annotated: the first argument is the name
        on, _, off = flag.partition("/")  # "--x/--no-x": a flag and its negation
        table[on] = (name, kind, param.default)
        if off:
            table[off] = (name, "off", param.default)
    return table


def test_flag_table_matches_the_typer_command():
    assert _option_table() == ESTIMATE_FLAGS
    assert set(inspect.signature(estimate_run.run_estimate).parameters) == {n for n, _, _ in ESTIMATE_FLAGS.values()}


@pytest.mark.parametrize("argv", [
    ["estimate", *LLAMA],
    ["estimate", "--params=7B", "--hardware", "cpu-local", "--json", "--compression", "--stage", "3"],
    ["estimate", *LLAMA, "--compression", "--zeropp"],
    ["estimate", *LLAMA, "--zeropp", "--no-zeropp"],
    ["estimate", *LLAMA, "--nodes", "2", "--reduce-fp32", "--loss", "chunked", "--loss-chunk", "1024",
     "--selective-policy", "op", "--trainable", "2%", "--init", "eager", "--check", "--config", "x.yaml",
     "--plot=m.png", "--precision", "fp32", "--micro-batch", "3"],
])
def test_fast_parse_equals_typer(argv, monkeypatch):
    seen = {}

    def capture(**kwargs):
        seen.update(kwargs)
        return 0

    monkeypatch.setattr(estimate_cli, "run_estimate", capture)
    result = CliRunner().invoke(build_app(("estimate",)), argv)
    assert result.exit_code == 0, result.output
    assert parse_fast(argv) == seen


@pytest.mark.parametrize("argv", [
    ["estimate", "--help"], ["estimate", *LLAMA, "--bogus"], ["estimate", "--nodes", "-1"], ["estimate", "--nodes"],
    ["estimate", "--nodes", "2x"], ["estimate", "--json=1"], ["estimate", "--model", "--json"], ["estimate", "x"],
    ["--version"], ["probe"],
])
def test_anything_else_goes_to_typer(argv):
    assert parse_fast(argv) is None


def test_composed_table_equals_rich_table():
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from ztune.config.schema import Compression
    from ztune.cost.estimate import Framework, sweep
    from ztune.profiles import load_hardware, load_model

    estimates = sweep(load_model("llama-2-7b"), load_hardware("dgx-a100-80g"), num_nodes=1, seq_len=2048,
                      global_batch=64, compression=tuple(Compression), framework=Framework(construction="eager"))
    assert any(e.init_peak_bytes is not None for e in estimates)
    cols, rows = estimate_run._table_rows(estimates, show_compression=True)
    e = estimates[0]
    title = (f"{e.model.name} on {e.num_nodes} x {e.hardware.name} ({e.world_size} GPUs, seq {e.config.seq_len}); "
             "memory in GiB per GPU, host GiB per node, comm GiB sent per GPU per step")
    reference = Table(title=title, header_style="bold", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in cols:
        reference.add_column(col, justify="left" if col in estimate_run.TEXT_COLUMNS else "right", no_wrap=True)
    for row in rows:
        reference.add_row(*row)

    def text(renderable, **kwargs) -> str:
        out = io.StringIO()
        Console(file=out, width=400, force_terminal=False).print(renderable, **kwargs)
        return out.getvalue()

    assert text(render_table(estimates, show_compression=True), soft_wrap=True) == text(reference)


def test_estimate_runs_without_typer_or_pydantic():
    code = (
        "import sys\n"
        "from ztune.cli import main\n"
        f"main(['estimate', *{LLAMA!r}])\n"
        "print(sorted(m for m in ('typer', 'pydantic', 'torch') if m in sys.modules), file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "recommended: #1 stage 3" in out.stdout
    assert out.stderr.strip().splitlines()[-1] == "[]"


def test_plain_lines_equal_rich_without_a_terminal(monkeypatch, capsys):
    from ztune.cost.estimate import sweep
    from ztune.profiles import load_hardware, load_model

    estimates = sweep(load_model("gpt2"), load_hardware("dgx-h100"), num_nodes=1, seq_len=1024, global_batch=64)
    lines = [estimate_run.table_segments(estimates, show_compression=False),
             [("recommended: #1 [not markup]", "bold"), (" - why", None)], [("assumptions: a; b", "dim")]]
    out = {}
    for plain in (True, False):
        monkeypatch.setattr(estimate_run, "_plain_stdout", lambda plain=plain: plain)
        estimate_run.print_lines(lines)
        out[plain] = capsys.readouterr().out
    assert out[True] == out[False]
    assert "recommended: #1 [not markup] - why\n" in out[True]
