"""tests/helpers/spawn.py itself: results in rank order, the test process's environment in every rank, a rank's
exception with its traceback, and a time limit whose message says which ranks were slow and how loaded the
machine was (issue 10 item 8)."""

from __future__ import annotations

import os
import time

import pytest

from tests.helpers.spawn import RankFailure, run_ranks

pytestmark = pytest.mark.dist

MARK_ENV = "ZTUNE_TEST_SPAWN_MARK"


def _report(rank: int, world_size: int) -> tuple:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return rank, world_size, float(t), os.environ.get(MARK_ENV), os.environ.get("EXTRA"), os.environ["MASTER_PORT"]


def _second_rank_sleeps(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(3600)
    return rank


def _second_rank_raises(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank 1 was told to fail")
    return rank


def test_results_in_rank_order_with_the_test_environment(monkeypatch):
    # Set after any forkserver started: a rank must see the environment of the call, not the server's.
    monkeypatch.setenv(MARK_ENV, f"mark-{time.monotonic_ns()}")
    out = run_ranks(_report, world_size=4, env={"EXTRA": "x"})
    assert [r[:3] for r in out] == [(r, 4, 10.0) for r in range(4)]
    assert {r[3] for r in out} == {os.environ[MARK_ENV]} and {r[4] for r in out} == {"x"}
    assert len({r[5] for r in out}) == 1


def test_a_rank_error_carries_its_traceback():
    with pytest.raises(RankFailure) as info:
        run_ranks(_second_rank_raises, world_size=2)
    text = str(info.value)
    assert "--- rank 1 ---" in text and "ValueError: rank 1 was told to fail" in text


def test_a_timeout_names_the_slow_rank_and_the_load():
    # No process group: rank 0 has nothing to wait for, so it finishes well inside the limit even on a busy
    # machine (with one, both ranks were once still creating it after 0.9 s at load 3.2: 'finished: none').
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_second_rank_sleeps, world_size=2, timeout_s=3.0, init_process_group=False)
    text = str(info.value)
    assert "ranks [1] had not finished: rank 1 " in text, text
    assert "finished: [0]" in text and "load average" in text and "x load factor" in text, text
    assert time.monotonic() - t0 < 600  # it was stopped, not left to sleep for an hour


def _imports(rank: int, world_size: int) -> bool:
    import sys

    return "torch._dynamo" in sys.modules


def test_ranks_start_with_dynamo_imported_and_refuse_dynamo_variables(monkeypatch):
    """The forkserver imports torch._dynamo (PRELOAD: torch.optim's first optimizer would otherwise pay ~1.9 CPU-s
    per rank), so a variable _dynamo reads at import cannot reach it through env= and is refused."""
    monkeypatch.delenv("ZTUNE_TEST_START_METHOD", raising=False)
    assert run_ranks(_imports, world_size=1, init_process_group=False) == [True]
    with pytest.raises(ValueError, match="TORCHDYNAMO_VERBOSE would not reach torch._dynamo"):
        run_ranks(_imports, world_size=1, env={"TORCHDYNAMO_VERBOSE": "1"})
