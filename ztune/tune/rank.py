"""Prune by memory, rank by estimated step time, and decide which candidates are worth a trial next.

Memory rules (per rank, bytes):
- predicted = estimate.memory_per_gpu.total + offset, where the offset is learned from measurements (the
  cost model leaves out the process baseline: interpreter, libraries, allocator slack);
- a candidate *fits* when predicted x (1 + margin) <= limit; the limit is the hardware's memory per GPU,
  the trial memory cap if lower, and after an OOM the smallest predicted memory of a candidate that ran
  out (the model's memory ordering is trusted, its absolute numbers are not);
- inside a family (all knobs but the micro-batch) memory grows with the micro-batch, so a measured fit at
  micro m proves every smaller one fits and an OOM at m rules out every larger one. Micro-batches beyond
  the margin are probed by doubling from the largest that ran, and after an OOM by bisection between the
  largest that ran and the smallest that did not.
A family where a trial crashed or hung is not tried again (see `assess`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ztune.config.schema import TrainConfig
from ztune.cost.compute import DEFAULT_EFFICIENCY, Efficiency
from ztune.cost.estimate import Estimate, estimate
from ztune.specs import Hardware, ModelSpec
from ztune.tune.calibrate import Calibration
from ztune.tune.space import Candidate


@dataclass(frozen=True)
class Workload:
    """What every candidate shares: the model, the ranks' hardware and the fixed batch geometry."""

    model: ModelSpec
    hardware: Hardware  # gpus_per_node = ranks of the trial on each node
    base: TrainConfig
    global_batch: int
    seq_len: int
    num_nodes: int = 1  # hosts a trial spans (autotune -H)

    def config(self, c: Candidate) -> TrainConfig:
        return c.to_config(self.base, global_batch=self.global_batch, seq_len=self.seq_len,
                           hpz_partition_size=self.hardware.gpus_per_node)

    def estimate(self, c: Candidate, efficiency: Efficiency = DEFAULT_EFFICIENCY) -> Estimate:
        return estimate(self.model, self.hardware, self.config(c), num_nodes=self.num_nodes,
                        efficiency=efficiency)

    def step_time_s(self, c: Candidate, calibration: Calibration) -> float:
        """Calibrated seconds per optimizer step: the cost model's, plus the fitted fixed cost of each
        micro-step."""
        est = self.estimate(c, calibration.efficiency)
        return est.step_time_s + est.grad_accum * calibration.micro_step_overhead_s


def local_hardware(hw: Hardware, *, num_ranks: int) -> Hardware:
    """`hw` as the single node a local trial runs on, with `num_ranks` ranks."""
    return dataclasses.replace(hw, gpus_per_node=num_ranks)


@dataclass(frozen=True)
class MemoryModel:
    """Calibrated memory prediction and the limit it is checked against (bytes per rank)."""

    limit_bytes: int
    margin: float = 0.1
    offset_bytes: int = 0

    def predicted_bytes(self, est: Estimate) -> int:
        return int(est.memory_per_gpu.total + self.offset_bytes)

    def fits(self, est: Estimate, *, with_margin: bool = True) -> bool:
        factor = 1.0 + self.margin if with_margin else 1.0
        host_ok = est.cpu_memory_per_host <= est.hardware.host_memory_bytes
        return host_ok and self.predicted_bytes(est) * factor <= self.limit_bytes


def fit_memory(*, limit_bytes: int, margin: float, measured: Iterable[tuple[Estimate, str, int | None]]) -> MemoryModel:
    """Learn the memory offset and limit from trials: (estimate, status, measured peak bytes) each.

    offset = the largest (measured - estimated) over successful trials (the conservative choice);
    limit = min(limit, smallest predicted memory among trials that ran out of memory)."""
    measured = list(measured)
    gaps = [peak - est.memory_per_gpu.total for est, status, peak in measured if status == "ok" and peak]
    offset = int(max(gaps)) if gaps else 0
    model = MemoryModel(limit_bytes=limit_bytes, margin=margin, offset_bytes=offset)
    oom = [model.predicted_bytes(est) for est, status, _ in measured if status == "oom"]
    if oom:
        model = dataclasses.replace(model, limit_bytes=min(limit_bytes, min(oom) - 1))
    return model


@dataclass(frozen=True)
class Assessment:
    candidate: Candidate
    estimate: Estimate
    step_time_s: float  # calibrated
    predicted_memory_bytes: int
    eligible: bool  # may be tried next
    reason: str  # why not, when not eligible


