"""Confirmation: before the tuner names its pick, the search's leaders are measured again, interleaved, and
the pick is the candidate with the lowest median of all its samples.

Why: the search measures each candidate once, and on a machine whose load changes by the minute one trial
is one sample of that load (a pick measured at 1.9 s/step ran 2.6 and 3.7 s/step in later trials, while the
three fastest candidates of the grid were within 3% of each other). A leader is a successful candidate whose
search trial was within `margin` of the fastest one, at most `top` of them, fastest first; with fewer than
two leaders there is nothing to decide. Round r of `repeats` runs each leader once, in order on odd rounds
and reversed on even ones (A B C, C B A, ...), so a load that drifts during the rounds weighs on every
leader alike; then the median of each candidate's samples (its search trial and its repeats) decides.

Pure functions of records: the tuner (tuner.py) runs the trials, journals each repeat as a ``repeat`` record
(journal.py) and reads them back on resume, so a killed tuner neither loses nor reruns a sample.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# Defaults of `ztune autotune --confirm / --confirm-top / --confirm-margin`.
CONFIRM_REPEATS = 2  # extra samples per leader: 3 samples each, so one slowed-down trial cannot decide
CONFIRM_TOP = 3
# Single trials of one candidate differed by 1.3-2.8x under load here (docs/bench/autotune_cluster.md); a
# leader within 15% of the fastest first sample is inside that noise, and `top` bounds the cost.
CONFIRM_MARGIN = 0.15


class _Measured(Protocol):  # tuner.TrialRecord (kept structural: tuner.py imports this module)
    status: str
    step_time_s: float | None

    @property
    def candidate(self) -> Any: ...


@dataclass(frozen=True)
class RepeatRecord:
    """One confirmation trial of the already measured candidate `key`; times in seconds."""

    index: int  # the trial number, shared with search trials (host trials use it for their port)
    key: str
    round: int  # 1-based
    status: str
    reason: str
    step_time_s: float | None
    wall_s: float
    resumed: bool = False

    def to_journal(self) -> dict[str, Any]:
        return {"kind": "repeat", "key": self.key, "index": self.index, "round": self.round,
                "status": self.status, "reason": self.reason, "step_time_s": self.step_time_s,
                "wall_s": self.wall_s, "time": time.time()}

    @classmethod
    def from_journal(cls, rec: dict[str, Any]) -> RepeatRecord:
        return cls(index=rec["index"], key=rec["key"], round=rec["round"], status=rec["status"],
                   reason=rec["reason"], step_time_s=rec["step_time_s"], wall_s=rec["wall_s"], resumed=True)


def median(xs: Sequence[float]) -> float:
    """The median of a non-empty sequence (mean of the middle two for an even count)."""
    s = sorted(xs)
    if not s:
        raise ValueError("median of no samples")
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def leaders(records: Iterable[_Measured], *, top: int, margin: float) -> list[str]:
    """Keys of the successful records whose step time is within `margin` (a fraction) of the fastest, fastest
    first, at most `top`; [] when fewer than two qualify."""
    ok = sorted((r.step_time_s, r.candidate.key) for r in records if r.status == "ok" and r.step_time_s)
    if not ok:
        return []
    fastest = ok[0][0]
    keys = [key for t, key in ok if t <= fastest * (1.0 + margin)][:top]
    return keys if len(keys) >= 2 else []


def rounds(keys: Sequence[str], *, repeats: int) -> list[list[tuple[int, str]]]:
    """The confirmation plan: `repeats` rounds of (round, key), odd rounds in order, even ones reversed."""
    return [[(r, k) for k in (keys if r % 2 else list(reversed(keys)))] for r in range(1, repeats + 1)]


def samples(records: Iterable[_Measured], repeats: Iterable[RepeatRecord]) -> dict[str, list[float]]:
    """Every successful sample per candidate key, seconds per step: its search trial first, then its repeats
    by round. Failed repeats (a hang, a crash) are no sample; the tuner reports them."""
    out: dict[str, list[float]] = {}
    for r in records:
        if r.status == "ok" and r.step_time_s:
            out[r.candidate.key] = [r.step_time_s]
    for rep in sorted(repeats, key=lambda x: (x.round, x.index)):
        if rep.status == "ok" and rep.step_time_s and rep.key in out:
            out[rep.key].append(rep.step_time_s)
    return out


def pick(records: Sequence[_Measured], repeats: Iterable[RepeatRecord]) -> _Measured | None:
    """The successful record with the lowest median over its samples (ties: the lower candidate), or None."""
    runs = samples(records, repeats)
    ok = [r for r in records if r.candidate.key in runs]
    return min(ok, key=lambda r: (median(runs[r.candidate.key]), r.candidate)) if ok else None
