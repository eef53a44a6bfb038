"""Time limits for tests on a shared machine: a base limit (what an idle machine needs, with margin) scaled
by how loaded the machine is right now, and a sentence that says so when the limit trips.

The scale is the 1-minute load average per core (never below 1): with two busy processes per core, every
process gets about half a core, so a wall-time bound doubles. Limits are safety nets against hangs, not
speed checks.
"""

from __future__ import annotations

import os
import time


def load_factor() -> float:
    """Runnable processes per core over the last minute, at least 1.0 (1.0 where unknown)."""
    try:
        load_1m = os.getloadavg()[0]
    except OSError:
        return 1.0
    return max(1.0, load_1m / (os.cpu_count() or 1))


def scaled_limit_s(base_s: float) -> float:
    """`base_s` stretched by the current load factor."""
    return base_s * load_factor()


def explain_limit(what: str, took_s: float, base_s: float) -> str:
    """The failure message of a tripped limit: what was slow, how slow, and against which limit."""
    factor = load_factor()
    return (f"{what} took {took_s:.1f} s; limit {base_s * factor:.0f} s = {base_s:.0f} s x load factor "
            f"{factor:.1f} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


class LoadScaledDeadline:
    """A wall-time limit that follows the load while it runs: `base_s` x the highest load factor sampled since
    it started (call `expired()` in the waiting loop; each call samples). A load that rises mid-run stretches
    the limit; one that falls again does not shrink it, so a slow stretch is never held against the test.

        deadline = LoadScaledDeadline(120.0)
        while not done():
            if deadline.expired():
                raise AssertionError(deadline.explain("the ranks") + "; " + what_was_left)
    """

    def __init__(self, base_s: float) -> None:
        self.base_s = base_s
        self.started = time.monotonic()
        self.factor = load_factor()
        self.peak_load_1m = _load_1m()

    @property
    def limit_s(self) -> float:
        return self.base_s * self.factor

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def expired(self) -> bool:
        self.factor = max(self.factor, load_factor())
        self.peak_load_1m = max(self.peak_load_1m, _load_1m())
        return self.elapsed_s() > self.limit_s

    def explain(self, what: str) -> str:
        """The failure message: what was slow, how long it took, and the limit with the load behind it."""
        return (f"{what} took {self.elapsed_s():.1f} s; limit {self.limit_s:.0f} s = {self.base_s:.0f} s x load "
                f"factor {self.factor:.1f} (highest 1-minute load average seen {self.peak_load_1m:.1f}, now "
                f"{_load_1m():.1f}, on {os.cpu_count()} cores)")


def _load_1m() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0
