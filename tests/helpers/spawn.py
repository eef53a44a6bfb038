"""The shared multi-process test helper: run a function on N gloo ranks and collect what each returns.

    results = run_ranks(fn, world_size=2, args=(config,))   # [rank0_result, rank1_result]

`fn(rank, world_size, *args)` must be importable by name (a module-level function of a test module) and
return something picklable (tensors are fine). Each rank runs in a fresh `spawn` process with torchrun's
environment (MASTER_ADDR/PORT on a free port, RANK, WORLD_SIZE, LOCAL_RANK) and OMP_NUM_THREADS=1; with
init_process_group=True (default) the gloo group is created before `fn` runs, otherwise `fn` can let
ztune.initialize create it from that environment. A rank's exception is re-raised in the test as
RankFailure with its traceback; the other ranks (likely blocked in a collective) are killed at once, as
are all ranks when `timeout_s` passes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

_GRACE_S = 1.0  # how long the other ranks get to report after one rank failed


class RankFailure(AssertionError):
    """A rank raised, died or timed out."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; small race accepted in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, port: int, results, args: tuple, init_group: bool,
            env: dict[str, str], timeout_s: float) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1", **env,
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init_group:
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        out = fn(rank, world_size, *args)
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 -- every failure goes back to the test, with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, *, world_size: int, args: tuple = (), timeout_s: float = 120.0,
              init_process_group: bool = True, env: dict[str, str] | None = None) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` processes; return the results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, daemon=True, name=f"rank{r}",
                    args=(fn, r, world_size, port, results, args, init_process_group, dict(env or {}), timeout_s))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    got: dict[int, tuple[bool, Any]] = {}
    failed_at: float | None = None
    try:
        while len(got) < world_size:
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now > failed_at + _GRACE_S):
                break
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in got]
                if dead and failed_at is None:
                    # A process that exited without reporting (killed, segfault): give the queue a moment.
                    failed_at = time.monotonic()
                continue
            got[rank] = (ok, payload)
            if not ok and failed_at is None:
                failed_at = time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=0.5 if len(got) == world_size else 0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    errors = [f"--- rank {r} ---\n{payload}" for r, (ok, payload) in sorted(got.items()) if not ok]
    missing = [r for r in range(world_size) if r not in got]
    if errors or missing:
        why = "timed out" if time.monotonic() > deadline else "did not report (killed: another rank failed or died)"
        codes = [procs[r].exitcode for r in missing]
        lines = errors + ([f"ranks {missing} {why}; exit codes {codes}"] if missing else [])
        raise RankFailure(f"{fn.__name__} failed on {world_size} ranks:\n" + "\n".join(lines))
    return [pickle.loads(got[r][1]) for r in range(world_size)]
