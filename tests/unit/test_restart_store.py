"""The default group's store under torchrun restarts: keys are prefixed by the restart attempt, so a restarted
rank never reads an address that a killed rank of the previous attempt published (runtime/initialize.py)."""

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
    first = _restart_safe_store(world_size=1, timeout=None)
    first.set("default_pg/0", "address of a rank that dies")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = _restart_safe_store(world_size=1, timeout=None)
    assert second.check(["default_pg/0"]) is False  # the dead attempt's key is not visible
    assert master.get("/ztune/attempt_0/default_pg/0") == b"address of a rank that dies"


def test_no_agent_store_no_wrapper(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert _restart_safe_store(world_size=2, timeout=None) is None
