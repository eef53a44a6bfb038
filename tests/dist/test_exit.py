"""A process that exits right after its last collective must exit cleanly.

gloo's worker threads release a collective's tensors after `wait()` has returned; one that frees the last
reference to a tensor's Python object needs the GIL, and during interpreter shutdown that kills the thread
inside a destructor: SIGABRT, "terminate called without an active exception" (runtime/comm/collectives.py's module
docstring). Before Comm kept those tensors referenced, 11 ranks aborted in 50 four-rank runs of this test's
script on the dev machine (all_gather 6 in 20 runs, reduce_scatter 3 in 10, all_reduce 1 in 10, all_to_all 1
in 10); the race is timing-dependent, so each case runs several times.

The ranks are real processes that end through the interpreter's shutdown, as `python SCRIPT` does, but forked
from a zygote that has imported torch (tests/helpers/zygote.py): 72 starts of torch cost ~2 minutes of CPU on
the 2-core CI machine. ZTUNE_TEST_START_METHOD=spawn starts them as `python SCRIPT` instead.

The same abort came back after a run that ends like benchmarks/cluster_worker.py (stage 3 through shared
memory, then torch's `dist.all_gather_object`, `dist.destroy_process_group()`, exit): 2 of 10 four-rank runs
of that benchmark, and 2 of 7 with core dumps, all showing the gloo worker in ~AsyncAllgatherWork (the
all_gather_object's tensors) at interpreter shutdown, because the default group outlived
destroy_process_group() (runtime/comm/groups.py). The scripts therefore also exit 3 whenever the default group
survives destroy_process_group(): that check fails on every run of the old code, not by chance. With the fix,
0 of 27 runs of that benchmark aborted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.load import scaled_limit_s
from tests.helpers.spawn import free_port
from tests.helpers.zygote import Zygote

pytestmark = pytest.mark.dist

SCRIPT = Path(__file__).with_name("exit_after_collective.py")
REPO = Path(__file__).resolve().parents[2]
WORLD = 4
RUNS = 3


def _run_once(zygote: Zygote, op: str, out_dir: Path, extra_env: dict[str, str] | None = None
              ) -> list[tuple[int, str]]:
    extra = {"ZTUNE_SHM_MIN_BYTES": "0"} if op == "stage3" else {}
    extra.update(extra_env or {})
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra)
        procs.append(zygote.start([str(SCRIPT), op], env=env, cwd=REPO, output=out_dir / f"rank{rank}.log"))
    out = []
    try:
        for rank, p in enumerate(procs):
            code = p.wait(timeout_s=scaled_limit_s(120.0))
            out.append((code, (out_dir / f"rank{rank}.log").read_text()))
    finally:
        for p in procs:
            p.kill()
    return out


@pytest.fixture(scope="module")
def zygote():
    with Zygote() as z:
        yield z


@pytest.mark.parametrize("op", ["all_gather", "reduce_scatter", "all_reduce", "all_to_all", "broadcast", "engine",
                                "stage3"])
def test_exit_right_after_a_collective_is_clean(zygote: Zygote, op: str, tmp_path: Path) -> None:
    for attempt in range(RUNS):
        out_dir = tmp_path / f"run{attempt}"
        out_dir.mkdir()
        for rank, (rc, text) in enumerate(_run_once(zygote, op, out_dir)):
            assert rc == 0 and "terminate called" not in text, f"run {attempt}, rank {rank}: exit {rc}\n{text}"


def test_exit_right_after_a_hierarchical_step_is_clean(zygote: Zygote, tmp_path: Path) -> None:
    """The same with 2 "hosts" x 2: the engine's collectives run on the hierarchical lanes' worker threads
    (runtime/comm/hierarchical.py), idle but alive at shutdown."""
    two_hosts = {"ZTUNE_LOCAL_WORLD_SIZE": "2", "ZTUNE_SHM_MIN_BYTES": "0"}
    for attempt in range(RUNS):
        out_dir = tmp_path / f"run{attempt}"
        out_dir.mkdir()
        for rank, (rc, text) in enumerate(_run_once(zygote, "engine", out_dir, two_hosts)):
            assert rc == 0 and "terminate called" not in text, f"run {attempt}, rank {rank}: exit {rc}\n{text}"
