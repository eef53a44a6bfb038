"""The shared multi-process test helper: run a function on N gloo ranks and collect what each returns.

    results = run_ranks(fn, world_size=2, args=(config,))   # [rank0_result, rank1_result]

`fn(rank, world_size, *args)` must be importable by name (a module-level function of a test module) and
return something picklable (tensors are fine). Each rank runs in a fresh process with torchrun's environment
(MASTER_ADDR/PORT on a free port, RANK, WORLD_SIZE, LOCAL_RANK) and OMP_NUM_THREADS=1; with
init_process_group=True (default) the gloo group is created before `fn` runs, otherwise `fn` can let
ztune.initialize create it from that environment. A rank's exception is re-raised in the test as
RankFailure with its traceback; the other ranks (likely blocked in a collective) are killed at once, as
are all ranks when the time limit passes.

Start-up: ranks are forked from a multiprocessing forkserver that has imported torch once (STYLE 9: "one spawn
helper"). A `spawn` start pays python + `import torch` (~1.8 CPU-s) in every rank of every call, which on the
2-core CI machine was most of a small test's time; a rank forked from the server starts with torch imported
and imports only its test module. A forked rank is still a fresh interpreter state for the test: nothing of
the test process is inherited (the server was started from a bare interpreter), its environment is set to the
test process's at the call (as spawn would), and only modules with no import-time configuration are preloaded
(PRELOAD). ZTUNE_TEST_START_METHOD=spawn goes back to plain spawn (e.g. to rule the server out).

Time limit: `timeout_s` is what an idle machine needs, with margin; it is stretched by the machine's load
while the ranks run (tests/helpers/load.py LoadScaledDeadline). A timeout names the ranks that had not
finished, what each was doing (starting, creating the process group, running `fn`) and the load average.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import random
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from tests.helpers.load import LoadScaledDeadline

_GRACE_S = 1.0  # how long the other ranks get to report after one rank failed
START_METHOD_ENV = "ZTUNE_TEST_START_METHOD"
# Imported once by the forkserver. Only modules whose import starts no thread and reads no environment a test
# sets: torch (its thread pools start at the first parallel op, after the fork), torch.distributed, ztune's own
# modules (none reads the environment at import; grep `os.environ` in runtime/ and ztune/) and torch._dynamo.
# torch.optim imports torch._dynamo at the first optimizer a process builds (torch/_compile.py _disable_dynamo
# wraps Optimizer.__init__), ~1.9 CPU-s per rank here, as long as `import torch` itself; its config reads
# variables named DYNAMO_ENV_PREFIXES at import, so a call that sets one for its ranks is refused (run_ranks).
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torch.optim", "ztune", "ztune.runtime.engine",
           "ztune.runtime.initialize"]
DYNAMO_ENV_PREFIXES = ("TORCHDYNAMO", "TORCHINDUCTOR", "TORCH_COMPILE", "TORCH_LOGS")
# gloo's own collective timeout, as a multiple of the (load-scaled) limit: the limit below must trip first,
# with its message, rather than a rank's "Timed out waiting" from a collective whose peer is merely slow.
_GLOO_TIMEOUT_FACTOR = 4.0


class RankFailure(AssertionError):
    """A rank raised, died or timed out."""


# Rendezvous ports for the tests' process groups. Asking the OS (bind to port 0, close, hand the number on) let
# two pytest-xdist workers hold the same port at once: a rank then meets the other test's group, trains in it
# and fails when that group ends, while its own rank 0 waits, silent (seen once in a full `make test`:
# test_checkpoint_kill's resumed rank 1 died in its first save with "Connection closed by peer" while rank 0,
# its log empty, had not started). So every worker draws from a slice of its own, below Linux's ephemeral range
# (32768-60999 by default: bind(0) and outgoing connections, gloo's among them, never land here) and below the
# 29500s that torchrun, `ztune launch` and the box benchmarks default to.
PORT_RANGE = (20000, 29000)
_port_draws = iter(())


def port_slice(environ: dict[str, str] | None = None) -> range:
    """This process's ports in PORT_RANGE: the whole range outside pytest-xdist, else worker gwK's K-th of
    PYTEST_XDIST_WORKER_COUNT equal slices."""
    env = os.environ if environ is None else environ
    worker, count = env.get("PYTEST_XDIST_WORKER", ""), env.get("PYTEST_XDIST_WORKER_COUNT", "")
    lo, hi = PORT_RANGE
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 0):
        return range(lo, hi)
    size = (hi - lo) // int(count)
    start = lo + min(int(worker[2:]), int(count) - 1) * size
    return range(start, start + size)


def free_port() -> int:
    """A TCP port of this process's slice (port_slice) that nothing listens on or holds now: successive calls go
    round the slice from a random start, so a test's groups, and reruns, do not reuse one port at once."""
    global _port_draws
    ports = port_slice()
    for _ in range(len(ports)):
        port = next(_port_draws, None)
        if port is None or port not in ports:
            start = random.SystemRandom().randrange(len(ports))
            _port_draws = (ports[(start + i) % len(ports)] for i in itertools.count())
            port = next(_port_draws)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use, or in TIME_WAIT: the next one
                continue
        return port
    raise RuntimeError(f"no free TCP port in {ports.start}-{ports.stop - 1} (tests/helpers/spawn.py PORT_RANGE)")


