"""The training rate of one workload on this host's CPU ranks, all of them busy at once: what
`ztune probe --model NAME --seq S --micro-batch B --precision P` measures, so that the profile's compute
(peak x train_flops_efficiency) is this workload's measured rate rather than a GPU fraction of a matmul peak.

Why all ranks at once: in training every rank of the host computes at the same time, on cores (and memory
bandwidth, caches, boost clocks) that the probe's one-process matmul has to itself. A rank's rate with its
peers busy is what a step sees. On a host with one core per rank the difference is the memory system's; where
ranks outnumber cores (the cluster in a box runs 2 hosts x 2 ranks on one 2-core machine, and the hosts' probes
run together, as they leave the inter-host measurement together) it is the core share itself.

Counting: forward + loss + backward of one micro-batch of random tokens, counted as the cost model counts
training FLOPs (ztune.cost.compute.model_flops_per_token, 6 Psi + 12 L h s per token: PaLM appendix B). Each
rank times `repeats` steps after a warm-up; the step's rate is the slowest rank's *median* (ranks run in
lockstep, and on a shared machine the best run is the exception, not the step a job sees).

Then every rank times one optimizer step over as many fp32 master elements as the model has parameters (stage 0's
case, where each rank steps the whole model), again all ranks at once after a barrier, through the runtime's own
path: the global gradient-norm pass that runtime/engine.py `step` runs over the owned gradients, then
runtime/optim_shard.py `step_shards` with the optimizer ztune.initialize builds on CPU (AdamW; the fused C++ kernel
when it is built). The slowest rank's median gives `optimizer_elements_per_s` (Hardware.optimizer_step_elements_per_s).
Then, the same way, 1-bit Adam's compression-stage update without its exchange (time_onebit_step: the runtime's
OneBitAdam.step through step_shards): `onebit_elements_per_s` (Hardware.onebit_step_elements_per_s).

With `codec` (the default), every rank then times the runtime's compressors too (ztune/probe_codec.py), again
all ranks at once after a barrier: a step's codec work runs on the same shared cores as its compute, in lockstep
on every rank, so its rate with the peers busy is the one a step sees. Per codec the slowest rank's rate counts.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field

from ztune.envvars import CPU_ALLOCATOR_DEFAULTS
from ztune.probe import ProbeFailed, _wait_for_result, reap

DTYPES = ("fp32", "bf16", "fp16")
WORKLOAD_REPEATS = 5  # timed steps per rank after one warm-up (tiny-llama at seq 128: ~0.5 s each per core)


@dataclass(frozen=True)
class WorkloadRate:
    """`flops_per_s` per rank (model FLOPs / the slowest rank's median step) while `ranks` ranks train
    `model` at micro_batch x seq_len in `dtype` at once; `step_s` that median step (forward + backward)."""

    model: str
    ranks: int
    seq_len: int
    micro_batch: int
    dtype: str
    threads: int
    step_s: float
    flops_per_s: float
    # Hardware.codec_*_elements_per_s field -> elements/s (slowest rank), measured with all ranks busy; {} if not
    codec_rates: dict = field(default_factory=dict)
    # master elements/s of one optimizer step (gradient norm + AdamW), slowest rank's median, all ranks at once;
    # 0: not measured
    optimizer_elements_per_s: float = 0.0
    # master elements/s of 1-bit Adam's compression-stage update without its exchange (time_onebit_step), likewise
    onebit_elements_per_s: float = 0.0
    # wall seconds per CPU second of a training step with every rank busy (mean step / its process CPU time, mean
    # over ranks): ~1 with a core per rank, ~ranks / cores where ranks outnumber the cores; 0: not measured
    cpu_stretch: float = 0.0


def _workload_worker(rank: int, spec, seq_len: int, micro_batch: int, dtype: str, threads: int, repeats: int,
                     barrier, queue, codec: bool = True) -> None:
    """One rank: build the model, warm up, wait for every rank, time `repeats` forward+backward steps, then (after
    another wait) `repeats` optimizer steps over the model's parameter count; with `codec`, wait again and time the
    codecs."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch

        from ztune.runtime.models import build_model

        torch.set_num_threads(threads)
        model = build_model(spec, seed=0, dtype={"fp32": torch.float32, "bf16": torch.bfloat16,
                                                 "fp16": torch.float16}[dtype])
        ids = torch.randint(0, spec.vocab_size, (micro_batch, seq_len),
                            generator=torch.Generator().manual_seed(rank))
        model(ids, labels=ids).backward()  # warm-up: allocator, oneDNN primitive caches
        barrier.wait(timeout=300)  # all ranks compute together, as in training
        times = []
        cpu_start = time.process_time()
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            model(ids, labels=ids).backward()
            times.append(time.perf_counter() - start)
        cpu_s = (time.process_time() - cpu_start) / repeats  # this rank's CPU seconds per step, all its threads
        numel = sum(p.numel() for p in model.parameters())
        model.zero_grad(set_to_none=True)
        # every rank steps its optimizer at once, as in training
        optimizer_times = time_optimizer_step(numel=numel, dtype=dtype, repeats=repeats,
                                              before=lambda: barrier.wait(timeout=300))
        onebit_times = time_onebit_step(numel=numel, dtype=dtype, repeats=repeats,
                                        before=lambda: barrier.wait(timeout=300))
        rates = {}
        if codec:
            from ztune.probe_codec import measure_codec_rates

            del model  # the codec buffers need the memory more than the model does now
            barrier.wait(timeout=300)
            rates = measure_codec_rates(threads=threads)
        queue.put(("ok", (rank, times, rates, numel, optimizer_times, onebit_times, cpu_s)))
    except BaseException as exc:  # reported to the parent; a rank must not hang silently
        queue.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))


