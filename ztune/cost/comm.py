"""Communication per optimizer step: which collectives each ZeRO stage issues, their bytes and time.

Byte conventions follow nccl-tests (github.com/NVIDIA/nccl-tests, doc/PERFORMANCE.md): for a collective
on a payload of S bytes over n ranks, the bytes each rank puts on the wire are

    all_reduce: 2(n-1)/n * S        all_gather, reduce_scatter: (n-1)/n * S

(S = the full, unsharded tensor), and a link's "bus bandwidth" is exactly that traffic divided by the time.
Time uses the alpha-beta model (Hockney 1994): T = steps * alpha + wire_bytes / busbw, with 2(n-1) ring
steps for all_reduce and n-1 for the others.

Links follow what NCCL builds (NCCL docs, "Environment variables" NCCL_ALGO / NCCL_MIN_NCHANNELS; Sylvain
Jeaugey (NCCL maintainer), github.com/NVIDIA/nccl/issues/412: one 200 Gb/s HDR NIC gives ~24 GB/s busbw
inter-node, "add more NICs and you should get more bandwidth, up to ... the NVLink intra-node bandwidth"):
- Inside a node a ring runs over NVLink/NVSwitch (or PCIe) at the profile's intra-node busbw.
- Across nodes NCCL runs one ring (channel) per NIC, every ring enters and leaves each node once, and the
  rings split the payload. So a node's NICs together carry the ring traffic: the inter-node busbw is the
  node's aggregate NIC bandwidth (gpus_per_node x the profile's per-GPU share, i.e. NICs x per-NIC rate),
  not one NIC's, and the ring is bounded by min(intra-node busbw, that aggregate).
- Of a ring's n steps, num_nodes cross a node boundary (inter-node latency), the rest stay inside.
- all_reduce may use NCCL's double binary tree instead (Sanders et al. 2009; NCCL 2.4 release notes):
  same bandwidth bound, 2 (log2(nodes) + gpus_per_node - 1) latency steps; NCCL picks the faster, so do we.
  all_gather and reduce_scatter are ring-only (the collectives FSDP / ZeRO-3 use).
The profile bandwidths are achievable nccl-tests busbw figures, hence no further derating by default.

Hierarchical (two-level) collectives, as the runtime runs them on CPU ranks over gloo
(runtime/comm/hierarchical.py; Jia et al. 2018, "Highly Scalable Deep Learning Training System with
Mixed-Precision", section 4.2): with L ranks per node on N nodes and a payload of S bytes,
  all_reduce     = intra reduce-scatter (S) + inter all-reduce (S/L) + intra all-gather (S)
  reduce_scatter = intra reduce-scatter (S) + inter reduce-scatter (S/L);  all_gather: the reverse.
Each level is a ring costed with alpha-beta (Thakur, Rabenseifner & Gropp 2005, "Optimization of
Collective Communication Operations in MPICH", section 4: reduce-scatter/all-gather (p-1)alpha +
(p-1)/p n beta, ring all-reduce twice that), intra-node at the profile's intra-node latency and busbw, inter-node
at its inter-node latency and per-GPU share of the NICs (the L inter rings of a node run at once, one per local
rank, and share them). Bytes per rank: intra 2(L-1)/L S and inter 2(N-1)/N S/L for all_reduce, half of each
for the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ztune.config.schema import Compression
from ztune.cost.gloo import serial_egress_bytes
from ztune.specs import Hardware

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER = "all_reduce", "all_gather", "reduce_scatter"
ALL_TO_ALL = "all_to_all"  # ZeRO++ qgZ and compressed exchanges (cost/zeropp.py)

# Ring steps per collective (nccl-tests PERFORMANCE.md; Patarasuk & Yuan 2009 for ring all-reduce).
_STEPS = {ALL_REDUCE: lambda n: 2 * (n - 1), ALL_GATHER: lambda n: n - 1, REDUCE_SCATTER: lambda n: n - 1}

# Compression formats, bytes per gradient element on the wire. The chunk sizes are ztune's choice and must
# match the runtime's compressor: one fp32 scale per chunk.
INT8_CHUNK_NUMEL = 512  # int8 value + fp32 absmax scale per 512 elements: 1 + 4/512 B = 0.252x of fp32
# Sign bit + fp32 mean-magnitude scale per 128 elements: 1/32 + 1/128 = 0.0391x of fp32 (Seide et al. 2014;
# Tang et al. 2021). Measured on tiny-gpt, AdamW, 60 steps: chunks of 2048 ended 6.9% above the uncompressed
# loss, 256 at 2.2%, 128 at 1.7% (benchmarks/bench_compression.py).
ONEBIT_CHUNK_NUMEL = 128
TOPK_INDEX_BYTES = 4  # int32 index per kept value
FP32_BYTES, BF16_BYTES = 4, 2


def ring_factor(op: str, world_size: int) -> float:
    """Wire bytes per rank per payload byte: 2(n-1)/n for all_reduce, (n-1)/n for gather/scatter."""
    n = world_size
    if op == ALL_REDUCE:
        return 2 * (n - 1) / n
    if op in (ALL_GATHER, REDUCE_SCATTER):
        return (n - 1) / n
    raise ValueError(f"unknown collective {op!r}")


@dataclass(frozen=True)
class Link:
    """A collective's bus bandwidth (nccl-tests busbw, bytes/s) and mean latency per ring step; the node
    layout lets all_reduce use a tree's latency across nodes."""

    bw_bytes_per_s: float
    latency_s: float
    num_nodes: int = 1
    gpus_per_node: int = 1
    # CPU ranks on gloo (is_gloo_profile): across hosts, reduce_scatter / all_gather move the bytes of gloo's
    # reduce and broadcast algorithms (cost/gloo.py), not the ring's.
    gloo: bool = False
    # CPU seconds a rank spends per byte it sends or receives on this link (Hardware.*_cpu_s_per_byte); 0: unknown
    cpu_s_per_byte: float = 0.0
    # CPU seconds per byte of the buffer a gloo reduce on this link reduces (Hardware.inter_node_reduce_cpu_s_per_byte,
    # the inter-host link only); 0: unknown (its bytes at cpu_s_per_byte)
    reduce_cpu_s_per_byte: float = 0.0
    # CPU seconds a rank spends per message step on this link, whatever its size (Hardware.*_cpu_s_per_step:
    # the CPU analogue of latency_s); 0: unknown
    cpu_s_per_step: float = 0.0


