"""Fixtures for end-to-end tests: a two-host cluster of network namespaces with real sshd servers, the
cluster in a box (benchmarks/cluster_box.py: hosts with their own /dev/shm and hostname behind shaped
links), and the stray-process check that runs after every test here (autotune and launch alike)."""

from __future__ import annotations

import uuid

import pytest

from benchmarks import cluster_box
from tests.e2e.netns import Cluster, why_unavailable
from tests.e2e.strays import MARKER_ENV, wait_none_marked


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    reason = why_unavailable()
    if reason is not None:
        pytest.skip(f"ssh e2e tests skipped: {reason}")
    c = Cluster(root=tmp_path_factory.mktemp("cluster"), num_hosts=2)
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture
def box():
    """A 2-host cluster in a box, links shaped to 1 Gbit/s; torn down after the test, also on failure."""
    reason = cluster_box.why_unavailable()
    if reason is not None:
        pytest.skip(f"cluster-in-a-box tests skipped: {reason}")
    with cluster_box.ClusterBox(num_hosts=2, rate_mbit=1000) as b:
        yield b


@pytest.fixture(autouse=True)
def no_stray_processes(monkeypatch, request):
    """Every process the test starts inherits a marker unique to the test; none may outlive it."""
    marker = f"{request.node.name}-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv(MARKER_ENV, marker)
    yield marker
    wait_none_marked(marker, what=request.node.nodeid)
