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

Then every rank trains the same micro-batch through the runtime itself (ztune.initialize, AdamW, the workload's
precision, 2 micro-steps per optimizer step) at each ZeRO stage in turn, on a gloo group of its own
(time_engine_stages: world size 1, so the runtime's code paths run without a transport), again all ranks at once: its
process CPU seconds of each micro-step's forward + backward and of engine.step, medians. Less a plain forward +
backward timed beside them and the optimizer update's own CPU, what is left is the runtime's own CPU per parameter
(Hardware.runtime_{micro,accum,step}_cpu_s_per_param_stage*: an optimizer step's first micro-step, each later one, and
engine.step): the gradient hooks' bucket copies, stage 3's per-unit gathers into fresh buffers and their release, the
parameter refresh after the step. The collectives' own CPU is the estimate's per-byte term, not this one.

With `codec` (the default), every rank then times the runtime's compressors too (ztune/probe_codec.py), again
all ranks at once after a barrier: a step's codec work runs on the same shared cores as its compute, in lockstep
on every rank, so its rate with the peers busy is the one a step sees. Per codec the slowest rank's rate counts.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from ztune.envvars import CPU_ALLOCATOR_DEFAULTS
from ztune.probe import ProbeFailed, _wait_for_result, reap

DTYPES = ("fp32", "bf16", "fp16")
WORKLOAD_REPEATS = 5  # timed steps per rank after one warm-up (tiny-llama at seq 128: ~0.5 s each per core)
# Timed runtime steps per ZeRO stage (time_engine_stages) after ENGINE_WARMUP untimed ones: stage 3's first steps
# run ~1.5x slower than the later ones (tiny-llama, fp32: 814, 697, then 476-533 ms of CPU), and one plain forward +
# backward varies by +-15% from step to step on a shared machine, so a median of 5 pairs.
ENGINE_WARMUP = 2
ENGINE_REPEATS = 5
# Host memory per parameter per rank while time_engine_stages runs: its peak RSS growth over stages 0-3 measured
# 58-60 B per parameter (a 37M-parameter llama, fp32; 72 B at 7.9M parameters): each engine (parameter, gradient,
# fp32 master, Adam's m and v: 20 B at fp32) beside the plain model and its gradient (8 B), and what the allocator
# keeps of the earlier stages' engines. Rounded up.
ENGINE_BYTES_PER_PARAM = 80
STAGES = (0, 1, 2, 3)


class EngineTimes(NamedTuple):
    """time_engine_stages' CPU seconds per timed optimizer step at one stage: the plain forward + backward, the
    runtime's first micro-step (forward + engine.backward), its second (a later one, at the boundary), and the
    boundary's engine.step."""

    plain: list
    first: list
    later: list
    step: list


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
    # The runtime's own CPU seconds per parameter beyond plain forward + backward (an optimizer step's first
    # micro-step, and each later one) and beyond the optimizer update (per engine.step), at ZeRO stages 0..3, mean
    # over ranks (time_engine_stages); () not measured
    runtime_micro_cpu_s_per_param: tuple = ()
    runtime_accum_cpu_s_per_param: tuple = ()
    runtime_step_cpu_s_per_param: tuple = ()
    # why the runtime was not timed ("": it was, or it was not asked for)
    runtime_skipped: str = ""
    params: int = 0  # the model's parameters as built (0: not recorded)


def _workload_worker(rank: int, spec, seq_len: int, micro_batch: int, dtype: str, threads: int, repeats: int,
                     barrier, queue, codec: bool = True, engine: bool = True) -> None:
    """One rank: build the model, warm up, wait for every rank, time `repeats` forward+backward steps, then (after
    another wait) `repeats` optimizer steps over the model's parameter count; with `engine`, the runtime's steps at
    each stage (time_engine_stages); with `codec`, wait again and time the codecs."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch

        from ztune.runtime.models import build_model

        torch.set_num_threads(threads)
        model = build_model(spec, seed=0, dtype=_torch_dtype(dtype))
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
        optimizer_cpu: list[float] = []
        optimizer_times = time_optimizer_step(numel=numel, dtype=dtype, repeats=repeats,
                                              before=lambda: barrier.wait(timeout=300), cpu=optimizer_cpu)
        onebit_times = time_onebit_step(numel=numel, dtype=dtype, repeats=repeats,
                                        before=lambda: barrier.wait(timeout=300))
        del model  # the engines below and the codec buffers need the memory more than the model does now
        engine_cpu = {}
        if engine:
            engine_cpu = time_engine_stages(spec, seq_len=seq_len, micro_batch=micro_batch, dtype=dtype, seed=rank,
                                            repeats=min(repeats, ENGINE_REPEATS),
                                            before=lambda: barrier.wait(timeout=300))
        rates = {}
        if codec:
            from ztune.probe_codec import measure_codec_rates

            barrier.wait(timeout=300)
            rates = measure_codec_rates(threads=threads)
        queue.put(("ok", (rank, times, rates, numel, optimizer_times, onebit_times, cpu_s,
                          statistics.median(optimizer_cpu), engine_cpu)))
    except BaseException as exc:  # reported to the parent; a rank must not hang silently
        queue.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))


def _torch_dtype(dtype: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _step_tensors(numel: int, dtype: str):
    """(fp32 master, `dtype` parameter (the master itself at fp32), `dtype` gradient) of `numel` elements, seeded."""
    import torch

    low = _torch_dtype(dtype)
    gen = torch.Generator().manual_seed(0)
    master = torch.randn(numel, generator=gen).mul_(0.02)
    param = master if low is torch.float32 else master.to(low)
    return master, param, torch.randn(numel, generator=gen).mul_(1e-3).to(low)


def _timed(step, *, repeats: int, before, cpu: list | None = None) -> list[float]:
    """Seconds of `repeats` calls of `step()` after one untimed call, followed by `before()`; with `cpu`, each
    call's process CPU seconds (all threads) are appended to it."""
    step()
    before()
    times = []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.process_time() - cpu_start)
    return times


