"""`ztune autotune --smoke`, the CI smoke mode, end to end: it must pick a config that trained, in bounded time."""

import subprocess
import sys
import time

import pytest

from ztune.config import load


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_smoke_mode_picks_a_config_that_trained(tmp_path):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ztune", "autotune", "--smoke", "--out", str(tmp_path), "--no-plot"],
                         capture_output=True, text=True, timeout=230)
    wall_s = time.perf_counter() - start
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    cfg = load(tmp_path / "best.yaml")
    assert cfg.zero.stage in (0, 1, 2, 3)
    print(f"autotune --smoke: {wall_s:.0f} s wall")
