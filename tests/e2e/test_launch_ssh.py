"""`ztune launch` over real ssh between network namespaces: a gloo job on 2 hosts, teardown on every kind of
failure within 10 s with nothing left behind, preflight refusals, and hostile strings kept as data.

The launcher itself runs inside the launcher namespace (`ip netns exec`), never in the root namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.netns import Cluster
from tests.helpers.load import explain_limit, scaled_limit_s

# pytest-timeout's net, above the load-scaled limits below (each says what was slow when it trips).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "examples/launch_check.py"
EVIL = "a;b $(touch {m}) `touch {m}` \"dq\" 'sq' $HOME \\ |&"
# Teardown and preflight limits on an idle machine; tests scale them by the load (tests/helpers/load.py).
TEARDOWN_LIMIT_S = 10.0
PREFLIGHT_LIMIT_S = 10.0


class Job:
    """A running `ztune launch` in the launcher namespace, with its output collected line by line."""

    def __init__(self, cluster: Cluster, args: list[str]) -> None:
        argv = cluster.ctl_argv([sys.executable, "-m", "ztune", "launch", "-F", str(cluster.ssh_config), *args])
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, d), daemon=True)
                         for s, d in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, dest: list[str]) -> None:
        for line in stream:
            dest.append(line.rstrip("\n"))

    def wait_for(self, predicate, base_limit_s: float = 60.0) -> list[str]:
        t0 = time.monotonic()
        while time.monotonic() - t0 < scaled_limit_s(base_limit_s):
            hits = [line for line in list(self.out) if predicate(line)]
            if hits:
                return hits
            if self.proc.poll() is not None:
                raise AssertionError(f"no matching line; launcher exited {self.proc.poll()}\n" + self.transcript())
            time.sleep(0.05)
        raise AssertionError(explain_limit("waiting for the job's line", time.monotonic() - t0, base_limit_s)
                             + "\n" + self.transcript())

    def finish(self, base_limit_s: float = 90.0) -> int:
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout=scaled_limit_s(base_limit_s))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(explain_limit("the launcher", time.monotonic() - t0, base_limit_s) + "\n"
                                 + self.transcript()) from None
        for t in self._threads:
            t.join(timeout=5)
        return rc

    def reports(self) -> list[tuple[str, dict]]:
        """(prefix, LAUNCH_CHECK payload) for every rank that reported."""
        out = []
        for line in self.out:
            prefix, sep, payload = line.partition(" LAUNCH_CHECK ")
            if sep:
                out.append((prefix, json.loads(payload)))
        return out

    def transcript(self) -> str:
        return "\n".join(["--- stdout", *self.out[-80:], "--- stderr", *self.err[-40:]])


def _hostfile(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "hostfile"
    path.write_text("# e2e hosts\n\n" + "\n".join(lines) + "\n")
    return str(path)


def _config(tmp_path: Path, *, world: int) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2,
                                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                                "zero_optimization": {"stage": 1}}))
    return str(path)


def _wait_clean(cluster: Cluster, since: float) -> float:
    """Seconds from `since` until no job process is left anywhere; fails after the (load-scaled) limit."""
    while True:
        strays = cluster.stray_pids()
        if not strays:
            return time.monotonic() - since
        if time.monotonic() - since > scaled_limit_s(TEARDOWN_LIMIT_S + 5):
            cmds = {}
            for ns, pids in strays.items():
                for p in pids:
                    with contextlib.suppress(psutil.Error):
                        cmds.setdefault(ns, []).append(" ".join(psutil.Process(p).cmdline())[:120])
            raise AssertionError(explain_limit("teardown", time.monotonic() - since, TEARDOWN_LIMIT_S + 5)
                                 + f"; left behind: {cmds}")
        time.sleep(0.1)


@pytest.fixture
def clean(cluster: Cluster):
    """Every test starts with no job processes and must end with none (the process-count check). At the start
    a process may still be on its way out (an ssh session of the previous test that reached a host after that
    test's own check, seen once with 3 pytest-xdist workers on 2 cores): it must be gone within the same
    load-scaled limit, and the failure names whatever stays."""
    _wait_clean(cluster, time.monotonic())
    yield cluster
    _wait_clean(cluster, time.monotonic())


def _long_job(cluster: Cluster, tmp_path: Path, port: int) -> Job:
    hosts = _hostfile(tmp_path, ["node1 slots=1", "node2 slots=1"])
    job = Job(cluster, ["-H", hosts, "--workdir", str(REPO), "--config", _config(tmp_path, world=2),
                        "--master-port", str(port), "--grace", "3", SCRIPT, "--", "--steps", "100000",
                        "--sleep-s", "0.05"])
    job.wait_for(lambda line: line.startswith("[node2:") and "step 3 " in line)
    assert len(job.reports()) == 2, job.transcript()
    return job


def test_gloo_job_on_two_hosts(clean: Cluster, tmp_path: Path) -> None:
    hosts = _hostfile(tmp_path, ["node1 slots=2", "node2 slots=1  # the second host"])
    logs = tmp_path / "logs"
    t0 = time.monotonic()
    job = Job(clean, ["-H", hosts, "--workdir", str(REPO), "--config", _config(tmp_path, world=3),
                      "--master-port", "29611", "--log-dir", str(logs), SCRIPT, "--", "--steps", "3"])
    rc = job.finish()
    elapsed_s = time.monotonic() - t0
    assert rc == 0, job.transcript()
    reports = dict(job.reports())
    assert sorted(reports) == ["[node1:0]", "[node1:1]", "[node2:2]"], job.transcript()
    for prefix, rep in reports.items():
        assert rep["world"] == 3 and rep["runtime"] == "ztune"
        host = prefix[1:6]
        ns_if = f"{clean.prefix}i{1 if host == 'node1' else 2}"
        # Both host names resolve to 127.0.0.1 on their own host: the interface must come from the route.
        assert rep["gloo_ifname"] == ns_if, rep
        assert rep["config"].endswith("/config.json")
    done = [line for line in job.out if " DONE rank=" in line]
    assert len(done) == 3 and all("world=3" in line for line in done)
    assert sorted(p.name for p in logs.iterdir()) == ["node1.log", "node2.log"]
    assert "DONE rank=2" in (logs / "node2.log").read_text()
    print(f"two-host gloo job: {elapsed_s:.1f} s end to end")


@pytest.mark.parametrize("how", ["kill -9 rank on host 2", "SIGINT to launcher", "ssh to host 2 dropped"])
def test_teardown_within_limit(clean: Cluster, tmp_path: Path, how: str) -> None:
    port = {"kill -9 rank on host 2": 29621, "SIGINT to launcher": 29622, "ssh to host 2 dropped": 29623}[how]
    job = _long_job(clean, tmp_path, port)
    victim_rank = next(rep for prefix, rep in job.reports() if prefix.startswith("[node2:"))
    t0 = time.monotonic()
    if how.startswith("kill -9"):
        os.kill(victim_rank["pid"], signal.SIGKILL)
    elif how.startswith("SIGINT"):
        job.proc.send_signal(signal.SIGINT)
    else:
        ssh = [p for p in psutil.Process(job.proc.pid).children() if p.name() == "ssh"
               and "node2" in p.cmdline()]
        assert len(ssh) == 1, [p.cmdline() for p in psutil.Process(job.proc.pid).children()]
        ssh[0].kill()
    rc = job.finish(base_limit_s=TEARDOWN_LIMIT_S + 10)
    exit_s = time.monotonic() - t0
    clean_s = _wait_clean(clean, t0)
    print(f"{how}: launcher exited after {exit_s:.1f} s, every process gone after {clean_s:.1f} s")
    print("\n".join(line for line in job.out + job.err if "[ztune]" in line or "failed" in line))
    assert rc != 0
    if how.startswith("SIGINT"):
        assert rc == 130
    if how.startswith("ssh"):  # the ssh client died of SIGKILL: 128 + 9, and the reason says so
        assert rc == 137 and any("connection lost" in line for line in job.out + job.err), job.transcript()
    limit_s = scaled_limit_s(TEARDOWN_LIMIT_S)
    assert exit_s < limit_s, explain_limit("the launcher's exit", exit_s, TEARDOWN_LIMIT_S) + job.transcript()
    assert clean_s < limit_s, explain_limit("teardown", clean_s, TEARDOWN_LIMIT_S) + job.transcript()
    assert any("nothing left running" in line for line in job.out), job.transcript()


def test_unreachable_host_fails_preflight_fast(clean: Cluster, tmp_path: Path) -> None:
    hosts = _hostfile(tmp_path, ["node1 slots=1", "unreachable slots=1"])
    t0 = time.monotonic()
    job = Job(clean, ["-H", hosts, "--workdir", str(REPO), SCRIPT])
    rc = job.finish()
    elapsed_s = time.monotonic() - t0
    print(f"unreachable host: preflight failed after {elapsed_s:.1f} s")
    err = "\n".join(job.err)
    print(err)
    assert rc == 1, job.transcript()
    assert elapsed_s < scaled_limit_s(PREFLIGHT_LIMIT_S), \
        explain_limit("the failing preflight", elapsed_s, PREFLIGHT_LIMIT_S) + job.transcript()
    assert "preflight failed" in err and "nothing was started" in err and "unreachable" in err
    assert "ssh failed" in err
    assert job.reports() == []


def test_hostile_strings_arrive_literally(clean: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = EVIL.format(m=marker)
    # A working directory of its own, with a .ztune_env whose value is hostile too.
    work = tmp_path / "work"
    (work / "examples").mkdir(parents=True)
    shutil.copy(REPO / SCRIPT, work / SCRIPT)
    (work / ".ztune_env").write_text(f"# comment\nZTUNE_CHECK_FROM_FILE={evil}\n")
    hosts = _hostfile(tmp_path, ["node1 slots=1", "node2 slots=1"])
    job = Job(clean, ["-H", hosts, "--workdir", str(work), "--config", _config(tmp_path, world=2),
                      "--master-port", "29631", "--env", f"ZTUNE_CHECK_EVIL={evil}",
                      # named like a credential: it travels in the stdin header, not on the ssh command line
                      "--env", f"ZTUNE_CHECK_TOKEN={evil}", SCRIPT, "--",
                      "--steps", "1", evil, f"--name={evil}"])
    rc = job.finish()
    assert rc == 0, job.transcript()
    reports = job.reports()
    assert len(reports) == 2
    for _prefix, rep in reports:
        assert rep["extra"] == [evil, f"--name={evil}"]
        assert rep["env"]["ZTUNE_CHECK_EVIL"] == evil
        assert rep["env"]["ZTUNE_CHECK_FROM_FILE"] == evil
        assert rep["env"]["ZTUNE_CHECK_TOKEN"] == evil
    assert not marker.exists()


def test_hostile_hostname_runs_nothing(clean: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad_host = f"node2;touch${{IFS}}{marker};$(touch${{IFS}}{marker})`touch${{IFS}}{marker}`'\""
    hosts = _hostfile(tmp_path, ["node1 slots=1", f"{bad_host} slots=1"])
    dry = Job(clean, ["-H", hosts, "--workdir", str(REPO), "--dry-run", SCRIPT])
    assert dry.finish() == 0, dry.transcript()
    commands = [shlex.split(line) for line in dry.out if line.startswith("ssh ")]
    assert len(commands) == 2 and bad_host in commands[1]  # one quoted word, right after "--"
    assert commands[1][commands[1].index("--") + 1] == bad_host
    job = Job(clean, ["-H", hosts, "--workdir", str(REPO), SCRIPT])
    rc = job.finish()
    assert rc == 1, job.transcript()
    assert "preflight failed" in "\n".join(job.err)
    assert not marker.exists() and job.reports() == []


@pytest.mark.parametrize("mode", ["two hosts over ssh", "local"])
def test_sigkill_of_the_launcher_leaves_nothing(clean: Cluster, tmp_path: Path, mode: str) -> None:
    """Issue 10.4: the launcher killed by SIGKILL runs no teardown code of its own; its ssh clients (or local
    node wrapper) get SIGTERM from the kernel (PR_SET_PDEATHSIG), the node wrappers reap their ranks."""
    if mode == "local":
        job = Job(clean, ["--nproc-per-node", "2", "--workdir", str(REPO), "--config", _config(tmp_path, world=2),
                          "--master-port", "29641", SCRIPT, "--", "--steps", "100000", "--sleep-s", "0.05"])
        job.wait_for(lambda line: "step 3 " in line)
    else:
        job = _long_job(clean, tmp_path, 29642)
    ranks = [rep["pid"] for _prefix, rep in job.reports()]
    assert len(ranks) == 2, job.transcript()
    t0 = time.monotonic()
    job.proc.kill()
    job.finish(base_limit_s=10)
    clean_s = _wait_clean(clean, t0)
    print(f"SIGKILL to the launcher ({mode}): every process gone after {clean_s:.1f} s")
    assert clean_s < scaled_limit_s(TEARDOWN_LIMIT_S), \
        explain_limit("teardown after SIGKILL", clean_s, TEARDOWN_LIMIT_S) + job.transcript()