def time_optimizer_step(*, numel: int, dtype: str, repeats: int, before=lambda: None,
                        cpu: list | None = None) -> list[float]:
    """Seconds of `repeats` optimizer steps (after one untimed step that allocates the moments) over `numel` fp32
    master elements with gradients and parameters in `dtype`, as runtime/engine.py `step` runs them on CPU-resident
    states: the gradient-norm pass (the engine computes the global norm every step for get_global_grad_norm, and for
    clipping), then runtime/optim_shard.py `step_shards` with the optimizer ztune.initialize builds (AdamW; the fused
    C++ kernel when it is built, runtime/initialize.py `_use_fused_cpu_adam`). `before()` runs after the untimed
    step (the probe's barrier); with `cpu`, each timed step's process CPU seconds are appended to it. Imports torch."""
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

    return _timed(step, repeats=repeats, before=before, cpu=cpu)  # the untimed first step allocates m and v


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


def _micro_step(engine, ids) -> None:
    engine.backward(engine(ids, ids))


@contextlib.contextmanager
def _one_process_runtime_env():
    """The environment time_engine_stages' engines see, restored afterwards: this process as one host of one rank
    (LOCAL_WORLD_SIZE 1, no ZTUNE_LOCAL_WORLD_SIZE) and no autotune trial's reporting (ZTUNE_TRIAL_*: a probe run
    inside a trial's environment must not write trial records or exit early). Switches such as ZTUNE_DISABLE_CPP_*
    stay: the probe times the runtime as this host's jobs run it."""
    from ztune.runtime.comm.topology import ENV_OVERRIDE

    drop = [k for k in os.environ if k == ENV_OVERRIDE or k.startswith("ZTUNE_TRIAL_")]
    saved = {k: os.environ.get(k) for k in [*drop, "LOCAL_WORLD_SIZE"]}
    for k in drop:
        del os.environ[k]
    os.environ["LOCAL_WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def time_engine_stages(spec, *, seq_len: int, micro_batch: int, dtype: str, repeats: int, before=lambda: None,
                       stages=STAGES, seed: int = 0) -> dict[int, EngineTimes]:
    """Process CPU seconds of the runtime's own training step, per ZeRO stage: for each of `stages`, a fresh model
    (seed 0) through ztune.initialize (AdamW, `dtype` precision, micro_batch x seq_len, 2 micro-steps per optimizer
    step, no clipping) on a gloo group of this process alone, ENGINE_WARMUP untimed optimizer steps, `before()` (the
    probe's barrier), then `repeats` optimizer steps, each right after one plain forward + backward of the same
    micro-batch on a plain `dtype` model, so that each step's figures and its plain one see the same load (the
    machine may be shared). Two micro-steps, because the runtime's later micro-steps of an optimizer step take other
    paths than its first (stages 0-1 accumulate in place, stages 2-3 reduce into a fresh shard and add it). World
    size 1 runs the runtime's own code paths (the gradient hooks and their buckets, stage 3's per-unit gathers into
    fresh buffers and their release, the parameter refresh after the step) without a transport: the estimate charges
    the collectives' CPU per byte apart (Hardware.*_cpu_s_per_byte). Returns {stage: EngineTimes}. Imports torch;
    leaves no process group behind and the environment as it found it."""
    import torch
    import torch.distributed as dist

    import ztune
    from ztune.runtime.models import build_model

    def cpu_of(fn) -> float:
        start = time.process_time()
        fn()
        return time.process_time() - start

    with _one_process_runtime_env():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            ids = torch.randint(0, spec.vocab_size, (micro_batch, seq_len),
                                generator=torch.Generator().manual_seed(seed))
            plain = build_model(spec, seed=0, dtype=_torch_dtype(dtype))

            def plain_step() -> None:
                plain.zero_grad(set_to_none=True)
                plain(ids, labels=ids).backward()

            plain_step()  # warm-up
            out: dict[int, EngineTimes] = {}
            for stage in stages:
                config = {"zero": {"stage": stage}, "precision": dtype, "seq_len": seq_len,
                          "batch": {"micro": micro_batch, "grad_accum": 2}, "gradient_clipping": 0.0,
                          "optimizer": {"type": "AdamW", "lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-8,
                                        "weight_decay": 0.0}}
                engine = ztune.initialize(build_model(spec, seed=0), config=config)[0]
                times = EngineTimes([], [], [], [])
                micro = functools.partial(_micro_step, engine, ids)
                for i in range(ENGINE_WARMUP + repeats):
                    if i == ENGINE_WARMUP:
                        before()
                    plain_s = cpu_of(plain_step)
                    first_s = cpu_of(micro)
                    engine.step()  # counts the micro-step: no update between boundaries
                    later_s = cpu_of(micro)
                    step_s = cpu_of(engine.step)
                    if i >= ENGINE_WARMUP:  # warm-up: allocations, the optimizer's states
                        for values, v in zip(times, (plain_s, first_s, later_s, step_s), strict=True):
                            values.append(v)
                out[stage] = times
                del engine, micro
                gc.collect()  # the engine's hooks and buffers form cycles: free them before the next stage's
            return out
        finally:
            dist.destroy_process_group()


