"""A dead rank on one of two hosts (network namespaces with sshd, tests/e2e/netns.py): `ztune launch -H hostfile
--max-restarts 1` of the checkpointing job tests/dist/ckpt_worker.py (stage 3, 8 steps, a save every 2), one
rank per host. The rank on node2 SIGKILLs itself after its 5th step; torchrun restarts the group on both hosts,
the script resumes from `latest` (saved after step 4), and the job finishes with the losses and the final
parameters of an uninterrupted run of the same job on the same two hosts, bitwise. Afterwards no process is
left in either host namespace (the launch tests' stray check) nor anywhere with the test's marker.
(tests/dist/test_checkpoint_restart.py is the single-host version.)"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.e2e.netns import Cluster
from tests.e2e.test_launch_ssh import _wait_clean

# pytest-timeout's net: two launches of 2 ranks over ssh, one restarted, on the shared 2-core machine.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]


def _launch(cluster: Cluster, out: Path, *, port: int, kill: bool) -> subprocess.CompletedProcess:
    out.mkdir()
    hostfile = out / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    env = ["--env", f"PYTHONPATH={REPO}", "--env", "OMP_NUM_THREADS=1"]
    if kill:
        env += ["--env", "CKPT_KILL_AT=1:step:5"]  # rank 1 is node2's only rank
    argv = cluster.ctl_argv([
        sys.executable, "-m", "ztune", "launch", "-F", str(cluster.ssh_config), "-H", str(hostfile),
        "--workdir", str(REPO), "--master-port", str(port), "--max-restarts", "1" if kill else "0",
        "--run-root", str(out / "runs"), "--grace", "3", *env,
        "tests/dist/ckpt_worker.py", "--", str(out / "ckpt"), str(out), "3", "none"])
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(int(s), float(v)) for s, v in (line.split() for line in (out / "losses.txt").read_text().splitlines())]


def _failure(proc) -> str:
    """What a failed launch printed, for the assertion: every line that names an error (the failing host's first
    lines were cut off when only the output's tail was shown: one run under load showed only node1's teardown after
    "node2 exited with code 1"), then the tails."""
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    errors = [line for line in lines if "Error" in line or "error:" in line or "exited" in line][:40]
    return "\n".join(["error lines:", *errors, "stdout tail:", proc.stdout[-2000:], "stderr tail:",
                      proc.stderr[-2000:]])


def test_dead_rank_on_one_host_restarts_both_and_resumes(cluster: Cluster, tmp_path: Path) -> None:
    assert cluster.stray_pids() == {}
    ref = _launch(cluster, tmp_path / "ref", port=29651, kill=False)
    assert ref.returncode == 0, _failure(ref)
    _wait_clean(cluster, time.monotonic())
    run = _launch(cluster, tmp_path / "run", port=29652, kill=True)
    assert run.returncode == 0, _failure(run)
    _wait_clean(cluster, time.monotonic())
    # The job finished with 2 ranks after rank 1 died: both hosts' agents restarted their ranks into a new group
    # (node2's counts a failure, node1's a membership change), and rank 0 logged the resumed steps again.
    assert "failed (exitcode: -9)" in run.stdout + run.stderr, run.stdout[-3000:]
    ref_losses = dict(_losses(tmp_path / "ref"))
    losses = _losses(tmp_path / "run")
    # Step 4 ran (logged, unless the agent stopped rank 0 first), was not saved, and ran again after the restart.
    assert [s for s, _ in losses] in ([0, 1, 2, 3, 4, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]), losses
    assert all(loss == ref_losses[s] for s, loss in losses), (losses, ref_losses)
    final, ref_final = torch.load(tmp_path / "run" / "final.pt"), torch.load(tmp_path / "ref" / "final.pt")
    assert all(torch.equal(final[k], v) for k, v in ref_final.items())
