"""The stray-process check: every process a test's ztune command started carries the test's marker in its
environment (ZTUNE_E2E_MARKER, set by the autouse fixture in conftest.py; ZTUNE_* variables also travel to
the ranks of other hosts), so after the test none may be left.

Time limits here are safety nets, not measurements: teardown on a loaded machine is slow, and a failure
names every process still alive and how long the wait was.
"""

from __future__ import annotations

import contextlib
import os
import time

import psutil

MARKER_ENV = "ZTUNE_E2E_MARKER"
# How long the processes of a finished command may take to go: torchrun's own teardown of its workers
# (SIGTERM, then SIGKILL after its shutdown timeout of 30 s) plus a loaded machine.
SETTLE_LIMIT_S = 90.0


def marked(marker: str) -> list[psutil.Process]:
    """Live processes (zombies excluded) whose environment holds `MARKER_ENV=marker`, this one excluded."""
    out = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER_ENV) == marker:
                out.append(proc)
        except (psutil.Error, OSError):
            continue
    return out


def describe(procs: list[psutil.Process]) -> str:
    rows = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            age_s = time.time() - p.create_time()
            rows.append(f"pid {p.pid} ppid {p.ppid()} sid {os.getsid(p.pid)} up {age_s:.0f} s: "
                        f"{' '.join(p.cmdline())[:160]}")
    return "\n  ".join(rows)


def wait_none_marked(marker: str, *, limit_s: float = SETTLE_LIMIT_S, what: str = "the command") -> float:
    """Seconds until no marked process is left; after `limit_s`, kill them (so later tests are not
    disturbed) and fail with the list."""
    t0 = time.monotonic()
    while True:
        left = marked(marker)
        if not left:
            return time.monotonic() - t0
        if time.monotonic() - t0 > limit_s:
            text = describe(left)
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            raise AssertionError(f"{len(left)} process(es) started by {what} still alive {limit_s:.0f} s after "
                                 f"it ended (killed now):\n  {text}")
        time.sleep(0.2)
