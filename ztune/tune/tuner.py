"""The autotuner's orchestrator: estimate, prune, rank, measure, calibrate, re-rank, stop.

Loop, one trial at a time (trials share the machine, so running two at once would spoil both timings):
1. calibrate the cost model on every successful trial so far (efficiency factors, memory offset, and the
   memory limit learned from OOMs);
2. assess the untried candidates (rank.py): estimate, prune by memory, fastest first;
3. stop when nothing is left, when the fastest remaining candidate is not predicted to beat the best
   measured step time by more than `threshold`, or when the trial cap or time budget is reached;
4. run the fastest eligible candidate as a trial (bench.py), journal it, repeat.

The journal makes the loop restartable: finished trials are read back instead of rerun.
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
        fit, _ = self.calibrate(out_of_sample=True)  # the same fit, plus each trial predicted without it
        return self._result(fit, memory, remaining, stop, wall_s=time.monotonic() - t0, new_trials=new_trials)

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
            if pgid and marker and kill_stale_group(int(pgid), marker=str(marker)):
                self.on_event("stale", key=key, pgid=pgid)

    def _run_one(self, a: Assessment, *, fit: Fit, budget_left_s: float | None) -> TrialRecord:
        s, c = self.settings, a.candidate
        index = max((r.index for r in self.records), default=0) + 1
        prior_est = self.workload.estimate(c, self.prior)
        timeout_s, stall_s = trial_limits_s(
            predicted_wall_s=self._trial_wall_s(a.step_time_s), predicted_step_s=a.step_time_s,
            trial_timeout_s=s.trial_timeout_s, stall_timeout_s=s.stall_timeout_s, budget_left_s=budget_left_s,
            load=load_factor())
        config_path = self.trial_dir / f"{c.key}.yaml"
        report_path = self.trial_dir / f"{c.key}.report.jsonl"
        save(self.workload.config(c), config_path)
        self.on_event("trial_start", index=index, candidate=c, estimate_s=a.step_time_s,
                      total_steps=s.warmup_steps + s.measured_steps)

        # What identifies the trial's processes for a later tuner (kill_stale_group): the report path is in
        # a local trial's environment; the config path is on a host trial's launcher command line.
        marker = str(report_path if s.hosts is None else config_path)

        def started(pgid: int) -> None:
            self.journal.append({"kind": "start", "key": c.key, "index": index, "pgid": pgid,
                                 "report": str(report_path), "marker": marker, "time": time.time()})

        common = dict(config_path=config_path, report_path=report_path, log_path=self.trial_dir / f"{c.key}.log",
                      script=s.script, script_args=s.script_args, warmup_steps=s.warmup_steps,
                      measured_steps=s.measured_steps, timeout_s=timeout_s, stall_s=stall_s, on_start=started,
                      on_poll=lambda report: self.on_event("trial_poll", index=index, steps=len(report["steps"])))
        if s.hosts is None:
            outcome: TrialOutcome = run_trial(nproc=s.nproc, memory_cap_bytes=s.memory_cap_bytes, **common)
        else:
            outcome = run_trial_on_hosts(hosts=s.hosts, index=index, preflight_cache=self.preflight_cache,
                                         **common)
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

    def _result(self, fit: Fit, memory: MemoryModel, remaining: list[Assessment], stop: str, *, wall_s: float,
                new_trials: int) -> TuneResult:
        calibrated = {}
        for r in self.records:
            est = self.workload.estimate(r.candidate, fit.efficiency)
            calibrated[r.candidate.key] = (self.workload.step_time_s(r.candidate, fit.calibration),
                                           memory.predicted_bytes(est))
        best = self._best()
        return TuneResult(
            trials=tuple(self.records), best=best,
            best_config=self.workload.config(best.candidate) if best else None, fit=fit, memory=memory,
            calibrated=calibrated, grid_size=len(self.candidates), stop_reason=stop, wall_s=wall_s,
            new_trials=new_trials, remaining=tuple(remaining),
        )


def export_best(result: TuneResult, *, out_dir: Path, deepspeed: bool) -> tuple[str, ...]:
    """Write the best config as ztune YAML (and DeepSpeed JSON); returns the paths written."""
    if result.best_config is None:
        return ()
    paths = [str(save(result.best_config, out_dir / "best.yaml"))]
    if deepspeed:
        paths.append(str(save(result.best_config, out_dir / "best.deepspeed.json", fmt="deepspeed")))
    return tuple(paths)
