"""ZeRO++ traffic (Wang et al. 2023, "ZeRO++: Extremely Efficient Collective Communication for Giant Model
Training", arXiv 2306.10209): stage 3's collectives with qwZ, hpZ and qgZ, split into bytes that cross hosts
and bytes that stay inside one.

Units: bytes per rank per optimizer step, ring accounting (cost/comm.py): a flat collective over all n ranks
sends (n-1)/n x its payload per rank, and all of it counts as cross-host when the ranks span several hosts (the
paper's "cross-node volume", section 3; for a ring the bytes through each host's NICs are that same (n-1)/n x
payload). Per micro-step, with P parameters, n = N hosts x L ranks:
- plain stage 3: forward all-gather, backward all-gather, gradient reduce-scatter: 3 (n-1)/n P b (b: bytes per
  element of the compute dtype), all cross-host; the backward all-gather leaves out the units the runtime does
  not re-gather (an untied token embedding: ztune/specs.py no_backward_gather_units): (2 P + P_bwd) (n-1)/n b;
- qwZ (section 3.1): the parameter all-gathers carry int8 + one fp32 scale per QWZ_BLOCK_NUMEL elements
  (runtime/zeropp.py), 1 + 4/2048 bytes per element instead of b;
- hpZ with partition k (section 3.2): the backward all-gather runs inside a k-rank group on one host:
  (k-1)/k P b intra-host, nothing cross-host (the secondary shard holds the forward's, possibly dequantized,
  values in the compute dtype);
- qgZ (section 3.3): the gradient reduce-scatter becomes an intra-host all-to-all of int4 chunks
  ((L-1)/L P q4 per rank, q4 = 1/2 + 4/QGZ_BLOCK_NUMEL bytes per element), a reduction, and an all-to-all among
  the ranks with the same local rank on each host of the re-quantized 1/L slice ((N-1)/N P/L q4 per rank;
  all L ranks of a host send theirs, so (N-1)/N P q4 leave each host: `cross_host_bytes_per_host`).
With all three at bf16 (b = 2) and many hosts the volume leaving each host per micro-step goes from 3 P b = 6P
to P (1 + 4/2048) + P (1/2 + 4/2048) ~ 1.5P: the paper's 4x (its abstract: "reduces communication volume of
ZeRO by 4x"; section 3: 3M -> 0.75M). Per rank (what comm_report measures) qgZ's share is another L times
smaller.

The runtime implements all three (runtime/zeropp.py, runtime/qgz.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ztune.cost.comm import (
    ALL_GATHER,
    ALL_TO_ALL,
    REDUCE_SCATTER,
    CommEstimate,
    Hierarchy,
    Link,
    OpEstimate,
    collective_cpu_s,
    collective_cpu_steps_s,
    hierarchical_collective_time_s,
    latency_steps,
)
from ztune.cost.gloo import serial_egress_bytes

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
    """Stage 3's bytes per rank per optimizer step with the given ZeRO++ parts, by where they travel (what
    `Engine.comm_report()["zeropp"]` measures). `ranks_per_host_cross` is how many of a host's ranks send
    `grad_cross_bytes` through its NICs: 1 for a flat ring (its per-rank ring bytes are also what each host
    boundary carries), L for qgZ's inter-host all-to-all (every rank sends its own slice)."""

    param_gather_cross_bytes: float  # forward (and, without hpZ, backward) all-gathers over every rank
    param_gather_intra_bytes: float  # hpZ's backward all-gather inside the host group
    grad_cross_bytes: float  # reduce-scatter over every rank, or qgZ's inter-host all-to-all
    grad_intra_bytes: float  # qgZ's intra-host all-to-all
    ranks_per_host_cross: int = 1

    @property
    def cross_host_bytes(self) -> float:
        """Per rank, on collectives that span hosts."""
        return self.param_gather_cross_bytes + self.grad_cross_bytes

    @property
    def intra_host_bytes(self) -> float:
        return self.param_gather_intra_bytes + self.grad_intra_bytes

    @property
    def cross_host_bytes_per_host(self) -> float:
        """What leaves each host through its NICs per step (the paper's cross-node volume)."""
        return self.param_gather_cross_bytes + self.grad_cross_bytes * self.ranks_per_host_cross


