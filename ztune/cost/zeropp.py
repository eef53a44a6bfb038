"""ZeRO++ traffic (Wang et al. 2023, "ZeRO++: Extremely Efficient Collective Communication for Giant Model
Training", arXiv 2306.10209): stage 3's collectives with qwZ, hpZ and qgZ, split into bytes that cross hosts
and bytes that stay inside one.

Units: bytes per rank per optimizer step, ring accounting (cost/comm.py): a flat collective over all n ranks
sends (n-1)/n x its payload per rank, and all of it counts as cross-host when the ranks span several hosts (the
paper's "cross-node volume", section 3; for a ring the bytes through each host's NICs are that same (n-1)/n x
payload). Per micro-step, with P parameters, n = N hosts x L ranks:
- plain stage 3: forward all-gather, backward all-gather, gradient reduce-scatter: 3 (n-1)/n P b (b: bytes per
  element of the compute dtype), all cross-host;
- qwZ (section 3.1): the parameter all-gathers carry int8 + one fp32 scale per QWZ_BLOCK_NUMEL elements
  (runtime/zeropp.py), 1 + 4/2048 bytes per element instead of b;
- hpZ with partition k (section 3.2): the backward all-gather runs inside a k-rank group on one host:
  (k-1)/k P b intra-host, nothing cross-host (the secondary shard holds the forward's, possibly dequantized,
  values in the compute dtype);
- qgZ (section 3.3): the gradient reduce-scatter becomes an intra-host all-to-all of int4 chunks
  ((L-1)/L P q4 per rank, q4 = 1/2 + 4/QGZ_BLOCK_NUMEL bytes per element), a reduction, and an all-to-all among
  the ranks with the same local rank on each host of the re-quantized 1/L slice ((N-1)/N P/L q4 per rank, so
  (N-1)/N P q4 through each host's NICs, which is what ring accounting charges a flat collective; cross-host
  bytes below are per host and divided by L for the per-rank figure that compares with the others).
With all three at bf16 (b = 2) and many hosts the cross-host volume per micro-step goes from 3 P b = 6P to
P (1 + 4/2048) + P (1/2 + 4/2048) ~ 1.5P: the paper's 4x (its abstract: "reduces communication volume of ZeRO
by 4x"; section 3: 3M -> 0.75M).

The runtime implements qwZ and hpZ; qgZ is modelled here but not offered by the estimate (its key is rejected).
"""

from __future__ import annotations

from dataclasses import dataclass

from ztune.cost.comm import ALL_GATHER, REDUCE_SCATTER, CommEstimate, Link, OpEstimate, latency_steps

# runtime/zeropp.py QWZ_BLOCK_NUMEL: int8 values, one fp32 scale per block.
QWZ_BLOCK_NUMEL = 2048
# qgZ's int4 gradients (paper section 3.3), one fp32 scale per block of this many elements (ztune's choice,
# the same block as qwZ's).
QGZ_BLOCK_NUMEL = 2048
FP32_BYTES = 4


def qwz_bytes_per_element() -> float:
    return 1.0 + FP32_BYTES / QWZ_BLOCK_NUMEL


def qgz_bytes_per_element() -> float:
    return 0.5 + FP32_BYTES / QGZ_BLOCK_NUMEL


@dataclass(frozen=True)
class ZeroPPTraffic:
    """Stage 3's bytes per optimizer step with the given ZeRO++ parts, by where they travel: cross-host bytes
    are what leaves each host through its NICs (per host), intra-host bytes what each rank sends inside its host
    (per rank). For a flat ring collective both equal one rank's ring bytes (module docstring)."""

    param_gather_cross_bytes: float  # forward (and, without hpZ, backward) all-gathers, per host
    param_gather_intra_bytes: float  # hpZ's backward all-gather inside the host group, per rank
    grad_cross_bytes: float  # reduce-scatter, or qgZ's inter-host all-to-all, per host
    grad_intra_bytes: float  # qgZ's intra-host all-to-all, per rank

    @property
    def cross_host_bytes(self) -> float:
        return self.param_gather_cross_bytes + self.grad_cross_bytes

    @property
    def intra_host_bytes(self) -> float:
        return self.param_gather_intra_bytes + self.grad_intra_bytes


