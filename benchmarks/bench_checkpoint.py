"""Checkpoint save / load time and bytes per rank: ztune against DeepSpeed's save_checkpoint and torch DCP.

    python benchmarks/bench_checkpoint.py [--model tiny-gpt] [--repeats 3]

Two gloo CPU ranks (spawned here), the same model profile and AdamW state after one training step:
- ztune ZeRO-2: engine.save_checkpoint / load_checkpoint (runtime/state/: per-rank safetensors + JSON);
- DeepSpeed ZeRO-2 (0.19, DS_ACCELERATOR=cpu): engine.save_checkpoint / load_checkpoint;
- torch DCP: FSDP2-sharded model and optimizer, torch.distributed.checkpoint.save / load of
  get_state_dict's (model, optimizer) state dicts, set_state_dict after loading.
Times are the slowest rank's, barrier to barrier, median of --repeats; bytes per rank are the files each rank
wrote (rank 0's shared files counted to rank 0). Then `ztune checkpoint consolidate` runs in a fresh process
on the ztune checkpoint: its peak RSS minus that of a process that only imports what it imports, against the
largest tensor (DESIGN/issue target: <= largest tensor + 256 MiB), and its time.
Writes docs/bench/checkpoint.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT_PATH = ROOT / "docs" / "bench" / "checkpoint.md"
WORLD_SIZE, MICRO, SEQ = 2, 2, 64
SYSTEMS = ("ztune", "deepspeed", "dcp")
RSS_TARGET_SLACK_BYTES = 256 << 20


def _files_bytes(folder: Path, rank: int, system: str) -> int:
    total = 0
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        n = p.name
        if system == "ztune":
            mine = n.startswith(f"rank{rank:05d}.") or (rank == 0 and not n.startswith("rank"))
        elif system == "deepspeed":
            mine = f"zero_pp_rank_{rank}_" in n or (rank == 0 and "zero_pp_rank_" not in n)
        else:
            mine = n.startswith(f"__{rank}_") or (rank == 0 and not n.startswith("__"))
        total += p.stat().st_size if mine else 0
    return total


def _build(system: str, model):
    """(save(dir), load(dir), step(batch)) for one system."""
    if system == "ztune":
        import ztune

        cfg = {"zero": {"stage": 2}, "precision": "fp32", "batch": {"micro": MICRO}, "optimizer": {"lr": 1e-4}}
        engine, _, _, _ = ztune.initialize(model, cfg)

        def step(ids):
            engine.backward(engine(ids, labels=ids))
            engine.step()

        return (lambda d: engine.save_checkpoint(d, tag="t")), (lambda d: engine.load_checkpoint(d, tag="t")), step
    if system == "deepspeed":
        import peers

        trainer = peers.build_deepspeed(model, system=peers.System("ds", "deepspeed", 2), bf16=False,
                                        micro_batch=MICRO)
        engine = trainer.owner
        return ((lambda d: engine.save_checkpoint(d, tag="t")), (lambda d: engine.load_checkpoint(d, tag="t")),
                lambda ids: trainer.step((ids, ids)))
    import peers
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    trainer = peers.build_fsdp2(model, system=peers.System("fsdp2", "fsdp2", 3), bf16=False)
    fsdp_model, optimizer = trainer.owner

    def save(d):
        msd, osd = get_state_dict(fsdp_model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=d)

    def load(d):
        msd, osd = get_state_dict(fsdp_model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=d)
        set_state_dict(fsdp_model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    return save, load, lambda ids: trainer.step((ids, ids))


def _timed(fn, *args) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn(*args)
    dist.barrier()
    t = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _rank_main(rank: int, args, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD_SIZE), OMP_NUM_THREADS="1",
                      DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from ztune.profiles import load_model
    from ztune.runtime.models import build_model

    spec = load_model(args.model)
    ids = torch.randint(0, spec.vocab_size, (MICRO, SEQ), generator=torch.Generator().manual_seed(rank))
    out = {}
    for system in SYSTEMS:
        save, load, step = _build(system, build_model(spec, seed=0))
        step(ids)
        saves, loads = [], []
        for i in range(args.repeats):
            folder = Path(root) / f"{system}{i}"
            saves.append(_timed(save, str(folder)))
            loads.append(_timed(load, str(folder)))
        sizes = [None] * WORLD_SIZE
        dist.all_gather_object(sizes, _files_bytes(Path(root) / f"{system}0", rank, system))
        out[system] = {"save_s": statistics.median(saves), "load_s": statistics.median(loads), "bytes": sizes}
        del save, load, step
    if rank == 0:
        (Path(root) / "result.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def _peak_rss_bytes(argv: list[str]) -> tuple[int, float]:
    """Peak RSS of the process running `argv` (a wrapper whose only child it is) and its wall time."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t, rc)")
    text = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True).stdout
    kib, wall_s, rc = text.split()[-3:]
    if int(rc) != 0:
        raise RuntimeError(f"{argv} exited {rc}")
    return int(kib) * 1024, float(wall_s)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _render(model: str, res: dict, rss: dict) -> str:
    mib = 2**20
    lines = [
        "## Checkpoints: save / load vs DeepSpeed and torch DCP",
        "",
        f"`python benchmarks/bench_checkpoint.py --model {model}`, {dt.date.today().isoformat()}: 2 gloo CPU "
        f"ranks, AdamW state after one step; slowest rank, median of {res['repeats']} (load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: a shared machine, times are indicative).",
        "",
        "| system | save s | load s | MiB rank 0 | MiB rank 1 |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"ztune": "ztune ZeRO-2 (safetensors per rank)", "deepspeed": "DeepSpeed ZeRO-2 save_checkpoint",
             "dcp": "torch DCP (FSDP2 state dicts)"}
    for system in SYSTEMS:
        r = res[system]
        lines.append(f"| {names[system]} | {r['save_s']:.2f} | {r['load_s']:.2f} | {r['bytes'][0] / mib:.1f} | "
                     f"{r['bytes'][1] / mib:.1f} |")
    over = rss["peak_bytes"] - rss["baseline_bytes"]
    lines += [
        "",
        f"`ztune checkpoint consolidate` (fp32, one model.safetensors of {rss['out_bytes'] / mib:.1f} MiB): "
        f"{rss['wall_s']:.1f} s, peak RSS {rss['peak_bytes'] / mib:.0f} MiB, of which "
        f"{over / mib:.0f} MiB above a process that only imports the same modules "
        f"({rss['baseline_bytes'] / mib:.0f} MiB); the largest tensor is {rss['largest_bytes'] / mib:.1f} MiB "
        f"(target: above-baseline <= largest + 256 MiB: "
        f"{'met' if over <= rss['largest_bytes'] + RSS_TARGET_SLACK_BYTES else 'NOT met'}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-gpt")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        mp.start_processes(_rank_main, args=(args, _free_port(), root), nprocs=WORLD_SIZE, start_method="spawn")
        res = json.loads((Path(root) / "result.json").read_text())
        res["repeats"] = args.repeats
        from ztune.runtime.state.reader import TagReader

        with TagReader(Path(root) / "ztune0" / "t") as reader:
            largest = max(torch.Size(s).numel() for s in reader.param_shapes().values()) * 4
        out = Path(root) / "hf"
        peak, wall_s = _peak_rss_bytes([sys.executable, "-m", "ztune", "checkpoint", "consolidate",
                                        str(Path(root) / "ztune0"), "--out", str(out)])
        base, _ = _peak_rss_bytes([sys.executable, "-c", "import torch, safetensors, ztune.cli, "
                                   "ztune.runtime.state.offline"])
        rss = {"peak_bytes": peak, "baseline_bytes": base, "wall_s": wall_s, "largest_bytes": largest,
               "out_bytes": (out / "model.safetensors").stat().st_size}
    text = _render(args.model, res, rss)
    OUT_PATH.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
