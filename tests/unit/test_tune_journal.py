"""The autotune journal: whole-line appends, torn tails, refusal of another run's journal."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ztune.tune.journal import Journal, JournalError
from ztune.tune.space import Candidate
from ztune.tune.tuner import TrialRecord


def _open(path, fp="abc", **kw):
    return Journal(path, fingerprint=fp, describe={"seq_len": 128, "model": "tiny"}, **kw)


def _candidate(micro: int) -> Candidate:
    return Candidate(stage=0, offload_optimizer=False, checkpointing="none", precision="fp32", compression="none",
                     micro=micro)


def _trial(micro: int) -> dict:
    """A finished trial as the tuner journals it (TrialRecord.to_journal); its key is z0-fp32-mb<micro>."""
    return TrialRecord(index=micro, candidate=_candidate(micro), status="ok", reason="", step_time_s=0.5,
                       peak_memory_bytes=1 << 20, prior_step_time_s=0.4, estimated_memory_bytes=1 << 20,
                       wall_s=9.0, first_loss=9.1, last_loss=7.0).to_journal()


def _start(micro: int) -> dict:
    """A trial's start as the tuner journals it (Tuner._launch)."""
    return {"kind": "start", "key": _candidate(micro).key, "index": micro, "pgid": 4242, "report": "r.jsonl",
            "marker": "r.jsonl", "time": 0.0}


def test_reload_gives_finished_and_unfinished_trials(tmp_path) -> None:
    path = tmp_path / "j.jsonl"
    j = _open(path)
    j.append(_start(1))
    j.append(_trial(1))
    j.append(_start(2))
    again = _open(path)
    assert set(again.state.finished) == {"z0-fp32-mb1"}
    assert set(again.state.unfinished) == {"z0-fp32-mb2"}
    assert all(line.endswith("}") for line in path.read_text().splitlines())


def test_torn_last_line_is_dropped_and_cut_before_the_next_append(tmp_path) -> None:
    path = tmp_path / "j.jsonl"
    j = _open(path)
    j.append(_trial(1))
    with open(path, "ab") as fh:
        fh.write(json.dumps(_trial(2)).encode()[:40])  # the tuner died inside write()
    again = _open(path)
    assert set(again.state.finished) == {"z0-fp32-mb1"} and again.state.torn_tail_bytes > 0
    again.append(_trial(3))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r.get("key") for r in records] == [None, "z0-fp32-mb1", "z0-fp32-mb3"]


def test_damage_before_the_last_line_is_an_error(tmp_path) -> None:
    path = tmp_path / "j.jsonl"
    j = _open(path)
    j.append(_trial(1))
    j.append(_trial(2))
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(JournalError, match="line 2 is damaged .*; correct or remove that line, or rerun with --fresh"):
        _open(path)


@pytest.mark.parametrize("edit, message", [
    (lambda line: "", "line 2 is blank; correct or remove that line"),
    (lambda line: line.replace('"status": "ok"', '"status": "ok", "status": "failed"'),
     'line 2: key "status" appears twice in one object; correct or remove that line'),
])
def test_a_blank_line_or_a_key_written_twice_names_the_line_and_keeps_the_file(tmp_path, edit, message) -> None:
    """A blank line said only "damaged; move the file aside" (every trial lost, where removing the line would
    do); a record with a key written twice was read as its last value (a hand edit changed the best config)."""
    path = tmp_path / "j.jsonl"
    j = _open(path)
    j.append(_trial(1))
    j.append(_trial(2))
    lines = path.read_text().splitlines()
    lines[1] = edit(lines[1])
    assert '"status": "ok"' in path.read_text()
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    with pytest.raises(JournalError, match=message):
        _open(path)
    assert path.read_bytes() == before


def test_journal_of_another_space_is_refused_unless_fresh(tmp_path) -> None:
    path = tmp_path / "j.jsonl"
    _open(path).append(_trial(1))
    with pytest.raises(JournalError, match="different tuning run.*--fresh"):
        Journal(path, fingerprint="other", describe={"seq_len": 256, "model": "tiny"})
    fresh = Journal(path, fingerprint="other", describe={"seq_len": 256, "model": "tiny"}, fresh=True)
    assert fresh.state.finished == {}
    assert fresh.moved_aside is not None and '"key": "z0-fp32-mb1"' in fresh.moved_aside.read_text()


