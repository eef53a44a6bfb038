"""The suite must collect every test folder: pytest's default norecursedirs contains "dist", which once
silently dropped tests/dist (all the multi-process gloo tests) from `make test`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_folder_is_collected():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    collected = {line.split("/")[1] for line in out.stdout.splitlines() if line.startswith("tests/")}
    folders = {p.name for p in (ROOT / "tests").iterdir()
               if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders <= collected, f"not collected: {sorted(folders - collected)}"
