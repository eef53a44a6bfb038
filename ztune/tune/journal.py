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
append. Damage anywhere else means someone edited the file, and is reported rather than guessed around: a
line that is not JSON, and a record whose fields the tuner could not read back as it wrote them (records.py),
are one line naming the file and the line, and a journal refused so is left as it is.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztune.errors import UserError, shown_json
from ztune.tune.records import RecordError, check_record

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


def _read(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], int, int]:
    """The records of `path` with their line numbers, the byte length of the well-formed prefix, and the bytes
    of a torn last line (0 if none)."""
    data = path.read_bytes()
    records: list[tuple[int, dict[str, Any]]] = []
    good_len = torn = 0
    lines = data.split(b"\n")
    # The piece after the last newline is either empty (clean file) or a torn line.
    complete, tail = lines[:-1], lines[-1]
    for number, raw in enumerate(complete, start=1):
        try:
            record = json.loads(raw, object_pairs_hook=_unique_keys)
            if not isinstance(record, dict) or "kind" not in record:
                raise ValueError("not a journal record")
        except _DuplicateKey as exc:  # json keeps the last one: a hand edit would pass for the tuner's record
            raise JournalError(f"journal {str(path)!r} line {number}: {exc}; correct or remove that line, or rerun "
                               "with --fresh to start over (the old file is kept)") from None
        except ValueError:
            if number == len(complete) and not tail:
                # A last line that was written but not whole-line valid (e.g. zero-filled after a crash
                # of the filesystem): still the tail, still tolerated.
                torn = len(raw) + 1
                break
            what = "is blank" if not raw.strip() else "is damaged (not a JSON object with a \"kind\")"
            raise JournalError(
                f"journal {str(path)!r} line {number} {what}; correct or remove that line, or rerun with --fresh "
                "to start over (the old file is kept)") from None
        good_len += len(raw) + 1
        records.append((number, record))
    return records, good_len, torn or len(tail)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: the object, or _DuplicateKey naming a key written twice."""
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(f"key {json.dumps(k, ensure_ascii=True)[:60]} appears twice in one object")
        seen[k] = v
    return seen


def _load(path: Path, records: list[tuple[int, dict[str, Any]]]) -> JournalState:
    """The state `records` (from _read) describe; a record the tuner could not read back as it wrote it is
    one JournalError naming the file, the line and the field (records.py). Reads only."""
    state = JournalState()
    for number, record in records:
        try:
            check_record(record)
            if record["kind"] == "header" and number > 1:
                raise RecordError("a second header (a journal has one, on line 1)")
        except RecordError as exc:
            raise JournalError(f"journal {str(path)!r} line {number}: {exc}; correct or remove that line, or "
                               "rerun with --fresh to start over (the old file is kept)") from None
        _apply(state, record)
    return state


def _apply(state: JournalState, record: dict[str, Any]) -> None:
    kind = record["kind"]
    key = record.get("key")
    if kind == "header":
        state.header = record
    elif kind == "start":
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
            records, good_len, torn = _read(self.path)
            # A journal of another run or version is named as such before any of its records is judged.
            self._check_header(records, describe)
            self.state = _load(self.path, records)
            self.state.torn_tail_bytes = torn
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

    def _check_header(self, records: list[tuple[int, dict[str, Any]]], describe: dict[str, Any]) -> None:
        if not records or records[0][1]["kind"] != "header":
            raise JournalError(f"journal {str(self.path)!r} does not start with a header; rerun with --fresh")
        header = records[0][1]
        version = header.get("version")
        # JSON's spelling: "1" (a string), 1.0 and true are not the integer this ztune writes, though == says so
        if type(version) is not int or version != JOURNAL_VERSION:
            raise JournalError(
                f"journal {str(self.path)!r} has version {shown_json(version)}, this ztune writes "
                f"{JOURNAL_VERSION}; rerun with --fresh (the old file is kept)"
            )
        _load(self.path, records[:1])  # its fields (the space compared below is an object)
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
            _apply(self.state, record)