def runtime_cpu_per_param(engine: dict, *, optimizer_cpu_s: float, numel: int) -> tuple[tuple, tuple, tuple]:
    """One rank's runtime CPU per parameter beyond what the cost model charges apart, from time_engine_stages'
    `engine` (world size 1, so the rank owns all `numel` elements at every stage), per stage: the medians over
    optimizer steps of (first micro-step's forward + backward CPU - the plain forward + backward timed just before
    it) / `numel` and of (a later micro-step's likewise) / `numel`, and (median engine.step CPU at the boundary -
    `optimizer_cpu_s`, the optimizer update's over `numel` elements) / `numel`; each floored at 0 (a difference the
    probe's noise hides is charged as nothing). Stages missing from `engine` give 0. Returns (first, later, step)."""
    first, later, step = [], [], []
    for stage in STAGES:
        t = engine.get(stage)
        if t is None:
            for values in (first, later, step):
                values.append(0.0)
            continue
        first.append(max(0.0, statistics.median(m - p for m, p in zip(t.first, t.plain, strict=True))) / numel)
        later.append(max(0.0, statistics.median(m - p for m, p in zip(t.later, t.plain, strict=True))) / numel)
        step.append(max(0.0, statistics.median(t.step) - optimizer_cpu_s) / numel)
    return tuple(first), tuple(later), tuple(step)