def ring_link(hw: Hardware, *, num_nodes: int, bandwidth_efficiency: float = 1.0) -> Link:
    """The NCCL-style link of a collective over `num_nodes` nodes of `hw` (see the module docstring)."""
    g = hw.gpus_per_node
    if num_nodes <= 1:
        return Link(bw_bytes_per_s=hw.intra_node_bw_bytes_per_s * bandwidth_efficiency,
                    latency_s=hw.intra_node_latency_s, num_nodes=1, gpus_per_node=g,
                    cpu_s_per_byte=hw.intra_node_cpu_s_per_byte, cpu_s_per_step=hw.intra_node_cpu_s_per_step)
    node_nic_bw = g * hw.inter_node_bw_bytes_per_s  # all the node's NICs, one ring each
    bw = min(hw.intra_node_bw_bytes_per_s, node_nic_bw)
    n = num_nodes * g
    latency = (num_nodes * hw.inter_node_latency_s + (n - num_nodes) * hw.intra_node_latency_s) / n
    # across hosts every gloo byte goes through TCP, a host's own peers' too (over loopback): the link's CPU per byte
    return Link(bw_bytes_per_s=bw * bandwidth_efficiency, latency_s=latency, num_nodes=num_nodes,
                gpus_per_node=g, gloo=is_gloo_profile(hw), cpu_s_per_byte=hw.inter_node_cpu_s_per_byte,
                cpu_s_per_step=hw.inter_node_cpu_s_per_step)


@dataclass(frozen=True)
class Hierarchy:
    """Two levels of a hierarchical collective: `intra` inside a node (L = ranks_per_node ranks), `inter`
    across the num_nodes nodes (one ring per local rank, each at its share of the node's NICs)."""

    intra: Link
    inter: Link
    num_nodes: int
    ranks_per_node: int
    gloo: bool = False  # the inter level runs gloo's reduce / broadcast algorithms (cost/gloo.py)


