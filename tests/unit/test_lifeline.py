"""lifeline.py: a wrapped process ends when its parent dies (SIGKILL included), and never starts its program
when the parent was already gone before the death signal was set."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from ztune.launch import lifeline

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

# A parent that starts a child (through the lifeline program or the preexec hook), prints the child's pid
# and then dies of SIGKILL: no cleanup code of its own runs.
PARENT = """
import os, signal, subprocess, sys
from ztune.launch import lifeline
how = sys.argv[1]
if how == "program":
    env = dict(os.environ, **{lifeline.PARENT_ENV: str(os.getpid())})
    child = subprocess.Popen(lifeline.wrap(["sleep", "300"], sig="KILL"), env=env, start_new_session=True)
else:
    child = subprocess.Popen(["sleep", "300"], start_new_session=True,
                             preexec_fn=lifeline.die_with_parent(signal.SIGKILL))
print(child.pid, flush=True)
import time; time.sleep(0.5)  # the child has exec'd sleep by now (or not: either way it must die)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _gone_within(pid: int, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["program", "preexec"])
def test_child_in_its_own_session_dies_with_a_sigkilled_parent(how: str) -> None:
    proc = subprocess.run([sys.executable, "-c", PARENT, how], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    pid = int(proc.stdout.split()[0])
    try:
        # The kernel sends the signal as the parent exits; 30 s is a net for a loaded machine only.
        assert _gone_within(pid, 30.0), f"child {pid} ({how}) outlived its SIGKILLed parent by 30 s"
    finally:
        if not _gone_within(pid, 0.0):
            os.kill(pid, 9)


def test_program_is_not_started_when_the_parent_is_already_gone(tmp_path) -> None:
    marker = tmp_path / "ran"
    # ZTUNE_LIFELINE_PARENT names a pid that is not our parent: as if it died between fork and prctl.
    env = dict(os.environ, **{lifeline.PARENT_ENV: "1" if os.getpid() != 1 else "2"})
    proc = subprocess.run(lifeline.wrap(["touch", str(marker)], sig="KILL"), env=env, capture_output=True,
                          timeout=60)
    assert proc.returncode == lifeline.EXIT_PARENT_GONE and not marker.exists()


def test_program_runs_in_the_same_pid_with_its_parent_recorded() -> None:
    code = f"import os; print(os.getpid(), os.environ['{lifeline.PARENT_ENV}'])"
    env = dict(os.environ, **{lifeline.PARENT_ENV: str(os.getpid())})
    proc = subprocess.Popen(lifeline.wrap(["__python__", "-c", code], sig="TERM"), env=env,
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    pid, recorded = out.split()
    assert proc.returncode == 0 and int(pid) == proc.pid and recorded == pid  # exec'd, not a grandchild


def test_bad_usage_is_exit_2() -> None:
    assert lifeline.main(["NOPE", "true"]) == 2 and lifeline.main(["TERM"]) == 2
