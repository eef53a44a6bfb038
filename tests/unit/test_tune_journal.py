"""The autotune journal: whole-line appends, torn tails, refusal of another run's journal."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ztune.tune.journal import Journal, JournalError


def _open(path, fp="abc", **kw):
    return Journal(path, fingerprint=fp, describe={"seq_len": 128, "model": "tiny"}, **kw)


def test_reload_gives_finished_and_unfinished_trials(tmp_path) -> None:
    path = tmp_path / "j.jsonl"
    j = _open(path)
    j.append({"kind": "start", "key": "a", "pgid": 1})
    j.append({"kind": "trial", "key": "a", "status": "ok"})
    j.append({"kind": "start", "key": "b", "pgid": 2})
    again = _open(path)
    assert set(again.state.finished) == {"a"}
    assert set(again.state.unfinished) == {"b"}
    assert all(line.endswith("}") for line in path.read_text().splitlines())


def test_torn_last_line_is_dropped_and_cut_before_the_next_append(tmp_path) -> None:
    path = tmp_path / "j.jsonl"
    j = _open(path)
    j.append({"kind": "trial", "key": "a", "status": "ok"})
    with open(path, "ab") as fh:
        fh.write(b'{"kind": "trial", "key": "b", "sta')  # the tuner died inside write()
    again = _open(path)
    assert set(again.state.finished) == {"a"} and again.state.torn_tail_bytes > 0
    again.append({"kind": "trial", "key": "c", "status": "ok"})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r.get("key") for r in records] == [None, "a", "c"]


def test_damage_before_the_last_line_is_an_error(tmp_path) -> None:
    path = tmp_path / "j.jsonl"
    j = _open(path)
    j.append({"kind": "trial", "key": "a", "status": "ok"})
    j.append({"kind": "trial", "key": "b", "status": "ok"})
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(JournalError, match="line 2 is damaged"):
        _open(path)


def test_journal_of_another_space_is_refused_unless_fresh(tmp_path) -> None:
    path = tmp_path / "j.jsonl"
    _open(path).append({"kind": "trial", "key": "a", "status": "ok"})
    with pytest.raises(JournalError, match="different tuning run.*--fresh"):
        Journal(path, fingerprint="other", describe={"seq_len": 256, "model": "tiny"})
    fresh = Journal(path, fingerprint="other", describe={"seq_len": 256, "model": "tiny"}, fresh=True)
    assert fresh.state.finished == {}
    assert fresh.moved_aside is not None and '"key": "a"' in fresh.moved_aside.read_text()


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
    # a record this code did not write (a field missing, a zero peak) is not trusted: measure again
    for bad in ({"peak_flops_fp32": 51e9}, dict(measured, peak_flops_bf16=0.0)):
        j = Journal(tmp_path / f"{len(bad)}.jsonl", fingerprint="fp", describe={})
        j.append({"kind": "compute", "measured": bad, "at": 0.0})
        assert _journalled_compute(hw, j, err) is None


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
    j2 = Journal(tmp_path / "j2.jsonl", fingerprint="fp", describe={})
    j2.append({"kind": "compute", "measured": partial, "at": 0.0})
    assert _journalled_compute(hw, j2, err) is None


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
