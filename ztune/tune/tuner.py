"""The autotuner's orchestrator: estimate, prune, rank, measure, calibrate, re-rank, stop.

Loop, one trial at a time (trials share the machine, so running two at once would spoil both timings):
1. calibrate the cost model on every successful trial so far (efficiency factors, memory offset, and the
   memory limit learned from OOMs);
2. assess the untried candidates (rank.py): estimate, prune by memory, fastest first;
3. stop when nothing is left, when the fastest remaining candidate is not predicted to beat the best
   measured step time by more than `threshold`, or when the trial cap or time budget is reached;
4. run the fastest eligible candidate as a trial (bench.py), journal it, repeat.
Then confirmation (confirm.py): the leaders of the search are measured again, interleaved, within what is
left of the trial cap and the time budget, and the pick is the lowest median over each candidate's samples.

The journal makes the loop restartable: finished trials and repeats are read back instead of rerun (a
repeat is identified by its candidate and round). The search decides on each candidate's first sample only:
repeats never change which candidates it measures.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztune.config.io import save
from ztune.config.schema import TrainConfig
from ztune.cost.compute import DEFAULT_EFFICIENCY, Efficiency
from ztune.tune.bench import TrialOutcome, kill_stale_group, run_trial
from ztune.tune.calibrate import Calibration, Fit, fit_calibration
from ztune.tune.confirm import (
    CONFIRM_MARGIN,
    CONFIRM_REPEATS,
    CONFIRM_TOP,
    RepeatRecord,
    leaders,
    median,
    pick,
    rounds,
    samples,
)
from ztune.tune.hosts import HostTrials, run_trial_on_hosts
from ztune.tune.journal import Journal
from ztune.tune.rank import Assessment, MemoryModel, Workload, assess, fit_memory
from ztune.tune.space import Candidate

# Seconds a trial needs besides its steps (interpreter, torch import, process group, model build); the
# first trial replaces this guess with measurements.
STARTUP_GUESS_S = 8.0
# A trial is declared hung after this many times its predicted duration (plus TIMEOUT_FLOOR_S).
TIMEOUT_FACTOR = 4.0
TIMEOUT_FLOOR_S = 30.0
# A started trial that reports no step for max(STALL_FLOOR_S, STALL_FACTOR x its predicted step) hangs.
STALL_FLOOR_S = 15.0
STALL_FACTOR = 5.0


def load_factor() -> float:
    """How much slower than idle this machine runs now: runnable processes per core over the last minute,
    at least 1 (1 where the load average is unknown)."""
    try:
        return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:
        return 1.0


def trial_limits_s(*, predicted_wall_s: float, predicted_step_s: float, trial_timeout_s: float | None,
                   stall_timeout_s: float | None, budget_left_s: float | None, load: float = 1.0,
                   ) -> tuple[float, float]:
    """(whole-trial limit, no-new-step limit) in seconds for one trial.

    Given values (--trial-timeout, --stall-timeout) are used as they are. Derived ones come from the
    calibrated prediction (startup measured on earlier trials + steps), widened by `load` (load_factor()):
    the predictions were measured at another load, and a busy machine must not turn a slow trial into a
    "hang". The time budget caps the whole-trial limit (never below TIMEOUT_FLOOR_S).
    """
    timeout_s = trial_timeout_s
    if timeout_s is None:
        timeout_s = (TIMEOUT_FLOOR_S + TIMEOUT_FACTOR * predicted_wall_s) * load
    if budget_left_s is not None:
        # A trial never runs past the budget by more than the floor (it ends as a timeout).
        timeout_s = min(timeout_s, max(budget_left_s, TIMEOUT_FLOOR_S))
    stall_s = stall_timeout_s
    if stall_s is None:
        stall_s = max(STALL_FLOOR_S, STALL_FACTOR * predicted_step_s) * load
    return timeout_s, stall_s


@dataclass(frozen=True)
class Settings:
    """Search controls. Times in seconds; memory in bytes per rank."""

    nproc: int
    script: str
    script_args: tuple[str, ...] = ()
    warmup_steps: int = 2
    measured_steps: int = 5
    threshold: float = 0.05
    memory_margin: float = 0.1
    memory_cap_bytes: int | None = None
    trial_timeout_s: float | None = None  # None: derived from the calibrated estimate
    stall_timeout_s: float | None = None  # None: derived from the calibrated estimate
    time_budget_s: float | None = None
    max_trials: int | None = None
    # Trials to run before the convergence test may stop the search: one measurement fits the model to
    # itself, so its ranking of the rest is still the uncalibrated one.
    min_trials: int = 3
    hosts: HostTrials | None = None  # trials through `ztune launch` on these hosts (autotune -H); None: local
    # Confirmation (confirm.py): extra samples per leader (0: off), most leaders, leaders' margin (fraction).
    confirm_repeats: int = CONFIRM_REPEATS
    confirm_top: int = CONFIRM_TOP
    confirm_margin: float = CONFIRM_MARGIN


@dataclass(frozen=True)
class TrialRecord:
    index: int
    candidate: Candidate
    status: str
    reason: str
    step_time_s: float | None
    peak_memory_bytes: int | None
    prior_step_time_s: float  # the uncalibrated estimate
    estimated_memory_bytes: int  # the cost model's per-rank total, uncalibrated
    wall_s: float
    first_loss: float | None = None
    last_loss: float | None = None
    resumed: bool = False

    def to_journal(self) -> dict[str, Any]:
        return {
            "kind": "trial", "key": self.candidate.key, "index": self.index,
            "candidate": self.candidate.__dict__, "status": self.status, "reason": self.reason,
            "step_time_s": self.step_time_s, "peak_memory_bytes": self.peak_memory_bytes,
            "prior_step_time_s": self.prior_step_time_s, "estimated_memory_bytes": self.estimated_memory_bytes,
            "wall_s": self.wall_s, "first_loss": self.first_loss, "last_loss": self.last_loss,
            "time": time.time(),
        }

    @classmethod
    def from_journal(cls, rec: dict[str, Any]) -> TrialRecord:
        return cls(index=rec["index"], candidate=Candidate(**rec["candidate"]), status=rec["status"],
                   reason=rec["reason"], step_time_s=rec["step_time_s"], peak_memory_bytes=rec["peak_memory_bytes"],
                   prior_step_time_s=rec["prior_step_time_s"], estimated_memory_bytes=rec["estimated_memory_bytes"],
                   wall_s=rec["wall_s"], first_loss=rec.get("first_loss"), last_loss=rec.get("last_loss"),
                   resumed=True)


@dataclass(frozen=True)
class TuneResult:
    trials: tuple[TrialRecord, ...]
    best: TrialRecord | None
    best_config: TrainConfig | None
    fit: Fit
    memory: MemoryModel
    # Calibrated estimate (step s, predicted memory bytes) per measured candidate key.
    calibrated: dict[str, tuple[float, int]]
    grid_size: int
    stop_reason: str
    wall_s: float
    new_trials: int
    exported: tuple[str, ...] = ()
    remaining: tuple[Assessment, ...] = field(default=())
    repeats: tuple[RepeatRecord, ...] = ()  # confirmation trials, journal order
    confirm_note: str = ""  # what confirmation did, or why it did not run
    new_repeats: int = 0

    @property
    def samples_s(self) -> dict[str, list[float]]:
        """Every successful sample per measured candidate key (seconds per step): search trial, repeats."""
        return samples(self.trials, self.repeats)

    @property
    def best_median_s(self) -> float | None:
        """The pick's median step time over its samples (what it was chosen on)."""
        return None if self.best is None else median(self.samples_s[self.best.candidate.key])

    @property
    def trained(self) -> bool:
        """The chosen config ran its measured steps with a finite loss (CI smoke criterion)."""
        b = self.best
        return bool(b and b.status == "ok" and b.last_loss is not None and math.isfinite(b.last_loss))