def test_a_resumed_run_ranks_with_the_compute_its_first_run_measured(tmp_path) -> None:
    """The CLI measures this host's compute once per run and journals it; a resume reads it back instead of
    re-measuring a machine whose load has changed (which reshuffled the killed run's plan)."""
    import io

    from rich.console import Console

    from ztune.cli.autotune import _COMPUTE_FIELDS, _journalled_compute
    from ztune.profiles import load_hardware

    hw = load_hardware("cpu-local")
    err = Console(file=io.StringIO())
    first = Journal(tmp_path / "j.jsonl", fingerprint="fp", describe={})
    assert _journalled_compute(hw, first, err) is None  # a new run: nothing recorded, measure
    measured = {"peak_flops_fp32": 51e9, "peak_flops_bf16": 23e9, "train_flops_efficiency": 0.31}
    first.append({"kind": "compute", "measured": measured, "at": 0.0})
    first.append({"kind": "compute", "measured": {f: 1.0 for f in _COMPUTE_FIELDS}, "at": 1.0})  # first wins
    resumed = Journal(tmp_path / "j.jsonl", fingerprint="fp", describe={})
    hw2 = _journalled_compute(hw, resumed, err)
    assert hw2 is not None and {f: getattr(hw2, f) for f in _COMPUTE_FIELDS} == measured
    assert hw2.name == hw.name and "as measured when this run started" in err.file.getvalue()


@pytest.mark.parametrize("bad, field", [
    ({"peak_flops_fp32": 51e9}, "has no measured.peak_flops_bf16"),
    ({"peak_flops_fp32": 51e9, "peak_flops_bf16": 0.0, "train_flops_efficiency": 0.31}, "measured.peak_flops_bf16 0.0"),
    ({"peak_flops_fp32": 51e9, "peak_flops_bf16": 23e9, "train_flops_efficiency": 50.0},
     "measured.train_flops_efficiency 50.0 is not a fraction"),
    ({"peak_flops_fp32": "fast", "peak_flops_bf16": 23e9, "train_flops_efficiency": 0.3},
     "measured.peak_flops_fp32 \"fast\""),
    ({"peak_flops_fp32": 51e9, "peak_flops_bf16": 23e9, "train_flops_efficiency": 0.3, "foo_bar": 1.0},
     "measured.foo_bar is not a measured rate"),
    ({}, "has no measured.peak_flops_fp32"),
    ([1, 2], "measured \\[1, 2\\] is not an object"),
])
def test_a_compute_record_the_tuner_did_not_write_is_one_line_naming_the_field(tmp_path, bad, field):
    """A hand-edited compute record was skipped silently (an extra or missing field, a zero peak): the run
    measured again and appended another, which the first record then outranked on every resume; an efficiency of
    50 was used for ranking. Now the journal read names the field, and the file is left as it was."""
    path = tmp_path / "j.jsonl"
    Journal(path, fingerprint="fp", describe={}).append({"kind": "compute", "measured": bad, "at": 0.0})
    before = path.read_bytes()
    with pytest.raises(JournalError, match=f"line 2: .*{field}"):
        Journal(path, fingerprint="fp", describe={})
    assert path.read_bytes() == before


