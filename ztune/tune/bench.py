"""Run one autotune trial: a local torchrun process group, supervised.

Each trial is `python -m torch.distributed.run --standalone --nproc-per-node N script args` started in a
session of its own, so the agent's group can be ended with one killpg; the ranks (each in a session of its
own, torchrun's choice) end with the agent, and the agent with the tuner, through PR_SET_PDEATHSIG
(ztune/launch/lifeline.py): no trial process outlives a killed tuner. The script learns
its config and the reporting protocol from environment variables (runtime/trial_report.py); the runner
reads the report file rank 0 writes and classifies the outcome:

- ``ok``: the report has its ``done`` record (the measured steps ran);
- ``oom``: MemoryError / "out of memory" / "can't allocate memory" in the output, or a rank killed by
  SIGKILL while a memory cap was set (the kernel's OOM killer);
- ``timeout``: no result within ``timeout_s``, or no new step for ``stall_s`` once the script has started
  reporting (a hang): the group gets SIGTERM, then SIGKILL;
- ``crash``: anything else, with the most telling line of the output as the reason.

The memory cap is RLIMIT_DATA set in the child before exec and inherited by every rank: since Linux 4.7
it bounds private writable mappings, which is where malloc'd tensors live, so an over-cap allocation fails
inside torch ("DefaultCPUAllocator: can't allocate memory") exactly as a real OOM would.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztune.config.io import CONFIG_ENV
from ztune.envvars import CPU_ALLOCATOR_DEFAULTS
from ztune.launch import lifeline

# Seconds between SIGTERM and SIGKILL when a trial is ended.
TERM_GRACE_S = 3.0
POLL_S = 0.1
_OOM_PATTERNS = re.compile(
    r"MemoryError|out of memory|can't allocate memory|Cannot allocate memory|std::bad_alloc|OutOfMemoryError",
    re.IGNORECASE,
)
# Lines that torchrun prints around a child's failure and that say nothing about the cause.
_NOISE = re.compile(r"ChildFailedError|torch\.distributed\.elastic|^\s*(Traceback|File |\^|~|=+|-+|\[\d\]|"
                    r"Root Cause|Failures:|<NO_OTHER_FAILURES>|time\s*:|host\s*:|rank\s*:|exitcode|"
                    r"error_file|traceback|raise |return |\w+\(|warnings\.warn)")
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt|Exit))\b(?::\s*(.*))?$")
# torchrun prefixes each rank's stderr lines with "[rank3]:"; `ztune launch` (trials on hosts) with "[host:3] ".
_RANK_PREFIX = re.compile(r"^(?:\[[^\]\s]+:\d+\] |\[(?:default)?rank\d+\]:\s?)")


# What a trial can end as (classify); the journal keeps it, and a resumed tuner reads it back (records.py).
STATUSES = ("ok", "oom", "crash", "timeout")


@dataclass(frozen=True)
class TrialOutcome:
    """What one trial measured. Times in seconds (median over measured steps), memory in bytes (max over
    ranks of each rank's peak)."""

    status: str  # one of STATUSES
    reason: str
    wall_s: float
    exit_code: int | None
    step_time_s: float | None = None
    step_times_s: tuple[float, ...] = ()
    peak_memory_bytes: int | None = None
    steps_done: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def torchrun_command(*, nproc: int, script: str | os.PathLike, script_args: Sequence[str] = ()) -> list[str]:
    """The argv of one local trial (standalone rendezvous picks a free port, so trials never collide).

    Both levels end with their parent (lifeline.py): torchrun gets SIGTERM when the tuner dies (and stops
    its workers), and every worker gets SIGKILL when torchrun dies, even of SIGKILL.
    """
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                *lifeline.torchrun_worker_args(sig="KILL"), str(script), *script_args]
    return lifeline.wrap(torchrun, sig="TERM")


