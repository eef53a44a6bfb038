"""Where a step's time goes in the cluster in a box: forward, backward, the wait for the gradient reductions at
the end of backward, the optimizer step (gradient-norm pass and step_shards), and the rest of engine.step (the
parameter refresh of stages 1-2) per ztune variant, to set beside `ztune estimate`'s parts (docs/bench/cost_cluster.md).

    python benchmarks/cost_cluster_parts.py --rate 10000 --variant "ztune flat, stage 0" --variant ...   (root)
    torchrun ... benchmarks/cost_cluster_parts.py --worker --variant ...    (one rank; what the box runs)

Every rank times each part of `--steps` steps with time.perf_counter after `--warmup` steps, by wrapping the
engine's own calls (GradReducer.finish, optim_shard.step_shards, torch.linalg.vector_norm as engine.step calls
it); it prints each rank's medians in ms, with the process's CPU seconds per step (all threads: `cpu`) and its
main thread's (`main_cpu`: the computing thread) and the hierarchical collectives' worker threads' (`lanes_cpu`:
runtime/comm/hierarchical.py, their shared-memory copies and sums and the gloo calls they make); the rest is gloo's
own threads. With
`--profile N`, rank 0 also runs torch.profiler over its timed steps and prints the N operators with the most self CPU
time; with `--pyprofile N`, cProfile instead (Python functions too: the runtime's hooks and bookkeeping), the N with
the most own time (`--pyprofile-clock cpu`: own main-thread CPU time). `--precision fp32` where bf16 matmul is
slow (run_all.check_bf16_speed). Throwaway instrumentation: nothing here changes what the runtime does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _timed(totals: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
    return wrapper


def _lanes_cpu_s() -> float:
    """CPU seconds so far of the hierarchical collectives' worker threads (runtime/comm/hierarchical.py _Worker),
    by their pthread CPU clocks; 0 where there are none."""
    import threading

    total = 0.0
    for t in threading.enumerate():
        if t.name == "ztune-hierarchical" and t.ident is not None:
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except OSError:  # the thread ended meanwhile
                pass
    return total


def worker(args) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import peers
    import torch
    import torch.distributed as dist

    import ztune.runtime.optim_shard as optim_shard
    from benchmarks.cluster_worker import SEED, VARIANTS, model_spec
    from ztune.runtime.data import batches, synthetic_corpus
    from ztune.runtime.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=dt.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = model_spec(args.model)
    total = args.warmup + args.steps
    corpus = synthetic_corpus(vocab_size=spec.vocab_size, num_tokens=(total + 1) * world * args.seq_len, seed=SEED)
    data = list(batches(corpus, batch_size=1, seq_len=args.seq_len, rank=rank, world_size=world, seed=SEED,
                        steps=total))
    parts: dict = {}
    optim_shard.step_shards = _timed(parts, "optimizer", optim_shard.step_shards)
    torch.linalg.vector_norm = _timed(parts, "grad_norm", torch.linalg.vector_norm)
    for v in (v for v in VARIANTS if v.name in args.variant):
        model = build_model(spec, dtype=torch.float32, seed=SEED)
        trainer = peers.build(peers.System(v.name, v.family, v.stage), model, bf16=args.precision == "bf16",
                              micro_batch=1,
                              seq_len=args.seq_len,
                              extra_config=peers.merge_config(v.config or {}, args.ztune_config) or None)
        engine = trainer.owner
        engine._reducer.finish = _timed(parts, "reduce_wait", engine._reducer.finish)
        rows = []
        prof = None
        for i in range(total):
            if i == args.warmup and args.profile and rank == 0:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                prof.__enter__()
            if i == args.warmup and args.pyprofile and rank == 0:
                import cProfile

                prof = cProfile.Profile(time.thread_time) if args.pyprofile_clock == "cpu" else cProfile.Profile()
                prof.enable()
            parts.clear()
            dist.barrier()
            m0, c0, t0, h0 = time.thread_time(), time.process_time(), time.perf_counter(), _lanes_cpu_s()
            loss = engine(*data[i])
            t1 = time.perf_counter()
            engine.backward(loss)
            t2 = time.perf_counter()
            engine.step()
            t3, c3, m3, h3 = time.perf_counter(), time.process_time(), time.thread_time(), _lanes_cpu_s()
            rows.append({"forward": t1 - t0, "backward": t2 - t1, "step": t3 - t2, "total": t3 - t0,
                         "cpu": c3 - c0, "main_cpu": m3 - m0, "lanes_cpu": h3 - h0, **parts})
        if prof is not None and args.pyprofile:
            import io
            import pstats

            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.pyprofile)
            print("\n".join(f"[parts] {line}" for line in text.getvalue().splitlines() if line.strip()), flush=True)
        elif prof is not None:
            prof.__exit__(None, None, None)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile)
            print("\n".join(f"[parts] {line}" for line in table.splitlines()), flush=True)
        keys = ("total", "cpu", "main_cpu", "lanes_cpu", "forward", "backward", "reduce_wait", "step", "grad_norm",
                "optimizer")
        med = {k: statistics.median(r.get(k, 0.0) for r in rows[args.warmup:]) * 1e3 for k in keys}
        gathered: list = [None] * world
        dist.all_gather_object(gathered, med)
        if rank == 0:
            print(f"[parts] {v.name}", flush=True)
            for r, m in enumerate(gathered):
                print(f"[parts]   rank {r}: " + " ".join(f"{k} {m[k]:.0f}" for k in keys), flush=True)
        del trainer, engine, model
    dist.destroy_process_group()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="a cluster_worker variant name")
    parser.add_argument("--rate", type=int, default=10000, help="link rate, Mbit/s (box mode)")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ztune-config", type=json.loads, default=None,
                        help="JSON merged into each variant's ztune config (e.g. a bucket size to try)")
    parser.add_argument("--profile", type=int, default=0,
                        help="rank 0: print the N operators with the most self CPU time over the timed steps")
    parser.add_argument("--pyprofile", type=int, default=0,
                        help="rank 0: cProfile over the timed steps, the N functions with the most own time")
    parser.add_argument("--pyprofile-clock", choices=("wall", "cpu"), default="wall",
                        help="--pyprofile's clock: wall seconds, or the main thread's CPU seconds (time.thread_time: "
                             "what the computing thread itself spends, not gloo's threads nor time preempted)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--worker", action="store_true", help="run as one torchrun rank")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    from benchmarks.cluster_box import ClusterBox

    script = [str(Path(__file__).resolve()), "--worker", "--model", args.model, "--seq-len", str(args.seq_len),
              "--warmup", str(args.warmup), "--steps", str(args.steps), "--profile", str(args.profile),
              "--pyprofile", str(args.pyprofile), "--pyprofile-clock", args.pyprofile_clock,
              "--precision", args.precision]
    if args.ztune_config:
        script += ["--ztune-config", json.dumps(args.ztune_config)]
    for name in args.variant:
        script += ["--variant", name]
    load0 = os.getloadavg()[0]
    with ClusterBox(num_hosts=2, rate_mbit=args.rate) as box:
        results = box.torchrun(script, nproc_per_node=2, env={"OMP_NUM_THREADS": "1"}, timeout_s=1800,
                               master_port=29533)
    for r in results:
        lines = [line for line in r.output.splitlines() if line.startswith("[parts]")]
        print("\n".join(lines) if not r.returncode else r.output[-8000:])
    print(f"link {args.rate} Mbit/s; load {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    return 1 if any(r.returncode for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
