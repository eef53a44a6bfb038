"""One rank of a cluster-in-a-box run (benchmarks/bench_cluster.py, tests/e2e/test_cluster_box.py).

    torchrun --nnodes 2 --node-rank K --nproc-per-node 2 --master-addr ADDR benchmarks/cluster_worker.py \
        --model tiny-llama --precision bf16 --out result.json

Every rank builds each variant in turn (VARIANTS: the same seeded model and synthetic corpus for each),
trains `--warmup` steps, then times `--steps` steps. Around the timed steps (between barriers) local rank 0
of every host reads the kernel's byte counters of the host's network interfaces other than `lo`
(/sys/class/net/*/statistics/tx_bytes): in the box that is the host's veth, so the difference is what the
host sent to the other hosts, IP/TCP headers and the few bytes of the barriers included, measured
outside ztune's own accounting. Rank 0 writes the JSON result.

Adding a variant is one line in VARIANTS: a name, a peers.py family ("ztune", "ddp", "deepspeed"), a
ZeRO stage, and a config dict merged into that system's config, e.g. for features on other branches
    Variant("ztune hierarchical, stage 3", "ztune", 3, {"comm": {"hierarchical": True}}),
    Variant("ztune ZeRO++ (qwZ+hpZ+qgZ)", "ztune", 3, {"zero": {"zero_quantized_weights": True, ...}}),
A variant that fails to build or to step is reported as failed with its error, never dropped silently.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SEED = 1234


@dataclass(frozen=True)
class Variant:
    """One configuration to run: peers.py's `family` and `stage`, plus `config` merged into its config."""

    name: str
    family: str
    stage: int
    config: dict = field(default_factory=dict)
    warmup: int = 0  # untimed steps this variant takes before everyone's --warmup ones


# 1-bit Adam's full-precision warm-up (freeze_step) in the box: its untimed steps, so that every timed step is a
# compression-stage step. With freeze_step 1 the variance frozen after one step diverged (loss 9.2, 8.9, 47, 1,315,
# ..., NaN from the 8th step, 2026-12-08), and a NaN run times other code: the C++ kernels leave non-finite blocks
# to the torch ops (runtime/onebit_kernels.py), so its CPU per step grew from ~420 to ~650 ms over 20 steps.
ONEBIT_FREEZE_STEP = 10


FLAT = {"comm": {"hierarchical": False}}  # ztune's default (auto) is hierarchical across several hosts
HIER = {"comm": {"hierarchical": True}}
VARIANTS: tuple[Variant, ...] = (
    Variant("ztune flat, stage 0", "ztune", 0, FLAT),
    Variant("ztune flat, stage 1", "ztune", 1, FLAT),
    Variant("ztune flat, stage 2", "ztune", 2, FLAT),
    Variant("ztune flat, stage 3", "ztune", 3, FLAT),
    Variant("ztune hierarchical, stage 0", "ztune", 0, HIER),
    Variant("ztune hierarchical, stage 1", "ztune", 1, HIER),
    Variant("ztune hierarchical, stage 2", "ztune", 2, HIER),
    Variant("ztune hierarchical, stage 3", "ztune", 3, HIER),
    Variant("ztune ZeRO++ (qwZ+hpZ2+qgZ), stage 3", "ztune", 3,
            {"zero": {"quantized_weights": True, "hpz_partition_size": 2, "quantized_gradients": True}}),
    # 1-bit Adam after its warm-up, so every timed step exchanges the compressed momentum.
    Variant("ztune 1-bit Adam, stage 0", "ztune", 0, {"optimizer": {"type": "OneBitAdam",
                                                                    "freeze_step": ONEBIT_FREEZE_STEP}},
            warmup=ONEBIT_FREEZE_STEP),
    Variant("DDP", "ddp", 0),
    Variant("DeepSpeed ZeRO-1", "deepspeed", 1),
    Variant("DeepSpeed ZeRO-2", "deepspeed", 2),
    Variant("DeepSpeed ZeRO-3", "deepspeed", 3),
)
# A small Llama for tests: seconds per step on one core, still every kind of layer.
TEST_SHAPE = dict(name="box-test-llama", architecture="llama", vocab_size=128, hidden_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=64)