def zeropp_traffic(*, num_params: int, num_nodes: int, ranks_per_node: int, grad_accum: int = 1,
                   param_bytes: float = 2, grad_bytes: float = 2, quantized_weights: bool = False,
                   hpz_partition_size: int = 1, quantized_gradients: bool = False,
                   trainable_params: int | None = None, backward_gather_numel: int | None = None) -> ZeroPPTraffic:
    """Stage 3's traffic per optimizer step (module docstring). All-False is plain stage 3, whose cross-host
    bytes equal cost/comm.py's zero_traffic_elements x the element size. On one host nothing crosses: the
    flat collectives count as intra-host. backward_gather_numel (default num_params): the elements re-gathered
    for backward (cost/comm.py zero_collectives), over the flat group or, with hpZ, the secondary group.

    Raises ValueError when hpz_partition_size does not divide ranks_per_node."""
    if hpz_partition_size < 1 or ranks_per_node % hpz_partition_size:
        raise ValueError(f"hpz_partition_size {hpz_partition_size} must divide the ranks per node {ranks_per_node}")
    p, a = num_params, grad_accum
    t = p if trainable_params is None else trainable_params
    bwd = p if backward_gather_numel is None else backward_gather_numel
    L, N, k = ranks_per_node, num_nodes, hpz_partition_size
    ring = (N * L - 1) / (N * L)
    weight_bytes = qwz_bytes_per_element() if quantized_weights else param_bytes
    fwd = a * ring * p * weight_bytes
    if k > 1:
        bwd_flat, bwd_intra = 0.0, a * (k - 1) / k * bwd * param_bytes
    else:
        bwd_flat, bwd_intra = a * ring * bwd * weight_bytes, 0.0
    if quantized_gradients:
        q4 = qgz_bytes_per_element()
        grad_intra = a * (L - 1) / L * t * q4
        grad_flat = a * (N - 1) / N * t / L * q4  # this rank's 1/L slice, to its N-1 peers on other hosts
    else:
        grad_intra, grad_flat = 0.0, a * ring * t * grad_bytes
    per_host = L if quantized_gradients else 1
    if N <= 1:  # one host: nothing crosses
        return ZeroPPTraffic(0.0, fwd + bwd_flat + bwd_intra, 0.0, grad_flat + grad_intra, per_host)
    return ZeroPPTraffic(fwd + bwd_flat, bwd_intra, grad_flat, grad_intra, per_host)


def hpz_secondary_bytes(*, num_params: int, hpz_partition_size: int, param_bytes: float) -> float:
    """Bytes per rank of hpZ's secondary shards (runtime/zeropp.py): P / k in the compute dtype; 0 when off."""
    return num_params / hpz_partition_size * param_bytes if hpz_partition_size > 1 else 0.0