def test_journalled_compute_restores_codec_rates(tmp_path):
    """A run whose candidates compress measured the codec rates too (cli/autotune.py); a resume ranks with them."""
    import io

    from rich.console import Console

    from ztune.cli.autotune import _COMPUTE_FIELDS, _journalled_compute
    from ztune.cost.codec import RATE_FIELDS
    from ztune.profiles import load_hardware

    hw, err = load_hardware("cpu-local"), Console(file=io.StringIO())
    measured = {"peak_flops_fp32": 51e9, "peak_flops_bf16": 23e9, "train_flops_efficiency": 0.31,
                **{f: 7e7 for f in RATE_FIELDS}}
    j = Journal(tmp_path / "j.jsonl", fingerprint="fp", describe={})
    j.append({"kind": "compute", "measured": measured, "at": 0.0})
    hw2 = _journalled_compute(hw, Journal(tmp_path / "j.jsonl", fingerprint="fp", describe={}), err)
    assert hw2 is not None and {f: getattr(hw2, f) for f in (*_COMPUTE_FIELDS, *RATE_FIELDS)} == measured
    # some codec rates but not all: not a record this code wrote
    partial = {k: v for k, v in measured.items() if k != RATE_FIELDS[0]}
    Journal(tmp_path / "j2.jsonl", fingerprint="fp", describe={}).append({"kind": "compute", "measured": partial,
                                                                         "at": 0.0})
    with pytest.raises(JournalError, match=f"line 2: .*some codec rates but no measured.{RATE_FIELDS[0]}"):
        Journal(tmp_path / "j2.jsonl", fingerprint="fp", describe={})


def test_measured_cpu_compute_measures_codec_rates_when_asked(monkeypatch):
    import io

    from rich.console import Console

    from ztune import probe
    from ztune.cli.autotune import _measured_cpu_compute
    from ztune.cost.codec import RATE_FIELDS
    from ztune.profiles import load_hardware, load_model

    hw = dataclasses.replace(load_hardware("cpu-local"), **dict.fromkeys(RATE_FIELDS, 0.0))
    rates = probe.FlopRates(1e11, 1e11, "cpu", 256)
    monkeypatch.setattr(probe, "with_measured_cpu_compute",
                        lambda hw, **kw: (hw, probe.CpuCompute(rates, 1e10, 0.1)))
    err = Console(file=io.StringIO())
    plain = _measured_cpu_compute(hw, err, model=load_model("tiny-gpt"), seq_len=16, precision="fp32", micro_batch=1)
    assert all(getattr(plain, f) == 0 for f in RATE_FIELDS)
    timed = _measured_cpu_compute(hw, err, model=load_model("tiny-gpt"), seq_len=16, precision="fp32", micro_batch=1,
                                  codec=True)
    assert all(getattr(timed, f) > 0 for f in RATE_FIELDS) and "codec per rank, measured now" in err.file.getvalue()


def test_a_timed_step_too_large_for_this_host_is_skipped_not_run(monkeypatch) -> None:
    """autotune's compute measurement times one unsharded step at the candidates' middle micro-batch; a huge
    --micro or --seq made that step allocate tens of GiB and the kernel killed the process (the CLI fuzz test
    hit it). Activations now count in the memory check, and such a step is skipped with a line saying so."""
    import io

    from rich.console import Console

    import ztune.probe as probe
    from ztune.cli.autotune import _measured_cpu_compute, timed_step_activation_bytes
    from ztune.probe import FlopRates
    from ztune.profiles import load_hardware, load_model

    model = load_model("tiny-gpt")
    small = timed_step_activation_bytes(model, seq_len=64, micro_batch=2, precision="fp32")
    huge = timed_step_activation_bytes(model, seq_len=65536, micro_batch=64, precision="fp32")
    assert small < 2**30 < huge
    assert timed_step_activation_bytes(model, seq_len=64, micro_batch=2, precision="bf16") * 2 == small
    seen = {}

    def fake(hw, *, model=None, **kwargs):
        seen["model"] = model
        rates = FlopRates(fp32_flops_per_s=1e10, bf16_flops_per_s=1e10, device="cpu", matrix_size=256)
        return hw, (probe.CpuCompute(rates, 1e9, 0.1) if model is not None else probe.CpuCompute(rates))

    monkeypatch.setattr(probe, "with_measured_cpu_compute", fake)
    err = Console(file=io.StringIO(), width=400)
    _measured_cpu_compute(load_hardware("cpu-local"), err, model=model, seq_len=65536, precision="fp32",
                          micro_batch=64)
    assert seen["model"] is None and "too large to time a step here" in err.file.getvalue()
    _measured_cpu_compute(load_hardware("cpu-local"), err, model=model, seq_len=64, precision="fp32", micro_batch=2)
    assert seen["model"] is model