def assess(candidates: Sequence[Candidate], *, workload: Workload, calibration: Calibration,
           memory: MemoryModel, outcomes: dict[Candidate, str]) -> list[Assessment]:
    """Every not-yet-tried candidate with its estimate and whether it may be tried next, fastest first;
    among equal estimates the larger micro-batch first (the cost model does not see per-call overheads,
    which favour it, until calibration has measured them).

    `outcomes` maps tried candidates to their status (ok, oom, crash, timeout)."""
    by_family: dict[tuple, list[Candidate]] = {}
    for c in candidates:
        by_family.setdefault(c.family, []).append(c)
    out = []
    for family_members in by_family.values():
        members = sorted(family_members, key=lambda c: c.micro)
        micros = [c.micro for c in members]
        ok = [c.micro for c in members if outcomes.get(c) == "ok"]
        oom = [c.micro for c in members if outcomes.get(c) == "oom"]
        failed = next((c for c in members if outcomes.get(c) in ("crash", "timeout")), None)
        lo = max(ok, default=0)
        hi = min(oom, default=None)
        between = [c.micro for c in members if c.micro > lo and (hi is None or c.micro < hi) and c not in outcomes]
        bisect_at = between[(len(between) - 1) // 2] if hi is not None and between else None
        double_at = next((m for m in micros if m >= 2 * lo), None) if lo else None
        for c in members:
            if c in outcomes:
                continue
            est = workload.estimate(c, calibration.efficiency)
            step_s = est.step_time_s + est.grad_accum * calibration.micro_step_overhead_s
            if failed is not None:
                # A crash or hang comes from the stage/offload/checkpointing mechanism far more often than
                # from the micro-batch: the family is not tried again.
                eligible, reason = False, f"{failed.key} ended with {outcomes[failed]}; the family is not retried"
            else:
                eligible, reason = _eligibility(c, est, memory=memory, lo=lo, hi=hi, bisect_at=bisect_at,
                                                double_at=double_at)
            out.append(Assessment(c, est, step_s, memory.predicted_bytes(est), eligible, reason))
    # Estimates equal to 4 significant digits count as ties.
    out.sort(key=lambda a: (float(f"{a.step_time_s:.4g}"), -a.candidate.micro, a.candidate))
    return out


def _eligibility(c: Candidate, est: Estimate, *, memory: MemoryModel, lo: int, hi: int | None,
                 bisect_at: int | None, double_at: int | None) -> tuple[bool, str]:
    if hi is not None and c.micro >= hi:
        return False, f"micro-batch {hi} of this family ran out of memory"
    if c.micro < lo:
        return True, ""  # a larger micro-batch of the family ran: this one fits
    if hi is not None:
        if c.micro == bisect_at:
            return True, ""
        return False, f"bisecting micro-batches between {lo or 'none'} (fits) and {hi} (out of memory)"
    if memory.fits(est):
        return True, ""
    if lo and c.micro == double_at and memory.fits(est, with_margin=False):
        return True, ""  # doubling past the safety margin: measurement decides
    if memory.fits(est, with_margin=False):
        return False, (f"within {memory.margin:.0%} of the memory limit; reached only by doubling from a "
                       "micro-batch that ran")
    return False, (f"predicted {est.memory_per_gpu.total + memory.offset_bytes:,} bytes per rank exceeds the "
                   f"limit {memory.limit_bytes:,}")


def zeropp_reason(workload: Workload, c: Candidate, *, efficiency: Efficiency,
                  measured_s: dict[str, float] | None = None) -> str:
    """Why a ZeRO++ pick pays, in one sentence: the (calibrated) cost model's communication per rank per step
    with qwZ + hpZ + qgZ against plain stage 3 of the same knobs, and both measured medians where the plain
    one ran too. "" for a candidate without ZeRO++."""
    if not c.zeropp:
        return ""
    plain = dataclasses.replace(c, zeropp=False)
    pp, flat = workload.estimate(c, efficiency).comm, workload.estimate(plain, efficiency).comm
    mib = float(1 << 20)
    text = (f"ZeRO++ (qwZ int8 weight all-gathers, hpZ: the backward all-gather inside each host's "
            f"{workload.hardware.gpus_per_node} ranks, qgZ int4 gradient exchange; Wang et al. 2023) across "
            f"{workload.num_nodes} hosts: the cost model puts communication at {pp.bytes_per_rank / mib:,.1f} MiB "
            f"and {pp.time_s * 1e3:,.0f} ms per rank per step against {flat.bytes_per_rank / mib:,.1f} MiB and "
            f"{flat.time_s * 1e3:,.0f} ms for plain stage 3 ({plain.key})")
    m = measured_s or {}
    if c.key in m and plain.key in m:
        text += f"; measured medians {m[c.key] * 1e3:,.0f} ms against {m[plain.key] * 1e3:,.0f} ms per step"
    return text
