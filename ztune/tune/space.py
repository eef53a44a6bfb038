"""The search space: which configs the tuner may try, from the model, the hardware and the user's
constraints (fixed global batch and sequence length, which knobs may vary).

A `Candidate` is one point (stage, optimizer offload, checkpointing, precision, compression, micro-batch,
ZeRO++); its *family* is the same point without the micro-batch, because memory grows with the micro-batch inside a
family, which is what the doubling/bisection search relies on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from ztune.config.schema import (
    ActivationConfig,
    BatchConfig,
    Checkpointing,
    Compression,
    CompressionConfig,
    Offload,
    Precision,
    TrainConfig,
)
from ztune.errors import UserError
from ztune.specs import Hardware, ModelSpec

KNOBS = ("stage", "offload", "checkpointing", "micro", "precision", "compression", "zeropp")


class SpaceError(UserError):
    """Constraints that leave nothing to search, or that contradict each other."""


@dataclass(frozen=True, order=True)
class Candidate:
    stage: int
    offload_optimizer: bool
    checkpointing: str  # a Checkpointing value
    precision: str  # a Precision value
    compression: str  # a Compression value
    micro: int
    # ZeRO++ (Wang et al. 2023): qwZ + hpZ over each host's ranks + qgZ, stage 3 across hosts only. Last and
    # False by default, so journals written before the knob existed read back as the same candidates.
    zeropp: bool = False

    @property
    def family(self) -> tuple:
        """Everything but the micro-batch."""
        return (self.stage, self.offload_optimizer, self.checkpointing, self.precision, self.compression,
                self.zeropp)

    @property
    def key(self) -> str:
        """Stable, readable id used in the journal and file names."""
        parts = [f"z{self.stage}", "offopt" if self.offload_optimizer else "",
                 f"ckpt-{self.checkpointing}" if self.checkpointing != "none" else "",
                 self.precision, f"comp-{self.compression}" if self.compression != "none" else "",
                 "zpp" if self.zeropp else "", f"mb{self.micro}"]
        return "-".join(p for p in parts if p)

    def to_config(self, base: TrainConfig, *, global_batch: int, seq_len: int,
                  hpz_partition_size: int = 1) -> TrainConfig:
        """The full TrainConfig: `base` (optimizer, buckets, clipping) with this point's knobs set. With
        `zeropp`, DeepSpeed's zero_quantized_weights, zero_hpz_partition_size = `hpz_partition_size` (the
        ranks of one host) and zero_quantized_gradients are on; without it `base`'s values stay."""
        zpp = dict(quantized_weights=True, hpz_partition_size=hpz_partition_size,
                   quantized_gradients=True) if self.zeropp else {}
        return dataclasses.replace(
            base,
            zero=dataclasses.replace(base.zero, stage=self.stage,
                                     offload_optimizer=Offload.CPU if self.offload_optimizer else Offload.NONE,
                                     offload_params=Offload.NONE, **zpp),
            precision=Precision(self.precision),
            batch=BatchConfig(micro=self.micro, global_=global_batch),
            seq_len=seq_len,
            activations=ActivationConfig(checkpointing=Checkpointing(self.checkpointing),
                                         every=base.activations.every, offload=base.activations.offload),
            compression=CompressionConfig(method=Compression(self.compression),
                                          topk_ratio=base.compression.topk_ratio),
        )


@dataclass(frozen=True)
class Constraints:
    """What the user fixes and what may vary. Tuple fields list the allowed values of each knob; a knob
    not in `vary` keeps the first (default) value."""

    num_ranks: int
    global_batch: int
    seq_len: int
    vary: tuple[str, ...] = ("stage", "checkpointing", "micro")
    stages: tuple[int, ...] = (0, 1, 2, 3)
    offload: tuple[bool, ...] = (False, True)
    checkpointing: tuple[str, ...] = ("none", "full")
    precisions: tuple[str, ...] = ("bf16",)
    compressions: tuple[str, ...] = ("none",)
    micro: tuple[int, ...] | None = None  # None: every divisor of global_batch / num_ranks
    max_micro: int | None = None
    num_nodes: int = 1  # hosts a trial spans; ZeRO++ candidates need 2 or more
    ranks_per_node: int = 1  # ... and 2 or more ranks on each (hpZ partitions inside a host)