def _repeat() -> dict:
    from ztune.tune.confirm import RepeatRecord

    return RepeatRecord(index=4, key=_candidate(1).key, round=1, status="ok", reason="", step_time_s=0.5,
                        wall_s=9.0).to_journal()


def _compute() -> dict:
    return {"kind": "compute", "measured": {"peak_flops_fp32": 5e10, "peak_flops_bf16": 2e10,
                                            "train_flops_efficiency": 0.3}, "at": 0.0}


_RECORDS = {"start": lambda: _start(1), "trial": lambda: _trial(1), "repeat": _repeat, "compute": _compute,
            "header": lambda: _start(1)}
_GONE = object()  # the field is removed from the record

# (record kind, field, dotted path to it, values the tuner never writes there). Every field a resumed tuner
# reads back (ztune/tune/records.py FIELDS), each with several values of the kinds a hand edit leaves.
_BAD_FIELDS = [
    ("start", "pgid", "pgid", ["abc", 1.5, True, "１２", "12", [1], None, 0, -4, 2**31]),
    ("start", "key", "key", [5, None, "", ["z0"], _GONE]),
    ("start", "report", "report", [3, None, ["r"]]),
    ("start", "marker", "marker", [3, False]),
    ("trial", "index", "index", ["1", 0, 1.0, True, None, _GONE]),
    ("trial", "status", "status", ["OK", "fine", None, 1, _GONE]),
    ("trial", "reason", "reason", [None, 3, _GONE]),
    ("trial", "step_time_s", "step_time_s", ["fast", "0.5", -1, float("nan"), float("inf"), True, [0.5], _GONE]),
    ("trial", "peak_memory_bytes", "peak_memory_bytes", [1.5, -1, "1G", True, _GONE]),
    ("trial", "prior_step_time_s", "prior_step_time_s", [None, "x", float("inf"), -0.1, _GONE]),
    ("trial", "estimated_memory_bytes", "estimated_memory_bytes", [None, 2.5, "1", -1, _GONE]),
    ("trial", "wall_s", "wall_s", [None, -0.1, "9", False, _GONE]),
    ("trial", "first_loss", "first_loss", ["nan", True, [1.0]]),
    ("trial", "last_loss", "last_loss", ["7", {}]),
    ("trial", "candidate", "candidate", ["z0-fp32-mb1", None, [], _GONE]),
    ("trial", "candidate.stage", "candidate.stage", ["0", 4, -1, True, 0.0, None, _GONE]),
    ("trial", "candidate.offload_optimizer", "candidate.offload_optimizer", [0, "false", None, _GONE]),
    ("trial", "candidate.checkpointing", "candidate.checkpointing", ["None", "NONE", 1, None, _GONE]),
    ("trial", "candidate.precision", "candidate.precision", ["FP32", "fp64", 32, _GONE]),
    ("trial", "candidate.compression", "candidate.compression", ["gzip", False, _GONE]),
    ("trial", "candidate.micro", "candidate.micro", [0, "1", 1.5, True, 2**40, _GONE]),
    ("trial", "candidate.zeropp", "candidate.zeropp", [0, "no", None]),
    ("trial", "candidate.color", "candidate.color", ["red", None]),
    ("trial", "candidate", "key", ["z3-fp32-mb1", "z0-fp32-mb2"]),  # the key says another candidate
    ("repeat", "round", "round", ["1", 0, 1.5, True, None, _GONE]),
    ("repeat", "index", "index", ["4", -1, _GONE]),
    ("repeat", "step_time_s", "step_time_s", ["x", -2, _GONE]),
    ("repeat", "key", "key", [None, 7, _GONE]),
    ("compute", "measured", "measured", ["fast", None, [5e10], {"peak_flops_fp32": "5e10"},
                                         {"peak_flops_fp32": -1.0}, {"peak_flops_fp32": float("nan")},
                                         {"peak_flops_fp32": True}, _GONE]),
    ("start", "kind", "kind", ["begin", "START", None, 3, ["start"]]),
    ("header", "header", "kind", ["header"]),  # a second header
]