def hierarchy_for(hw: Hardware, *, num_nodes: int, ranks_per_node: int | None = None) -> Hierarchy:
    """The two levels on `hw`: intra-node busbw and latency; inter-node per-GPU bandwidth and latency."""
    per_node = hw.gpus_per_node if ranks_per_node is None else ranks_per_node
    return Hierarchy(intra=Link(bw_bytes_per_s=hw.intra_node_bw_bytes_per_s, latency_s=hw.intra_node_latency_s,
                                cpu_s_per_byte=hw.intra_node_cpu_s_per_byte,
                                cpu_s_per_step=hw.intra_node_cpu_s_per_step),
                     inter=Link(bw_bytes_per_s=hw.inter_node_bw_bytes_per_s, latency_s=hw.inter_node_latency_s,
                                cpu_s_per_byte=hw.inter_node_cpu_s_per_byte,
                                reduce_cpu_s_per_byte=hw.inter_node_reduce_cpu_s_per_byte,
                                cpu_s_per_step=hw.inter_node_cpu_s_per_step),
                     num_nodes=num_nodes, ranks_per_node=per_node, gloo=is_gloo_profile(hw))


def is_gloo_profile(hw: Hardware) -> bool:
    """A profile of CPU ranks, whose collectives run on gloo: a shipped cpu-* profile, or one `ztune probe` wrote
    on a host without GPUs (its source says "N CPU ranks", ztune/probe.py build_profile)."""
    return hw.name.lower().startswith("cpu") or "CPU ranks" in hw.source


def hierarchical_level_bytes(op: str, payload_bytes: float, *, num_nodes: int, ranks_per_node: int
                             ) -> tuple[float, float]:
    """(intra-node, inter-node) bytes one rank sends in a hierarchical `op` on `payload_bytes` (module
    docstring). Their sum is the flat ring's ring_factor(op, N x L) x payload."""
    n_nodes, per_node = num_nodes, ranks_per_node
    intra = (per_node - 1) / per_node * payload_bytes
    inter = (n_nodes - 1) / n_nodes * payload_bytes / per_node
    if op == ALL_REDUCE:
        return 2 * intra, 2 * inter
    if op in (ALL_GATHER, REDUCE_SCATTER):
        return intra, inter
    raise ValueError(f"unknown collective {op!r}")


def hierarchical_collective_time_s(*, op: str, payload_bytes: float, hierarchy: Hierarchy) -> float:
    """Alpha-beta time of one hierarchical collective on `payload_bytes` (full tensor): the sum of its levels'
    ring times (module docstring). 0 on one rank."""
    h = hierarchy
    if h.num_nodes * h.ranks_per_node <= 1 or payload_bytes <= 0:
        return 0.0
    intra_bytes, inter_bytes = hierarchical_level_bytes(op, payload_bytes, num_nodes=h.num_nodes,
                                                        ranks_per_node=h.ranks_per_node)
    intra_steps = (2 if op == ALL_REDUCE else 1) * (h.ranks_per_node - 1)  # RS (+ AG) inside the node
    inter_steps = _STEPS[op](h.num_nodes)
    if h.gloo:  # the bytes through the host's NICs (its L ranks' share of them together), per gloo's algorithms
        inter_s = serial_egress_bytes(op, payload_bytes, num_nodes=h.num_nodes, ranks_per_node=h.ranks_per_node,
                                      level="inter") / (h.ranks_per_node * h.inter.bw_bytes_per_s)
    else:
        inter_s = inter_bytes / h.inter.bw_bytes_per_s
    return (intra_steps * h.intra.latency_s + intra_bytes / h.intra.bw_bytes_per_s
            + inter_steps * h.inter.latency_s + inter_s)


