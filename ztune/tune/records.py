"""What each journal record must hold: the fields a resumed tuner reads back, with their types and bounds.

The journal (journal.py) is written by the tuner alone, but it is a text file in the results folder and people
edit it (to drop a trial, to fix a path). A value the tuner never writes used to surface far from the file: a
pgid of "abc" or [1] as a traceback from int() in the stale-trial cleanup, a step time of "fast" from the
calibration; or it was read as something else: int(1.5), int(true) and int("１２") are process groups 1, 1
and 12. Every record is checked here when the journal is read, and the first fault is a `RecordError` naming
the field; journal.py adds the file and the line.

Only the fields the tuner reads are checked (``time``, a start record's ``index`` are kept as they are). Fields
older journals lack are optional: a start record's ``marker``, a candidate's ``zeropp``, a trial's losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ztune.config.schema import Checkpointing, Compression, Precision
from ztune.errors import shown_json
from ztune.inputs import MAX_BATCH
from ztune.tune.bench import STATUSES
from ztune.tune.space import Candidate

# Linux's pid_t is a signed 32-bit int; os.killpg of a larger id raises OverflowError.
MAX_PGID = 2**31 - 1


class RecordError(ValueError):
    """A record field that is missing or holds a value the tuner never writes; the message names the field."""


@dataclass(frozen=True)
class Field:
    name: str
    ok: Callable[[Any], bool]
    what: str  # what the value must be, for the message
    required: bool = True


def _whole(lo: int, hi: int | None = None) -> Callable[[Any], bool]:
    # type() and not isinstance(): JSON's true is a Python bool, which is an int.
    return lambda v: type(v) is int and lo <= v and (hi is None or v <= hi)


def _number(v: Any) -> bool:
    """A finite number >= 0 (seconds, FLOP/s)."""
    return type(v) in (int, float) and math.isfinite(v) and v >= 0


def _or_null(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _key(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def _loss(v: Any) -> bool:
    # A diverged trial's loss is NaN or infinite, and the journal keeps it so (json writes NaN, Infinity).
    return v is None or type(v) in (int, float)


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _one_of(values: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in values


def _measured(v: Any) -> bool:
    return isinstance(v, dict)


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


# A compute record's `measured`: the machine's compute as the run measured it when it started (cli/autotune.py
# _journalled_compute), with the codec rates (cost/codec.py RATE_FIELDS) where it measured them too.
COMPUTE_FIELDS = ("peak_flops_fp32", "peak_flops_bf16", "train_flops_efficiency")
MEASURED_FIELDS: tuple[Field, ...] = (
    Field("peak_flops_fp32", _positive, "a FLOP/s rate, a number > 0"),
    Field("peak_flops_bf16", _positive, "a FLOP/s rate, a number > 0"),
    Field("train_flops_efficiency", lambda v: _positive(v) and v <= 1, "a fraction of the peak, from 0 to 1 (> 0)"),
)


def _names(enum: Any) -> tuple[str, ...]:
    return tuple(m.value for m in enum)


_KEY = Field("key", _key, "a candidate key such as \"z0-fp32-mb4\"")
_INDEX = Field("index", _whole(1), "a trial number, a whole number from 1")
_STATUS = Field("status", _one_of(STATUSES), "a trial status (" + ", ".join(STATUSES) + ")")
_REASON = Field("reason", _text, "a text (\"\" for none)")
_STEP = Field("step_time_s", _or_null(_number), "a step time in seconds, a number >= 0, or null")
_WALL = Field("wall_s", _number, "a duration in seconds, a number >= 0")

# Per kind, the fields read back (tuner.TrialRecord.from_journal, confirm.RepeatRecord.from_journal,
# Tuner._end_stale_trials, cli/autotune.py _journalled_compute, Journal._check_header). `candidate` is checked
# field by field below.
FIELDS: dict[str, tuple[Field, ...]] = {
    "header": (Field("fingerprint", _text, "a text", required=False),
               Field("space", lambda v: isinstance(v, dict), "an object", required=False)),
    "start": (_KEY,
              Field("pgid", _whole(1, MAX_PGID), f"a process-group id, a whole number from 1 to {MAX_PGID}",
                    required=False),
              Field("report", _text, "a file path", required=False),
              Field("marker", _text, "a file path", required=False)),
    "trial": (_KEY, _INDEX, Field("candidate", lambda v: isinstance(v, dict), "an object of the candidate's knobs"),
              _STATUS, _REASON, _STEP,
              Field("peak_memory_bytes", _or_null(_whole(0)), "a whole number of bytes, or null"),
              Field("prior_step_time_s", _number, "a step time in seconds, a number >= 0"),
              Field("estimated_memory_bytes", _whole(0), "a whole number of bytes"),
              _WALL,
              Field("first_loss", _loss, "a number or null", required=False),
              Field("last_loss", _loss, "a number or null", required=False)),
    "repeat": (_KEY, _INDEX, Field("round", _whole(1), "a confirmation round, a whole number from 1"),
               _STATUS, _REASON, _STEP, _WALL),
    "compute": (Field("measured", _measured, "an object of the measured rates (profile field: value)"),),
}

# The knobs of space.Candidate, as the tuner writes them (Candidate.__dict__).
CANDIDATE_FIELDS: tuple[Field, ...] = (
    Field("stage", _whole(0, 3), "a ZeRO stage, 0 to 3"),
    Field("offload_optimizer", _flag, "true or false"),
    Field("checkpointing", _one_of(_names(Checkpointing)), "one of " + ", ".join(_names(Checkpointing))),
    Field("precision", _one_of(_names(Precision)), "one of " + ", ".join(_names(Precision))),
    Field("compression", _one_of(_names(Compression)), "one of " + ", ".join(_names(Compression))),
    Field("micro", _whole(1, MAX_BATCH), f"a micro-batch, a whole number from 1 to {MAX_BATCH}"),
    Field("zeropp", _flag, "true or false", required=False),  # journals from before ZeRO++ lack it
)


shown = shown_json  # a record's value as the journal spells it (JSON), cut to 60 characters


def _check_fields(record: dict[str, Any], fields: tuple[Field, ...], *, kind: str, prefix: str = "") -> None:
    for f in fields:
        if f.name not in record:
            if f.required:
                raise RecordError(f"the {kind} record has no {prefix}{f.name} ({f.what})")
            continue
        if not f.ok(record[f.name]):
            raise RecordError(f"{prefix}{f.name} {shown(record[f.name])} is not {f.what}")


def check_record(record: dict[str, Any]) -> None:
    """Raise RecordError for the first field of `record` (a parsed journal line with a ``kind``) the tuner
    could not read back as it wrote it."""
    kind = record["kind"]
    if not isinstance(kind, str) or kind not in FIELDS:
        raise RecordError(f"kind {shown(kind)} is not a journal record kind ({', '.join(FIELDS)})")
    _check_fields(record, FIELDS[kind], kind=kind)
    if kind == "compute":
        _check_measured(record["measured"])
    if kind == "trial":
        candidate = record["candidate"]
        known = {f.name for f in CANDIDATE_FIELDS}
        extra = sorted(str(k) for k in candidate if k not in known)
        if extra:
            raise RecordError(f"candidate.{extra[0]} is not a knob (knobs: {', '.join(sorted(known))})")
        _check_fields(candidate, CANDIDATE_FIELDS, kind=kind, prefix="candidate.")
        described = Candidate(**candidate).key
        if described != record["key"]:
            raise RecordError(f"candidate describes {shown(described)}, not the record's key {shown(record['key'])}")



def _check_measured(measured: dict[str, Any]) -> None:
    """A compute record's rates: the compute fields, and either every codec rate or none (as the tuner writes
    them), each a rate the profile loader would take."""
    from ztune.cost.codec import RATE_FIELDS

    known = (*COMPUTE_FIELDS, *RATE_FIELDS)
    extra = sorted(str(k) for k in measured if k not in known)
    if extra:
        raise RecordError(f"measured.{extra[0]} is not a measured rate (rates: {', '.join(COMPUTE_FIELDS)}, and the "
                          "codec rates of cost/codec.py)")
    _check_fields(measured, MEASURED_FIELDS, kind="compute", prefix="measured.")
    codec = [f for f in RATE_FIELDS if f in measured]
    if codec and len(codec) < len(RATE_FIELDS):
        missing = next(f for f in RATE_FIELDS if f not in measured)
        raise RecordError(f"the compute record has some codec rates but no measured.{missing} (the tuner writes "
                          "all of them or none)")
    for f in codec:
        if not _number(measured[f]):
            raise RecordError(f"measured.{f} {shown(measured[f])} is not an elements-per-second rate, a number >= 0")