def _step_tensors(numel: int, dtype: str):
    """(fp32 master, `dtype` parameter (the master itself at fp32), `dtype` gradient) of `numel` elements, seeded."""
    import torch

    low = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    gen = torch.Generator().manual_seed(0)
    master = torch.randn(numel, generator=gen).mul_(0.02)
    param = master if low is torch.float32 else master.to(low)
    return master, param, torch.randn(numel, generator=gen).mul_(1e-3).to(low)


def _timed(step, *, repeats: int, before) -> list[float]:
    """Seconds of `repeats` calls of `step()` after one untimed call, followed by `before()`."""
    step()
    before()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def time_optimizer_step(*, numel: int, dtype: str, repeats: int, before=lambda: None) -> list[float]:
    """Seconds of `repeats` optimizer steps (after one untimed step that allocates the moments) over `numel` fp32
    master elements with gradients and parameters in `dtype`, as runtime/engine.py `step` runs them on CPU-resident
    states: the gradient-norm pass (the engine computes the global norm every step for get_global_grad_norm, and for
    clipping), then runtime/optim_shard.py `step_shards` with the optimizer ztune.initialize builds (AdamW; the fused
    C++ kernel when it is built, runtime/initialize.py `_use_fused_cpu_adam`). `before()` runs after the untimed
    step (the probe's barrier). Imports torch."""
    import torch

    from ztune.config.schema import OptimizerType, TrainConfig
    from ztune.runtime.engine import squared_norm
    from ztune.runtime.initialize import _use_fused_cpu_adam
    from ztune.runtime.optim_shard import build_shard_optimizer, step_shards

    master, param, grad = _step_tensors(numel, dtype)
    fused = _use_fused_cpu_adam(TrainConfig(), device=torch.device("cpu"), kind=OptimizerType.ADAMW)
    optimizer = build_shard_optimizer([master], kind=OptimizerType.ADAMW, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=0.0, momentum=0.0, fused_cpu=fused)

    def step():
        squared_norm([grad]).item()  # as runtime/engine.py step
        step_shards(optimizer, masters=[master], grads=[grad], param_shards=[param], grad_divisor=1.0)

    return _timed(step, repeats=repeats, before=before)  # the untimed first step allocates m and v


