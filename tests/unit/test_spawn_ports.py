"""tests/helpers/spawn.py free_port: each pytest-xdist worker draws rendezvous ports from a slice of its own, outside
the OS's ephemeral range and the 29500s that launchers default to, skipping ports in use."""

from __future__ import annotations

import socket

import pytest

from tests.helpers import spawn


def test_worker_slices_are_disjoint_and_outside_the_ephemeral_range_and_the_launch_defaults():
    slices = [spawn.port_slice({"PYTEST_XDIST_WORKER": f"gw{k}", "PYTEST_XDIST_WORKER_COUNT": "3"}) for k in range(3)]
    seen: set[int] = set()
    for ports in slices:
        assert len(ports) >= 2900
        assert not seen & set(ports)
        seen |= set(ports)
    assert min(seen) >= spawn.PORT_RANGE[0] and max(seen) < 29000 < 32768  # Linux's ephemeral range starts at 32768
    assert spawn.port_slice({}) == range(*spawn.PORT_RANGE)  # outside xdist: the whole range
    assert spawn.port_slice({"PYTEST_XDIST_WORKER": "master", "PYTEST_XDIST_WORKER_COUNT": "3"}) == \
        range(*spawn.PORT_RANGE)


def test_successive_ports_differ_and_stay_in_the_slice(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    ports = [spawn.free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    assert all(p in spawn.port_slice() for p in ports)


def test_a_port_in_use_is_skipped(monkeypatch):
    # 4,500 workers: slices of 2 ports, gw0's being the range's first two
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4500")
    first, second = spawn.port_slice()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        try:
            held.bind(("127.0.0.1", first))
        except OSError:
            pytest.fail(f"port {first} is taken on this machine; the test needs it free")
        held.listen()
        assert {spawn.free_port() for _ in range(5)} == {second}
