"""`ztune autotune --smoke`, the CI smoke mode, end to end: it must pick a config that trained, in bounded time."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.load import explain_limit, scaled_limit_s
from ztune.config import load

# The run's own limit (idle machine: ~60 s), scaled by the load; pytest-timeout's net is above any scaled one.
BASE_LIMIT_S = 230.0


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=scaled_limit_s(BASE_LIMIT_S), **kwargs)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise AssertionError(explain_limit(" ".join(argv[1:5]), time.monotonic() - t0, BASE_LIMIT_S)
                             + f"; stderr so far:\n{tail}") from None


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_smoke_mode_picks_a_config_that_trained(tmp_path):
    start = time.perf_counter()
    out = _run([sys.executable, "-m", "ztune", "autotune", "--smoke", "--out", str(tmp_path), "--no-plot"])
    wall_s = time.perf_counter() - start
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    cfg = load(tmp_path / "best.yaml")
    assert cfg.zero.stage in (0, 1, 2, 3)
    print(f"autotune --smoke: {wall_s:.0f} s wall")


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_user_script_calling_initialize_is_the_workload(tmp_path):
    # The --script protocol end to end through the engine: examples/train_tiny.py only calls
    # ztune.initialize(config=None); the engine finds $ZTUNE_CONFIG and reports steps to the tuner.
    root = Path(__file__).resolve().parents[2]
    out = _run([sys.executable, "-m", "ztune", "autotune", "--script", str(root / "examples/train_tiny.py"),
                "--stages", "0,2", "--micro", "4", "--seq", "32", "--max-trials", "2", "--steps", "2", "--no-plot",
                "--json", "--out", str(tmp_path), "--", "--steps", "1000"], cwd=root)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(out.stdout)
    ok = [t for t in result["trials"] if t["status"] == "ok"]
    assert len(ok) == 2, result["trials"]
    assert all(t["step_time_s"] > 0 for t in ok)
    assert load(tmp_path / "best.yaml").zero.stage in (0, 2)
