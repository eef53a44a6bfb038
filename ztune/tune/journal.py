"""The tuner's journal: one JSON object per line, appended and fsync'd whole, so a tuner killed at any
moment leaves a file that reloads to exactly the trials that finished.

Record kinds:
- ``header``: the first line; ``fingerprint`` identifies the model, hardware and search space. A journal
  whose fingerprint differs from the current run's is refused (the caller may start ``fresh``).
- ``start``: a trial began (with the process-group id of its torchrun, so a resumed tuner can end a
  trial that outlived a killed tuner).
- ``trial``: a trial finished, with its status, measurements and estimates.
- ``repeat``: a confirmation trial of an already measured candidate finished (confirm.py), with its round;
  it ends the ``start`` of the same key, and never replaces the candidate's ``trial`` record.
- ``compute``: the compute this host measured when the run started (the profile fields it replaced, e.g.
  peak_flops_fp32, train_flops_efficiency); a resumed run ranks with these instead of measuring again, so
  its plan continues the killed run's rather than reshuffling with the machine's load. The first one wins.

Only a torn *last* line (the tuner died inside ``write``) is tolerated: it is cut off before the next
append. Damage anywhere else means someone edited the file, and is reported rather than guessed around.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztune.errors import UserError

JOURNAL_VERSION = 1


class JournalError(UserError):
    """A journal that cannot be resumed (different space, damaged, or from another version)."""


@dataclass
class JournalState:
    """What a journal holds: finished trials by candidate key (last record wins), confirmation repeats in
    journal order, and trials that started without finishing (key -> start record)."""

    header: dict[str, Any] | None = None
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    repeats: list[dict[str, Any]] = field(default_factory=list)
    unfinished: dict[str, dict[str, Any]] = field(default_factory=dict)
    compute: dict[str, Any] | None = None  # the first ``compute`` record
    torn_tail_bytes: int = 0


def _parse(path: Path) -> tuple[JournalState, int]:
    """Parse `path`; returns the state and the byte length of the well-formed prefix."""
    data = path.read_bytes()
    state = JournalState()
    good_len = 0
    lines = data.split(b"\n")
    # The piece after the last newline is either empty (clean file) or a torn line.
    complete, tail = lines[:-1], lines[-1]
    for number, raw in enumerate(complete, start=1):
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or "kind" not in record:
                raise ValueError("not a journal record")
        except ValueError:
            if number == len(complete) and not tail:
                # A last line that was written but not whole-line valid (e.g. zero-filled after a crash
                # of the filesystem): still the tail, still tolerated.
                state.torn_tail_bytes = len(raw) + 1
                break
            raise JournalError(
                f"journal {str(path)!r} line {number} is damaged; move the file aside or rerun with --fresh"
            ) from None
        good_len += len(raw) + 1
        _apply(state, record, path=path, number=number)
    if tail:
        state.torn_tail_bytes = len(tail)
    return state, good_len


def _apply(state: JournalState, record: dict[str, Any], *, path: Path, number: int) -> None:
    kind = record["kind"]
    if number == 1:
        if kind != "header":
            raise JournalError(f"journal {str(path)!r} does not start with a header; rerun with --fresh")
        state.header = record
        return
    key = record.get("key")
    if kind == "start":
        state.unfinished[key] = record
    elif kind == "trial":
        state.unfinished.pop(key, None)
        state.finished[key] = record
    elif kind == "repeat":
        state.unfinished.pop(key, None)
        state.repeats.append(record)
    elif kind == "compute" and state.compute is None:
        state.compute = record


class Journal:
    """Append-only JSONL journal at `path` for the search space identified by `fingerprint`."""

    def __init__(self, path: str | os.PathLike, *, fingerprint: str, describe: dict[str, Any],
                 fresh: bool = False) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.moved_aside: Path | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            # --fresh never deletes: the old journal is kept next to the new one.
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.moved_aside = self.path.with_name(f"{self.path.stem}.{stamp}.old{self.path.suffix}")
            os.replace(self.path, self.moved_aside)
        if self.path.exists() and self.path.stat().st_size > 0:
            self.state, good_len = _parse(self.path)
            self._check_header(describe)
            if good_len < self.path.stat().st_size:
                # Cut the torn line so the next append starts on a line of its own.
                with open(self.path, "r+b") as fh:
                    fh.truncate(good_len)
                    os.fsync(fh.fileno())
        else:
            self.state = JournalState()
            header = {"kind": "header", "version": JOURNAL_VERSION, "fingerprint": fingerprint,
                      "space": describe, "created": time.time()}
            self.path.write_bytes(b"")
            self.append(header)
            self.state.header = header

    def _check_header(self, describe: dict[str, Any]) -> None:
        header = self.state.header or {}
        if header.get("version") != JOURNAL_VERSION:
            raise JournalError(
                f"journal {str(self.path)!r} has version {header.get('version')!r}, this ztune writes "
                f"{JOURNAL_VERSION}; rerun with --fresh (the old file is kept)"
            )
        if header.get("fingerprint") != self.fingerprint:
            old = header.get("space", {})
            diffs = [k for k in sorted(set(old) | set(describe)) if old.get(k) != describe.get(k)]
            what = ", ".join(diffs) if diffs else "search space"
            raise JournalError(
                f"journal {str(self.path)!r} belongs to a different tuning run (differs in: {what}); "
                "rerun with --fresh to start over (the old file is kept) or choose another --out"
            )

    def append(self, record: dict[str, Any]) -> None:
        """Write `record` as one line with a single write() and fsync it before returning."""
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if record.get("kind") in ("start", "trial", "repeat", "compute"):
            _apply(self.state, record, path=self.path, number=0)