def micro_choices(*, global_batch: int, num_ranks: int, allowed: Sequence[int] | None = None,
                  max_micro: int | None = None) -> list[int]:
    """Micro-batches that divide the per-rank samples per step, ascending."""
    if num_ranks < 1:
        raise SpaceError(f"--nproc must be >= 1, got {num_ranks}")
    if global_batch < 1 or global_batch % num_ranks:
        raise SpaceError(f"--global-batch {global_batch} must be a positive multiple of --nproc {num_ranks}")
    per_rank = global_batch // num_ranks
    divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
    if allowed is not None:
        bad = [m for m in allowed if m not in divisors]
        if bad:
            raise SpaceError(f"--micro {bad[0]} does not divide the {per_rank} samples per rank per step "
                             f"(global batch {global_batch} / {num_ranks} ranks); allowed: "
                             + ", ".join(map(str, divisors)))
        divisors = sorted(set(allowed))
    if max_micro is not None:
        divisors = [d for d in divisors if d <= max_micro]
    if not divisors:
        raise SpaceError(f"no micro-batch <= {max_micro} divides {per_rank}; raise --max-micro")
    return divisors


def build_space(c: Constraints) -> list[Candidate]:
    """Every valid candidate, in a deterministic order. Combinations the runtime rejects (optimizer
    offload at stage 0, bf16 compression of 16-bit gradients) are left out, and so is ZeRO++ where it cannot
    pay: below stage 3, on one host or one rank per host (nothing crosses a host boundary to save), or with
    another gradient compression (qgZ is the gradient compression; cost/estimate.py sweep() alike)."""
    unknown = [k for k in c.vary if k not in KNOBS]
    if unknown:
        raise SpaceError(f"--vary: unknown knob {unknown[0]!r}; allowed: {', '.join(KNOBS)}")

    def values(knob: str, options: Sequence) -> list:
        return list(options) if knob in c.vary else list(options[:1])

    micros = micro_choices(global_batch=c.global_batch, num_ranks=c.num_ranks, allowed=c.micro,
                           max_micro=c.max_micro)
    if "micro" not in c.vary:
        micros = micros[-1:] if c.micro is None else micros[:1]
    out = []
    for stage in values("stage", c.stages):
        if stage not in (0, 1, 2, 3):
            raise SpaceError(f"--stages: got {stage}; allowed: 0, 1, 2, 3")
        for offload in values("offload", c.offload):
            if offload and stage == 0:
                continue
            for ckpt in values("checkpointing", c.checkpointing):
                Checkpointing(ckpt)
                for precision in values("precision", c.precisions):
                    Precision(precision)
                    for comp in values("compression", c.compressions):
                        Compression(comp)
                        if comp == "bf16" and precision != "fp32":
                            continue
                        for zpp in values("zeropp", (False, True)):
                            if zpp and (stage != 3 or c.num_nodes < 2 or c.ranks_per_node < 2 or comp != "none"):
                                continue
                            out.extend(Candidate(stage, offload, ckpt, precision, comp, m, zpp) for m in micros)
    if not out:
        raise SpaceError("the constraints leave no configuration to try; allow more stages or knobs")
    return out


def fingerprint(*, model: ModelSpec, hardware: Hardware, constraints: Constraints, candidates: Sequence[Candidate],
                base: TrainConfig, workload: dict) -> tuple[str, dict]:
    """A hash of everything that makes measurements comparable, and a readable summary of it. Search
    controls (time budget, threshold, trial cap) are not part of it: changing them may resume a run."""
    from ztune.config.io import to_dict

    describe = {
        "model": dataclasses.asdict(model) | {"architecture": model.architecture.value},
        "hardware": dataclasses.asdict(hardware),
        "num_ranks": constraints.num_ranks,
        "global_batch": constraints.global_batch,
        "seq_len": constraints.seq_len,
        "candidates": [c.key for c in candidates],
        "base_config": to_dict(base),
        "workload": workload,
    }
    digest = hashlib.sha256(json.dumps(describe, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest, describe
