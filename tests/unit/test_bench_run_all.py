"""`make bench` runs the cluster-in-a-box benchmark (root, namespaces) only when asked."""

from __future__ import annotations

import pytest

from benchmarks import run_all


def _names(argv):
    return [p.stem for p in run_all.select_scripts(argv)]


def test_cluster_bench_is_opt_in():
    default = _names([])
    assert not {"bench_cluster", "bench_autotune_cluster", "bench_cost_cluster"} & set(default)
    assert "runtime_vs_peers" in default
    assert not {"netns", "cluster_box", "cluster_worker", "peers", "run_all"} & set(default)
    with_cluster = _names(["--cluster"])
    assert {"bench_cluster", "bench_autotune_cluster", "bench_cost_cluster", "runtime_vs_peers"} <= set(with_cluster)
    assert _names(["bench_cluster"]) == ["bench_cluster"]
    assert _names(["bench_autotune_cluster"]) == ["bench_autotune_cluster"]


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="--clusters"):
        run_all.select_scripts(["--clusters"])
