"""The tuner's confirmation phase (ztune/tune/confirm.py) with a fake trial runner: no process runs. Each
candidate's samples are scripted per ZeRO stage, so the tests know which pick the medians must give, which
trials the budget allows, and what a resume after a kill may (not) rerun."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest

from ztune.cli.autotune import recommendation, result_json
from ztune.config import load
from ztune.config.schema import TrainConfig
from ztune.profiles import load_hardware, load_model
from ztune.tune import tuner
from ztune.tune.bench import TrialOutcome
from ztune.tune.calibrate import Fit
from ztune.tune.confirm import leaders, median, rounds
from ztune.tune.journal import Journal
from ztune.tune.rank import Workload, local_hardware
from ztune.tune.space import Constraints, build_space

STEPS = 4  # warm-up + measured steps per trial (Settings below)
# Per stage: the search trial's sample, then the repeats in the order they run. Stage 0's first sample is
# the lucky one (fastest once, slowest by median); stage 3 is outside any margin.
SCRIPT = {0: [1.00, 1.60, 1.50], 1: [1.05, 1.04, 1.06], 2: [1.10, 1.20, 1.10], 3: [2.00]}


class Killed(Exception):
    pass


class FakeRunner:
    """Stands in for bench.run_trial: journals the start through on_start, advances a fake clock by the
    trial's wall time (startup 0 + STEPS steps), returns the next scripted sample of the candidate."""

    def __init__(self, script: dict[int, list[float]], *, kill_at: int | None = None) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[str] = []  # report file stems, in order
        self.kill_at, self.now = kill_at, 0.0

    def __call__(self, *, config_path, report_path, on_start, **_) -> TrialOutcome:
        stem = Path(report_path).name.removesuffix(".report.jsonl")
        on_start(4242 + len(self.calls))
        if self.kill_at is not None and len(self.calls) == self.kill_at:
            raise Killed(stem)  # the tuner dies during this trial: a start without an end in the journal
        self.calls.append(stem)
        stage = load(config_path).zero.stage
        step_s = self.script[stage].pop(0)
        if step_s is None:  # a hung trial
            self.now += 60.0
            return TrialOutcome(status="timeout", reason="no new step for 60 s", wall_s=60.0, exit_code=None)
        self.now += STEPS * step_s
        return TrialOutcome(status="ok", reason="", wall_s=STEPS * step_s, exit_code=0, step_time_s=step_s,
                            peak_memory_bytes=1 << 20, first_loss=2.0, last_loss=1.0)


def _tuner(tmp_path: Path, monkeypatch, runner: FakeRunner, **settings) -> tuner.Tuner:
    monkeypatch.setattr(tuner, "run_trial", runner)
    monkeypatch.setattr(tuner, "time", types.SimpleNamespace(monotonic=lambda: runner.now, time=lambda: 0.0))
    monkeypatch.setattr(tuner, "load_factor", lambda: 1.0)
    # The prior as the fit (calibration has its own tests; its coordinate descent would cost seconds here).
    monkeypatch.setattr(tuner, "fit_calibration", lambda step_time, points, *, prior, **_: Fit(prior, ()))
    hw = local_hardware(load_hardware("cpu-local"), num_ranks=2)
    w = Workload(model=load_model("tiny-gpt"), hardware=hw, base=TrainConfig(), global_batch=8, seq_len=32)
    space = build_space(Constraints(num_ranks=2, global_batch=8, seq_len=32, vary=("stage",), stages=(0, 1, 2, 3),
                                    precisions=("fp32",), micro=(4,)))
    journal = Journal(tmp_path / "journal.jsonl", fingerprint="fp", describe={})
    # min_trials above the grid: the search measures every candidate, so only confirmation decides.
    s = tuner.Settings(nproc=2, script="train.py", warmup_steps=1, measured_steps=3, min_trials=99, **settings)
    return tuner.Tuner(workload=w, candidates=space, settings=s, journal=journal, out_dir=tmp_path,
                       memory_limit_bytes=1 << 40)


def _records(tmp_path: Path, kind: str) -> list[dict]:
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_leaders_rounds_and_median() -> None:
    rec = lambda key, t, status="ok": types.SimpleNamespace(candidate=types.SimpleNamespace(key=key),  # noqa: E731
                                                           step_time_s=t, status=status)
    records = [rec("a", 1.0), rec("b", 1.1), rec("c", 1.14), rec("d", 1.16), rec("e", 0.5, "crash")]
    assert leaders(records, top=3, margin=0.15) == ["a", "b", "c"]
    assert leaders(records, top=2, margin=0.15) == ["a", "b"]
    assert leaders(records, top=3, margin=0.05) == []  # one leader: nothing to confirm
    assert rounds(["a", "b", "c"], repeats=2) == [[(1, "a"), (1, "b"), (1, "c")], [(2, "c"), (2, "b"), (2, "a")]]
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([1.0, 4.0]) == 2.5


