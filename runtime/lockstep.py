"""Stage 3's parameter gathers when ranks may not run the same modules: their own group, a stamp, a bounded wait.

Stage 3 all-gathers a unit when this rank calls it (runtime/param_gather.py). Ranks that call different units
(data-dependent routing with the experts as units) or a different number of forwards (evaluation or
generation of different lengths) would pair their all-gathers wrongly: equal-sized units silently swap
shards, unequal ones abort inside gloo, and a gather left without a partner waits for the process group's
timeout (30 minutes by default). With shared-memory shards (runtime/comm/shm.py) a gather reads the other ranks'
shards without them, so none of this arises; the mechanism here covers gathers through the process group
(gloo: ranks on different hosts, or ZTUNE_SHM=0):

- they run on a process group of their own, created with a short timeout (`ZTUNE_GATHER_TIMEOUT_S`, default
  60 s): a gather without a partner fails in bounded time, and gathers pair only with gathers, while the
  gradient reductions keep the default group and its generous timeout (slow links);
- each gather sends a stamp next to it (3 int64 per rank, all-gathered on the same group): how many gathers
  this rank has issued before, the unit's index, and the phase (forward with or without grad, backward).
  A rank that finds any stamp different from its own raises before using the parameters.

Every failure is `GatherDivergedError` on each rank involved, naming the cause and the remedies. The stamp is
one small extra collective per unit gather, on this path only. Its cost was below the noise where measured: a
4-layer GPT-2 (hidden 128, seq 64, micro-batch 2), 2 gloo ranks, stage 3, the two variants alternating in one
process: median step 0.91 s with stamps, 1.09 s without, on the 2-core dev machine at load average ~30.
"""

from __future__ import annotations

from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ztune import envvars
from ztune.runtime.comm.groups import GroupRef

# torch >= 2.12 renamed the flat all-gather (as in runtime/comm/collectives.py).
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
TIMEOUT_ENV = "ZTUNE_GATHER_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0
FORWARD, FORWARD_NO_GRAD, BACKWARD = 0, 1, 2
_PHASES = {FORWARD: "a training forward", FORWARD_NO_GRAD: "a no-grad forward (evaluation)", BACKWARD: "backward"}

REMEDIES = (
    "every rank must call the same gathered units in the same order, the same number of times. Remedies: pass "
    "units= to ztune.initialize naming modules every rank calls in every forward (e.g. whole MoE layers rather "
    "than their experts; units=[] gathers the model as one unit); give every rank the same number of forwards "
    "(transformers: generate(..., synced_gpus=True)); or run the ranks on one host, where stage 3 gathers "
    f"through shared memory. If a rank was only slow (e.g. saving a checkpoint), raise {TIMEOUT_ENV}.")


class GatherDivergedError(RuntimeError):
    """Stage 3 ranks issued different parameter gathers (module docstring)."""


def timeout_from_env() -> float:
    """Seconds a stage-3 gather may wait for its partners ($ZTUNE_GATHER_TIMEOUT_S, default 60)."""
    return float(envvars.read(TIMEOUT_ENV, default=DEFAULT_TIMEOUT_S))


def unit_names(model: nn.Module, modules) -> list[str]:
    """Dotted names of `modules` in `model` ("(model)" for the model itself)."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names.get(id(m), "?") or "(model)" for m in modules]


class Lockstep:
    """The gather group and the stamps of one engine (module docstring). Create it with `create`."""

    def __init__(self, *, group: dist.ProcessGroup, rank: int, world_size: int, names: list[str],
                 timeout_s: float):
        self._group = GroupRef(group)  # torch's registry owns it until destroy_process_group (comm/groups.py)
        self.rank = rank
        self.world_size = world_size
        self.names = names
        self.timeout_s = timeout_s
        self._issued = 0
        self._unverified: deque = deque()  # stamps in issue order, not yet waited for
        # The last stamps stay referenced a while after their wait: gloo's worker thread may drop its own
        # references only after wait() returned (runtime/comm/collectives.py, tensor lifetimes).
        self._recent: deque = deque(maxlen=16)

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self._group.get()

    @classmethod
    def create(cls, *, rank: int, world_size: int, names: list[str]) -> Lockstep:
        """Collective over the default group: every rank must call it, in the same order."""
        timeout_s = timeout_from_env()
        group = dist.new_group(timeout=timedelta(seconds=timeout_s), backend="gloo")
        return cls(group=group, rank=rank, world_size=world_size, names=names, timeout_s=timeout_s)

    def stamp(self, unit: int, *, phase: int):
        """Launch this gather's stamp exchange; returns the handle for `verify`."""
        mine = torch.tensor([self._issued, unit, phase], dtype=torch.int64)
        self._issued += 1
        out = torch.empty(self.world_size * 3, dtype=torch.int64)
        work = _all_gather_flat(out, mine, group=self.group, async_op=True)
        self._recent.append((out, mine))
        self._unverified.append((work, out, mine))
        return work, out, mine

    def wait(self, work, stamp) -> None:
        """Wait for a unit's gather and its stamp; GatherDivergedError if a partner is missing (timeout), the
        transport reports a mismatch, or any rank's stamp differs from this rank's. Every stamp issued before
        this one is verified first, in issue order, so all ranks meet the first difference at the same stamp
        (never a wait on a gather whose partner was not issued)."""
        _work, _out, mine = stamp
        try:
            seq = int(mine[0])
            while self._unverified and int(self._unverified[0][2][0]) <= seq:
                stamp_work, out, earlier = self._unverified.popleft()
                stamp_work.wait()
                self._verify(out.view(self.world_size, 3), earlier)
            work.wait()
        except GatherDivergedError:
            raise
        except RuntimeError as e:  # gloo: timeout, size mismatch, or a peer that already failed and left
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GatherDivergedError(
                f"ztune stage 3: rank {self.rank}'s gather of unit {self.names[int(mine[1])]!r} in "
                f"{_PHASES[int(mine[2])]} found no matching gather on every rank within {self.timeout_s:g} s "
                f"({first}): {REMEDIES}") from e

    def _verify(self, stamps: torch.Tensor, mine: torch.Tensor) -> None:
        if bool((stamps == mine).all()):
            return
        parts = []
        for r, (seq, unit, phase) in enumerate(stamps.tolist()):
            name = self.names[unit] if 0 <= unit < len(self.names) else "?"
            parts.append(f"rank {r}: gather #{seq} of {name!r} in {_PHASES.get(phase, '?')}")
        raise GatherDivergedError(f"ztune stage 3: ranks gathered different parameters ({'; '.join(parts)}): "
                                  f"{REMEDIES}")