def zeropp_traffic(*, num_params: int, num_nodes: int, ranks_per_node: int, grad_accum: int = 1,
                   param_bytes: float = 2, grad_bytes: float = 2, quantized_weights: bool = False,
                   hpz_partition_size: int = 1, quantized_gradients: bool = False,
                   trainable_params: int | None = None) -> ZeroPPTraffic:
    """Stage 3's traffic per optimizer step (module docstring). All-False is plain stage 3, whose cross-host
    bytes equal cost/comm.py's zero_traffic_elements x the element size. On one host nothing crosses: the
    flat collectives count as intra-host, per rank.

    Raises ValueError when hpz_partition_size does not divide ranks_per_node."""
    if hpz_partition_size < 1 or ranks_per_node % hpz_partition_size:
        raise ValueError(f"hpz_partition_size {hpz_partition_size} must divide the ranks per node {ranks_per_node}")
    p, a = num_params, grad_accum
    t = p if trainable_params is None else trainable_params
    L, N, k = ranks_per_node, num_nodes, hpz_partition_size
    ring = (N * L - 1) / (N * L)
    fwd = a * ring * p * (qwz_bytes_per_element() if quantized_weights else param_bytes)
    if k > 1:
        bwd_flat, bwd_intra = 0.0, a * (k - 1) / k * p * param_bytes
    else:
        bwd_flat, bwd_intra = fwd, 0.0
    if quantized_gradients:
        q4 = qgz_bytes_per_element()
        grad_intra = a * (L - 1) / L * t * q4
        # each of the host's L ranks sends its reduced 1/L slice to its N-1 peers on other hosts
        grad_flat = a * (N - 1) / N * t * q4
    else:
        grad_intra, grad_flat = 0.0, a * ring * t * grad_bytes
    if N <= 1:  # one host: nothing crosses
        return ZeroPPTraffic(0.0, fwd + bwd_flat + bwd_intra, 0.0, grad_flat + grad_intra)
    return ZeroPPTraffic(fwd + bwd_flat, bwd_intra, grad_flat, grad_intra)


def hpz_secondary_bytes(*, num_params: int, hpz_partition_size: int, param_bytes: float) -> float:
    """Bytes per rank of hpZ's secondary shards (runtime/zeropp.py): P / k in the compute dtype; 0 when off."""
    return num_params / hpz_partition_size * param_bytes if hpz_partition_size > 1 else 0.0


def zeropp_comm_estimate(*, num_params: int, num_nodes: int, ranks_per_node: int, grad_accum: int, link: Link,
                         intra_link: Link, param_bytes: float, grad_bytes: float, num_units: int,
                         quantized_weights: bool, hpz_partition_size: int,
                         trainable_params: int | None = None) -> CommEstimate:
    """cost/comm.py's CommEstimate for stage 3 with qwZ / hpZ: the flat collectives on `link` (all ranks), hpZ's
    backward all-gather on `intra_link` over its k ranks. One launch per unit and micro-step, as comm_estimate
    charges stage 3 (the runtime gathers and reduces per module unit)."""
    n, k, a = num_nodes * ranks_per_node, hpz_partition_size, grad_accum
    tr = zeropp_traffic(num_params=num_params, num_nodes=num_nodes, ranks_per_node=ranks_per_node, grad_accum=a,
                        param_bytes=param_bytes, grad_bytes=grad_bytes, quantized_weights=quantized_weights,
                        hpz_partition_size=k, trainable_params=trainable_params)
    flat_gather = tr.param_gather_cross_bytes if num_nodes > 1 else tr.param_gather_intra_bytes - (
        a * (k - 1) / k * num_params * param_bytes if k > 1 else 0.0)
    grad = tr.grad_cross_bytes if num_nodes > 1 else tr.grad_intra_bytes
    launches = a * num_units

    def op(name: str, kind: str, wire: float, group: int, on: Link, per_step: int) -> OpEstimate:
        if group <= 1 or wire <= 0:
            return OpEstimate(name, kind, "micro", 0, 0.0, 0.0)
        time_s = per_step * latency_steps(name, group, on) * on.latency_s + wire / on.bw_bytes_per_s
        return OpEstimate(name, kind, "micro", per_step, wire, time_s)

    ops = [op(ALL_GATHER, "param", flat_gather, n, link, launches * (1 if k > 1 else 2))]
    if k > 1:
        ops.append(op(ALL_GATHER, "param", a * (k - 1) / k * num_params * param_bytes, k, intra_link, launches))
    ops.append(op(REDUCE_SCATTER, "grad", grad, n, link, launches))
    return CommEstimate(ops=tuple(ops), link=link, world_size=n)
