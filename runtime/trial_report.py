"""The autotune trial protocol, runtime side: step times and peak memory reported to the tuner.

The tuner starts each trial with these environment variables (docs/autotune.md):
- ``ZTUNE_CONFIG``: path of the trial's config (read by ``ztune.initialize``);
- ``ZTUNE_TRIAL_REPORT``: path of a JSONL file that rank 0 appends to; ``-`` means rank 0 prints each record
  to stdout as one line starting with ``@@ztune-trial@@ `` instead (trials on other hosts, whose files the
  tuner cannot read: `ztune launch` relays the line, the tuner writes it to its own report file);
- ``ZTUNE_TRIAL_WARMUP`` / ``ZTUNE_TRIAL_STEPS``: optimizer steps to skip, then to measure;
- ``ZTUNE_TRIAL_EXIT``: "1" (default) ends the process with ``SystemExit(0)`` once the measured steps
  are done; "0" only sets ``should_stop`` for a script that polls it.

The engine calls ``record_step`` once per optimizer step (at the gradient-accumulation boundary). A step's
time is the wall time since the previous call, so it covers forward, backward, communication and the
optimizer step. Peak memory is the device high-water mark on GPU and the peak RSS on CPU, less the pages
of other ranks' shared-memory buffers this rank has read (runtime/comm/shm.py): those are the other ranks'
memory, resident in this process only because it maps them.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from typing import Any

REPORT_ENV = "ZTUNE_TRIAL_REPORT"
WARMUP_ENV = "ZTUNE_TRIAL_WARMUP"
STEPS_ENV = "ZTUNE_TRIAL_STEPS"
EXIT_ENV = "ZTUNE_TRIAL_EXIT"
STDOUT_PATH = "-"  # REPORT_ENV value: records go to stdout, each line prefixed by STDOUT_MARKER
STDOUT_MARKER = "@@ztune-trial@@ "


def _peak_memory_bytes(engine: Any = None) -> int:
    """This process's peak memory: CUDA max allocated when a GPU is in use, else peak RSS without the
    resident pages of other ranks' shared buffers (module docstring)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    shm = getattr(getattr(engine, "comm", None), "shm", None)
    if shm is not None:
        # Once read, peer pages stay resident, so now is their high-water mark too.
        peak -= max(0, _resident_shmem_bytes() - shm.own_bytes())
    return peak


def _resident_shmem_bytes() -> int:
    """RssShmem of /proc/self/status (shared-memory pages resident in this process); 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _gather_max(values: list[float]) -> list[list[float]]:
    """All ranks' `values` (one list per rank); just ours when torch.distributed is not running."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [values]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, values)
    return out


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class TrialReporter:
    """Measures optimizer steps for one autotune trial; rank 0 appends them to `path` as JSON lines.

    Every rank must call `record_step` at the same steps: the last one gathers peak memory from all ranks.
    """

    def __init__(self, *, path: str, warmup_steps: int, measured_steps: int, rank: int = 0,
                 world_size: int = 1, exit_when_done: bool = True) -> None:
        if warmup_steps < 0 or measured_steps < 1:
            raise ValueError(f"trial steps: warmup {warmup_steps} must be >= 0 and measured {measured_steps} >= 1")
        self.path = path
        self.warmup_steps = warmup_steps
        self.measured_steps = measured_steps
        self.rank = rank
        self.world_size = world_size
        self.exit_when_done = exit_when_done
        self.steps_done = 0
        self.should_stop = False
        self._last_t = time.perf_counter()
        self._times_s: list[float] = []
        self._losses: list[float] = []
        self._pending_loss: Any = None
        self._write({"event": "start", "world_size": world_size, "pid": os.getpid(),
                     "warmup_steps": warmup_steps, "measured_steps": measured_steps})

    @classmethod
    def from_env(cls, *, rank: int | None = None, world_size: int | None = None) -> TrialReporter | None:
        """A reporter when this process runs as an autotune trial (ZTUNE_TRIAL_REPORT set), else None."""
        path = os.environ.get(REPORT_ENV)
        if not path:
            return None
        from ztune import envvars

        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        # A bad ZTUNE_TRIAL_* value is an EnvVarError naming the variable (ztune/envvars.py).
        return cls(path=path, warmup_steps=envvars.read(WARMUP_ENV), measured_steps=envvars.read(STEPS_ENV),
                   rank=rank, world_size=world_size, exit_when_done=envvars.read(EXIT_ENV))

    def _write(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        if self.path == STDOUT_PATH:
            sys.stdout.write(STDOUT_MARKER + json.dumps(record) + "\n")
            sys.stdout.flush()
            return
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def note_loss(self, loss: Any) -> None:
        """Remember the latest loss (tensor or number) for the next `record_step` that gets none: lets a
        training loop report its loss when the engine makes the `record_step` call."""
        self._pending_loss = loss

    def record_step(self, engine: Any = None, *, loss: Any = None) -> bool:
        """Mark the end of one optimizer step. Returns True once the measured steps are done (and, when
        exiting is enabled, raises SystemExit(0) after the final record is on disk)."""
        if self.should_stop:
            return True
        if loss is None:
            loss, self._pending_loss = self._pending_loss, None
        now = time.perf_counter()
        step_s, self._last_t = now - self._last_t, now
        self.steps_done += 1
        warmup = self.steps_done <= self.warmup_steps
        loss_value = _finite(loss.detach().float().item() if hasattr(loss, "detach") else loss)
        if loss_value is not None:
            self._losses.append(loss_value)
        if not warmup:
            self._times_s.append(step_s)
        self._write({"event": "step", "step": self.steps_done, "warmup": warmup, "step_time_s": step_s,
                     "peak_memory_bytes": _peak_memory_bytes(engine), "loss": loss_value})
        if self.steps_done < self.warmup_steps + self.measured_steps:
            return False
        self._finish(engine)
        return True

    def _finish(self, engine: Any) -> None:
        self.should_stop = True
        peaks = [int(v[0]) for v in _gather_max([float(_peak_memory_bytes(engine))])]
        times = sorted(self._times_s)
        mid = len(times) // 2
        median = times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2
        record: dict[str, Any] = {
            "event": "done",
            "measured_steps": len(times),
            "step_time_s": median,
            "step_time_mean_s": sum(times) / len(times),
            "step_times_s": self._times_s,
            "peak_memory_bytes": max(peaks),
            "peak_memory_bytes_per_rank": peaks,
            "first_loss": self._losses[0] if self._losses else None,
            "last_loss": self._losses[-1] if self._losses else None,
        }
        for name in ("memory_report", "comm_report"):
            report = getattr(engine, name, None)
            if callable(report):
                try:
                    record[name] = {k: v for k, v in report().items() if isinstance(v, (int, float, str))}
                except Exception as exc:  # a report is a nice-to-have; never fail the trial over it
                    record[name] = {"error": f"{type(exc).__name__}: {exc}"}
        self._write(record)
        if self.exit_when_done:
            torch = sys.modules.get("torch")
            if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()
                torch.distributed.destroy_process_group()
            sys.stdout.flush()
            raise SystemExit(0)


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a trial report: {'steps': [...], 'done': {...} or None, 'start': {...} or None}. A torn last
    line (the trial was killed mid-write) is ignored."""
    out: dict[str, Any] = {"start": None, "steps": [], "done": None}
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        event = record.get("event")
        if event == "step":
            out["steps"].append(record)
        elif event in ("start", "done"):
            out[event] = record
    return out
