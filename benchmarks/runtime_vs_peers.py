"""ztune's sharded runtime against its peers, side by side in one run, on 2 gloo ranks.

    python benchmarks/runtime_vs_peers.py [--quick]

For each model (the tiny-gpt and tiny-llama profiles: 21M and 31M parameters) and precision (fp32, bf16)
one launcher spawns 2 ranks; each rank builds every system (peers.PEERS and, when the runtime exposes
`initialize`, ztune stages 0-3) from the same seeded model (runtime/models.py) and synthetic corpus
(runtime/data.py), warms each up, then times them in rounds with the order rotated every round so that
slow drift of this shared machine spreads over all systems. Step time is the median over all timed steps
of the slower rank's time. Writes docs/bench/runtime_vs_peers.md; `make bench` assembles
docs/benchmarks.md. 436 s on the 2-core dev machine when quiet (load average ~1.5); `--quick` (1 timed step)
only checks that everything runs.

ztune runs with its default shared-memory transport for single-host CPU ranks (runtime/comm/shm.py); stages 0
and 1 also run with gloo only (ZTUNE_SHM=0) to show what the transport contributes.

Matching: ztune stage 0 vs DDP; 1 vs DDP + ZeroRedundancyOptimizer and DeepSpeed ZeRO-1; 2 vs DeepSpeed
ZeRO-2; 3 vs FSDP2 (both reshard settings) and DeepSpeed ZeRO-3. Target: ztune/peer <= 0.9.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

from ztune.specs import ModelSpec, count_params

# peers.py and run_all.py sit next to this script, which runs as a file, not as a package module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT_PATH = ROOT / "docs" / "bench" / "runtime_vs_peers.md"
WORLD_SIZE = 2
TARGET_RATIO = 0.9
SEQ_LEN = 128
# Micro-batch per rank for each model: keeps one fp32 step near 0.2-1 s on one core.
MICRO_BATCH = {"tiny-gpt": 2, "tiny-llama": 2}
SEED = 1234


# ---- the workload: model and data, identical on every rank and for every system ----

def model_spec(name: str) -> ModelSpec:
    from ztune.profiles import load_model

    return load_model(name)


def build_model(spec: ModelSpec) -> nn.Module:
    """The same fp32 weights on every rank and for every system; forward(input_ids, labels) -> fp32 loss."""
    from ztune.runtime.models import build_model as build

    return build(spec, dtype=torch.float32, seed=SEED)


def make_batches(*, spec: ModelSpec, rank: int, num_steps: int, micro_batch: int,
                 seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's (input_ids, labels) for each step, int64 [micro_batch, seq_len]: windows of the runtime's
    seeded synthetic corpus (learnable phrases, so the loss falls), the same sequence for every system."""
    from ztune.runtime.data import batches, synthetic_corpus

    num_tokens = (num_steps + 1) * micro_batch * WORLD_SIZE * seq_len
    corpus = synthetic_corpus(vocab_size=spec.vocab_size, num_tokens=num_tokens, seed=SEED)
    return list(batches(corpus, batch_size=micro_batch, seq_len=seq_len, rank=rank, world_size=WORLD_SIZE,
                        seed=SEED, steps=num_steps))


# ---- per-rank measurement ----