def test_confirmation_picks_the_lowest_median_measuring_no_new_candidate(tmp_path, monkeypatch) -> None:
    runner = FakeRunner(SCRIPT)
    result = _tuner(tmp_path, monkeypatch, runner).run()
    # The search measured each candidate once; the leaders within 15% (stages 0-2) ran twice more each,
    # interleaved A B C, C B A; stage 3 never again.
    assert sorted(c.split("-")[0] for c in runner.calls[:4]) == ["z0", "z1", "z2", "z3"]
    assert [c.split("-", 1)[0] + c[c.rindex("."):] for c in runner.calls[4:]] == [
        "z0.r1", "z1.r1", "z2.r1", "z2.r2", "z1.r2", "z0.r2"]
    assert len(result.trials) == 4 and len(result.repeats) == 6 and result.new_repeats == 6
    # Without repeats stage 0 (1.00 once) would win; on medians stage 1 (1.05) does.
    assert result.best.candidate.stage == 1 and result.best_median_s == pytest.approx(1.05)
    assert result.samples_s[result.best.candidate.key] == [1.05, 1.04, 1.06]
    assert "confirmed 3 leader(s)" in result.confirm_note
    reps = _records(tmp_path, "repeat")
    assert [(r["key"].split("-")[0], r["round"]) for r in reps] == [
        ("z0", 1), ("z1", 1), ("z2", 1), ("z2", 2), ("z1", 2), ("z0", 2)]
    assert len(_records(tmp_path, "trial")) == 4  # repeats never add or replace a candidate's trial record
    # What the CLI prints and writes: the median the pick was chosen on, and its samples.
    line = recommendation(result)
    assert line.startswith(f"{result.best.candidate.key} at a median of 1,050 ms/step over 3 sample(s) "
                           "(1,050, 1,040, 1,060)") and "z2-fp32-mb4 1,100" in line, line
    payload = result_json(result)
    assert payload["best"]["step_time_s"] == pytest.approx(1.05) and payload["best"]["samples_s"] == [1.05, 1.04, 1.06]
    assert (payload["num_trials"], payload["num_repeats"], payload["total_trials"]) == (4, 6, 10)
    # best.yaml is written once, header and all: a reader (or a kill) never sees it without its header.
    (tmp_path / "best.yaml").write_text("previous pick\n")
    seen, real_replace = [], os.replace

    def watch(src, dst):
        if Path(dst).name == "best.yaml":
            seen.append(Path(src).read_text())
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watch)
    paths = tuner.export_best(result, out_dir=tmp_path, deepspeed=False, note=line)
    monkeypatch.setattr(os, "replace", real_replace)
    text = Path(paths[0]).read_text()
    assert seen == [text]
    assert text.startswith(f"# ztune autotune pick: {line}\n# confirmed") and load(paths[0]).zero.stage == 1


def test_confirmation_off_keeps_the_single_sample_pick(tmp_path, monkeypatch) -> None:
    runner = FakeRunner(SCRIPT)
    result = _tuner(tmp_path, monkeypatch, runner, confirm_repeats=0).run()
    assert len(runner.calls) == 4 and result.repeats == () and result.best.candidate.stage == 0
    assert result.confirm_note == "confirmation off"


@pytest.mark.parametrize(("limit", "repeats", "why"), [
    ({"max_trials": 7}, 3, "the cap is 7"),  # round 1 fits (4 + 3), round 2 does not
    ({"max_trials": 6}, 0, "the cap is 6"),
    # Search 4 x 4 steps x (1 + 1.05 + 1.1 + 2) s = 20.6 s; a round ~12.6 s: one fits in 35 s, two do not.
    ({"time_budget_s": 35.0}, 3, "time budget"),
])
def test_confirmation_keeps_to_the_trial_cap_and_time_budget(tmp_path, monkeypatch, limit, repeats, why) -> None:
    runner = FakeRunner(SCRIPT)
    result = _tuner(tmp_path, monkeypatch, runner, **limit).run()
    assert len(result.trials) == 4 and len(result.repeats) == repeats, result.confirm_note
    assert why in result.confirm_note


def test_resume_after_a_kill_in_confirmation_loses_and_reruns_no_sample(tmp_path, monkeypatch) -> None:
    killed = FakeRunner(SCRIPT, kill_at=6)  # dies in the 3rd repeat (z2, round 1)
    with pytest.raises(Killed):
        _tuner(tmp_path, monkeypatch, killed).run()
    assert len(_records(tmp_path, "repeat")) == 2
    ended = []
    monkeypatch.setattr(tuner, "kill_stale_group", lambda pgid, marker: ended.append((pgid, marker)) or True)
    # The samples the first run consumed are gone from the script: a rerun of any of them would fail.
    rest = {0: [1.50], 1: [1.06], 2: [1.20, 1.10], 3: []}
    again = FakeRunner(rest)
    result = _tuner(tmp_path, monkeypatch, again).run()
    # The stale start record of the killed trial was ended with its process group; nothing but the missing
    # repeats ran, in the planned order.
    assert ended and ended[0][0] == 4242 + 6 and ended[0][1].endswith("z2-fp32-mb4.r1.report.jsonl")
    assert [c.split("-", 1)[0] + c[c.rindex("."):] for c in again.calls] == ["z2.r1", "z2.r2", "z1.r2", "z0.r2"]
    assert result.new_trials == 0 and result.new_repeats == 4 and len(result.repeats) == 6
    assert sum(r.resumed for r in result.repeats) == 2
    assert result.best.candidate.stage == 1 and result.samples_s[result.best.candidate.key] == [1.05, 1.04, 1.06]
    keys = [(r["key"], r["round"]) for r in _records(tmp_path, "repeat")]
    assert len(keys) == len(set(keys)) == 6


def test_a_failed_repeat_is_no_sample_and_is_reported(tmp_path, monkeypatch) -> None:
    script = {**SCRIPT, 0: [1.00, None, 0.90]}
    result = _tuner(tmp_path, monkeypatch, FakeRunner(script)).run()
    assert [r.status for r in result.repeats].count("timeout") == 1
    assert result.samples_s["z0-fp32-mb4"] == [1.00, 0.90]  # the hung repeat added nothing
    assert result.best.candidate.stage == 0 and result.best_median_s == pytest.approx(0.95)
    assert "(1 failed: no sample)" in result.confirm_note and "at least 2 each" in result.confirm_note
