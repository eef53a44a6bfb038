"""Time limits for tests on a shared machine: a base limit (what an idle machine needs, with margin) scaled
by how loaded the machine is right now, and a sentence that says so when the limit trips.

The scale is the 1-minute load average per core (never below 1): with two busy processes per core, every
process gets about half a core, so a wall-time bound doubles. Limits are safety nets against hangs, not
speed checks.
"""

from __future__ import annotations

import os


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
