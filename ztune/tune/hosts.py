"""Autotune trials on several hosts: each trial is one `ztune launch` of the trial script over SSH.

`ztune autotune -H hostfile` (or inside a Slurm allocation of several nodes) runs every trial through the
launcher, so a multi-node job is tuned on the hosts it will run on instead of one host and extrapolated:

- the launcher is a child process of the tuner (`python -m ztune launch ...`) in a session of its own; it
  gets SIGTERM when the tuner dies, even of SIGKILL (lifeline.die_with_parent), and its teardown stops every
  host (the node wrappers also stop when their ssh connection drops). A trial that times out or stalls gets
  the same: SIGTERM to the launcher, which tears down every host and confirms nothing is left, then SIGKILL
  if it has not exited after its grace period;
- the preflight (python, versions, script, interfaces on every host) runs once, for the first trial; later
  trials reuse its result (`ztune launch --preflight-cache`);
- rank 0 may run on another host, whose files the tuner cannot read, so the trial report travels as stdout
  lines (runtime/trial_report.py, ``ZTUNE_TRIAL_REPORT=-``) that the launcher relays and this module writes
  to the tuner's own report file: the journal, stall detection and resume work as for local trials;
- each trial uses its own rendezvous port (`base_port + trial index`), so a port still in TIME_WAIT after
  the previous trial's teardown is never reused at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztune.launch.lifeline import die_with_parent
from ztune.tune.bench import TrialOutcome, trial_outcome, watch_trial

# Seconds the launcher gets for its teardown after SIGTERM before it is killed; its own grace (SIGTERM to
# SIGKILL on the hosts) plus the reap over a second ssh (supervise.py allows grace + 20 s).
LAUNCHER_GRACE_S = 30.0


@dataclass(frozen=True)
class HostTrials:
    """Where trials run and how to reach the hosts: the `ztune launch` options the tuner passes on."""

    hostfile: str | None  # None: the Slurm allocation (SLURM_JOB_NODELIST)
    include: str | None = None
    exclude: str | None = None
    ssh_config: str | None = None
    ssh_options: tuple[str, ...] = ()
    insecure_no_host_key_check: bool = False
    workdir: str | None = None
    python: str | None = None
    base_port: int = 29500
    grace_s: float = 5.0


def launch_flags(hosts: HostTrials) -> list[tuple[str, str]]:
    """The user's text flags `hosts` passes on to `ztune launch`, as (flag, value) pairs, those given only. The
    CLI checks them with the launcher's own table (ztune.launch.TEXT_FLAGS) before anything runs."""
    flags = [("--hostfile", hosts.hostfile), ("--include", hosts.include), ("--exclude", hosts.exclude),
             ("--ssh-config", hosts.ssh_config), ("--workdir", hosts.workdir), ("--python", hosts.python),
             *(("--ssh-option", opt) for opt in hosts.ssh_options)]
    return [(flag, value) for flag, value in flags if value is not None]


def launch_argv(hosts: HostTrials, *, config_path: str | os.PathLike, script: str, script_args: Sequence[str],
                env: dict[str, str], port: int, preflight_cache: str | os.PathLike) -> list[str]:
    """The tuner's `ztune launch` command for one trial (argv; every value one element, no shell)."""
    argv = [sys.executable, "-m", "ztune", "launch", "--config", str(config_path), "--master-port", str(port),
            "--grace", f"{hosts.grace_s:g}", "--preflight-cache", str(preflight_cache)]
    for flag, value in launch_flags(hosts):
        argv += [flag, value]
    if hosts.insecure_no_host_key_check:
        argv.append("--insecure-no-host-key-check")
    for key, value in sorted(env.items()):
        argv += ["--env", f"{key}={value}"]
    return [*argv, script, "--", *script_args]


def _relay(stream, log, report_path: Path, marker: str) -> None:
    """Copy the launcher's output to the trial log; report lines (`[host:0] <marker>{json}`) also go to the
    tuner's report file, as rank 0 would have written them locally."""
    with open(report_path, "ab") as report:
        for raw in iter(stream.readline, b""):
            log.write(raw)
            log.flush()
            text = raw.decode("utf-8", errors="replace")
            at = text.find(marker)
            if at >= 0:
                report.write(text[at + len(marker):].rstrip("\r\n").encode() + b"\n")
                report.flush()


def _stop_launcher(proc: subprocess.Popen) -> None:
    """SIGTERM: the launcher tears down every host; SIGKILL only if it has not finished in time."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=LAUNCHER_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def run_trial_on_hosts(*, hosts: HostTrials, index: int, config_path: str | os.PathLike,
                       report_path: str | os.PathLike, log_path: str | os.PathLike, script: str,
                       script_args: Sequence[str] = (), warmup_steps: int, measured_steps: int, timeout_s: float,
                       stall_s: float | None = None, preflight_cache: str | os.PathLike,
                       on_start: Callable[[int], None] | None = None,
                       on_poll: Callable[[dict[str, Any]], None] | None = None) -> TrialOutcome:
    """One trial on the hosts, to completion, timeout or failure (never raises for a failing trial).

    Limits as in bench.run_trial: `timeout_s` for the whole trial, `stall_s` between reported steps.
    `on_start(pid)` gets the launcher's pid (its process group) for the journal.
    """
    from ztune.runtime import trial_report as tr  # no torch: the protocol module imports only the stdlib

    report_path, log_path = Path(report_path), Path(log_path)
    report_path.unlink(missing_ok=True)
    report_path.touch()
    env = {tr.REPORT_ENV: tr.STDOUT_PATH, tr.WARMUP_ENV: str(warmup_steps), tr.STEPS_ENV: str(measured_steps),
           tr.EXIT_ENV: "1"}
    argv = launch_argv(hosts, config_path=config_path, script=script, script_args=script_args, env=env,
                       port=hosts.base_port + index, preflight_cache=preflight_cache)
    t0 = time.monotonic()
    start_mtime = report_path.stat().st_mtime
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                                preexec_fn=die_with_parent(signal.SIGTERM))
        if on_start is not None:
            on_start(proc.pid)
        relay = threading.Thread(target=_relay, args=(proc.stdout, log, report_path, tr.STDOUT_MARKER),
                                 daemon=True)
        relay.start()

        def stalled_s() -> float:  # the report file exists from the start: count from its first relayed line
            mtime = report_path.stat().st_mtime
            return time.time() - mtime if mtime != start_mtime else 0.0

        # interrupted (Ctrl-C): the hosts are torn down before we go on
        timed_out = watch_trial(proc, t0=t0, timeout_s=timeout_s, stall_s=stall_s, stalled_s=stalled_s,
                                stop=_stop_launcher, on_poll=on_poll, report_path=report_path)
        relay.join(timeout=10.0)
    return trial_outcome(exit_code=proc.returncode, wall_s=time.monotonic() - t0, log_path=log_path,
                         report_path=report_path, timed_out=timed_out, memory_capped=False)