def collective_cpu_s(op: str, payload_bytes: float, *, world_size: int, link: Link,
                     hierarchy: Hierarchy | None = None) -> float:
    """CPU seconds one rank spends moving one `op` on `payload_bytes` (full tensor): every byte it sends or
    receives at its transport's measured CPU cost (Link.cpu_s_per_byte; a rank receives what it sends in these
    symmetric collectives), with `hierarchy` each level's bytes at its own transport's. 0 when unknown.

    On gloo the inter level of a hierarchical reduce_scatter is gloo reduces (runtime/comm/hierarchical.py
    _inter_reduce_scatter: each rank's column, payload / L, in num_nodes reduces); where the probe measured a
    reduce's CPU (Link.reduce_cpu_s_per_byte, per byte of its buffer) the column is charged at it. gloo::reduce
    runs a ring reduce-scatter on every rank, then sends each chunk to the root (cost/gloo.py), and cost 2.3x the
    bytes rule on the cluster in a box (2 hosts, 10 Gbit/s, 32 MiB: 35 ms of CPU per rank against 15 ms)."""
    if world_size <= 1 or payload_bytes <= 0:
        return 0.0
    if hierarchy is not None:
        intra, inter = hierarchical_level_bytes(op, payload_bytes, num_nodes=hierarchy.num_nodes,
                                                ranks_per_node=hierarchy.ranks_per_node)
        inter_cpu = 2 * inter * hierarchy.inter.cpu_s_per_byte
        if op == REDUCE_SCATTER and hierarchy.gloo and hierarchy.inter.reduce_cpu_s_per_byte > 0 \
                and hierarchy.num_nodes > 1:
            inter_cpu = payload_bytes / hierarchy.ranks_per_node * hierarchy.inter.reduce_cpu_s_per_byte
        return 2 * intra * hierarchy.intra.cpu_s_per_byte + inter_cpu
    return 2 * payload_bytes * ring_factor(op, world_size) * link.cpu_s_per_byte


# The runtime's shared-memory transport synchronises each collective with gloo barriers of the host's ranks
# (runtime/comm/shm.py: all_reduce 3, reduce_scatter and all_gather 2 each).
SHM_BARRIERS = {ALL_REDUCE: 3, REDUCE_SCATTER: 2, ALL_GATHER: 2}


def barrier_steps(n: int) -> int:
    """Message steps of one gloo barrier of `n` ranks: gloo/barrier.cc is a dissemination barrier (Hensgen,
    Finkel & Manber 1988, "Two algorithms for barrier synchronization"), ceil(log2 n) rounds of one message sent
    and one received."""
    return math.ceil(math.log2(n)) if n > 1 else 0


def gloo_cpu_steps(op: str, n: int) -> float:
    """Message steps per rank (one message sent and one received, on average over the ranks) of one launch of
    `op` as the runtime runs it on a gloo group of `n` ranks (runtime/comm/collectives.py, cost/gloo.py):

    all_reduce: gloo's ring, 2(n-1); all_gather: n broadcasts, each n-1 messages in all, so n-1 per rank;
    reduce_scatter: n reduces, each a ring reduce-scatter (n-1 steps on every rank) and n-1 chunks sent to its
    root, so n(n-1) + (n-1) = n^2 - 1 per rank; all_to_all: n-1.

    Measured on 4 gloo ranks on 2 cores (4 KiB, CPU per op per rank, 2026-12-08): all_reduce 1.9-2.2 ms,
    a reduce 1.2-1.6 ms, a broadcast 0.27-0.57 ms, a barrier 0.76-0.83 ms: ~0.33 ms per step, whatever the op."""
    if n <= 1:
        return 0.0
    if op == ALL_REDUCE:
        return 2.0 * (n - 1)
    if op in (ALL_GATHER, ALL_TO_ALL):
        return float(n - 1)
    if op == REDUCE_SCATTER:
        return float(n * n - 1)
    raise ValueError(f"unknown collective {op!r}")