Event = Callable[..., None]


def _noop(kind: str, **data: Any) -> None:
    return None


class Tuner:
    """One tuning run over `candidates` of `workload`, journalled in `out_dir`/journal.jsonl."""

    def __init__(self, *, workload: Workload, candidates: Sequence[Candidate], settings: Settings,
                 journal: Journal, out_dir: Path, memory_limit_bytes: int,
                 prior: Efficiency = DEFAULT_EFFICIENCY, on_event: Event = _noop) -> None:
        self.workload = workload
        self.candidates = list(candidates)
        self.settings = settings
        self.journal = journal
        self.out_dir = Path(out_dir)
        self.trial_dir = self.out_dir / "trials"
        self.trial_dir.mkdir(parents=True, exist_ok=True)
        # Host trials: the first trial's preflight serves the rest of this run (never an earlier run's).
        self.preflight_cache = self.trial_dir / "preflight.json"
        self.preflight_cache.unlink(missing_ok=True)
        self.memory_limit_bytes = memory_limit_bytes
        self.prior = prior
        self.on_event = on_event
        known = {c.key: c for c in self.candidates}
        self.records: list[TrialRecord] = [TrialRecord.from_journal(r) for r in journal.state.finished.values()
                                            if r["key"] in known]
        self.records.sort(key=lambda r: r.index)
        self.repeats: list[RepeatRecord] = [RepeatRecord.from_journal(r) for r in journal.state.repeats
                                            if r["key"] in known]

    # ------------------------------------------------------------------ calibration
    def calibrate(self, *, out_of_sample: bool = False) -> tuple[Fit, MemoryModel]:
        ok = [r for r in self.records if r.status == "ok" and r.step_time_s]
        fit = fit_calibration(self.workload.step_time_s, [(r.candidate, r.step_time_s) for r in ok],
                              prior=Calibration(efficiency=self.prior), out_of_sample=out_of_sample)
        memory = fit_memory(limit_bytes=self.memory_limit_bytes, margin=self.settings.memory_margin,
                            measured=[(self.workload.estimate(r.candidate), r.status, r.peak_memory_bytes)
                                      for r in self.records])
        return fit, memory

    def _best(self) -> TrialRecord | None:
        """The search's best: lowest first sample (the convergence test's reference; repeats never change it)."""
        ok = [r for r in self.records if r.status == "ok" and r.step_time_s]
        return min(ok, key=lambda r: (r.step_time_s, r.candidate)) if ok else None

    def _trial_wall_s(self, step_time_s: float) -> float:
        """Predicted wall time of a trial: startup (measured on earlier trials) + its steps."""
        s = self.settings
        steps = s.warmup_steps + s.measured_steps
        startups = [r.wall_s - steps * r.step_time_s for r in self.records if r.status == "ok" and r.step_time_s]
        startup = sorted(startups)[len(startups) // 2] if startups else STARTUP_GUESS_S
        return max(startup, 0.0) + steps * step_time_s

    # ------------------------------------------------------------------ the loop
    def run(self) -> TuneResult:
        t0 = time.monotonic()
        s = self.settings
        self._end_stale_trials()
        new_trials = 0
        self.on_event("plan", grid_size=len(self.candidates), resumed=len(self.records))
        while True:
            fit, memory = self.calibrate()
            tried = {r.candidate: r.status for r in self.records}
            remaining = assess(self.candidates, workload=self.workload, calibration=fit.calibration,
                               memory=memory, outcomes=tried)
            eligible = [a for a in remaining if a.eligible]
            best = self._best()
            stop = self._stop_reason(eligible, best, new_trials=new_trials, elapsed_s=time.monotonic() - t0)
            if stop:
                break
            nxt = eligible[0]
            self._run_one(nxt, fit=fit, budget_left_s=None if s.time_budget_s is None
                          else s.time_budget_s - (time.monotonic() - t0))
            new_trials += 1
        note, new_repeats = self._confirm(t0=t0)
        fit, _ = self.calibrate(out_of_sample=True)  # the same fit, plus each trial predicted without it
        return self._result(fit, memory, remaining, stop, wall_s=time.monotonic() - t0, new_trials=new_trials,
                            confirm_note=note, new_repeats=new_repeats)

    # ------------------------------------------------------------------ confirmation
    def _confirm(self, *, t0: float) -> tuple[str, int]:
        """Run the confirmation rounds not in the journal yet; (what happened, repeats run now). A round
        starts only if all of its trials fit in what is left of --max-trials (repeats count) and, by the
        calibrated prediction, --time-budget."""
        s = self.settings
        if s.confirm_repeats <= 0:
            return "confirmation off", 0
        keys = leaders(self.records, top=s.confirm_top, margin=s.confirm_margin)
        if not keys:
            return (f"nothing to confirm: no second successful candidate within {s.confirm_margin:.0%} of the "
                    "fastest"), 0
        by_key = {r.candidate.key: r for r in self.records}
        done = {(r.key, r.round) for r in self.repeats}
        new, cut = 0, ""
        for plan in rounds(keys, repeats=s.confirm_repeats):
            pending = [(rnd, key) for rnd, key in plan if (key, rnd) not in done]
            if not pending:
                continue
            total = len(self.records) + len(self.repeats)
            if s.max_trials is not None and total + len(pending) > s.max_trials:
                cut = f"; round {pending[0][0]} needs {len(pending)} more trial(s), the cap is {s.max_trials}"
                break
            if s.time_budget_s is not None:
                need_s = sum(self._trial_wall_s(by_key[key].step_time_s) for _, key in pending)
                elapsed_s = time.monotonic() - t0
                if elapsed_s + need_s > s.time_budget_s:
                    cut = (f"; round {pending[0][0]} (~{need_s:.0f} s) would pass the time budget "
                           f"{s.time_budget_s:.0f} s")
                    break
            for rnd, key in pending:
                self._run_repeat(by_key[key], round_=rnd, t0=t0)
                new += 1
        runs = samples(self.records, self.repeats)
        ran = sum(r.key in keys for r in self.repeats)
        failed = sum(r.key in keys and r.status != "ok" for r in self.repeats)
        return (f"confirmed {len(keys)} leader(s) within {s.confirm_margin:.0%} of the fastest "
                f"({', '.join(keys)}) with {ran} repeat(s), interleaved"
                + (f" ({failed} failed: no sample)" if failed else "")
                + f"; chosen on the median of each candidate's samples (at least "
                f"{min(len(runs.get(k, ())) for k in keys)} each){cut}"), new

    def _run_repeat(self, record: TrialRecord, *, round_: int, t0: float) -> RepeatRecord:
        s, c = self.settings, record.candidate
        index = 1 + max([r.index for r in self.records] + [r.index for r in self.repeats], default=0)
        self.on_event("trial_start", index=index, candidate=c, estimate_s=record.step_time_s,
                      total_steps=s.warmup_steps + s.measured_steps)
        outcome = self._launch(c, index=index, stem=f"{c.key}.r{round_}", predicted_step_s=record.step_time_s,
                               budget_left_s=None if s.time_budget_s is None
                               else s.time_budget_s - (time.monotonic() - t0), extra={"round": round_})
        rep = RepeatRecord(index=index, key=c.key, round=round_, status=outcome.status, reason=outcome.reason,
                           step_time_s=outcome.step_time_s, wall_s=outcome.wall_s)
        self.journal.append(rep.to_journal())
        self.repeats.append(rep)
        self.on_event("repeat_end", record=rep)
        return rep

    def _stop_reason(self, eligible: list[Assessment], best: TrialRecord | None, *, new_trials: int,
                     elapsed_s: float) -> str:
        s = self.settings
        if not eligible:
            return "every candidate was measured or ruled out"
        measured = sum(r.status == "ok" for r in self.records)
        if best is not None and measured >= s.min_trials and \
                eligible[0].step_time_s >= best.step_time_s * (1.0 - s.threshold):
            return (f"converged: no remaining candidate is predicted to beat {best.candidate.key} "
                    f"({best.step_time_s * 1e3:.0f} ms) by more than {s.threshold:.0%}")
        if s.max_trials is not None and len(self.records) >= s.max_trials:
            return f"trial cap reached ({s.max_trials} trials)"
        if s.time_budget_s is not None:
            predicted = self._trial_wall_s(eligible[0].step_time_s)
            if elapsed_s + predicted > s.time_budget_s and (new_trials or elapsed_s >= s.time_budget_s):
                return f"time budget: the next trial (~{predicted:.0f} s) would pass {s.time_budget_s:.0f} s"
        return ""

    def _end_stale_trials(self) -> None:
        """Trials that started but never finished belong to a tuner that was killed: end their process
        group if it still runs, so they neither steal cores nor write into the new trial's files."""
        for key, rec in list(self.journal.state.unfinished.items()):
            pgid, marker = rec.get("pgid"), rec.get("marker") or rec.get("report")
            if pgid and marker and kill_stale_group(pgid, marker=marker):  # types checked on load (records.py)
                self.on_event("stale", key=key, pgid=pgid)

    def _run_one(self, a: Assessment, *, fit: Fit, budget_left_s: float | None) -> TrialRecord:
        s, c = self.settings, a.candidate
        index = 1 + max([r.index for r in self.records] + [r.index for r in self.repeats], default=0)
        prior_est = self.workload.estimate(c, self.prior)
        self.on_event("trial_start", index=index, candidate=c, estimate_s=a.step_time_s,
                      total_steps=s.warmup_steps + s.measured_steps)
        outcome = self._launch(c, index=index, stem=c.key, predicted_step_s=a.step_time_s,
                               budget_left_s=budget_left_s)
        record = TrialRecord(
            index=index, candidate=c, status=outcome.status, reason=outcome.reason,
            step_time_s=outcome.step_time_s, peak_memory_bytes=outcome.peak_memory_bytes,
            prior_step_time_s=prior_est.step_time_s,
            estimated_memory_bytes=int(prior_est.memory_per_gpu.total), wall_s=outcome.wall_s,
            first_loss=outcome.first_loss, last_loss=outcome.last_loss,
        )
        self.journal.append(record.to_journal())
        self.records.append(record)
        self.on_event("trial_end", record=record, calibrated_s=a.step_time_s)
        return record

    def _launch(self, c: Candidate, *, index: int, stem: str, predicted_step_s: float,
                budget_left_s: float | None, extra: dict[str, Any] | None = None) -> TrialOutcome:
        """Run candidate `c` as trial `index` (files trials/<stem>.*), journalling its start; its outcome."""
        s = self.settings
        timeout_s, stall_s = trial_limits_s(
            predicted_wall_s=self._trial_wall_s(predicted_step_s), predicted_step_s=predicted_step_s,
            trial_timeout_s=s.trial_timeout_s, stall_timeout_s=s.stall_timeout_s, budget_left_s=budget_left_s,
            load=load_factor())
        config_path = self.trial_dir / f"{c.key}.yaml"
        report_path = self.trial_dir / f"{stem}.report.jsonl"
        save(self.workload.config(c), config_path)

        # What identifies the trial's processes for a later tuner (kill_stale_group): the report path is in
        # a local trial's environment; the config path is on a host trial's launcher command line.
        marker = str(report_path if s.hosts is None else config_path)

        def started(pgid: int) -> None:
            self.journal.append({"kind": "start", "key": c.key, "index": index, "pgid": pgid,
                                 "report": str(report_path), "marker": marker, "time": time.time(),
                                 **(extra or {})})

        common = dict(config_path=config_path, report_path=report_path, log_path=self.trial_dir / f"{stem}.log",
                      script=s.script, script_args=s.script_args, warmup_steps=s.warmup_steps,
                      measured_steps=s.measured_steps, timeout_s=timeout_s, stall_s=stall_s, on_start=started,
                      on_poll=lambda report: self.on_event("trial_poll", index=index, steps=len(report["steps"])))
        if s.hosts is None:
            outcome: TrialOutcome = run_trial(nproc=s.nproc, memory_cap_bytes=s.memory_cap_bytes, **common)
        else:
            outcome = run_trial_on_hosts(hosts=s.hosts, index=index, preflight_cache=self.preflight_cache,
                                         **common)
        return outcome

    def _result(self, fit: Fit, memory: MemoryModel, remaining: list[Assessment], stop: str, *, wall_s: float,
                new_trials: int, confirm_note: str = "", new_repeats: int = 0) -> TuneResult:
        calibrated = {}
        for r in self.records:
            est = self.workload.estimate(r.candidate, fit.efficiency)
            calibrated[r.candidate.key] = (self.workload.step_time_s(r.candidate, fit.calibration),
                                           memory.predicted_bytes(est))
        best = pick(self.records, self.repeats)  # the lowest median over each candidate's samples
        return TuneResult(
            trials=tuple(self.records), best=best,
            best_config=self.workload.config(best.candidate) if best else None, fit=fit, memory=memory,
            calibrated=calibrated, grid_size=len(self.candidates), stop_reason=stop, wall_s=wall_s,
            new_trials=new_trials, remaining=tuple(remaining), repeats=tuple(self.repeats),
            confirm_note=confirm_note, new_repeats=new_repeats,
        )


def export_best(result: TuneResult, *, out_dir: Path, deepspeed: bool, note: str = "") -> tuple[str, ...]:
    """Write the best config as ztune YAML (and DeepSpeed JSON); returns the paths written. `note` (why this
    config: its median and samples) heads the YAML file as a comment."""
    if result.best_config is None:
        return ()
    header = f"ztune autotune pick: {note}\n{result.confirm_note}" if note else ""
    path = save(result.best_config, out_dir / "best.yaml", header=header)  # one atomic write, header included
    paths = [str(path)]
    if deepspeed:
        paths.append(str(save(result.best_config, out_dir / "best.deepspeed.json", fmt="deepspeed")))
    return tuple(paths)
