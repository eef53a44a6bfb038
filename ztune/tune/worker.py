"""The built-in autotune workload: a profile model on synthetic tokens, trained through ztune.initialize.

Run by the tuner as one rank of a torchrun group (never imported by the CLI):

    python -m torch.distributed.run --standalone --nproc-per-node 2 ztune/tune/worker.py --model tiny-gpt

The trial's config comes from $ZTUNE_CONFIG (the engine reads it), steps and the report path from the
trial protocol variables (runtime/trial_report.py). The engine reports each optimizer step and ends the
process when the measured steps are done; if an engine does not expose a `trial_reporter`, this loop
reports for it.
"""

from __future__ import annotations

import argparse
import os
import sys

# Tokens of synthetic corpus per sample of the global batch: enough windows that a trial never repeats
# an epoch in its few steps, small enough to build in milliseconds.
CORPUS_WINDOWS_PER_SAMPLE = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ztune autotune built-in workload (one torchrun rank)")
    p.add_argument("--model", required=True, help="model profile name or YAML path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10,
                   help="optimizer steps when run outside a trial (no $ZTUNE_TRIAL_REPORT)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    import ztune
    from ztune import envvars
    from ztune.config.io import CONFIG_ENV, load
    from ztune.profiles import load_model
    from ztune.runtime.data import batches, synthetic_corpus
    from ztune.runtime.models import build_model
    from ztune.runtime.trial_report import TrialReporter

    torch.set_num_threads(envvars.omp_num_threads())  # as the tuner timed it (cli/autotune.py)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load(os.environ[CONFIG_ENV])
    spec = load_model(args.model)
    model = build_model(spec, seed=args.seed)
    engine, _optimizer, _loader, _scheduler = ztune.initialize(model, config=None)
    reporter = getattr(engine, "trial_reporter", None)
    own_reporter = reporter is None
    if own_reporter:
        reporter = TrialReporter.from_env(rank=rank, world_size=world)
    accum = cfg.grad_accum_for(world)
    global_batch = cfg.global_batch_for(world)
    corpus = synthetic_corpus(vocab_size=spec.vocab_size, seed=args.seed,
                              num_tokens=CORPUS_WINDOWS_PER_SAMPLE * global_batch * cfg.seq_len)
    data = batches(corpus, batch_size=cfg.batch.micro, seq_len=cfg.seq_len, rank=rank, world_size=world,
                   seed=args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    step = 0
    while not (reporter.should_stop if reporter is not None else step >= args.steps):
        step += 1
        for _ in range(accum):
            input_ids, labels = next(data)
            loss = engine(input_ids.to(device), labels.to(device))
            engine.backward(loss)
            if reporter is not None:
                reporter.note_loss(loss)  # for the engine's record_step at the boundary
            engine.step()
        if own_reporter and reporter is not None:
            reporter.record_step(engine, loss=loss)
    dist.destroy_process_group()


if __name__ == "__main__":
    # Run as a file by torchrun: make the repository importable the same way as the tuner sees it.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main()
