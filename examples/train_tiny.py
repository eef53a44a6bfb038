"""Train the `tiny-gpt` demo model with ztune's sharded runtime on a generated corpus.

    torchrun --standalone --nproc-per-node 2 examples/train_tiny.py --steps 30
    ztune launch examples/train_tiny.py -- --steps 30          # same, through the launcher
    ... train_tiny.py --steps 30 --save-dir ckpt --save-every 10  # checkpoints; a rerun resumes from `latest`

The corpus is synthetic (runtime/data.py: seeded phrases with Zipf-like frequencies), so the run needs no
download; a falling loss shows the model learns its structure. The training config comes from --config, else
from the file named by $ZTUNE_CONFIG (what `ztune launch` / `ztune autotune` set), else a ZeRO-2 default.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch

import ztune
from ztune.config import CONFIG_ENV
from ztune.envvars import omp_num_threads
from ztune.profiles import load_model
from ztune.runtime.data import batches, synthetic_corpus
from ztune.runtime.models import build_model

DEFAULT_CONFIG = {
    "zero": {"stage": 2},
    "precision": "fp32",
    "batch": {"micro": 4, "grad_accum": 1},
    "seq_len": 128,
    "optimizer": {"type": "AdamW", "lr": 1e-3, "weight_decay": 0.01},
    "gradient_clipping": 1.0,
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-gpt", help="model profile name (default: tiny-gpt)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default: 30)")
    p.add_argument("--config", default=None, help="ztune YAML or DeepSpeed JSON (default: $ZTUNE_CONFIG or ZeRO-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dir", default=None, help="checkpoint folder: resume from its `latest`, save into it")
    p.add_argument("--save-every", type=int, default=0, help="save a checkpoint every N steps (0: only at the end)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(omp_num_threads())  # OMP_NUM_THREADS if a positive integer, else 1
    config = args.config or (None if os.environ.get(CONFIG_ENV) else DEFAULT_CONFIG)
    spec = load_model(args.model)
    model = build_model(spec, seed=args.seed)
    engine, _, _, _ = ztune.initialize(model, config=config)
    if args.save_dir:
        engine.load_checkpoint(args.save_dir)  # resume: returns (None, None) when nothing is saved there yet
    start = engine.global_steps
    cfg = engine.config
    rank, world = engine.rank, engine.world_size
    seq_len = min(cfg.seq_len, spec.max_seq_len)
    micro, accum = cfg.batch.micro, cfg.grad_accum_for(world)
    corpus = synthetic_corpus(vocab_size=spec.vocab_size, num_tokens=2_000_000, seed=args.seed)
    data = batches(corpus, batch_size=micro, seq_len=seq_len, rank=rank, world_size=world, seed=args.seed)
    data = itertools.islice(data, start * accum, None)  # the micro-batches the resumed steps already used

    progress = None
    if rank == 0:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        print(f"{spec.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on {world} ranks, "
              f"ZeRO-{cfg.zero.stage}, {cfg.precision.value}, micro {micro} x accum {accum} x {world} ranks, "
              f"seq {seq_len}", flush=True)
        progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[ms]:.0f} ms/step"),
                            TimeRemainingColumn())
        task = progress.add_task("train", total=args.steps, completed=start, loss=float("nan"), ms=0.0)
        progress.start()
    first_loss = last_loss = float("nan")
    try:
        for step in range(start, args.steps):
            step_start = time.perf_counter()
            total = 0.0
            for _ in range(accum):
                input_ids, labels = next(data)
                loss = engine(input_ids, labels=labels)
                engine.backward(loss)
                total += loss.item() / accum
                engine.step()
            last_loss = total
            if step == start:
                first_loss = total
            if progress is not None:
                progress.update(task, advance=1, loss=total, ms=(time.perf_counter() - step_start) * 1e3)
            if args.save_dir and (step + 1 == args.steps or args.save_every and (step + 1) % args.save_every == 0):
                engine.save_checkpoint(args.save_dir)
    finally:
        if progress is not None:
            progress.stop()
    if rank == 0:
        mem = engine.memory_report()
        comm = engine.comm_report()
        print(f"loss {first_loss:.3f} -> {last_loss:.3f} over steps {start + 1}-{args.steps}; "
              f"rank 0 holds {mem['total'] / 2**20:.1f} MiB of model states, "
              f"sends {comm['bytes_sent_per_step'] / 2**20:.1f} MiB per step", flush=True)


if __name__ == "__main__":
    main()
