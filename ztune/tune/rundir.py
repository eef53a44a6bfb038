"""The autotune results folder (`ztune autotune --out`): what an earlier run left there is never lost.

A folder holds one tuning run: `journal.jsonl` (its trials, the record a rerun resumes from), `trials/` (each
trial's config, report and log) and what it exported (`best.yaml`, `best.deepspeed.json`, `autotune.png`).
- A run resumes a folder whose journal is its own (same fingerprint; ztune/tune/journal.py refuses another
  run's journal with one line).
- `--fresh` keeps the previous run whole: all of the above move into `previous/<stamp>/` first.
- `--smoke` starts over every time and deletes its previous trials, so it takes only a folder that is new,
  holds no autotune results, or holds an earlier smoke run (its journal header's workload says `"smoke":
  true`; journals from before that mark: the same search as this smoke run, or the default smoke folder).
  Any other run's folder is refused with one line.
- Results without a journal to resume from (someone removed it) would be overwritten trial by trial: refused
  unless `--fresh`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ztune.errors import UserError

JOURNAL = "journal.jsonl"
TRIALS = "trials"
# Everything a run writes into its folder (ztune/cli/autotune.py, ztune/tune/tuner.py export_best).
RUN_FILES = (JOURNAL, TRIALS, "best.yaml", "best.deepspeed.json", "autotune.png")
PREVIOUS = "previous"
DEFAULT_OUT = Path("ztune-autotune")
DEFAULT_SMOKE_OUT = DEFAULT_OUT / "smoke"
SMOKE_MARK = "smoke"  # key in the workload of a --smoke run's journal header (space.fingerprint's describe)


def run_files(out: Path) -> list[str]:
    """The names of RUN_FILES present in `out` (empty when `out` does not exist)."""
    return [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []


def _journal_header(out: Path) -> dict | None:
    """The header record of `out`'s journal; None if there is no journal or its first line is unreadable."""
    try:
        with open(out / JOURNAL, "rb") as fh:
            first = fh.readline(1 << 20)
        header = json.loads(first)
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) and header.get("kind") == "header" else None


def _num_trials(out: Path) -> int:
    try:
        with open(out / JOURNAL, "rb") as fh:
            return sum(1 for line in fh if b'"kind": "trial"' in line)
    except OSError:
        return 0


def _plain(value: object) -> object:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def is_smoke_run(out: Path, *, describe: dict | None = None) -> bool:
    """Whether `out` holds a --smoke run's results (or none at all). `describe`: this smoke run's journal
    header space (ztune.tune.space.fingerprint), which a smoke journal from before the mark equals, less it."""
    if not run_files(out):
        return True
    space = (_journal_header(out) or {}).get("space")
    if isinstance(space, dict):
        workload = space.get("workload")
        if isinstance(workload, dict) and workload.get(SMOKE_MARK) is True:
            return True
        if describe is not None:
            unmarked = {**describe, "workload": {k: v for k, v in (describe.get("workload") or {}).items()
                                                 if k != SMOKE_MARK}}
            if _plain(space) == _plain(unmarked):
                return True
    # Other smoke journals from before the mark: only the default smoke folder is taken on trust.
    return os.path.abspath(out) == os.path.abspath(DEFAULT_SMOKE_OUT)


def check_out(out: Path, *, smoke: bool, fresh: bool, describe: dict | None = None) -> None:
    """Refuse (UserError, one line) an `--out` whose earlier results this run would overwrite or delete.
    `describe`: this run's journal header space. Reads only; call it after the other input checks and before
    anything is written."""
    present = run_files(out)
    if not present:
        return
    if smoke:
        if not is_smoke_run(out, describe=describe):
            what = (f"a tuning run's journal with {_num_trials(out)} trial(s)" if JOURNAL in present
                    else "autotune results: " + ", ".join(present))
            raise UserError(f"--smoke --out {str(out)!r}: that folder holds {what}, which a smoke run would "
                            f"replace; give --smoke a new or empty folder, or drop --out (default "
                            f"{DEFAULT_SMOKE_OUT})")
        return
    if JOURNAL not in present and not fresh:
        raise UserError(f"--out {str(out)!r} holds autotune results ({', '.join(present)}) but no {JOURNAL} "
                        "to resume from; pass --fresh to keep them aside and start over, or choose another --out")


def keep_previous_run(out: Path) -> Path | None:
    """Move the previous run's files (RUN_FILES) of `out` into `out/previous/<stamp>/`; returns that folder,
    or None when there was nothing to move. Renames only (same filesystem): nothing is copied or deleted."""
    present = run_files(out)
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out / PREVIOUS / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = out / PREVIOUS / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for name in present:
        os.replace(out / name, dest / name)
    return dest