def measure_workload_rate(spec, *, ranks: int, seq_len: int, micro_batch: int, dtype: str, threads: int,
                          repeats: int = WORKLOAD_REPEATS, timeout_s: float = 600.0, codec: bool = True,
                          engine: bool = True) -> WorkloadRate:
    """Spawn `ranks` processes that train `spec` (a ModelSpec) at once on `threads` torch threads each and
    return the per-rank rate, with `engine` also the runtime's own CPU per stage, with `codec` also the codec rates
    (module docstring). Raises ProbeFailed when a rank fails or hangs."""
    import multiprocessing as mp

    from ztune.cost.compute import model_flops_per_token
    from ztune.probe_codec import slowest
    from ztune.specs import count_params

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    skipped = ""
    if engine:
        import psutil

        need = ranks * count_params(spec).total * ENGINE_BYTES_PER_PARAM
        available = psutil.virtual_memory().available
        if need > 0.8 * available:  # the ranks' engines would push the host into swap or the OOM killer
            engine = False
            skipped = (f"{ranks} ranks x {spec.name}'s engine need ~{need / 2**30:.1f} GiB, over 80% of the "
                       f"{available / 2**30:.1f} GiB available")
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(ranks)
    procs = [ctx.Process(target=_workload_worker, daemon=True,
                         args=(r, spec, seq_len, micro_batch, dtype, threads, repeats, barrier, queue, codec,
                               engine))
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
    medians, codec_rates, optimizer_rates, onebit_rates, stretches, runtime = [], [], [], [], [], []
    numel = 0
    try:
        for _ in range(ranks):
            status, payload = _wait_for_result(queue, procs, timeout_s=timeout_s)
            if status != "ok":
                raise ProbeFailed(f"training {spec.name} on {ranks} ranks failed: {payload}")
            numel = payload[3]
            medians.append(statistics.median(payload[1]))
            stretches.append(statistics.mean(payload[1]) / payload[6] if payload[6] > 0 else 1.0)
            optimizer_rates.append(payload[3] / statistics.median(payload[4]))
            onebit_rates.append(payload[3] / statistics.median(payload[5]))
            if payload[2]:
                codec_rates.append(payload[2])
            if payload[8]:
                runtime.append(runtime_cpu_per_param(payload[8], optimizer_cpu_s=payload[7], numel=payload[3]))
    finally:
        reap(procs)
    # mean over ranks, per stage: the runtime's CPU is each rank's own work, as the contention is
    micro, accum, step = (tuple(statistics.mean(r[k][s] for r in runtime) for s in STAGES) if runtime else ()
                          for k in range(3))
    step_s = max(medians)
    per_token = model_flops_per_token(active_params=count_params(spec).active_per_token, num_layers=spec.num_layers,
                                      attention_width=spec.num_heads * spec.head_size, seq_len=seq_len)
    flops = micro_batch * seq_len * per_token / step_s if step_s > 0 else math.inf
    return WorkloadRate(spec.name, ranks, seq_len, micro_batch, dtype, threads, step_s, flops, slowest(codec_rates),
                        optimizer_elements_per_s=min(optimizer_rates), onebit_elements_per_s=min(onebit_rates),
                        cpu_stretch=statistics.mean(stretches), runtime_micro_cpu_s_per_param=micro,
                        runtime_accum_cpu_s_per_param=accum, runtime_step_cpu_s_per_param=step,
                        runtime_skipped=skipped, params=numel)
