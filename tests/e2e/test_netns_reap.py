"""A network whose owner was SIGKILLed (no `close()`) is removed, with what runs inside it, by the next
network's `start()` (benchmarks/netns.py reap_orphans); a live owner's network is never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import netns as net

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
SUBNET = "10.79.0.0/24"  # neither the launch tests' nor the box's, so this can run beside both

# The owner: builds a network with one member running `sleep`, says which, then waits to be killed.
OWNER = textwrap.dedent("""
    import subprocess, sys, time
    from benchmarks import netns as net
    n = net.Network(prefix=sys.argv[1], subnet=sys.argv[2])
    n.start()
    n.add_member(sys.argv[1] + "h0", n.addr(11), 0)
    sleeper = subprocess.Popen(["ip", "netns", "exec", sys.argv[1] + "h0", "sleep", "600"])
    print(sleeper.pid, flush=True)
    time.sleep(600)
""")


def _spawn_owner(prefix: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER, prefix, SUBNET], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"owner did not start its network (rc {proc.poll()})"
    return proc, int(line)


def test_killed_owners_network_is_reaped_live_owners_is_not():
    if (reason := net.why_unavailable()) is not None:
        pytest.skip(f"namespace tests skipped: {reason}")
    base = f"ztr{os.getpid() % 10000}"
    dead, live = f"{base}a", f"{base}b"
    killed, sleeper = _spawn_owner(dead)
    keeper, _ = _spawn_owner(live)
    mine = net.Network(prefix=f"{base}c", subnet=SUBNET)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert {f"{dead}sw", f"{dead}h0"} <= set(net.family_namespaces())  # SIGKILL left them behind
        assert net.alive(sleeper)
        mine.start()  # reaps the dead owner's network first
        left = set(net.family_namespaces())
        assert not {f"{dead}sw", f"{dead}h0"} & left
        assert not (net.RECORDS / f"{dead}.json").exists() and not Path(f"/etc/netns/{dead}h0").exists()
        assert not net.alive(sleeper)
        assert {f"{live}sw", f"{live}h0"} <= left  # its owner still runs: untouched
    finally:
        for proc in (killed, keeper):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        net.reap_orphans()  # the keeper's network, now that it is dead too
        mine.close()
    assert not [n for n in net.family_namespaces() if n.startswith(base)]
    if not net.family_namespaces():  # nobody else's network is up: the test subnet's route went with ours
        assert SUBNET not in net.run("ip", "route", "show", "type", "blackhole").stdout
