"""The default group's store under torchrun restarts: keys are prefixed by the restart attempt, so a restarted
rank never reads an address that a killed rank of the previous attempt published (runtime/initialize.py). The
attempt is counted per rank in the store, so agents on different hosts whose TORCHELASTIC_RESTART_COUNT
differ (one counted a failure, the other restarted for a membership change) still agree on it."""

from __future__ import annotations

import torch.distributed as dist

from tests.helpers.spawn import free_port
from ztune.runtime.initialize import _restart_safe_store


def test_keys_of_each_attempt_are_apart(monkeypatch):
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, 1, is_master=True)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = _restart_safe_store(rank=0, world_size=1, timeout=None)
    first.set("default_pg/0", "address of a rank that dies")
    second = _restart_safe_store(rank=0, world_size=1, timeout=None)
    assert second.check(["default_pg/0"]) is False  # the dead attempt's key is not visible
    assert master.get("/ztune/attempt_1/default_pg/0") == b"address of a rank that dies"


def test_ranks_agree_on_the_attempt_whatever_their_agents_count(monkeypatch):
    """Two hosts, attempt 2: host A's agent counted a restart (TORCHELASTIC_RESTART_COUNT=1), host B's restarted
    for a membership change (still 0). Both ranks see each other's keys."""
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, 1, is_master=True)  # the agent's store (kept alive)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    for rank in (0, 1):  # the first attempt
        _restart_safe_store(rank=rank, world_size=2, timeout=None)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    a = _restart_safe_store(rank=0, world_size=2, timeout=None)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    b = _restart_safe_store(rank=1, world_size=2, timeout=None)
    a.set("default_pg/0", "rank 0, attempt 2")
    assert b.get("default_pg/0") == b"rank 0, attempt 2"
    assert master.get("/ztune/attempt_2/default_pg/0") == b"rank 0, attempt 2"


def test_no_agent_store_no_wrapper(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert _restart_safe_store(rank=0, world_size=2, timeout=None) is None
