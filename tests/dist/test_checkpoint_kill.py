"""kill -9 of every rank during training and during saves, then resume from `latest`: the loss of every step
(including the re-run ones) and the final parameters are bitwise equal to an uninterrupted run.

Each trial starts 2 ranks of tests/dist/ckpt_worker.py (own processes with torchrun's environment, forked from a
zygote that has imported torch: tests/helpers/zygote.py; saving every 2 of 8 steps), kills them, starts them again
and lets them finish. Kill points, in turn:
- "random": SIGKILL to both ranks a random 0-0.5 s after a random step was logged (in a step, or inside
  a save, wherever it lands);
- "shard": one rank kills itself right after writing its shard of the n-th save (metadata not yet written;
  the other rank is then killed by the test): the staging folder is incomplete and must be ignored;
- "commit": rank 0 kills itself after the tag folder is renamed into place but before `latest` moves.
CI runs 3 trials (one per kind); ZTUNE_CKPT_KILL_TRIALS=N runs N, cycling over the kinds and over stages
3, 2 + optimizer offload, 1 and 0.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.load import load_factor, scaled_limit_s
from tests.helpers.spawn import free_port
from tests.helpers.zygote import Zygote, ZygoteChild

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ckpt_worker.py")
WORLD = 2
KINDS = ("random", "shard", "commit")
CONFIGS = ((3, "none"), (2, "cpu"), (1, "none"), (0, "none"))
RUN_TIMEOUT_S = 400.0  # idle-machine safety net, stretched by the load: one run takes ~30 s loaded


def _launch(zygote: Zygote, save_dir: Path, out_dir: Path, stage: int, offload: str, *,
            kill_at: str | None = None) -> list[tuple[ZygoteChild, Path]]:
    """Start the 2 ranks (real processes, forked from the zygote: each would otherwise spend ~3.5 CPU-s importing
    torch before its first step); each rank's output goes on the end of OUT_DIR/rank<r>.log."""
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(WORLD),
               "OMP_NUM_THREADS": "1", "ZTUNE_SHM_MIN_BYTES": "0", "PYTHONPATH": str(REPO)}
        env.pop("CKPT_KILL_AT", None)
        if kill_at is not None:
            env["CKPT_KILL_AT"] = kill_at
        log = out_dir / f"rank{rank}.log"
        procs.append((zygote.start([str(WORKER), str(save_dir), str(out_dir), str(stage), offload], env=env,
                                   cwd=REPO, output=log, append=True), log))
    return procs


def _kill_all(procs) -> None:
    for p, _ in procs:
        p.kill()  # SIGKILL, where it still runs
    for p, _ in procs:
        p.wait(timeout_s=30)


def _wait(procs, *, until_one_dies: bool = False) -> None:
    """Wait for every rank to exit 0 (or, until_one_dies, for the first to exit, then SIGKILL the rest)."""
    factor = load_factor()
    limit_s = RUN_TIMEOUT_S * factor
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        codes = [p.poll() for p, _ in procs]
        if until_one_dies and any(c is not None for c in codes):
            _kill_all(procs)
            return
        if not until_one_dies and all(c is not None for c in codes):
            break
        if any(c not in (None, 0) for c in codes):
            break
        time.sleep(0.1)
    codes = [p.poll() for p, _ in procs]
    _kill_all(procs)
    if until_one_dies or any(c != 0 for c in codes):
        logs = "\n".join(log.name + ":\n" + log.read_text()[-3000:] for _, log in procs)
        raise AssertionError(f"ranks exited {codes} (None: still running at {limit_s:.0f} s = {RUN_TIMEOUT_S:.0f} s x "
                             f"load factor {factor:.1f}, killed)\n{logs}")


def _losses(out_dir: Path) -> list[tuple[int, float]]:
    rows = [line.split() for line in (out_dir / "losses.txt").read_text().splitlines()]
    return [(int(s), float(v)) for s, v in rows]


def _reference(zygote: Zygote, root: Path, stage: int, offload: str) -> tuple[dict[int, float], dict]:
    out = root / f"ref{stage}{offload}"
    out.mkdir()
    procs = _launch(zygote, out / "ckpt", out, stage, offload)
    _wait(procs)
    losses = dict(_losses(out))
    assert sorted(losses) == list(range(8))
    return losses, torch.load(out / "final.pt")


def _trial(zygote: Zygote, root: Path, i: int, kind: str, stage: int, offload: str, ref, rng: random.Random) -> str:
    ref_losses, ref_final = ref
    out = root / f"trial{i}"
    out.mkdir()
    save_dir = out / "ckpt"
    if kind == "random":
        # After a random number of logged steps plus up to half a second: inside a step or a save.
        lines, delay_s = rng.randint(1, 7), rng.uniform(0.0, 0.5)
        procs = _launch(zygote, save_dir, out, stage, offload)
        deadline = time.monotonic() + scaled_limit_s(RUN_TIMEOUT_S)
        while time.monotonic() < deadline and all(p.poll() is None for p, _ in procs):
            log = out / "losses.txt"
            if log.exists() and len(log.read_text().splitlines()) >= lines:
                break
            time.sleep(0.05)
        time.sleep(delay_s)
        _kill_all(procs)
        where = f"{delay_s:.2f} s after step {lines - 1}"
    else:
        rank, nth = (rng.randrange(WORLD), rng.randint(1, 3)) if kind == "shard" else (0, rng.randint(1, 3))
        procs = _launch(zygote, save_dir, out, stage, offload, kill_at=f"{rank}:{kind}:{nth}")
        _wait(procs, until_one_dies=True)
        where = f"rank {rank} in save {nth}"
    assert all(p.poll() is not None for p, _ in procs)  # no rank left behind
    _wait(_launch(zygote, save_dir, out, stage, offload))
    for step, loss in _losses(out):  # every attempt's steps, re-run ones included
        assert loss == ref_losses[step], (kind, where, step)
    final = torch.load(out / "final.pt")
    for k, v in ref_final.items():
        assert torch.equal(final[k], v), (kind, where, k)
    return f"{kind} {where} stage {stage} offload {offload}"


@pytest.mark.timeout(1800)  # 7 starts of 2 ranks, each ~6 s idle and ~30 s on the loaded 2-core machine
def test_kill9_during_steps_and_saves_resumes_exactly(tmp_path):
    trials = int(os.environ.get("ZTUNE_CKPT_KILL_TRIALS", "3"))
    rng = random.Random(int(os.environ.get("ZTUNE_CKPT_KILL_SEED", "0")))
    configs = CONFIGS if trials > len(KINDS) else CONFIGS[:1]
    done = []
    with Zygote() as zygote:
        refs = {cfg: _reference(zygote, tmp_path, *cfg) for cfg in configs}
        for i in range(trials):
            cfg = configs[(i // len(KINDS)) % len(configs)]
            done.append(_trial(zygote, tmp_path, i, KINDS[i % len(KINDS)], *cfg, refs[cfg], rng))
    print("\n".join(done))
