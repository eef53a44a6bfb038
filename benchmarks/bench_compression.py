"""Gradient compression on the demo model: loss after N steps and bytes on the wire, per method.

2 gloo ranks (one spawn; each rank trains every method in turn from the same seed and the same batches):
tiny-gpt (profiles/models/tiny-gpt.yaml, ~21M parameters), the synthetic corpus (runtime/data.py), ZeRO
stage 0 at fp32 (so the uncompressed run is the fp32 baseline and stage 0 runs both phases of the compressed
exchange), AdamW. Final loss = mean of the last 20 steps' losses on rank 0 (the rank's own micro-batch),
relative to the uncompressed run's; bytes = comm_report's bytes_sent_per_step relative to the uncompressed
run's, next to ztune.cost.comm's prediction for the same config.

Target (DESIGN.md): int8 <= 0.27x and 1-bit <= 0.04x the fp32 bytes, loss within 2% of uncompressed.

Usage: python benchmarks/bench_compression.py [--steps 200] [--micro 2] [--seq 64] [--methods none,int8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.spawn import run_ranks  # noqa: E402

METHODS = ("none", "bf16", "int8", "onebit", "topk")
TAIL_STEPS = 20
SEED = 0
LOSS_TARGET = 0.02
BYTES_TARGETS = {"int8": 0.27, "onebit": 0.04}


def _config(*, method: str, micro: int, seq: int, lr: float, topk_ratio: float) -> dict:
    return {"zero": {"stage": 0}, "precision": "fp32", "batch": {"micro": micro, "grad_accum": 1}, "seq_len": seq,
            "optimizer": {"type": "AdamW", "lr": lr, "weight_decay": 0.01},
            "compression": {"method": method, "topk_ratio": topk_ratio}}


def train_all(rank: int, world_size: int, opts: dict) -> list[dict]:
    import torch

    import ztune
    from ztune.profiles import load_model
    from ztune.runtime.data import batches, synthetic_corpus
    from ztune.runtime.models import build_model

    spec = load_model("tiny-gpt")
    corpus = synthetic_corpus(vocab_size=spec.vocab_size, num_tokens=opts["seq"] * opts["micro"] * world_size
                              * opts["steps"] * 2, seed=SEED)
    out = []
    for method in opts["methods"]:
        model = build_model(spec, seed=SEED)
        cfg = _config(method=method, micro=opts["micro"], seq=opts["seq"], lr=opts["lr"], topk_ratio=opts["topk_ratio"])
        engine, *_ = ztune.initialize(model, cfg)
        losses = []
        start = time.perf_counter()
        for ids, labels in batches(corpus, batch_size=opts["micro"], seq_len=opts["seq"], rank=rank,
                                   world_size=world_size, seed=SEED, steps=opts["steps"]):
            loss = engine(ids, labels=labels)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        wall_s = time.perf_counter() - start
        report = engine.comm_report()
        out.append({"method": method, "losses": losses, "wall_s": wall_s,
                    "bytes_per_step": report["bytes_sent_per_step"], "padded_params": report["padded_params"],
                    "num_params": report["num_params"], "num_buckets": len(engine.groups)})
        del engine, model
        torch.manual_seed(0)
    return out


def predicted_bytes(*, method: str, padded_params: int, num_buckets: int, topk_ratio: float) -> float:
    from ztune.config.schema import Compression
    from ztune.cost.comm import Link, comm_estimate

    est = comm_estimate(num_params=padded_params, world_size=2, stage=0, grad_accum=1, link=Link(1e9, 1e-6),
                        param_bytes=4, grad_bytes=4, reduce_bucket_numel=-(-padded_params // num_buckets),
                        allgather_bucket_numel=padded_params, num_units=1, compression=Compression(method),
                        topk_ratio=topk_ratio)
    return est.bytes_per_rank


def render(results: list[dict], opts: dict, *, wall_s: float, command: str) -> str:
    base = next(r for r in results if r["method"] == "none")
    base_loss = sum(base["losses"][-TAIL_STEPS:]) / TAIL_STEPS
    rows = []
    for r in results:
        loss = sum(r["losses"][-TAIL_STEPS:]) / TAIL_STEPS
        pred = predicted_bytes(method=r["method"], padded_params=r["padded_params"], num_buckets=r["num_buckets"],
                               topk_ratio=opts["topk_ratio"])
        bytes_ratio = r["bytes_per_step"] / base["bytes_per_step"]
        loss_ratio = loss / base_loss
        target = BYTES_TARGETS.get(r["method"])
        met = abs(loss_ratio - 1) <= LOSS_TARGET and (target is None or bytes_ratio <= target)
        verdict = "-" if r["method"] == "none" else ("pass" if met else "FAIL")
        rows.append(f"| {r['method']} | {r['losses'][0]:.3f} | {loss:.4f} | {loss_ratio:.4f} | "
                    f"{r['bytes_per_step'] / 2**20:.2f} | {bytes_ratio:.4f} | {r['bytes_per_step'] / pred:.4f} | "
                    f"{r['wall_s'] / len(r['losses']) * 1e3:.0f} | {verdict} |")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    import torch

    lines = [
        "## Gradient compression (tiny-gpt, 2 gloo ranks)", "",
        f"Command: `{command}`  ",
        f"Date: {dt.datetime.now().isoformat(timespec='seconds')}  ",
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}; whole run {wall_s:.0f} s.", "",
        f"Setup: tiny-gpt ({results[0]['num_params']:,} parameters, {results[0]['num_buckets']} reduce buckets), "
        f"ZeRO stage 0, fp32, AdamW lr {opts['lr']}, {opts['steps']} steps of micro-batch {opts['micro']} x seq "
        f"{opts['seq']} per rank (synthetic corpus, seed {SEED}); top-k ratio {opts['topk_ratio']}. Final loss = mean "
        f"of rank 0's last {TAIL_STEPS} step losses. Bytes = bytes each rank sends per step (comm_report, ring "
        "accounting; the compressed exchange is an all-to-all plus an all-gather of compressed shards); "
        "'vs model' = measured / ztune.cost.comm's prediction for the same config. Targets (DESIGN.md): loss within "
        f"{LOSS_TARGET:.0%} of uncompressed; bytes int8 <= 0.27x, onebit <= 0.04x.", "",
        "| method | first loss | final loss | loss vs none | MiB/step | bytes vs fp32 | vs model | ms/step | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *rows, "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--topk-ratio", type=float, default=0.01)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "compression.md")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    if "none" not in methods:
        methods.insert(0, "none")
    opts = {"steps": args.steps, "micro": args.micro, "seq": args.seq, "lr": args.lr, "topk_ratio": args.topk_ratio,
            "methods": methods}
    start = time.perf_counter()
    results = run_ranks(train_all, world_size=2, args=(opts,), timeout_s=1800)[0]
    text = render(results, opts, wall_s=time.perf_counter() - start,
                  command="python benchmarks/bench_compression.py " + " ".join(argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