def live_storage_bytes() -> dict[int, int]:
    """{storage address: bytes} of every live CPU tensor storage Python can reach (via gc); tensor
    subclasses that wrap another tensor (DTensor) are skipped, their local tensor is counted."""
    import gc
    import warnings

    found: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some lazily imported objects warns
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
            # Storages freed in place (FSDP2 resizes its unsharded buffers to 0) have no data.
            if storage.nbytes():
                found[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            continue  # wrapper subclasses (DTensor) have no storage of their own
    return found


class _StepProbe:
    """Counts tensor bytes at the first optimizer step it sees once armed: then parameters, gradients and
    the optimizer states of earlier steps are all alive, and activations are already freed."""

    def __init__(self) -> None:
        self.armed = False
        self.snapshot: dict[int, int] | None = None
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._handle = register_optimizer_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        if self.armed:
            # A gradient autograd wrote has no Python object until someone reads `.grad`, and gc only sees
            # Python objects: hold them while counting (DDP's are views of its buckets, counted once).
            grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
            self.snapshot = live_storage_bytes()
            self.armed = False
            del grads

    def close(self) -> None:
        self._handle.remove()

@dataclass(frozen=True)
class Schedule:
    warmup_steps: int
    rounds: int
    steps_per_visit: int

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.rounds * self.steps_per_visit


@dataclass(frozen=True)
class Job:
    model: str
    precision: str  # "fp32" | "bf16"
    micro_batch: int
    seq_len: int
    schedule: Schedule
    with_ztune: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, job: Job, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=dt.timedelta(seconds=300))
    try:
        results = run_rank(job=job, rank=rank, world_size=WORLD_SIZE)
        if rank == 0:
            Path(out_file).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _max_over_ranks(times_s: list[float]) -> list[float]:
    """Per step, the slower rank's time (the step is only done when both are)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, times_s)
    return [max(col) for col in zip(*gathered, strict=True)]


def _call_report(report) -> dict | str:
    if report is None:
        return ""
    try:
        value = report()
    except Exception as exc:  # a runtime bug must not cost the whole table; it is shown instead
        return f"memory_report() raised {exc.__class__.__name__}: {exc}"
    return value if isinstance(value, dict) else str(value)[:400]


def run_rank(*, job: Job, rank: int, world_size: int) -> dict:
    """Build, warm up and time every system on this rank; rank 0's return value is the job's result."""
    import gc
    import resource

    import torch.distributed as dist

    spec = model_spec(job.model)
    bf16 = job.precision == "bf16"
    sched = job.schedule
    systems = (peers.ZTUNE + peers.ZTUNE_GLOO if job.with_ztune else ()) + peers.PEERS
    data = make_batches(spec=spec, rank=rank, num_steps=sched.total_steps, micro_batch=job.micro_batch,
                        seq_len=job.seq_len)
    probe = _StepProbe()
    records: dict[str, dict] = {}
    trainers: dict[str, peers.Trainer] = {}
    for system in systems:
        rec = records[system.name] = {"name": system.name, "family": system.family, "stage": system.stage,
                                      "error": None, "times_s": [], "cpu_s": [], "losses": [], "tensor_bytes": None,
                                      "measured_at_step": False, "memory_report": ""}
        try:
            gc.collect()
            before = live_storage_bytes()
            trainer = peers.build(system, build_model(spec), bf16=bf16, micro_batch=job.micro_batch,
                                  seq_len=job.seq_len)
            for step in range(sched.warmup_steps):
                # Arm on the second step: AdamW creates its states lazily in the first.
                probe.armed = step == min(1, sched.warmup_steps - 1)
                rec["losses"].append(trainer.step(data[step]))
            after, probe.snapshot = probe.snapshot, None
            rec["measured_at_step"] = after is not None
            after = after if after is not None else live_storage_bytes()
            foreign = trainer.foreign_storages()
            rec["tensor_bytes"] = sum(n for ptr, n in after.items() if ptr not in before and ptr not in foreign)
            rec["memory_report"] = _call_report(trainer.memory_report)
            trainers[system.name] = trainer
        except Exception as exc:  # recorded in the table: one broken system must not hide the others
            rec["error"] = f"{exc.__class__.__name__}: {exc}"
        dist.barrier()
    probe.close()

    active = [name for name in records if name in trainers]
    for rnd in range(sched.rounds):
        shift = rnd % max(1, len(active))
        for name in active[shift:] + active[:shift]:
            rec, trainer = records[name], trainers[name]
            if rec["error"]:
                continue
            dist.barrier()
            try:
                for k in range(sched.steps_per_visit):
                    batch = data[sched.warmup_steps + rnd * sched.steps_per_visit + k]
                    start, start_cpu = time.perf_counter(), time.process_time()
                    rec["losses"].append(trainer.step(batch))
                    rec["times_s"].append(time.perf_counter() - start)
                    rec["cpu_s"].append(time.process_time() - start_cpu)
            except Exception as exc:
                rec["error"] = f"{exc.__class__.__name__}: {exc}"

    rows = []
    for rec in records.values():
        ok = rec["error"] is None and len(rec["times_s"]) == sched.rounds * sched.steps_per_visit
        times = _max_over_ranks(rec["times_s"] if ok else [])
        cpu = _max_over_ranks(rec["cpu_s"] if ok else [])
        rows.append({**rec, "times_s": times, "median_ms": statistics.median(times) * 1e3 if times else None,
                     "cpu_s": cpu, "cpu_ms": statistics.median(cpu) * 1e3 if cpu else None,
                     "final_loss": rec["losses"][-1] if rec["losses"] else None})
    return {"model_name": spec.name, "num_params": count_params(spec).total, "systems": rows,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

def run_job(job: Job) -> dict:
    """Spawn the 2 ranks for one model x precision and return rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.json")
        start = time.perf_counter()
        mp.start_processes(_rank_main, args=(job, _free_port(), out_file), nprocs=WORLD_SIZE,
                           start_method="spawn")
        results = json.loads(Path(out_file).read_text())
    results["wall_s"] = time.perf_counter() - start
    return results