def collective_cpu_steps_s(op: str, *, world_size: int, link: Link, hierarchy: Hierarchy | None = None,
                           gloo_only: bool = False) -> float:
    """CPU seconds one rank spends on one launch of `op` whatever its size: its message steps at the link's measured
    CPU per step (Link.cpu_s_per_step; the wakeups, system calls and bookkeeping of each message, ~0.3-0.4 ms on
    the cluster in a box, where a 4 KiB all_reduce of 4 ranks costs ~2 ms of CPU per rank). With `hierarchy`, the
    intra level's barriers (SHM_BARRIERS, barrier_steps) at the intra link's and the inter level's gloo ops
    (gloo_cpu_steps over num_nodes) at the inter link's; flat on gloo, gloo_cpu_steps over the world; on one host
    of a gloo profile the shared-memory transport's barriers, unless `gloo_only` (compressed gradients: their
    exchange is gloo all-to-all + all-gather on every layout, 2(n-1) steps like the ring all_reduce). 0 where the
    CPU per step is unknown (GPU profiles, profiles from before it was measured)."""
    if world_size <= 1:
        return 0.0
    if hierarchy is not None:
        h = hierarchy
        intra = SHM_BARRIERS.get(op, 0) * barrier_steps(h.ranks_per_node) * h.intra.cpu_s_per_step
        return intra + gloo_cpu_steps(op, h.num_nodes) * h.inter.cpu_s_per_step
    if link.cpu_s_per_step <= 0:
        return 0.0
    if link.num_nodes <= 1 and op in SHM_BARRIERS and not gloo_only:
        return SHM_BARRIERS[op] * barrier_steps(world_size) * link.cpu_s_per_step
    return gloo_cpu_steps(op, world_size) * link.cpu_s_per_step


def latency_steps(op: str, world_size: int, link: Link) -> float:
    """Latency steps of one collective: the ring's, or for all_reduce across nodes the tree's if fewer
    (counted in mean ring-step latencies; a tree's inter-node hops are weighted by their share)."""
    ring = _STEPS[op](world_size)
    if op != ALL_REDUCE or link.num_nodes <= 1:
        return ring
    tree = 2 * (math.ceil(math.log2(link.num_nodes)) + link.gpus_per_node - 1)
    return min(ring, tree)


def collective_time_s(*, op: str, payload_bytes: float, world_size: int, link: Link) -> float:
    """Alpha-beta time of one collective on `payload_bytes` (full tensor). 0 on one rank."""
    if world_size <= 1 or payload_bytes <= 0:
        return 0.0
    steps = latency_steps(op, world_size, link)
    return steps * link.latency_s + payload_bytes * ring_factor(op, world_size) / link.bw_bytes_per_s


def wire_bytes_per_element(*, method: Compression, grad_bytes: int, topk_ratio: float = 0.01) -> float:
    """Bytes per gradient element sent after compression.

    none: the gradient dtype; bf16: 2 (0.5x of fp32); int8: 1 + a fp32 scale per INT8_CHUNK_NUMEL;
    onebit: 1/8 + a fp32 scale per ONEBIT_CHUNK_NUMEL (1/32 of fp32 plus scales); topk: ratio x (value in
    the gradient dtype + TOPK_INDEX_BYTES).
    """
    if method is Compression.NONE:
        return float(grad_bytes)
    if method is Compression.BF16:
        return float(min(grad_bytes, BF16_BYTES))
    if method is Compression.INT8:
        return 1.0 + FP32_BYTES / INT8_CHUNK_NUMEL
    if method is Compression.ONEBIT:
        return 1.0 / 8 + FP32_BYTES / ONEBIT_CHUNK_NUMEL
    if method is Compression.TOPK:
        return topk_ratio * (grad_bytes + TOPK_INDEX_BYTES)
    raise ValueError(f"unknown compression {method!r}")  # pragma: no cover


@dataclass(frozen=True)
class ZeroCollective:
    """One kind of collective a stage issues: `payload_numel` elements (full tensor) per occurrence,
    `per_step` occurrences per optimizer step. `kind` is 'grad' or 'param'; `phase` says when it runs:
    'micro' (during every micro-step's forward/backward), 'boundary' (backward of the last micro-step) or
    'after_step' (after the optimizer step, nothing left to overlap with)."""

    op: str
    kind: str
    phase: str
    payload_numel: int
    per_step: int
    backward: bool = False  # stage 3's re-gather for backward


