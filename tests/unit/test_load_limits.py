"""tests/helpers/load.py: limits that follow the machine's load, and messages that say what was slow."""

from __future__ import annotations

import os

from tests.helpers import load


def _set_load(monkeypatch, load_1m: float) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (load_1m, load_1m, load_1m))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)


def test_deadline_follows_the_highest_load_seen(monkeypatch):
    _set_load(monkeypatch, 1.0)  # idle: factor 1
    deadline = load.LoadScaledDeadline(10.0)
    assert deadline.limit_s == 10.0
    deadline.started -= 15.0  # 15 s have passed
    _set_load(monkeypatch, 8.0)  # 4 runnable processes per core: the limit is now 40 s
    assert not deadline.expired() and deadline.limit_s == 40.0
    _set_load(monkeypatch, 2.0)  # the load fell again: the limit keeps its highest value
    assert not deadline.expired() and deadline.limit_s == 40.0
    deadline.started -= 30.0
    assert deadline.expired()
    text = deadline.explain("the ranks")
    assert text.startswith("the ranks took 45.")
    assert "limit 40 s = 10 s x load factor 4.0" in text and "highest 1-minute load average seen 8.0" in text


def test_scaled_limit_and_message(monkeypatch):
    _set_load(monkeypatch, 6.0)
    assert load.scaled_limit_s(100.0) == 300.0
    assert "limit 300 s = 100 s x load factor 3.0 (load average 6.0 on 2 cores)" in load.explain_limit("x", 1.0, 100.0)
