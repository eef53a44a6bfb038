"""The one rich Console, the error line, and a table helper that also speaks JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def error(message: str) -> None:
    """One line on stderr, no traceback. The message is text, never markup (it may quote `[fd00::1]:0`)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", markup=True, soft_wrap=True)


def emit_json(payload: Any) -> None:
    """Machine-readable output on stdout (plain print: no rich wrapping or colour)."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
          justify_right: Sequence[str] = ()) -> Table:
    """A rich table; `justify_right` names numeric columns."""
    t = Table(title=title, header_style="bold", title_justify="left")
    for col in columns:
        t.add_column(col, justify="right" if col in justify_right else "left")
    for row in rows:
        t.add_row(*(str(c) for c in row))
    return t


def human_bytes(n: float) -> str:
    """Binary units: 1 GiB = 2**30 bytes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