def _fmt_mib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:,.1f}"


def _ratio(ztune_ms: float | None, peer_ms: float | None) -> float | None:
    if ztune_ms is None or peer_ms is None:
        return None
    return ztune_ms / peer_ms


def render_table(job: Job, results: dict) -> list[str]:
    rows = results["systems"]
    by_name = {r["name"]: r for r in rows}
    ztune_ms = {r["stage"]: r["median_ms"] for r in rows if r["family"] == "ztune" and r["median_ms"]}
    sched = job.schedule
    lines = [
        f"### {results['model_name']} ({results['num_params'] / 1e6:.1f}M parameters), {job.precision}",
        "",
        f"micro batch {job.micro_batch} x seq {job.seq_len} per rank, {WORLD_SIZE} ranks; "
        f"{sched.warmup_steps} warm-up steps, then {sched.rounds} rounds x {sched.steps_per_visit} timed steps; "
        f"{results['wall_s']:.0f} s for this table; rank 0 peak RSS {results['peak_rss_bytes'] / 2**30:.2f} GiB.",
        "",
        "| system | stage | median step ms | ztune / peer | CPU ms per step | tensor MiB per rank | "
        f"loss after {sched.total_steps} steps |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = [s.name for s in peers.ZTUNE + peers.ZTUNE_GLOO + peers.PEERS]
    for name in names:
        r = by_name.get(name)
        if r is None:
            lines.append(f"| {name} | {name[-1]} | not available | | | | |")
            continue
        if r.get("error") or r["median_ms"] is None:
            lines.append(f"| {name} | {r['stage']} | failed: {(r['error'] or 'no timed steps')[:80]} | | | | |")
            continue
        ratio = _ratio(ztune_ms.get(r["stage"]), r["median_ms"]) if not r["family"].startswith("ztune") else None
        ratio_txt = "-" if ratio is None else f"{ratio:.2f}" + (" ✓" if ratio <= TARGET_RATIO else "")
        mem_txt = _fmt_mib(r["tensor_bytes"]) + ("" if r["measured_at_step"] else " (between steps)")
        lines.append(f"| {name} | {r['stage']} | {r['median_ms']:.0f} | {ratio_txt} | {r['cpu_ms']:.0f} | {mem_txt} | "
                     f"{r['final_loss']:.4f} |")
    for r in rows:
        report = r.get("memory_report")
        if isinstance(report, dict) and "total" in report:
            parts = ", ".join(f"{k} {v / 2**20:,.1f}" for k, v in report.items() if k != "total")
            lines.append(f"- {r['name']}: `engine.memory_report()` after warm-up: {report['total'] / 2**20:,.1f} "
                         f"MiB ({parts} MiB).")
        elif report:
            lines.append(f"- {r['name']}: {report}")
    return lines + [""]


def render(jobs_results: list[tuple[Job, dict]], *, command: str, elapsed_s: float) -> str:
    from run_all import machine_line

    lines = [
        "## ztune runtime vs DDP, ZeroRedundancyOptimizer, FSDP2 and DeepSpeed",
        "",
        f"Command: `{command}` (also run by `make bench`). Date: {dt.date.today().isoformat()}. "
        f"Machine: {machine_line()}. torch {torch.__version__}; DeepSpeed {_deepspeed_version()}. "
        f"Whole run: {elapsed_s:.0f} s.",
        "",
        "Every system trains the same seeded model on the same synthetic tokens with AdamW (fused torch kernel "
        "for all peers), no clipping, gloo on 2 ranks with one thread each (`OMP_NUM_THREADS=1`). Step time "
        "= forward + backward + optimizer step of one micro-batch, the slower rank's, median over the timed "
        "steps; systems take turns in rotated order each round. `ztune / peer` is ztune's step time at the "
        f"matching ZeRO stage over the peer's; the target is <= {TARGET_RATIO} (✓). `CPU ms per step`: the "
        "process CPU time of the busier rank (all its threads), median; it shows the work a system does, "
        "apart from waiting, which helps read wall times on a loaded machine. `tensor MiB per rank`: "
        "bytes of the CPU tensor storages that building and warming up the system left alive, counted at "
        "the first optimizer step of the second warm-up step (parameters, gradients, optimizer states and "
        "any persistent buffers such as communication buckets; tensors only C++ holds are not seen). "
        "fp32 losses agree across peers to ~1e-5 (tests/unit/test_bench_peers_smoke.py); bf16 losses differ "
        "by each system's rounding.",
        "",
        "bf16 modes: DDP and ZeroRedundancyOptimizer run forward under `torch.autocast('cpu', bfloat16)` "
        "with fp32 parameters, gradients and all-reduce; FSDP2 uses `MixedPrecisionPolicy(param_dtype=bf16)` "
        "(bf16 all-gather, compute and gradient reduce-scatter, fp32 shards and AdamW); DeepSpeed "
        "`bf16.enabled` (bf16 parameters, gradients and communication, fp32 master weights in ZeRO's "
        "optimizer); ztune `precision: bf16` (bf16 parameters and gradients, fp32 master weights).",
        "",
    ]
    for job, results in jobs_results:
        lines += render_table(job, results)
    lines += render_summary(jobs_results)
    return "\n".join(lines).rstrip() + "\n"


def render_summary(jobs_results: list[tuple[Job, dict]]) -> list[str]:
    head = "| peer | stage | " + " | ".join(f"{j.model} {j.precision}" for j, _ in jobs_results) + " |"
    rule = "|---|---:|" + "---:|" * len(jobs_results)
    lines = []
    for key, title in (("median_ms", "step-time"), ("cpu_ms", "CPU-time")):
        target = f" (target <= {TARGET_RATIO})" if key == "median_ms" else " (work done, waiting excluded)"
        lines += [f"### ztune / peer {title} ratio{target}", "", head, rule]
        for peer in peers.PEERS:
            cells = []
            for _job, results in jobs_results:
                rows = {r["name"]: r for r in results["systems"]}
                z = rows.get(f"ztune stage {peer.stage}", {}).get(key)
                ratio = _ratio(z, rows.get(peer.name, {}).get(key))
                mark = " ✓" if ratio is not None and key == "median_ms" and ratio <= TARGET_RATIO else ""
                cells.append("n/a" if ratio is None else f"{ratio:.2f}{mark}")
            lines.append(f"| {peer.name} | {peer.stage} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### ztune with gloo only (`ZTUNE_SHM=0`) / peer step-time ratio", "",
              "Without the shared-memory transport (runtime/comm/shm.py) ztune's collectives all go through gloo, as "
              "the peers' do; this isolates what the transport contributes.", "", head, rule]
    for system in peers.ZTUNE_GLOO:
        peer = next(p for p in peers.PEERS if p.stage == system.stage and p.family in ("ddp", "zero_redundancy"))
        cells = []
        for _job, results in jobs_results:
            rows = {r["name"]: r for r in results["systems"]}
            ratio = _ratio(rows.get(system.name, {}).get("median_ms"), rows.get(peer.name, {}).get("median_ms"))
            cells.append("n/a" if ratio is None else f"{ratio:.2f}" + (" ✓" if ratio <= TARGET_RATIO else ""))
        lines.append(f"| {peer.name} | {peer.stage} | " + " | ".join(cells) + " |")
    return lines + [""]


def _deepspeed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return "not installed"


def build_jobs(*, quick: bool) -> list[Job]:
    sched = Schedule(warmup_steps=1, rounds=1, steps_per_visit=1) if quick else \
        Schedule(warmup_steps=2, rounds=6, steps_per_visit=2)
    with_ztune = peers.ztune_available()
    jobs = []
    for model, micro in MICRO_BATCH.items():
        for precision in ("fp32", "bf16"):
            jobs.append(Job(model=model, precision=precision, micro_batch=micro, seq_len=SEQ_LEN,
                            schedule=sched, with_ztune=with_ztune))
    return jobs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 1 timed step (smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"markdown section to write (default: {OUT_PATH.relative_to(ROOT)}; with --quick "
                             "only when given)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    done = []
    for job in build_jobs(quick=args.quick):
        print(f"== {job.model} {job.precision}: {json.dumps(asdict(job))}", flush=True)
        results = run_job(job)
        for r in results["systems"]:
            print(f"   {r['name']:<36} {r.get('median_ms') or 0:8.1f} ms  loss {r.get('final_loss')}"
                  f"  {r.get('error') or ''}", flush=True)
        done.append((job, results))
    command = "python benchmarks/runtime_vs_peers.py" + (" --quick" if args.quick else "")
    text = render(done, command=command, elapsed_s=time.perf_counter() - start)
    out = args.out or (None if args.quick else OUT_PATH)
    if out is None:
        print(text)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
