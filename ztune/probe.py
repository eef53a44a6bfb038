"""Measure this host and write a hardware profile: what `ztune probe` does, as plain functions.

Reading (NVML for GPUs, psutil for the host) and measuring (memory bandwidth, matmul FLOP/s, all_reduce
over a local process group, pinned host<->device copies) are separate leaf functions; `build_profile`
turns their results into a `Hardware`, `field_notes` says for every field whether it was measured, read
or assumed, and `to_yaml` writes the profile format of profiles/hardware/*.yaml. torch is imported only
inside the measuring functions, so importing this module stays cheap.

Conventions: bandwidths in bytes/s. Memory bandwidth follows STREAM (McCalpin): copy counts the bytes
read plus written (2 x array), triad 3 x array. Collective bandwidth follows nccl-tests
(NVIDIA/nccl-tests, doc/PERFORMANCE.md): all_reduce busbw = 2(n-1)/n x bytes / time; the latency is the
alpha of the alpha-beta model (Hockney 1994) per ring step, 2(n-1) steps per all_reduce, as in
ztune.cost.comm. On a host without GPUs a "GPU" is a CPU rank (one per core share), as in cpu-local.yaml.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ztune.specs import RUNTIME_CPU_KINDS, Hardware

GIB = 1 << 30
# Held back from each CPU rank's share of RAM for the OS and the Python processes (cpu-local.yaml).
CPU_RESERVED_BYTES = 2 * GIB
# nccl-tests' own default check: achievable NIC throughput is ~90% of the line rate (dgx-h100.yaml).
NIC_EFFICIENCY = 0.9
DEFAULT_INTER_NODE_GBPS = 10.0  # one 10 GbE port per node, when the user does not say
# Per ring step: TCP over Ethernet ~50 us; InfiniBand NDR + NCCL proxy ~5 us (dgx-h100.yaml).
ETHERNET_LATENCY_S, INFINIBAND_LATENCY_S = 50e-6, 5e-6
INFINIBAND_FROM_GBPS = 200.0  # faster than this per node: assume an RDMA fabric
SINGLE_RANK_LATENCY_S = 5e-6  # no peer to measure against; a placeholder the cost model never uses at n=1


class ProbeFailed(RuntimeError):
    """A measurement could not run (process group hung, CUDA build missing): the CLI exits 1."""


# --------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class GpuScan:
    """What NVML says. `status` is one line: "3 NVIDIA GPUs" or why none were found."""

    gpus: tuple[GpuInfo, ...]
    status: str


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    cpu_cores: int  # physical cores where psutil knows them, logical otherwise
    memory_bytes: int


def read_gpus(*, nvml=None) -> GpuScan:
    """GPUs via NVML (`pynvml`, or a stand-in for tests). No library or no driver is "no GPU", never an
    exception: a CPU host is a normal place to run `ztune probe`."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return GpuScan((), "no NVIDIA GPU/driver found (pynvml not installed)")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return GpuScan((), f"no NVIDIA GPU/driver found ({exc})")
    try:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            gpus.append(GpuInfo(i, name, int(nvml.nvmlDeviceGetMemoryInfo(handle).total)))
    except nvml.NVMLError as exc:
        return GpuScan((), f"NVML failed while listing GPUs ({exc})")
    finally:
        nvml.nvmlShutdown()
    status = f"{len(gpus)} NVIDIA GPU(s)" if gpus else "NVML found no NVIDIA GPU"
    return GpuScan(tuple(gpus), status)


def read_host() -> HostInfo:
    import psutil

    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    return HostInfo(socket.gethostname(), int(cores), int(psutil.virtual_memory().total))


# ------------------------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class MemoryBandwidth:
    """STREAM-convention rates, bytes/s, best of the repeats, all cores."""

    copy_bytes_per_s: float
    triad_bytes_per_s: float
    threads: int