def model_spec(name: str):
    from ztune.specs import Architecture, ModelSpec

    if name == TEST_SHAPE["name"]:
        return ModelSpec(**{**TEST_SHAPE, "architecture": Architecture(TEST_SHAPE["architecture"])})
    from ztune.profiles import load_model

    return load_model(name)


def nic_tx_bytes() -> int:
    """Bytes sent so far on every interface of this network namespace but `lo`."""
    total = 0
    for dev in Path("/sys/class/net").iterdir():
        if dev.name != "lo":
            total += int((dev / "statistics" / "tx_bytes").read_text())
    return total


def cpu_ticks() -> tuple[int, int]:
    """(idle, total) clock ticks of the whole machine so far (/proc/stat's first line; idle + iowait count as idle).
    The box's hosts share one kernel, so this is every host's cores, and any other work on the machine."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def host_separation(dist, layout) -> dict:
    """Whether runtime/comm/shm.py finds shared memory across the whole job (it must not when the job spans
    hosts) and among the ranks of the first host (it must). Only the first host is asked:
    `SharedMemoryTransport.connect` broadcasts from global rank 0, so it serves groups holding rank 0."""
    from ztune.runtime.comm.shm import SharedMemoryTransport

    rank, world = dist.get_rank(), dist.get_world_size()
    whole = SharedMemoryTransport.connect(group=None, rank=rank, world_size=world) is not None
    first_host = None
    if layout.multi_node and layout.ranks_per_node > 1:
        group = dist.new_group(layout.intra_node_ranks(0))  # every rank takes part in creating it
        if layout.node_of(rank) == 0:
            first_host = SharedMemoryTransport.connect(group=group, rank=rank,
                                                       world_size=layout.ranks_per_node) is not None
    flags: list = [None] * world
    dist.all_gather_object(flags, first_host)
    return {"whole_job": whole, "first_host": flags[0]}


def step_ms(rec: dict) -> float | None:
    """A variant's step time in ms: `step_ms`, the timed steps' wall time over their number, mean over the ranks
    (they start together after a barrier and end within a step of each other): the job's throughput.

    Records from before 2026-12-08 lack it and give `median_ms`: the median over the timed steps of the slowest
    rank's time for that step. A step's boundary is not a synchronisation point, so one rank's step k and k+1
    trade waits (the stage-0 all-reduce's wait lands in either), and the per-step maximum over ranks overstates
    the throughput step: on the cluster in a box at 10 Gbit/s (12 steps, 2026-12-08) by 9% for flat stage 0,
    15% for hierarchical stage 0 and 16% for 1-bit Adam, and by 0-3% for stage 3, whose collectives run all
    through the step. None for a failed variant."""
    if rec.get("error"):
        return None
    return rec.get("step_ms") or rec.get("median_ms")


def run_variant(variant: Variant, *, args, spec, data, layout, dist) -> dict:
    import peers
    import torch

    from ztune.runtime.models import build_model

    rank = dist.get_rank()
    rec = {"name": variant.name, "family": variant.family, "stage": variant.stage, "config": variant.config,
           "error": None, "losses": [], "times_s": [], "tx_bytes": None}
    counters_here = layout.local_rank_of(rank) == 0
    try:
        system = peers.System(variant.name, variant.family, variant.stage)
        model = build_model(spec, dtype=torch.float32, seed=SEED)
        extra = peers.merge_config(variant.config or {}, args.ztune_config) if variant.family == "ztune" else \
            variant.config
        trainer = peers.build(system, model, bf16=args.precision == "bf16", micro_batch=args.micro_batch,
                              seq_len=args.seq_len, extra_config=extra or None)
        if variant.family == "ztune":  # did the engine move its buffers through shared memory?
            rec["engine_shared_memory"] = getattr(trainer.owner.comm, "shm", None) is not None
        first = args.warmup + variant.warmup  # the first timed step's index into `data`
        for step in range(first):
            rec["losses"].append(trainer.step(data[step]))
        dist.barrier()
        before = nic_tx_bytes() if counters_here else 0
        cpu_before = time.process_time()  # this rank's CPU seconds, all its threads (gloo's included)
        ticks_before = cpu_ticks()
        loop_start = time.perf_counter()
        for step in range(first, first + args.steps):
            start = time.perf_counter()
            rec["losses"].append(trainer.step(data[step]))
            rec["times_s"].append(time.perf_counter() - start)
        loop_s = time.perf_counter() - loop_start
        cpu_s = (time.process_time() - cpu_before) / args.steps
        idle, total = (after - before for after, before in zip(cpu_ticks(), ticks_before, strict=True))
        if rank == 0:  # the machine's idle share while rank 0 stepped (all its cores, all the box's hosts)
            rec["machine_idle_fraction"] = idle / total if total else None
        dist.barrier()
        sent = nic_tx_bytes() - before if counters_here else 0
        del trainer
    except Exception as exc:  # reported in the table; one broken variant must not hide the others
        rec["error"] = f"{exc.__class__.__name__}: {exc}"[:300]
        sent, cpu_s, loop_s = 0, None, None
    # Every rank gets here (a failing rank too), so the gathers below line up; a rank stuck inside a
    # collective is caught by the harness's timeout instead.
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"times": rec["times_s"], "losses": rec["losses"], "error": rec["error"],
                                      "sent": sent, "cpu_s": cpu_s, "loop_s": loop_s})
    errors = [g["error"] for g in gathered if g["error"]]
    rec["error"] = errors[0] if errors else None
    if rec["error"] is None:
        rec["times_s"] = [max(col) for col in zip(*(g["times"] for g in gathered), strict=True)]
        rec["median_ms"] = statistics.median(rec["times_s"]) * 1e3  # the slowest rank's step, median (see step_ms)
        rec["tx_bytes"] = sum(g["sent"] for g in gathered)
        rec["tx_bytes_per_step"] = rec["tx_bytes"] / args.steps
        rec["losses_by_rank"] = [g["losses"] for g in gathered]
        rec["cpu_s_per_step_by_rank"] = [g["cpu_s"] for g in gathered]  # user + system, mean over the timed steps
        rec["mean_step_s_by_rank"] = [g["loop_s"] / args.steps for g in gathered]
        rec["step_ms"] = statistics.mean(rec["mean_step_s_by_rank"]) * 1e3
        rec["times_s_by_rank"] = [g["times"] for g in gathered]
    return rec


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variant", action="append", default=None,
                        help="a VARIANTS name to run (repeat for several; default: all of them)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ztune-config", type=json.loads, default=None,
                        help="JSON merged into every ztune variant's config, e.g. "
                             "'{\"zero\": {\"reduce_bucket_numel\": 5000000}}'")
    args = parser.parse_args(argv)
    names = [v.name for v in VARIANTS]
    wanted = args.variant or [v.name for v in VARIANTS]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        print(f"unknown variant(s) {unknown}; known: {names}", file=sys.stderr)
        return 2

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    from ztune.runtime.comm.topology import layout_from_env
    from ztune.runtime.data import batches, synthetic_corpus

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=dt.timedelta(seconds=300))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        layout = layout_from_env(world_size=world)
        separation = host_separation(dist, layout)
        spec = model_spec(args.model)
        wanted_variants = [v for v in VARIANTS if v.name in wanted]
        total = args.warmup + max((v.warmup for v in wanted_variants), default=0) + args.steps
        corpus = synthetic_corpus(vocab_size=spec.vocab_size, num_tokens=(total + 1) * args.micro_batch * world *
                                  args.seq_len, seed=SEED)
        data = list(batches(corpus, batch_size=args.micro_batch, seq_len=args.seq_len, rank=rank, world_size=world,
                            seed=SEED, steps=total))
        records = []
        for variant in VARIANTS:
            if variant.name in wanted:
                records.append(run_variant(variant, args=args, spec=spec, data=data, layout=layout, dist=dist))
                if rank == 0:
                    r = records[-1]
                    print(f"[box] {r['name']}: {step_ms(r) or 0:.0f} ms/step, "
                          f"{(r.get('tx_bytes_per_step') or 0) / 2**20:.1f} MiB/step across hosts "
                          f"{r['error'] or ''}", flush=True)
        if rank == 0:
            result = {"world_size": world, "ranks_per_node": layout.ranks_per_node, "num_nodes": layout.num_nodes,
                      "model": spec.name, "precision": args.precision, "micro_batch": args.micro_batch,
                      "seq_len": args.seq_len, "warmup": args.warmup, "steps": args.steps,
                      "shared_memory": separation, "variants": records}
            args.out.write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # peers.py sits next to this script
    sys.exit(main(sys.argv[1:]))