def zero_collectives(*, num_params: int, stage: int, grad_accum: int, trainable_params: int | None = None,
                     backward_gather_numel: int | None = None) -> list[ZeroCollective]:
    """The collectives of ZeRO `stage` per optimizer step (DESIGN.md, ZeRO paper section 7).

    Stages 0/1 accumulate gradients locally and reduce once per step; stage 2 reduce-scatters every
    micro-step (its gradient shard cannot hold a full-size accumulation); stage 3 all-gathers parameters
    for forward and again for backward, and reduce-scatters gradients, every micro-step.

    trainable_params (default: all of num_params): frozen parameters produce no gradient collective and, at
    stages 1/2, need no refresh after the step (they never change); stage 3 still gathers them with their unit.
    backward_gather_numel (default: num_params): the elements stage 3 re-gathers for backward, less the units
    whose backward reads no weight (ztune/specs.py no_backward_gather_units: an untied token embedding).
    """
    p, a = num_params, grad_accum
    t = p if trainable_params is None else trainable_params
    bwd = p if backward_gather_numel is None else backward_gather_numel
    if stage == 0:
        return [ZeroCollective(ALL_REDUCE, "grad", "boundary", t, 1)]
    if stage == 1:
        return [ZeroCollective(REDUCE_SCATTER, "grad", "boundary", t, 1),
                ZeroCollective(ALL_GATHER, "param", "after_step", t, 1)]
    if stage == 2:
        # With one micro-step its reduction is the boundary's: it can only hide behind that one backward.
        return [ZeroCollective(REDUCE_SCATTER, "grad", "micro" if a > 1 else "boundary", t, a),
                ZeroCollective(ALL_GATHER, "param", "after_step", t, 1)]
    if stage == 3:
        return [ZeroCollective(ALL_GATHER, "param", "micro", p, a),  # forward
                ZeroCollective(ALL_GATHER, "param", "micro", bwd, a, backward=True),  # re-gather after release
                ZeroCollective(REDUCE_SCATTER, "grad", "micro", t, a)]
    raise ValueError(f"stage must be 0-3, got {stage}")


def zero_traffic_elements(num_params: int, world_size: int, stage: int, grad_accum: int = 1,
                          backward_gather_numel: int | None = None) -> float:
    """Elements each rank sends per optimizer step: sum of payload x ring factor over the stage's
    collectives. With grad_accum=1: 2(n-1)/n Psi for stages 0-2 and 3(n-1)/n Psi for stage 3 (DESIGN.md),
    (2 Psi + Psi_bwd)(n-1)/n where stage 3 re-gathers only Psi_bwd = `backward_gather_numel` for backward
    (zero_collectives). This is the number the runtime's comm_report (bytes / element size) must reproduce."""
    return sum(c.payload_numel * c.per_step * ring_factor(c.op, world_size)
               for c in zero_collectives(num_params=num_params, stage=stage, grad_accum=grad_accum,
                                         backward_gather_numel=backward_gather_numel))


@dataclass(frozen=True)
class OpEstimate:
    """One collective kind in one step: `calls` launches, `bytes_per_rank` on the wire, `time_s` in all."""

    op: str
    kind: str
    phase: str
    calls: int
    bytes_per_rank: float
    time_s: float
    cpu_s: float = 0.0  # CPU seconds one rank spends moving them (collective_cpu_s); 0: unknown


@dataclass(frozen=True)
class CommEstimate:
    ops: tuple[OpEstimate, ...]
    link: Link
    world_size: int

    @property
    def bytes_per_rank(self) -> float:
        return sum(o.bytes_per_rank for o in self.ops)

    @property
    def time_s(self) -> float:
        return sum(o.time_s for o in self.ops)

    @property
    def cpu_s(self) -> float:
        """CPU seconds one rank spends per step moving every op's bytes (0 where the profile has no measurement)."""
        return sum(o.cpu_s for o in self.ops)

    def time_in_phase_s(self, phase: str, kind: str | None = None) -> float:
        """Seconds of the ops in `phase` ("micro", "boundary", "after_step"), of one `kind` ("grad", "param")
        when given."""
        return sum(o.time_s for o in self.ops if o.phase == phase and (kind is None or o.kind == kind))