def time_onebit_step(*, numel: int, dtype: str, repeats: int, before=lambda: None) -> list[float]:
    """Seconds of `repeats` compression-stage updates of 1-bit Adam (after one untimed one) over `numel` fp32 master
    elements with gradients and parameters in `dtype`: runtime/optim_shard.py `step_shards` with the runtime's own
    OneBitAdam (runtime/onebit_adam.py), as runtime/engine.py steps it after the freeze (the gradient's fp32 copy,
    OneBitAdam.step: momentum (4), the update with the frozen variance and its mask (7)-(8), then the 16-bit
    parameter refresh), with the momentum exchange left out: the cost model charges it as communication and codec
    time. One untimed warm-up step (the engine's AdamW, freeze_step 1) freezes the variance first. `before()` runs
    after the untimed update. Imports torch."""
    from ztune.runtime.onebit_adam import OneBitAdam
    from ztune.runtime.optim_shard import step_shards

    master, param, grad = _step_tensors(numel, dtype)
    optimizer = OneBitAdam([master], comm=None, freeze_step=1, lr=1e-4)
    # The exchange (5)-(6) replaced by nothing: its bytes and codec are other terms of the estimate.
    optimizer.exchange_momentum_ = lambda p, m, state, *, mask=True: None
    step_shards(optimizer.warmup_optimizer(), masters=[master], grads=[grad.clone()], param_shards=[param],
                grad_divisor=1.0)  # (1)-(3) once: v frozen, positive where the gradient is not zero

    def step():
        step_shards(optimizer, masters=[master], grads=[grad], param_shards=[param], grad_divisor=1.0)

    return _timed(step, repeats=repeats, before=before)


def measure_workload_rate(spec, *, ranks: int, seq_len: int, micro_batch: int, dtype: str, threads: int,
                          repeats: int = WORKLOAD_REPEATS, timeout_s: float = 600.0, codec: bool = True
                          ) -> WorkloadRate:
    """Spawn `ranks` processes that train `spec` (a ModelSpec) at once on `threads` torch threads each and
    return the per-rank rate, with `codec` also the codec rates (module docstring). Raises ProbeFailed when a
    rank fails or hangs."""
    import multiprocessing as mp

    from ztune.cost.compute import model_flops_per_token
    from ztune.probe_codec import slowest
    from ztune.specs import count_params

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(ranks)
    procs = [ctx.Process(target=_workload_worker, daemon=True,
                         args=(r, spec, seq_len, micro_batch, dtype, threads, repeats, barrier, queue, codec))
             for r in range(ranks)]
    # The ranks start with the allocator setting `ztune launch` gives a job's ranks (spawn copies os.environ).
    added = {k: v for k, v in CPU_ALLOCATOR_DEFAULTS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        for p in procs:
            p.start()
    finally:
        for k in added:
            os.environ.pop(k, None)
    medians, codec_rates, optimizer_rates, onebit_rates, stretches = [], [], [], [], []
    try:
        for _ in range(ranks):
            status, payload = _wait_for_result(queue, procs, timeout_s=timeout_s)
            if status != "ok":
                raise ProbeFailed(f"training {spec.name} on {ranks} ranks failed: {payload}")
            medians.append(statistics.median(payload[1]))
            stretches.append(statistics.mean(payload[1]) / payload[6] if payload[6] > 0 else 1.0)
            optimizer_rates.append(payload[3] / statistics.median(payload[4]))
            onebit_rates.append(payload[3] / statistics.median(payload[5]))
            if payload[2]:
                codec_rates.append(payload[2])
    finally:
        reap(procs)
    step_s = max(medians)
    per_token = model_flops_per_token(active_params=count_params(spec).active_per_token, num_layers=spec.num_layers,
                                      attention_width=spec.num_heads * spec.head_size, seq_len=seq_len)
    flops = micro_batch * seq_len * per_token / step_s if step_s > 0 else math.inf
    return WorkloadRate(spec.name, ranks, seq_len, micro_batch, dtype, threads, step_s, flops, slowest(codec_rates),
                        optimizer_elements_per_s=min(optimizer_rates), onebit_elements_per_s=min(onebit_rates),
                        cpu_stretch=statistics.mean(stretches))