def _with(record: dict, path: str, value) -> dict:
    record = json.loads(json.dumps(record))
    *parents, name = path.split(".")
    holder = record
    for p in parents:
        holder = holder[p]
    if value is _GONE:
        holder.pop(name)
    else:
        holder[name] = value
    return record


@pytest.mark.parametrize(("kind", "field", "path", "value"),
                         [(k, f, p, v) for k, f, p, values in _BAD_FIELDS for v in values],
                         ids=lambda x: repr(x) if x is not _GONE else "missing")
def test_a_field_the_tuner_never_writes_is_one_error_naming_file_line_and_field(tmp_path, kind, field, path,
                                                                               value) -> None:
    """A hand-edited journal whose pgid was "abc" gave a traceback on resume (int() in the stale-trial
    cleanup); 1.5, true and "１２" were read as process groups 1, 1 and 12. Every field read back is checked
    when the journal is read, the error names the file, the line and the field, and the file is left whole
    (even as its last line, which is not a torn write: it is valid JSON)."""
    path_ = tmp_path / "j.jsonl"
    good = _open(path_)
    good.append(_trial(2))
    with open(path_, "a") as fh:  # by hand, as a person edits it
        fh.write(json.dumps(_with(_RECORDS[kind](), path, value)) + "\n")
    before = path_.read_bytes()
    with pytest.raises(JournalError) as exc:
        _open(path_)
    message = str(exc.value)
    assert f"{str(path_)!r} line 3: " in message and field in message and "--fresh" in message, message
    assert "\n" not in message
    assert path_.read_bytes() == before


def test_what_the_tuner_writes_reads_back_in_every_form(tmp_path) -> None:
    """The checks refuse no record the tuner writes, nor one an older ztune wrote (a start without a marker,
    a candidate without zeropp, a trial without losses), nor a diverged trial's NaN loss."""
    from ztune.tune.records import CANDIDATE_FIELDS

    assert [f.name for f in CANDIDATE_FIELDS] == [f.name for f in dataclasses.fields(Candidate)]
    path = tmp_path / "j.jsonl"
    j = _open(path)
    old_start = {k: v for k, v in _start(3).items() if k != "marker"}
    old_trial = _trial(3)
    del old_trial["first_loss"], old_trial["last_loss"], old_trial["candidate"]["zeropp"]
    failed = {**_trial(4), "status": "oom", "reason": "out of memory", "step_time_s": None,
              "peak_memory_bytes": None, "first_loss": float("nan"), "last_loss": float("inf")}
    for record in (_start(1), _trial(1), _repeat(), _compute(), old_start, old_trial, _start(4), failed):
        j.append(record)
    again = _open(path)
    assert set(again.state.finished) == {"z0-fp32-mb1", "z0-fp32-mb3", "z0-fp32-mb4"}
    assert not again.state.unfinished and len(again.state.repeats) == 1 and again.state.compute is not None


@pytest.mark.parametrize(("field", "value"), [("space", [1, 2]), ("space", "tiny"), ("fingerprint", 5)])
def test_a_header_field_the_tuner_never_writes_is_one_error(tmp_path, field, value) -> None:
    path = tmp_path / "j.jsonl"
    _open(path)
    header = json.loads(path.read_text())
    path.write_text(json.dumps({**header, field: value}) + "\n")
    before = path.read_bytes()
    with pytest.raises(JournalError, match=f"line 1: {field} .* is not"):
        _open(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(("value", "shown"), [("1", '"1"'), (1.0, "1.0"), (True, "true"), (2, "2"), (None, "null")])
def test_a_header_version_other_than_the_integer_written_is_refused_in_json_spelling(tmp_path, value, shown) -> None:
    """ "1", 1.0 and true compare equal to 1 in Python, or look like it in a message; none is the integer 1 this
    ztune writes. The message spells the value as the file does; the file is kept."""
    path = tmp_path / "j.jsonl"
    _open(path)
    header = json.loads(path.read_text())
    path.write_text(json.dumps({**header, "version": value}) + "\n")
    before = path.read_bytes()
    with pytest.raises(JournalError) as err:
        _open(path)
    assert f"has version {shown}, this ztune writes 1; rerun with --fresh" in str(err.value)
    assert path.read_bytes() == before