def comm_estimate(*, num_params: int, world_size: int, stage: int, grad_accum: int, link: Link,
                  param_bytes: int, grad_bytes: int, reduce_bucket_numel: int, allgather_bucket_numel: int,
                  num_units: int, compression: Compression = Compression.NONE, topk_ratio: float = 0.01,
                  trainable_params: int | None = None, hierarchy: Hierarchy | None = None,
                  no_backward_gather: tuple[int, ...] = ()) -> CommEstimate:
    """Bytes and alpha-beta time of every collective of one optimizer step.

    Launch counts: gradient collectives run per reduce bucket; stage 1/2 parameter refreshes per
    all-gather bucket; stage 3 gathers and reduce-scatters per module unit (`num_units`: blocks +
    embedding + head), or per bucket if buckets are smaller. Each launch pays its ring's latency steps.

    Compression applies to gradient collectives only. A compressed gradient cannot be summed hop by hop in
    a ring, so ztune assumes the exchange of 1-bit Adam (Tang et al. 2021): an all-to-all of compressed
    chunks (each rank sums its chunk), then an all-gather of the re-compressed sums. Its wire bytes equal
    the ring all-reduce's 2(n-1)/n factor on the compressed size (a reduce-scatter is the first half).
    trainable_params: see zero_collectives (None: every parameter trains).
    hierarchy: run every collective in two levels (hierarchical_collective_time_s); bytes per rank are the
    same as the flat ring's, only their split between the levels and hence the time differ.
    no_backward_gather: elements of each stage-3 unit not re-gathered for backward (ztune/specs.py
    no_backward_gather_units): out of the backward all-gather's bytes and launches.
    """
    n = world_size
    ops = []
    for c in zero_collectives(num_params=num_params, stage=stage, grad_accum=grad_accum,
                              trainable_params=trainable_params,
                              backward_gather_numel=num_params - sum(no_backward_gather)):
        if c.kind == "grad":
            per_elem = wire_bytes_per_element(method=compression, grad_bytes=grad_bytes, topk_ratio=topk_ratio)
            buckets = math.ceil(c.payload_numel / reduce_bucket_numel)
        else:
            per_elem = param_bytes
            buckets = math.ceil(c.payload_numel / allgather_bucket_numel)
        units = num_units - len(no_backward_gather) if c.backward else num_units
        launches = max(buckets, units) if stage == 3 else buckets
        payload_bytes = c.payload_numel * per_elem
        if n <= 1:
            ops.append(OpEstimate(c.op, c.kind, c.phase, 0, 0.0, 0.0))
            continue
        wire = payload_bytes * ring_factor(c.op, n) * c.per_step
        # (compressed gradients go through a flat all-to-all in the runtime: not hierarchical)
        compressed = c.kind == "grad" and compression is not Compression.NONE
        two_level = hierarchy is not None and not compressed
        cpu_s = c.per_step * (collective_cpu_s(c.op, payload_bytes, world_size=n, link=link,
                                               hierarchy=hierarchy if two_level else None)
                              + launches * collective_cpu_steps_s(c.op, world_size=n, link=link,
                                                                  hierarchy=hierarchy if two_level else None,
                                                                  gloo_only=compressed))
        if two_level:
            # per launch: its levels' latency, and its share of the payload's bytes
            one = hierarchical_collective_time_s(op=c.op, payload_bytes=payload_bytes / launches, hierarchy=hierarchy)
            time_s = c.per_step * launches * one
        else:
            steps = latency_steps(c.op, n, link)
            transfer = wire
            if link.gloo and link.num_nodes > 1 and (c.kind != "grad" or compression is Compression.NONE):
                # per host, through its NICs (link: the node's aggregate), as gloo's algorithms move it, op by op
                transfer = c.per_step * serial_egress_bytes(c.op, payload_bytes, num_nodes=link.num_nodes,
                                                            ranks_per_node=link.gpus_per_node)
            time_s = c.per_step * (launches * steps * link.latency_s) + transfer / link.bw_bytes_per_s
        ops.append(OpEstimate(c.op, c.kind, c.phase, launches * c.per_step, wire, time_s, cpu_s))
    return CommEstimate(ops=tuple(ops), link=link, world_size=n)