def _context() -> mp.context.BaseContext:
    method = os.environ.get(START_METHOD_ENV, "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"{START_METHOD_ENV}={method!r}: expected 'forkserver' or 'spawn'")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(fn: Callable, rank: int, world_size: int, port: int, results, phases, args: tuple, init_group: bool,
            environ: dict[str, str], env: dict[str, str], gloo_timeout_s: float) -> None:
    t0 = time.monotonic()
    # The test process's environment at the call (a forked rank would otherwise keep the server's, from when
    # the server started), then torchrun's variables, then the call's `env`.
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init_group:
            phases.send(("creating the process group", time.monotonic() - t0))
            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=gloo_timeout_s))
        phases.send((f"running {fn.__name__}", time.monotonic() - t0))
        out = fn(rank, world_size, *args)
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 -- every failure goes back to the test, with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, *, world_size: int, args: tuple = (), timeout_s: float = 120.0,
              init_process_group: bool = True, env: dict[str, str] | None = None) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` processes; return the results in rank order.

    timeout_s: the limit on an idle machine (seconds), stretched by the load (module docstring)."""
    ctx = _context()
    dynamo_env = sorted(k for k in env or {} if k.startswith(DYNAMO_ENV_PREFIXES))
    if dynamo_env and ctx.get_start_method() == "forkserver":
        raise ValueError(f"run_ranks(env=...): {', '.join(dynamo_env)} would not reach torch._dynamo, which the "
                         f"forkserver imported before the call (PRELOAD): run with {START_METHOD_ENV}=spawn")
    # Results go through a queue, touched once per rank after `fn` returns; progress goes through a plain pipe
    # per rank: a queue's semaphores are shared-memory pages, and tests/dist/test_shm.py measures the rank's
    # resident shared memory while `fn` runs.
    results = ctx.Queue()
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
    port = free_port()
    deadline = LoadScaledDeadline(timeout_s)
    environ = dict(os.environ)
    gloo_timeout_s = deadline.limit_s * _GLOO_TIMEOUT_FACTOR
    procs = [
        ctx.Process(target=_worker, daemon=True, name=f"rank{r}",
                    args=(fn, r, world_size, port, results, pipes[r][1], args, init_process_group, environ,
                          dict(env or {}), gloo_timeout_s))
        for r in range(world_size)
    ]
    for p, (_, sender) in zip(procs, pipes, strict=True):
        p.start()
        sender.close()
    got: dict[int, tuple[bool, Any]] = {}
    phase: dict[int, tuple[str, float]] = {}  # rank -> (what it started doing, seconds after its start)
    failed_at: float | None = None
    timed_out = False
    try:
        while len(got) < world_size:
            now = time.monotonic()
            if failed_at is not None and now > failed_at + _GRACE_S:
                break
            if deadline.expired():
                timed_out = True
                break
            _read_phases(pipes, phase)
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
        _read_phases(pipes, phase)
        for receiver, _ in pipes:
            receiver.close()
    errors = [f"--- rank {r} ---\n{payload}" for r, (ok, payload) in sorted(got.items()) if not ok]
    missing = [r for r in range(world_size) if r not in got]
    if errors or missing:
        lines = errors
        if missing:
            codes = [procs[r].exitcode for r in missing]
            if timed_out:
                lines.append(deadline.explain(f"{fn.__name__} on {world_size} ranks") + f"; ranks {missing} had not "
                             f"finished: " + "; ".join(_doing(r, phase) for r in missing)
                             + f"; finished: {sorted(got) or 'none'}")
            else:
                lines.append(f"ranks {missing} did not report (killed: another rank failed or died); "
                             f"exit codes {codes}; last seen: " + "; ".join(_doing(r, phase) for r in missing))
        raise RankFailure(f"{fn.__name__} failed on {world_size} ranks:\n" + "\n".join(lines))
    return [pickle.loads(got[r][1]) for r in range(world_size)]


def _read_phases(pipes: list, phase: dict[int, tuple[str, float]]) -> None:
    for rank, (receiver, _) in enumerate(pipes):
        try:
            while receiver.poll():
                phase[rank] = receiver.recv()
        except (EOFError, OSError):  # the rank exited: nothing more to read
            pass


def _doing(rank: int, phase: dict[int, tuple[str, float]]) -> str:
    if rank not in phase:
        return f"rank {rank} still starting (python and imports)"
    what, at_s = phase[rank]
    return f"rank {rank} {what} (since {at_s:.1f} s after its start)"
