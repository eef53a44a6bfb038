"""`ztune autotune -H`: trials run on two hosts (network namespaces with sshd) through `ztune launch`, one
preflight for all of them, the report relayed over stdout, and nothing left on any host after each trial or
after a SIGKILL of the tuner. The tuner itself runs in the launcher namespace, never in the root namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.netns import Cluster
from tests.e2e.test_launch_ssh import _wait_clean
from tests.helpers.load import explain_limit, scaled_limit_s

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]


def _tuner(cluster: Cluster, tmp_path: Path, extra: list[str]) -> subprocess.Popen:
    hosts = tmp_path / "hostfile"
    hosts.write_text("node1 slots=1\nnode2 slots=1\n")
    argv = cluster.ctl_argv([sys.executable, "-m", "ztune", "autotune", "-H", str(hosts), "-F",
                             str(cluster.ssh_config), "--workdir", str(REPO), "--out", str(tmp_path / "out"),
                             "--model", "tiny-gpt", "--global-batch", "4", "--seq", "32", "--no-plot", *extra])
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_trials_run_on_both_hosts_with_one_preflight(cluster: Cluster, tmp_path: Path) -> None:
    assert cluster.stray_pids() == {}
    proc = _tuner(cluster, tmp_path, ["--stages", "0,2", "--vary", "stage", "--micro", "2", "--warmup", "1",
                                      "--steps", "2", "--max-trials", "2", "--min-trials", "2", "--json"])
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=scaled_limit_s(240))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(explain_limit("autotune -H with 2 trials", time.monotonic() - t0, 240)
                             + f"\n{out[-3000:]}\n{err[-3000:]}") from None
    assert proc.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"
    result = json.loads(out)
    trials = result["trials"]
    assert [t["status"] for t in trials] == ["ok", "ok"], trials
    assert all(t["step_time_s"] > 0 and t["first_loss"] is not None for t in trials)
    logs = sorted((tmp_path / "out" / "trials").glob("*.log"))
    assert len(logs) == 2
    texts = [p.read_text() for p in logs]
    for text in texts:  # every trial had a rank on each host
        assert "[node1:0]" in text and "[node2:1]" in text, text[-2000:]
    # The preflight ran for the first trial only; the second reused it.
    assert sum("preflight: reusing" in t for t in texts) == 1, [t[:400] for t in texts]
    _wait_clean(cluster, time.monotonic())


def test_sigkill_of_the_tuner_leaves_nothing_on_any_host(cluster: Cluster, tmp_path: Path) -> None:
    assert cluster.stray_pids() == {}
    # A trial that never finishes: the launch check script stepping forever.
    proc = _tuner(cluster, tmp_path, ["--script", str(REPO / "examples" / "launch_check.py"), "--stages", "1",
                                      "--vary", "stage", "--trial-timeout", "600", "--stall-timeout", "600",
                                      "--", "--steps", "100000", "--sleep-s", "0.05"])
    hosts = [cluster.host_ns(0), cluster.host_ns(1)]
    t0 = time.monotonic()
    while not all(len(cluster.stray_pids().get(ns, ())) >= 3 for ns in hosts):  # wrapper, torchrun, a rank
        if proc.poll() is not None:
            raise AssertionError(f"the tuner exited {proc.returncode} before its trial ran on both hosts:\n"
                                 + proc.stderr.read()[-3000:])
        if time.monotonic() - t0 > scaled_limit_s(120):
            proc.kill()
            raise AssertionError(explain_limit("the trial's start on both hosts", time.monotonic() - t0, 120))
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The launcher gets SIGTERM from the kernel (its parent died) and tears both hosts down.
    _wait_clean(cluster, time.monotonic())
