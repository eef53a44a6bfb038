"""One rank of the kill -9 trials (test_checkpoint_kill.py), started with torchrun's environment:

    python tests/dist/ckpt_worker.py SAVE_DIR OUT_DIR STAGE OFFLOAD   (the repository on PYTHONPATH)

Resumes from SAVE_DIR's `latest` when there is one (`engine.load_checkpoint` returns (None, None) otherwise),
trains to STEPS saving every SAVE_EVERY steps, and rank 0 appends "step loss" lines to OUT_DIR/losses.txt;
at the end rank 0 writes the final parameters to OUT_DIR/final.pt.
CKPT_KILL_AT="<rank>:<point>:<n>" makes that rank SIGKILL itself at the n-th time it reaches <point>:
"shard" right after writing its shard file (the metadata not yet written), "commit" right before `latest`
is replaced (tag folder already renamed into place), "step" after its n-th training step. That is how the
test kills inside a save deterministically; kills at random times come from the test itself. Under torchrun
restarts (TORCHELASTIC_RESTART_COUNT > 0) the kill is not armed again, so the restarted group finishes.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys

STEPS, SAVE_EVERY = 8, 2
_after_step = None  # set by CKPT_KILL_AT=<rank>:step:<n>


def _arm_kill(rank: int) -> None:
    spec = os.environ.get("CKPT_KILL_AT")
    if not spec:
        return
    who, point, nth = spec.split(":")
    if int(who) != rank or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    from ztune.runtime.state import save, tags

    calls = {"n": 0}

    def hit():
        calls["n"] += 1
        if calls["n"] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "shard":
        original = save._write_safetensors

        def write(*args, **kwargs):
            info = original(*args, **kwargs)
            if args[0].name.startswith("rank"):
                hit()
            return info

        save._write_safetensors = write
    elif point == "step":
        global _after_step
        _after_step = hit
    elif point == "commit":
        original_replace = tags.replace_atomic

        def replace(*args, **kwargs):
            hit()
            return original_replace(*args, **kwargs)

        tags.replace_atomic = replace


def main() -> None:
    save_dir, out_dir, stage, offload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    import torch

    import ztune
    from tests.dist.test_parity import MICRO, SEED, SEQ, build, case, config_for, corpus
    from ztune.runtime.data import batches

    torch.set_num_threads(1)
    c = case(stage=stage, offload=offload, model="llama")
    engine, _, _, _ = ztune.initialize(build(c), config_for(c, int(os.environ["WORLD_SIZE"])))
    _arm_kill(engine.rank)
    engine.load_checkpoint(save_dir)  # the one-line resume: (None, None) on the first start
    start = engine.global_steps
    data = batches(corpus(), batch_size=MICRO, seq_len=SEQ, rank=engine.rank, world_size=engine.world_size,
                   seed=SEED)
    data = itertools.islice(data, start, None)
    for step in range(start, STEPS):
        ids, labels = next(data)
        loss = engine(ids, labels=labels)
        engine.backward(loss)
        engine.step()
        if engine.rank == 0:
            with open(os.path.join(out_dir, "losses.txt"), "a") as f:
                f.write(f"{step} {loss.item()!r}\n")
        if _after_step is not None:
            _after_step()
        if (step + 1) % SAVE_EVERY == 0:
            engine.save_checkpoint(save_dir)
    state = engine.full_state_dict()
    if engine.rank == 0:
        torch.save(state, os.path.join(out_dir, "final.pt"))


if __name__ == "__main__":
    main()
