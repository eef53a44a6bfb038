"""Fixtures for end-to-end tests: a two-host cluster of network namespaces with real sshd servers."""

from __future__ import annotations

import pytest

from tests.e2e.netns import Cluster, why_unavailable


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
