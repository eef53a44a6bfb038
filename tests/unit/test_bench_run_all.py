"""`make bench` runs the cluster-in-a-box benchmark (root, namespaces) only when asked."""

from __future__ import annotations

import pytest

from benchmarks import run_all


def _names(argv):
    return [p.stem for p in run_all.select_scripts(argv)]


def test_cluster_bench_is_opt_in():
    default = _names([])
    assert "bench_cluster" not in default and "bench_cost_cluster" not in default and "runtime_vs_peers" in default
    assert not {"netns", "cluster_box", "cluster_worker", "peers", "run_all"} & set(default)
    assert "bench_cluster" in _names(["--cluster"]) and "runtime_vs_peers" in _names(["--cluster"])
    assert "bench_cost_cluster" in _names(["--cluster"])
    assert _names(["bench_cluster"]) == ["bench_cluster"]


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="--clusters"):
        run_all.select_scripts(["--clusters"])