def zeropp_comm_estimate(*, num_params: int, num_nodes: int, ranks_per_node: int, grad_accum: int, link: Link,
                         intra_link: Link, param_bytes: float, grad_bytes: float, num_units: int,
                         quantized_weights: bool, hpz_partition_size: int, quantized_gradients: bool = False,
                         trainable_params: int | None = None, hierarchy: Hierarchy | None = None,
                         no_backward_gather: tuple[int, ...] = ()) -> CommEstimate:
    """cost/comm.py's CommEstimate for stage 3 with ZeRO++: the flat collectives on `link` (all ranks); hpZ's
    backward all-gather (k ranks) and qgZ's first all-to-all (L ranks) on `intra_link`; qgZ's second all-to-all
    (N ranks, one per host) on `link`. One launch per unit and micro-step, as comm_estimate charges stage 3 (the
    runtime gathers and reduces per module unit); an all-to-all pays n-1 latency steps (pairwise exchanges).

    Time through the hosts' NICs (`link`: a node's aggregate): qgZ's inter-host all-to-all is sent by all L ranks
    of a host at once, so a host's NICs carry L x one rank's bytes. With `hierarchy` the flat parameter
    all-gathers run in two levels (runtime/comm/hierarchical.py; comm.hierarchical auto on CPU hosts); on a gloo
    link without it they move gloo's broadcast bytes (cost/gloo.py). no_backward_gather: as for comm_estimate
    (the units backward does not re-gather, whether over the flat group or hpZ's)."""
    L, N, k, a = ranks_per_node, num_nodes, hpz_partition_size, grad_accum
    n = N * L
    bwd = num_params - sum(no_backward_gather)
    tr = zeropp_traffic(num_params=num_params, num_nodes=N, ranks_per_node=L, grad_accum=a, param_bytes=param_bytes,
                        grad_bytes=grad_bytes, quantized_weights=quantized_weights, hpz_partition_size=k,
                        quantized_gradients=quantized_gradients, trainable_params=trainable_params,
                        backward_gather_numel=bwd)
    t = num_params if trainable_params is None else trainable_params
    hpz_bytes = a * (k - 1) / k * bwd * param_bytes if k > 1 else 0.0
    qgz_intra = a * (L - 1) / L * t * qgz_bytes_per_element() if quantized_gradients else 0.0
    flat_gather = tr.param_gather_cross_bytes if N > 1 else tr.param_gather_intra_bytes - hpz_bytes
    grad = tr.grad_cross_bytes if N > 1 else tr.grad_intra_bytes - qgz_intra
    launches = a * num_units

    def op(name: str, kind: str, wire: float, group: int, on: Link, per_step: int) -> OpEstimate:
        if group <= 1 or wire <= 0:
            return OpEstimate(name, kind, "micro", 0, 0.0, 0.0)
        steps = latency_steps(REDUCE_SCATTER if name == ALL_TO_ALL else name, group, on)
        time_s = per_step * steps * on.latency_s + wire / on.bw_bytes_per_s
        # CPU: every byte sent is also received by some rank (cost/comm.py collective_cpu_s), and each launch's
        # message steps on these gloo groups (no shared-memory transport: gloo_only)
        cpu_s = 2 * wire * on.cpu_s_per_byte + per_step * collective_cpu_steps_s(name, world_size=group, link=on,
                                                                                 gloo_only=True)
        return OpEstimate(name, kind, "micro", per_step, wire, time_s, cpu_s)

    bwd_launches = a * (num_units - len(no_backward_gather))
    gathers = launches + (0 if k > 1 else bwd_launches)
    ops = [op(ALL_GATHER, "param", flat_gather, n, link, gathers)]
    if N > 1 and flat_gather > 0:
        payload = flat_gather / (n - 1) * n / gathers  # one launch's full tensor, from its ring bytes
        if hierarchy is not None:
            one = hierarchical_collective_time_s(op=ALL_GATHER, payload_bytes=payload, hierarchy=hierarchy)
            ops[0] = OpEstimate(ALL_GATHER, "param", "micro", gathers, flat_gather, gathers * one,
                                gathers * (collective_cpu_s(ALL_GATHER, payload, world_size=n, link=link,
                                                            hierarchy=hierarchy)
                                           + collective_cpu_steps_s(ALL_GATHER, world_size=n, link=link,
                                                                    hierarchy=hierarchy)))
        elif link.gloo:
            egress = serial_egress_bytes(ALL_GATHER, payload, num_nodes=N, ranks_per_node=L)
            ops[0] = OpEstimate(ALL_GATHER, "param", "micro", gathers, flat_gather,
                                gathers * (latency_steps(ALL_GATHER, n, link) * link.latency_s
                                           + egress / link.bw_bytes_per_s), ops[0].cpu_s)
    if k > 1:
        ops.append(op(ALL_GATHER, "param", hpz_bytes, k, intra_link, bwd_launches))
    if quantized_gradients:
        ops.append(op(ALL_TO_ALL, "grad", qgz_intra, L, intra_link, launches))
        cross = op(ALL_TO_ALL, "grad", grad, N, link, launches)
        if N > 1 and cross.calls:  # every rank of the host sends its slice through the host's NICs at once
            cross = OpEstimate(ALL_TO_ALL, "grad", "micro", cross.calls, grad,
                               cross.time_s + (L - 1) * grad / link.bw_bytes_per_s, cross.cpu_s)
        ops.append(cross)
    else:
        ops.append(op(REDUCE_SCATTER, "grad", grad, n, link, launches))
    return CommEstimate(ops=tuple(ops), link=link, world_size=n)