def _best_time_s(fn: Callable[[], None], *, repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()  # warm-up: first touch of pages, kernel/JIT selection
    sync()
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_host_memory_bandwidth(*, size_bytes: int, repeats: int, threads: int | None = None) -> MemoryBandwidth:
    """Copy (b = a) and triad (a = b + s*c) over fp32 arrays of `size_bytes` each with `threads` torch
    threads (default: every core). Arrays must be well beyond the last-level cache to measure DRAM."""
    import psutil
    import torch

    threads = threads or psutil.cpu_count(logical=False) or 1
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = max(1, size_bytes // 4)
        a, b, c = torch.ones(n), torch.empty(n), torch.full((n,), 2.0)
        copy_s = _best_time_s(lambda: b.copy_(a), repeats=repeats)
        triad_s = _best_time_s(lambda: torch.add(b, c, alpha=3.0, out=a), repeats=repeats)
    finally:
        torch.set_num_threads(saved)
    return MemoryBandwidth(2 * 4 * n / copy_s, 3 * 4 * n / triad_s, threads)


@dataclass(frozen=True)
class FlopRates:
    """Dense matmul FLOP/s per device (per CPU rank on a CPU host): the slowest device's best run.
    `matrix_size` is the size asked for; `fp32_size`/`bf16_size` the sizes measured, when a dtype's products
    were too slow for the size asked (None: measured at `matrix_size`)."""

    fp32_flops_per_s: float
    bf16_flops_per_s: float
    device: str
    matrix_size: int
    fp32_size: int | None = None
    bf16_size: int | None = None

    def size_for(self, dtype: str) -> int:
        return getattr(self, f"{dtype}_size") or self.matrix_size


# Smallest product a matmul measurement starts from, to learn the rate before committing to the size asked for.
_MATMUL_FIRST_SIZE = 256


def _matmul_size(*, first_s: float, first_size: int, limit: int, max_product_s: float) -> int:
    """The size (a multiple of 64, <= limit) whose product takes about `max_product_s` at the rate one product of
    `first_size` showed (time ~ size^3). A CPU without bf16 units multiplies bf16 some 40x slower than fp32:
    without this cap a 2048^2 bf16 product took 85 s on a 2-core VM, and `--quick`'s 1024^2 ten."""
    if first_s <= 0 or not math.isfinite(max_product_s):
        return limit
    fit = int(first_size * (max_product_s / first_s) ** (1 / 3)) // 64 * 64
    return max(64, min(limit, fit))


def measure_matmul_flops(*, device: str, matrix_size: int, repeats: int, threads: int = 1,
                         max_product_s: float = math.inf) -> FlopRates:
    """2*N^3 FLOP per N x N matmul, best of `repeats`, fp32 (TF32 off) and bf16. `device` is "cpu" (with
    `threads` torch threads: one rank's cores) or "cuda:i". N is `matrix_size`, or less for a dtype whose
    product would take over `max_product_s` seconds there (timed first at a small size)."""
    import torch

    saved_threads, saved_tf32 = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: TF32 has its own, higher peak
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)

    def operands(n: int, dtype: torch.dtype) -> tuple:
        x = torch.randn(n, n, device=device).to(dtype)
        y = torch.randn(n, n, device=device).to(dtype)
        return x, y, torch.empty(n, n, device=device, dtype=dtype)

    rates, sizes = {}, {}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            size = matrix_size
            if math.isfinite(max_product_s) and matrix_size > _MATMUL_FIRST_SIZE:
                x, y, out = operands(_MATMUL_FIRST_SIZE, dtype)
                # best of 2: one product preempted on a busy host must not shrink the size for nothing
                first_s = _best_time_s(lambda x=x, y=y, out=out: torch.mm(x, y, out=out), repeats=2, sync=sync)
                size = _matmul_size(first_s=first_s, first_size=_MATMUL_FIRST_SIZE, limit=matrix_size,
                                    max_product_s=max_product_s)
            x, y, out = operands(size, dtype)
            seconds = _best_time_s(lambda x=x, y=y, out=out: torch.mm(x, y, out=out), repeats=repeats, sync=sync)
            rates[dtype], sizes[dtype] = 2 * size**3 / seconds, size
    finally:
        torch.set_num_threads(saved_threads)
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    smaller = {d: (n if n != matrix_size else None) for d, n in sizes.items()}
    return FlopRates(rates[torch.float32], rates[torch.bfloat16], device, matrix_size,
                     smaller[torch.float32], smaller[torch.bfloat16])


# `ztune autotune` on a CPU profile: the matmul size and the cap per product of `probe --quick` (plan_for).
LOCAL_CPU_MATMUL_SIZE, LOCAL_CPU_MATMUL_MAX_PRODUCT_S, LOCAL_CPU_MATMUL_REPEATS = 1024, 0.25, 3
TRAIN_STEP_REPEATS = 2  # forward + backward timings after one warm-up; the best counts


def measure_train_flops_per_s(spec, *, seq_len: int, micro_batch: int, threads: int, dtype: str = "fp32",
                              repeats: int = TRAIN_STEP_REPEATS) -> float:
    """FLOP/s one CPU rank reaches training `spec`: forward + loss + backward of one micro-batch of random
    tokens (runtime.models.build_model, `threads` torch threads, best of `repeats` after a warm-up), counted
    as the cost model counts them (ztune.cost.compute.model_flops_per_token: 6 Psi + 12 L h s per token).
    Divided by the matmul rate it is the achieved fraction a profile's train_flops_efficiency stands for."""
    import torch

    from ztune.cost.compute import model_flops_per_token
    from ztune.runtime.models import build_model
    from ztune.specs import count_params

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(spec, seed=0, dtype={"fp32": torch.float32, "bf16": torch.bfloat16,
                                                 "fp16": torch.float16}[dtype])
        ids = torch.randint(0, spec.vocab_size, (micro_batch, seq_len), generator=torch.Generator().manual_seed(0))

        def step() -> None:
            model(ids, labels=ids).backward()

        step()  # warm-up: allocator, oneDNN primitive caches
        seconds = _best_time_s(step, repeats=repeats)
    finally:
        torch.set_num_threads(saved)
    per_token = model_flops_per_token(active_params=count_params(spec).active_per_token, num_layers=spec.num_layers,
                                      attention_width=spec.num_heads * spec.head_size, seq_len=seq_len)
    return micro_batch * seq_len * per_token / seconds


@dataclass(frozen=True)
class CpuCompute:
    """What `with_measured_cpu_compute` measured: the matmul rates, and the training rate of the workload
    with the fraction of the matmul rate it reached (None when no workload was timed)."""

    rates: FlopRates
    train_flops_per_s: float | None = None
    train_flops_efficiency: float | None = None


def with_measured_cpu_compute(hw: Hardware, *, threads: int = 1, measure: Callable[..., FlopRates] | None = None,
                              model=None, seq_len: int = 0, micro_batch: int = 1, dtype: str = "fp32",
                              measure_train: Callable[..., float] | None = None) -> tuple[Hardware, CpuCompute]:
    """`hw` (a CPU profile: one "GPU" = one CPU rank) with its compute replaced by what this host's cores
    measure now, and the measurements.

    Peak: the best of LOCAL_CPU_MATMUL_REPEATS dense N x N products (torch.mm, 2*N^3 FLOP each, N = 1024 or
    smaller where a product would exceed 0.25 s) on `threads` torch threads, fp32 and bf16: the rate the
    BLAS (oneDNN / MKL sgemm) reaches on one rank's cores, which a shipped profile can only guess for
    another CPU (cpu-local.yaml's figures are a different machine's). With `model`, also its training rate
    at `micro_batch` x `seq_len` in `dtype` (measure_train_flops_per_s); that rate over the matmul rate of
    the same dtype becomes train_flops_efficiency, so the estimate of this workload on this core is measured
    end to end rather than a GPU fraction (GENERIC_TRAIN_FLOPS_EFFICIENCY) applied to a CPU.
    `measure` / `measure_train` replace the timed functions in tests."""
    rates = (measure or measure_matmul_flops)(device="cpu", matrix_size=LOCAL_CPU_MATMUL_SIZE,
                                              repeats=LOCAL_CPU_MATMUL_REPEATS, threads=threads,
                                              max_product_s=LOCAL_CPU_MATMUL_MAX_PRODUCT_S)
    measured = dataclasses.replace(hw, peak_flops_fp32=rates.fp32_flops_per_s,
                                   peak_flops_bf16=rates.bf16_flops_per_s)
    if model is None:
        return measured, CpuCompute(rates)
    train = (measure_train or measure_train_flops_per_s)(model, seq_len=seq_len, micro_batch=micro_batch,
                                                         threads=threads, dtype=dtype)
    peak = rates.fp32_flops_per_s if dtype == "fp32" else rates.bf16_flops_per_s
    # Above 1 (elementwise work is free, or the matmul was preempted) the matmul rate is the better bound.
    efficiency = min(1.0, train / peak)
    measured = dataclasses.replace(measured, train_flops_efficiency=efficiency)
    return measured, CpuCompute(rates, train, efficiency)


@dataclass(frozen=True)
class HostDeviceBandwidth:
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float

    @property
    def bytes_per_s(self) -> float:
        # Offload moves gradients down and parameters up every step: the slower direction bounds it.
        return min(self.h2d_bytes_per_s, self.d2h_bytes_per_s)


def measure_host_device_bandwidth(*, size_bytes: int, repeats: int, device: str = "cuda:0") -> HostDeviceBandwidth:
    """Pinned host <-> `device` copies of `size_bytes`, best of `repeats`. Needs CUDA."""
    import torch

    if not torch.cuda.is_available():
        raise ProbeFailed("host<->device bandwidth needs CUDA, and torch.cuda is not available")
    host = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    h2d = _best_time_s(lambda: dev.copy_(host, non_blocking=True), repeats=repeats, sync=sync)
    d2h = _best_time_s(lambda: host.copy_(dev, non_blocking=True), repeats=repeats, sync=sync)
    return HostDeviceBandwidth(size_bytes / h2d, size_bytes / d2h)


# ------------------------------------------------------------------------------------------ collective
@dataclass(frozen=True)
class AlphaBeta:
    """all_reduce fit t(S) = 2(n-1) * latency_s + 2(n-1)/n * S / busbw. `latency_from` says whether the
    intercept was fitted or (noisy, non-positive intercept) bounded by the smallest message's time."""

    busbw_bytes_per_s: float
    latency_s: float
    latency_from: str


def fit_alpha_beta(sizes_bytes: Sequence[float], times_s: Sequence[float], *, world_size: int) -> AlphaBeta:
    """Latency from a least-squares line t = a + b*S weighted by 1/t^2 (relative error, so the small messages
    that fix the intercept weigh as much as the large ones); busbw from the largest message, after that latency.

    A step's bytes travel mostly in large messages (gradient buckets, whole-shard gathers), and a link can carry
    small messages faster per byte than its sustained rate: a token bucket (tc-tbf(8), a shaped port) lets a
    burst through at line rate. A line through every size then over-states the rate the large messages get:
    on the cluster in a box's tbf-shaped 1 Gbit/s link the line gave 139 MB/s where a 128 MiB gloo all_reduce
    between the hosts ran at 119.5 MB/s (benchmarks/cluster_box.py, 2026-12-07). Where t is exactly a + b*S
    both ways give the same busbw. Raises ValueError for fewer than two distinct sizes or a time <= 0."""
    if world_size < 2 or len(sizes_bytes) != len(times_s) or len(sizes_bytes) < 2:
        raise ValueError("need world_size >= 2 and at least two (size, time) pairs")
    if len(set(sizes_bytes)) < 2 or min(times_s) <= 0:
        raise ValueError("need two distinct sizes and positive times")
    w = [1.0 / t**2 for t in times_s]
    sw = sum(w)
    mean_s = sum(wi * s for wi, s in zip(w, sizes_bytes, strict=True)) / sw
    mean_t = sum(wi * t for wi, t in zip(w, times_s, strict=True)) / sw
    var = sum(wi * (s - mean_s) ** 2 for wi, s in zip(w, sizes_bytes, strict=True))
    slope = sum(wi * (s - mean_s) * (t - mean_t) for wi, s, t in zip(w, sizes_bytes, times_s, strict=True)) / var
    intercept = mean_t - slope * mean_s
    steps, wire = 2 * (world_size - 1), 2 * (world_size - 1) / world_size
    big = max(range(len(sizes_bytes)), key=lambda i: sizes_bytes[i])
    if slope <= 0 or intercept >= times_s[big]:  # pure noise: the largest message's busbw, latency included
        slope, intercept = times_s[big] / sizes_bytes[big], min(intercept, 0.0)
    busbw = wire * sizes_bytes[big] / (times_s[big] - max(intercept, 0.0))
    if intercept > 0:
        return AlphaBeta(busbw, intercept / steps, "fit")
    small = min(range(len(sizes_bytes)), key=lambda i: sizes_bytes[i])
    return AlphaBeta(busbw, times_s[small] / steps, "smallest message")


@dataclass(frozen=True)
class CollectiveResult:
    backend: str
    world_size: int
    sizes_bytes: tuple[int, ...]
    times_s: tuple[float, ...]  # per all_reduce, slowest rank, best trial
    fit: AlphaBeta
    transport: str = ""  # what carried the buffers: the backend, or "gloo + shared memory" (runtime/comm/shm.py)
    # per all_reduce, the most CPU seconds (user + system, all threads) one rank's process spent, best trial; ()
    # when not measured. On CPU ranks this is the transport's own work: copies, the TCP stack, the sums.
    cpu_s: tuple[float, ...] = ()
    # gloo's reduce (to rank 0) of the largest size, measured alike: (bytes, the most CPU seconds one rank spent);
    # None when not measured (only the inter-host probe measures it, for the hierarchical reduce-scatter)
    reduce_cpu: tuple[int, float] | None = None

    def busbw_bytes_per_s(self, i: int) -> float:
        n = self.world_size
        return 2 * (n - 1) / n * self.sizes_bytes[i] / self.times_s[i]

    def cpu_s_per_byte(self) -> float:
        """CPU seconds per byte a rank sends or receives, at the largest size: a ring all_reduce of S bytes over n
        ranks sends 2(n-1)/n S per rank and receives as much (nccl-tests doc/PERFORMANCE.md), so the largest size's
        CPU time over twice that. 0 when not measured."""
        if not self.cpu_s or self.world_size < 2:
            return 0.0
        i = max(range(len(self.sizes_bytes)), key=self.sizes_bytes.__getitem__)
        n = self.world_size
        return self.cpu_s[i] / (2 * 2 * (n - 1) / n * self.sizes_bytes[i])

    def cpu_s_per_step(self) -> float:
        """CPU seconds per message step whatever its size (one message sent and one received: the CPU analogue of
        the fit's latency), at the smallest size: a ring all_reduce takes 2(n-1) steps (nccl-tests
        doc/PERFORMANCE.md), so that size's CPU time, less its bytes at cpu_s_per_byte, over them. 0 when not
        measured."""
        if not self.cpu_s or self.world_size < 2:
            return 0.0
        i = min(range(len(self.sizes_bytes)), key=self.sizes_bytes.__getitem__)
        n = self.world_size
        moved = 2 * 2 * (n - 1) / n * self.sizes_bytes[i]
        return max(0.0, self.cpu_s[i] - moved * self.cpu_s_per_byte()) / (2 * (n - 1))

    def reduce_cpu_s_per_byte(self) -> float:
        """CPU seconds per byte of the buffer a gloo reduce reduces, on the busiest rank (root or not: gloo::reduce
        runs a ring reduce-scatter on every rank, then sends the chunks to the root, cost/gloo.py). 0 when not
        measured."""
        if self.reduce_cpu is None or self.reduce_cpu[0] <= 0:
            return 0.0
        return self.reduce_cpu[1] / self.reduce_cpu[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_worker(rank: int, world_size: int, port: int, backend: str, sizes: Sequence[int],
                       target_s: float, threads: int, queue, *, addr: str = "127.0.0.1", report_rank: int = 0,
                       shared_memory: bool = True, reduce_too: bool = False) -> None:
    """One rank: time back-to-back all_reduces per size; rank `report_rank` reports the slowest rank's time.
    `addr`:`port` is rank 0's rendezvous; `shared_memory` lets CPU ranks use runtime/comm/shm.py. `reduce_too`:
    then gloo reduces to rank 0 of the largest size, timed alike (their CPU: CollectiveResult.reduce_cpu)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        device, bound = torch.device("cpu"), {}
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
            bound = {"device_id": device}  # binds the communicator to this GPU (barrier needs to know it)
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world_size, **bound)
        sync = (lambda: torch.cuda.synchronize(device)) if backend == "nccl" else (lambda: None)
        # CPU ranks on one host: measure what the runtime will use for its buffers (runtime/comm/shm.py).
        shm = None
        if backend == "gloo" and shared_memory:
            from ztune.runtime.comm.shm import SharedMemoryTransport

            shm = SharedMemoryTransport.connect(group=None, rank=rank, world_size=world_size)
        transport = backend if shm is None else f"{backend} + shared memory"

        def timed(op, buf) -> tuple[float, float]:
            """(seconds, CPU seconds) per `op(buf)`, the slowest rank's, best of 3 trials."""
            op(buf)  # warm-up: connection setup, buffer registration, page faults
            sync()
            start = time.perf_counter()
            op(buf)
            sync()
            # Every rank must run the same number of iterations: agree on the slowest rank's estimate.
            probe = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
            dist.all_reduce(probe, op=dist.ReduceOp.MAX)
            iters = int(min(200, max(3, target_s / max(probe.item(), 1e-7))))
            best, cpu = math.inf, math.inf
            for _ in range(3):
                dist.barrier()
                start, cpu_start = time.perf_counter(), time.process_time()
                for _ in range(iters):
                    op(buf)
                sync()
                best = min(best, (time.perf_counter() - start) / iters)
                # this process's CPU seconds per op, all threads (gloo's, the kernel's TCP work in them)
                cpu = min(cpu, (time.process_time() - cpu_start) / iters)
            slowest = torch.tensor([best, cpu], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            return slowest[0].item(), slowest[1].item()

        times, cpu_times = [], []
        for size in sizes:
            buf = shm.zeros(max(1, size // 4), dtype=torch.float32) if shm is not None else None
            if buf is None:
                buf = torch.ones(max(1, size // 4), dtype=torch.float32, device=device)
            else:
                buf.fill_(1.0)
            all_reduce = shm.all_reduce if shm is not None and shm.worth_it(buf) else dist.all_reduce
            seconds, cpu = timed(all_reduce, buf)
            times.append(seconds)
            cpu_times.append(cpu)
        reduce_cpu = None
        if reduce_too:
            buf = torch.ones(max(1, max(sizes) // 4), dtype=torch.float32, device=device)
            reduce_cpu = (buf.numel() * 4, timed(lambda b: dist.reduce(b, dst=0), buf)[1])
        dist.destroy_process_group()
        if rank == report_rank:
            queue.put(("ok", {"times": times, "cpu_times": cpu_times, "transport": transport,
                              "reduce_cpu": reduce_cpu}))
    except BaseException as exc:  # reported to the parent, which decides; a rank must not hang silently
        queue.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))


def reap(procs) -> None:
    """Join the probe's rank processes; one still alive 10 s later is terminated (then joined for 5 s more),
    so no rank outlives the probe whatever happened to its peers."""
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


def _wait_for_result(queue, procs, *, timeout_s: float) -> tuple[str, object]:
    """Rank 0's result or the first error; a rank that dies without a word ends the wait early."""
    import queue as queue_mod

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=0.5)
        except queue_mod.Empty:
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                return "error", f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}"
    return "error", f"no result within {timeout_s:.0f} s (a rank hung)"


def measure_collective_bandwidth(*, world_size: int, sizes: Sequence[int], backend: str,
                                 target_s: float = 0.2, threads: int = 1, timeout_s: float = 120.0
                                 ) -> CollectiveResult:
    """Spawn `world_size` local ranks (127.0.0.1, a free port; gloo on CPU, nccl with one GPU per rank),
    time all_reduce of fp32 buffers of each size in `sizes` (bytes) for about `target_s` per trial, and
    fit the alpha-beta model. On CPU the buffers are in shared memory when the ranks can share it, as the
    runtime's are (runtime/comm/shm.py; ZTUNE_SHM=0 measures gloo alone); the result's `transport` says which."""
    import multiprocessing as mp

    if world_size < 2:
        raise ValueError("a collective needs at least 2 ranks")
    ctx = mp.get_context("spawn")  # fork after torch threads exist is unsafe; spawn gives clean ranks
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_collective_worker, daemon=True,
                         args=(r, world_size, port, backend, list(sizes), target_s, threads, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        status, payload = _wait_for_result(queue, procs, timeout_s=timeout_s)
    finally:
        reap(procs)
    if status != "ok":
        raise ProbeFailed(f"{backend} all_reduce over {world_size} local ranks failed: {payload}")
    sizes_t = tuple(int(4 * max(1, s // 4)) for s in sizes)
    times = payload["times"]
    return CollectiveResult(backend, world_size, sizes_t, tuple(times),
                            fit_alpha_beta(sizes_t, times, world_size=world_size), transport=payload["transport"],
                            cpu_s=tuple(payload.get("cpu_times", ())))


# --------------------------------------------------------------------------------------------- profile
@dataclass(frozen=True)
class Measurements:
    """Everything `build_profile` needs. `ranks` is GPUs per node (CPU ranks on a CPU host);
    `collective` is None with one rank, `host_device` None on a CPU host."""

    host: HostInfo
    gpus: GpuScan
    ranks: int
    memory: MemoryBandwidth
    flops: FlopRates
    collective: CollectiveResult | None
    host_device: HostDeviceBandwidth | None
    # gloo all_reduce between this host and another, one process on each (ztune.probe_link); None: a
    # single-host probe, which measures no inter-host link.
    inter_node: CollectiveResult | None = None
    # ztune.probe_workload: one model's training rate per CPU rank with every local rank busy (probe --model);
    # None: not asked for.
    workload: object | None = None
    # Hardware.codec_*_elements_per_s field -> elements/s per CPU rank (ztune/probe_codec.py); {}: not measured
    # (GPU hosts). `codec_note` says how they were measured.
    codec: dict = dataclasses.field(default_factory=dict)
    codec_note: str = ""


def inter_node_link(gbps: float | None, *, ranks: int) -> tuple[float, float]:
    """(bytes/s per rank, latency s) for a node NIC line rate of `gbps` Gbit/s shared by `ranks`."""
    gbps = DEFAULT_INTER_NODE_GBPS if gbps is None else gbps
    latency = INFINIBAND_LATENCY_S if gbps > INFINIBAND_FROM_GBPS else ETHERNET_LATENCY_S
    return gbps * 1e9 / 8 * NIC_EFFICIENCY / ranks, latency


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "host"


def build_profile(m: Measurements, *, name: str | None = None, inter_node_gbps: float | None = None) -> Hardware:
    """A `Hardware` for this node from measurements; what cannot be measured on one host (the inter-node
    link) comes from `inter_node_gbps` (node NIC line rate, Gbit/s) or DEFAULT_INTER_NODE_GBPS."""
    on_gpu = m.host_device is not None
    if on_gpu:
        gpu_memory = min(g.memory_bytes for g in m.gpus.gpus[: m.ranks])
        host_device = m.host_device.bytes_per_s
    else:
        gpu_memory = max(GIB, (m.host.memory_bytes - CPU_RESERVED_BYTES) // m.ranks)
        # A CPU rank's "device" memory is host RAM: one rank's share of the copy rate, in bytes copied/s.
        host_device = m.memory.copy_bytes_per_s / 2 / m.ranks
    if m.collective is not None:
        intra_bw, intra_latency = m.collective.fit.busbw_bytes_per_s, m.collective.fit.latency_s
    else:  # one rank: no intra-node collective ever runs; keep the fields positive and harmless
        intra_bw, intra_latency = host_device, SINGLE_RANK_LATENCY_S
    if m.inter_node is not None:
        # One process per host moves a 2-rank all_reduce: busbw = bytes / time = one direction of the link,
        # the node's whole NIC, shared by its ranks as the profile's per-GPU figure is (specs.Hardware).
        inter_bw = m.inter_node.fit.busbw_bytes_per_s / m.ranks
        inter_latency = m.inter_node.fit.latency_s
    else:
        inter_bw, inter_latency = inter_node_link(inter_node_gbps, ranks=m.ranks)
    gpu_names = sorted({g.name for g in m.gpus.gpus[: m.ranks]}) if on_gpu else []
    what = f"{m.ranks}x {' / '.join(gpu_names)}" if on_gpu else f"{m.ranks} CPU ranks on {m.host.cpu_cores} cores"
    return Hardware(
        name=name or f"probed-{_sanitize(m.host.hostname)}",
        gpus_per_node=m.ranks,
        gpu_memory_bytes=int(gpu_memory),
        peak_flops_bf16=m.flops.bf16_flops_per_s,
        peak_flops_fp32=m.flops.fp32_flops_per_s,
        intra_node_bw_bytes_per_s=intra_bw,
        intra_node_latency_s=intra_latency,
        inter_node_bw_bytes_per_s=inter_bw,
        inter_node_latency_s=inter_latency,
        host_device_bw_bytes_per_s=host_device,
        host_memory_bytes=m.host.memory_bytes,
        host_memory_bw_bytes_per_s=max(m.memory.copy_bytes_per_s, m.memory.triad_bytes_per_s),
        cpu_cores=m.host.cpu_cores,
        source=f"ztune probe on {m.host.hostname} ({what}); see the comment on each field",
        train_flops_efficiency=workload_efficiency(m),
        optimizer_step_elements_per_s=m.workload.optimizer_elements_per_s if m.workload is not None else 0.0,
        onebit_step_elements_per_s=m.workload.onebit_elements_per_s if m.workload is not None else 0.0,
        # CPU ranks: the transports' CPU per byte and the step's contention (GPU ranks' CPU time says nothing)
        inter_node_cpu_s_per_byte=m.inter_node.cpu_s_per_byte() if m.inter_node is not None and not on_gpu else 0.0,
        intra_node_cpu_s_per_byte=m.collective.cpu_s_per_byte() if m.collective is not None and not on_gpu else 0.0,
        inter_node_reduce_cpu_s_per_byte=(m.inter_node.reduce_cpu_s_per_byte()
                                          if m.inter_node is not None and not on_gpu else 0.0),
        inter_node_cpu_s_per_step=m.inter_node.cpu_s_per_step() if m.inter_node is not None and not on_gpu else 0.0,
        intra_node_cpu_s_per_step=m.collective.cpu_s_per_step() if m.collective is not None and not on_gpu else 0.0,
        cpu_contention=m.workload.cpu_stretch if m.workload is not None and not on_gpu else 0.0,
        **(runtime_cpu_fields(m.workload) if not on_gpu else {}),
        **m.codec,
    )


RUNTIME_CPU_FIELDS = tuple(f"runtime_{kind}_cpu_s_per_param_stage{s}" for kind in RUNTIME_CPU_KINDS for s in range(4))


def runtime_cpu_fields(w) -> dict[str, float]:
    """The Hardware.runtime_*_cpu_s_per_param_stage* fields from a WorkloadRate (ztune/probe_workload.py), {} when
    the workload did not time the runtime."""
    if w is None or not w.runtime_micro_cpu_s_per_param:
        return {}
    out = {}
    for kind in RUNTIME_CPU_KINDS:
        values = getattr(w, f"runtime_{kind}_cpu_s_per_param")
        out.update({f"runtime_{kind}_cpu_s_per_param_stage{s}": float(v) for s, v in enumerate(values)})
    return out


def workload_efficiency(m: Measurements) -> float:
    """train_flops_efficiency from the measured workload (probe --model): its rate per rank over the matmul
    rate of its dtype, so that peak x efficiency is the measured rate; 0 (unknown) without one. Capped at 1:
    above it the matmul measurement, not the workload, was the slow one (with_measured_cpu_compute does the same)."""
    w = m.workload
    if w is None:
        return 0.0
    peak = m.flops.fp32_flops_per_s if w.dtype == "fp32" else m.flops.bf16_flops_per_s
    return min(1.0, w.flops_per_s / peak)


def field_notes(m: Measurements, *, inter_node_gbps: float | None = None) -> dict[str, str]:
    """For each numeric Hardware field: "measured: ...", "read: ..." or "assumed: ..."."""
    on_gpu = m.host_device is not None
    gbps = DEFAULT_INTER_NODE_GBPS if inter_node_gbps is None else inter_node_gbps
    given = "--inter-node-gbps" if inter_node_gbps is not None else "default, pass --inter-node-gbps"
    inter = (f"assumed: this single-host probe measured no inter-host link; {gbps:g} Gbit/s per node ({given}) x "
             f"{NIC_EFFICIENCY:.0%} achievable / {m.ranks} ranks")
    c = m.collective
    f = m.flops
    notes = {
        "gpus_per_node": f"read: {m.gpus.status}" if on_gpu else f"read: {m.ranks} CPU ranks ({m.gpus.status})",
        "gpu_memory_bytes": "read: NVML memory total, smallest GPU" if on_gpu else
        f"assumed: RAM less {CPU_RESERVED_BYTES // GIB} GiB, split over {m.ranks} CPU ranks",
        "peak_flops_bf16": f"measured: bf16 {f.size_for('bf16')}^2 matmul on {f.device} (achieved, <= datasheet "
        "peak)",
        "peak_flops_fp32": f"measured: fp32 {f.size_for('fp32')}^2 matmul on {f.device}, TF32 off (achieved)",
        "inter_node_bw_bytes_per_s": inter,
        "inter_node_latency_s": "assumed: " + ("InfiniBand-class" if gbps > INFINIBAND_FROM_GBPS else "TCP/Ethernet")
        + " per-step latency",
        "host_memory_bytes": "read: psutil total RAM",
        "host_memory_bw_bytes_per_s": f"measured: STREAM copy/triad with {m.memory.threads} threads, best",
        "cpu_cores": "read: psutil physical cores",
        "nics_per_node": "assumed: 0 = one NIC per rank (NCCL rings); only the node's total NIC bandwidth counts",
        "train_flops_efficiency": "assumed: 0 = the cost model's generic fraction of the peak above; "
        "`ztune autotune` calibrates it from trials",
    }
    if m.workload is not None:
        w = m.workload
        notes["train_flops_efficiency"] = (
            f"measured: {w.model} {w.dtype} forward+backward, micro {w.micro_batch} x seq {w.seq_len}, "
            f"{w.ranks} ranks at once: {w.flops_per_s / 1e9:.3g} GFLOP/s per rank (median step "
            f"{w.step_s * 1e3:.0f} ms, slowest rank) / the {w.dtype} matmul rate")
    w = m.workload
    timed = (f"over {w.model}'s parameter count of fp32 masters, {w.dtype} grads, {w.ranks} ranks at once, slowest "
             "rank's median (ztune/probe_workload.py)") if w is not None else ""
    for field, rate, what, otherwise in (
            ("optimizer_step_elements_per_s", w and w.optimizer_elements_per_s, "gradient norm + AdamW step",
             "the estimate charges no optimizer compute on device-resident states"),
            ("onebit_step_elements_per_s", w and w.onebit_elements_per_s,
             "1-bit Adam's compression-stage update without its exchange",
             "1-bit Adam's step is charged at optimizer_step_elements_per_s")):
        notes[field] = (f"measured: {what} {timed}" if rate else
                        f"assumed: 0 = unknown (`ztune probe --model` times it on CPU ranks): {otherwise}")
    unknown = "assumed: 0 = unknown: the estimate charges no CPU for communication"
    notes["inter_node_cpu_s_per_byte"] = unknown
    if m.inter_node is not None and m.inter_node.cpu_s_per_byte() > 0 and not on_gpu:
        notes["inter_node_cpu_s_per_byte"] = (f"measured: CPU seconds of the inter-host {m.inter_node.transport} "
                                              "all_reduce per byte sent or received, largest size, busiest rank")
    notes["inter_node_reduce_cpu_s_per_byte"] = ("assumed: 0 = unknown: a gloo reduce across hosts is charged at "
                                                 "the all_reduce's CPU per byte")
    if m.inter_node is not None and m.inter_node.reduce_cpu_s_per_byte() > 0 and not on_gpu:
        notes["inter_node_reduce_cpu_s_per_byte"] = (
            f"measured: CPU seconds of a {m.inter_node.transport} gloo reduce per byte of its buffer, "
            f"{m.inter_node.reduce_cpu[0] >> 20} MiB, busiest rank")
    notes["intra_node_cpu_s_per_byte"] = unknown
    if m.collective is not None and m.collective.cpu_s_per_byte() > 0 and not on_gpu:
        notes["intra_node_cpu_s_per_byte"] = (f"measured: CPU seconds of the {m.collective.transport} all_reduce per "
                                              "byte sent or received, largest size, busiest rank")
    for field, result, where in (("inter_node_cpu_s_per_step", m.inter_node, "inter-host"),
                                 ("intra_node_cpu_s_per_step", m.collective, "in-host")):
        notes[field] = "assumed: 0 = unknown: the estimate charges no CPU per message step"
        if result is not None and result.cpu_s_per_step() > 0 and not on_gpu:
            notes[field] = (f"measured: CPU seconds of the {where} {result.transport} all_reduce per message step, "
                            f"smallest size ({min(result.sizes_bytes):,} B), busiest rank")
    notes["cpu_contention"] = unknown
    measured_runtime = runtime_cpu_fields(m.workload) if not on_gpu else {}
    skipped = m.workload.runtime_skipped if m.workload is not None else ""
    for name in RUNTIME_CPU_FIELDS:
        notes[name] = ("assumed: 0 = unknown (`ztune probe --model` times the runtime on CPU ranks): the estimate "
                       "charges no CPU for the runtime's own work")
        if skipped:
            notes[name] = f"assumed: 0 = unknown: the runtime was not timed ({skipped}); the estimate charges none"
        if name in measured_runtime:
            per = {"micro": "first micro-step's forward + backward", "accum": "later micro-steps' forward + backward",
                   "step": "engine.step"}[name.split("_")[1]]
            less = "optimizer update" if "_step_" in name else "plain forward + backward"
            notes[name] = (f"measured: the runtime's {per} CPU less the {less}, per parameter, {m.workload.model}, "
                           f"{m.workload.ranks} ranks at once, each on a group of its own; median steps, mean over "
                           "ranks, floored at 0")
    if m.workload is not None and m.workload.cpu_stretch > 0 and not on_gpu:
        notes["cpu_contention"] = (f"measured: {m.workload.model} forward+backward with {m.workload.ranks} ranks at "
                                   "once, wall seconds per CPU second of a step, mean over ranks")
    from ztune.cost.codec import RATE_FIELDS

    for name in RATE_FIELDS:
        notes[name] = (f"measured: {m.codec_note}" if name in m.codec else
                       "assumed: 0 = unknown (not measured for this profile): the estimate charges no codec time, "
                       "does not recommend a row that needs it, and says so")
    if m.inter_node is not None:
        link = m.inter_node
        notes["inter_node_bw_bytes_per_s"] = (f"measured: {link.transport} all_reduce busbw "
                                              f"{link.fit.busbw_bytes_per_s * 8 / 1e9:.3g} Gbit/s, one process per "
                                              f"host, {len(link.sizes_bytes)} sizes, / {m.ranks} ranks")
        notes["inter_node_latency_s"] = f"measured: alpha per ring step between the hosts ({link.fit.latency_from})"
    if c is not None:
        notes["intra_node_bw_bytes_per_s"] = (f"measured: {c.transport or c.backend} all_reduce busbw, "
                                              f"{c.world_size} ranks, "
                                              f"alpha-beta fit over {len(c.sizes_bytes)} sizes")
        notes["intra_node_latency_s"] = f"measured: alpha per ring step ({c.fit.latency_from})"
    else:
        notes["intra_node_bw_bytes_per_s"] = "assumed: 1 rank, no collective to measure; set to host<->device"
        notes["intra_node_latency_s"] = "assumed: 1 rank, never used"
    notes["host_device_bw_bytes_per_s"] = ("measured: pinned copies, slower of h2d/d2h" if on_gpu else
                                           "assumed: no device; each CPU rank's share of the memory copy rate")
    return notes


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4e}"  # always has a dot and a signed exponent: a YAML 1.1 float
    return json.dumps(str(value))  # a JSON string is a valid YAML double-quoted scalar


def to_yaml(hw: Hardware, notes: dict[str, str] | None = None) -> str:
    """The profile as YAML in the layout of profiles/hardware/*.yaml (one field a line, comments)."""
    notes = notes or {}
    lines = ["# Hardware profile written by `ztune probe`. Each comment says whether the value was",
             "# measured on this host, read from the system, or assumed. Edit the assumed ones if you know better."]
    for field in dataclasses.fields(Hardware):
        line = f"{field.name}: {_scalar(getattr(hw, field.name))}"
        note = notes.get(field.name, "").replace("\n", " ")
        lines.append(f"{line:<43} # {note}" if note else line)  # a space before '#' however long the line
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- orchestrator
@dataclass(frozen=True)
class ProbePlan:
    """Sizes and repeats; `quick` keeps the whole probe to seconds (small, cache-resident-ish buffers)."""

    memory_bytes: int
    matmul_size_cpu: int
    matmul_size_gpu: int
    collective_sizes: tuple[int, ...]
    collective_target_s: float
    # The inter-host link (ztune.probe_link), gloo on host buffers: up to a gradient bucket's size even when
    # quick, as fit_alpha_beta takes its busbw from the largest message.
    link_sizes: tuple[int, ...]
    host_device_bytes: int
    repeats: int
    matmul_max_product_s: float  # a slower product is measured at a smaller size (measure_matmul_flops)


def plan_for(*, quick: bool, on_gpu: bool) -> ProbePlan:
    kib, mib = 1 << 10, 1 << 20
    link = tuple(4**i * 4 * kib for i in range(8))  # 4 KiB .. 64 MiB: 0.6 s at 1 Gbit/s
    if quick:
        return ProbePlan(64 * mib, 1024, 4096, (4 * kib, 64 * kib, 1 * mib, 8 * mib), 0.05,
                         (4 * kib, 64 * kib, 1 * mib, 8 * mib, 64 * mib), 64 * mib, 3, 0.25)
    top = 1024 * mib if on_gpu else 64 * mib  # gloo over loopback is ~1 GB/s: 64 MiB already costs 0.1 s
    sizes = tuple(s for s in (4**i * 4 * kib for i in range(12)) if s <= top)
    return ProbePlan(512 * mib, 2048, 8192, sizes, 0.2, link, 512 * mib, 5, 5.0)


def check_ranks(ranks: int | None) -> int:
    """The local ranks to probe: `ranks`, or by default the visible GPUs (2 on a CPU host). UserError when
    `ranks` is below 1 or above the visible GPUs, or on a CPU host above twice the logical CPUs: more would
    time-slice (the all_reduce then measures the scheduler, not the transport), and each rank is a process
    with torch loaded, so a typo such as --ranks 500 must not spawn them. Imports torch."""
    import torch

    from ztune.errors import UserError

    available = torch.cuda.device_count() if torch.cuda.is_available() else None
    ranks = ranks if ranks is not None else (available or 2)
    cpu_limit = max(2, 2 * (os.cpu_count() or 1))
    if ranks < 1 or (available is not None and ranks > available) or (available is None and ranks > cpu_limit):
        limit = f"1..{available} (GPUs visible)" if available else f"1..{cpu_limit} (2 x the logical CPUs here)"
        raise UserError(f"--ranks {ranks}: must be {limit}")
    return ranks


def measure_all(*, quick: bool, ranks: int | None, on_step: Callable[[str], None] = lambda label: None,
                inter_node_master: tuple[str, int] | None = None, node_rank: int = 0,
                workload: dict | None = None) -> Measurements:
    """Read the host, then measure memory, matmul, collectives and (with CUDA) host<->device copies.
    `on_step(label)` is called before each measurement (the CLI drives a progress bar with it). With
    `inter_node_master` (host, port), first the link to another host running the same probe as the other
    `node_rank` (ztune.probe_link). With `workload` (ztune.probe_workload.measure_workload_rate's spec, seq_len,
    micro_batch, dtype; CPU hosts only), next that model's training rate on all local ranks at once: right after
    the inter-host measurement, so that two hosts' probes that share a machine measure it together."""
    from ztune.errors import UserError

    on_step("reading GPUs (NVML) and host (psutil)")
    gpus, host = read_gpus(), read_host()
    import torch

    on_gpu = torch.cuda.is_available()
    if gpus.gpus and not on_gpu:
        raise ProbeFailed(f"{gpus.status} but torch.cuda is not available (a CPU-only torch build, or "
                          "CUDA_VISIBLE_DEVICES hides them): install a CUDA build of torch to probe the GPUs")
    available = torch.cuda.device_count() if on_gpu else None
    ranks = check_ranks(ranks)
    if on_gpu and not gpus.gpus:  # CUDA without NVML (unusual): take sizes from torch instead
        props = [torch.cuda.get_device_properties(i) for i in range(available)]
        gpus = GpuScan(tuple(GpuInfo(i, p.name, p.total_memory) for i, p in enumerate(props)),
                       f"{available} CUDA GPU(s) (NVML unavailable)")
    plan = plan_for(quick=quick, on_gpu=on_gpu)
    inter_node = None
    if inter_node_master is not None:
        from ztune.probe_link import measure_inter_node_link

        on_step(f"gloo all_reduce with {inter_node_master[0]}:{inter_node_master[1]}, node {node_rank} of 2, "
                f"{len(plan.link_sizes)} sizes up to {plan.link_sizes[-1] >> 20} MiB")
        inter_node = measure_inter_node_link(master_addr=inter_node_master[0], master_port=inter_node_master[1],
                                             node_rank=node_rank, sizes=plan.link_sizes,
                                             target_s=plan.collective_target_s)
    threads_per_rank = 1 if on_gpu else max(1, host.cpu_cores // ranks)
    workload_rate = None
    if workload is not None:
        if on_gpu:
            raise UserError("--model: the workload's training rate is measured on CPU ranks; on GPUs the profile's "
                            "matmul peak and train_flops_efficiency stand for it")
        from ztune.probe_workload import measure_workload_rate

        on_step(f"training {workload['spec'].name} on {ranks} CPU ranks at once: plain, then the runtime at "
                "ZeRO stages 0-3")
        workload_rate = measure_workload_rate(ranks=ranks, threads=threads_per_rank, **workload)

    on_step(f"host memory bandwidth ({plan.memory_bytes >> 20} MiB arrays)")
    memory = measure_host_memory_bandwidth(size_bytes=plan.memory_bytes, repeats=plan.repeats)
    if on_gpu:
        devices = ["cuda:0"] if quick else [f"cuda:{i}" for i in range(ranks)]
        on_step(f"matmul FLOP/s on {len(devices)} GPU(s)")
        per_device = [measure_matmul_flops(device=d, matrix_size=plan.matmul_size_gpu, repeats=plan.repeats,
                                           max_product_s=plan.matmul_max_product_s)
                      for d in devices]
        flops = min(per_device, key=lambda r: r.bf16_flops_per_s)
    else:
        on_step(f"matmul FLOP/s on one CPU rank ({threads_per_rank} thread(s))")
        flops = measure_matmul_flops(device="cpu", matrix_size=plan.matmul_size_cpu, repeats=plan.repeats,
                                     threads=threads_per_rank, max_product_s=plan.matmul_max_product_s)
    collective = None
    if ranks >= 2:
        backend = "nccl" if on_gpu else "gloo"
        on_step(f"{backend} all_reduce, {ranks} local ranks, {len(plan.collective_sizes)} sizes")
        collective = measure_collective_bandwidth(world_size=ranks, sizes=plan.collective_sizes, backend=backend,
                                                  target_s=plan.collective_target_s, threads=threads_per_rank)
    codec, codec_note = {}, ""
    if workload_rate is not None and workload_rate.codec_rates:
        codec = workload_rate.codec_rates
        codec_note = (f"the runtime's codec on {ranks} ranks at once after the workload, slowest rank's median, "
                      f"{threads_per_rank} thread(s) each (ztune/probe_codec.py)")
    else:
        from ztune.probe_codec import measure_codec_rates

        where = devices[0] if on_gpu else f"one CPU rank ({threads_per_rank} thread(s))"
        on_step(f"codec rates on {where}")
        codec = measure_codec_rates(threads=threads_per_rank, device=devices[0] if on_gpu else "cpu")
        codec_note = f"the runtime's codec on {where} alone, median (ztune/probe_codec.py)"
    host_device = None
    if on_gpu:
        on_step(f"pinned host<->device copies ({plan.host_device_bytes >> 20} MiB)")
        host_device = measure_host_device_bandwidth(size_bytes=plan.host_device_bytes, repeats=plan.repeats)
    return Measurements(host, gpus, ranks, memory, flops, collective, host_device, inter_node, workload_rate,
                        codec, codec_note)