def _preexec(memory_cap_bytes: int | None) -> Callable[[], None]:
    def setup() -> None:
        if memory_cap_bytes:
            resource.setrlimit(resource.RLIMIT_DATA, (memory_cap_bytes, memory_cap_bytes))
    return setup


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the trial's process group, then SIGKILL whatever is left after TERM_GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # The agent is gone; ranks may linger in the group for a moment.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def _protocol():
    # Imported on use: ztune.runtime's package may import torch, which `ztune autotune --help` must not.
    from ztune.runtime import trial_report

    return trial_report


def kill_stale_group(pgid: int, *, marker: str) -> bool:
    """End a trial group left by a killed tuner, if it is still alive and really ours (a process whose
    environment or command line mentions `marker`, the trial's report path). Returns True if killed."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return False
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            env = proc.environ()
            if env.get(_protocol().REPORT_ENV) == marker or marker in " ".join(proc.cmdline()):
                os.killpg(pgid, signal.SIGKILL)
                return True
        except (psutil.Error, ProcessLookupError, PermissionError, OSError):
            continue
    return False


def _stalled_s(report_path: Path) -> float:
    """Seconds since rank 0 last wrote to its report; 0 before the first write (still starting up)."""
    try:
        return time.time() - report_path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _reason_from_output(text: str) -> str:
    """The most telling line of a failed trial's output: the last exception line of a rank, else the
    last line that is not torchrun's wrapping."""
    lines = [_RANK_PREFIX.sub("", ln).rstrip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        m = _ERROR_LINE.match(line)
        if m and "ChildFailedError" not in line and m.group(1) not in ("SystemExit",):
            return line.strip()[:300]
    for line in reversed(lines):
        if not _NOISE.search(line):
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "no output"


def classify(*, exit_code: int | None, output: str, report: dict[str, Any], timed_out: str,
             memory_capped: bool) -> tuple[str, str]:
    """(status, reason) of a finished trial; `timed_out` says why the runner ended it ("" if it did not).
    Pure, so the rules are testable without processes."""
    done = report.get("done")
    steps = len(report.get("steps", []))
    if timed_out:
        return "timeout", f"{timed_out} (hang?); {steps} steps were reported"
    oom_match = _OOM_PATTERNS.search(output)
    if oom_match:
        line = next((ln.strip() for ln in reversed(output.splitlines()) if _OOM_PATTERNS.search(ln)), "")
        return "oom", f"out of memory: {line[:240]}"
    killed = exit_code in (-signal.SIGKILL, 128 + signal.SIGKILL) or "Signals.SIGKILL" in output
    if killed and memory_capped:
        return "oom", "a rank was killed by SIGKILL under a memory cap (OOM killer)"
    if done is not None and exit_code == 0:
        return "ok", ""
    if exit_code == 0:
        return "crash", f"exited 0 after {steps} steps without a finished trial report (did the script " \
                        "call ztune.initialize and keep stepping?)"
    return "crash", f"exit code {exit_code}: {_reason_from_output(output)}"


def run_trial(*, config_path: str | os.PathLike, report_path: str | os.PathLike, log_path: str | os.PathLike,
              nproc: int, script: str | os.PathLike, script_args: Sequence[str] = (), warmup_steps: int,
              measured_steps: int, timeout_s: float, stall_s: float | None = None,
              memory_cap_bytes: int | None = None,
              env: dict[str, str] | None = None, on_start: Callable[[int], None] | None = None,
              on_poll: Callable[[dict[str, Any]], None] | None = None) -> TrialOutcome:
    """Run one trial to completion, timeout or failure; never raises for a failing trial.

    `timeout_s` bounds the whole trial; `stall_s` (if set) bounds the time between two reported steps
    once the script has reported its start. `on_start(pgid)` runs once the group exists (the tuner
    journals it); `on_poll(report)` runs about every second with the report so far.
    """
    tr = _protocol()
    report_path, log_path = Path(report_path), Path(log_path)
    report_path.unlink(missing_ok=True)
    child_env = dict(os.environ if env is None else env)
    child_env.update({CONFIG_ENV: str(config_path), tr.REPORT_ENV: str(report_path),
                      tr.WARMUP_ENV: str(warmup_steps), tr.STEPS_ENV: str(measured_steps), tr.EXIT_ENV: "1",
                      "OMP_NUM_THREADS": child_env.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"})
    for key, value in CPU_ALLOCATOR_DEFAULTS.items():  # as `ztune launch` gives its ranks
        child_env.setdefault(key, value)
    # The repository root on the path so `ztune` and `runtime` import the same way in every rank.
    root = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH", "")) if p)
    child_env[lifeline.PARENT_ENV] = str(os.getpid())
    argv = torchrun_command(nproc=nproc, script=script, script_args=script_args)
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=child_env, start_new_session=True,
                                preexec_fn=_preexec(memory_cap_bytes))
        if on_start is not None:
            on_start(proc.pid)
        # interrupted (Ctrl-C): watch_trial never leaves a group behind
        timed_out = watch_trial(proc, t0=t0, timeout_s=timeout_s, stall_s=stall_s,
                                stalled_s=lambda: _stalled_s(report_path), stop=_kill_group,
                                on_poll=on_poll, report_path=report_path)
        # Ranks the agent did not reap (e.g. after it crashed) go with the group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return trial_outcome(exit_code=proc.returncode, wall_s=time.monotonic() - t0, log_path=log_path,
                         report_path=report_path, timed_out=timed_out, memory_capped=bool(memory_cap_bytes))


def watch_trial(proc: subprocess.Popen, *, t0: float, timeout_s: float, stall_s: float | None,
                stalled_s: Callable[[], float], stop: Callable[[subprocess.Popen], None],
                on_poll: Callable[[dict[str, Any]], None] | None, report_path: Path) -> str:
    """Wait for a started trial; `stop(proc)` it after `timeout_s` in all, or when `stalled_s()` (seconds since
    the last reported step, 0 before the first) exceeds `stall_s`, or when interrupted. `on_poll` gets the
    report about every second. Returns why it was stopped ("" when it ended by itself)."""
    tr = _protocol()
    timed_out = ""
    last_poll = 0.0
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now - t0 > timeout_s:
                timed_out = f"no result after {timeout_s:.0f} s"
            elif stall_s is not None and stalled_s() > stall_s:
                timed_out = f"no new step for {stall_s:.0f} s"
            if timed_out:
                stop(proc)
                break
            if on_poll is not None and now - last_poll >= 1.0:
                last_poll = now
                on_poll(tr.read_report(report_path))
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): never leave the trial behind
            stop(proc)
    return timed_out


def trial_outcome(*, exit_code: int | None, wall_s: float, log_path: Path, report_path: Path, timed_out: str,
                  memory_capped: bool) -> TrialOutcome:
    """The outcome of a finished trial from its output (log) and rank 0's report file."""
    output = log_path.read_text(errors="replace")
    report = _protocol().read_report(report_path)
    status, reason = classify(exit_code=exit_code, output=output, report=report, timed_out=timed_out,
                              memory_capped=memory_capped)
    done = report.get("done") or {}
    steps = report.get("steps", [])
    peak = done.get("peak_memory_bytes") or max((s.get("peak_memory_bytes") or 0 for s in steps), default=None)
    return TrialOutcome(
        status=status, reason=reason, wall_s=wall_s, exit_code=exit_code,
        step_time_s=done.get("step_time_s") if status == "ok" else None,
        step_times_s=tuple(done.get("step_times_s", ())), peak_memory_bytes=peak or None,
        steps_done=len(steps), first_loss=done.get("first_loss"), last_loss=done.get("last_loss"),
        extra={k: done[k] for k in ("memory_report", "comm_report", "peak_memory_bytes_per_rank") if k in done},
    )
