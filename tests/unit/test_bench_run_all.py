"""`make bench` runs the cluster-in-a-box benchmark (root, namespaces) only when asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import run_all


def _names(argv):
    return [p.stem for p in run_all.select_scripts(argv)]


def test_cluster_bench_is_opt_in():
    default = _names([])
    assert not {"bench_cluster", "bench_autotune_cluster", "bench_cost_cluster"} & set(default)
    assert "runtime_vs_peers" in default
    assert not {"netns", "cluster_box", "cluster_worker", "peers", "run_all"} & set(default)
    # the one-off diagnostics, run by hand with their own arguments (cost_cluster_parts.py needs --variant: make bench
    # ran it without and failed)
    assert not {"cost_cluster_parts", "gloo_pair_turns", "onebit_exchange_sim"} & set(_names(["--cluster"]))
    for name in run_all.DIAGNOSTICS:
        assert (run_all.BENCH_DIR / name).exists(), name
    with_cluster = _names(["--cluster"])
    assert {"bench_cluster", "bench_autotune_cluster", "bench_cost_cluster", "runtime_vs_peers"} <= set(with_cluster)
    assert _names(["bench_cluster"]) == ["bench_cluster"]
    assert _names(["bench_autotune_cluster"]) == ["bench_autotune_cluster"]


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="--clusters"):
        run_all.select_scripts(["--clusters"])


def test_a_cpu_without_fast_bf16_is_refused_in_one_line_unless_allowed():
    # This dev machine's AVX2-only EPYC core: 62 GFLOP/s fp32, 1.2 bf16 (torch's fallback kernel).
    line = run_all.slow_bf16_refusal(fp32_gflops=62.0, bf16_gflops=1.2, prog="run_all.py")
    assert line is not None and "\n" not in line and "52x slower" in line and run_all.ALLOW_SLOW_BF16 in line
    # With AVX512-BF16 (the earlier dev machines: ~200 bf16 against ~90 fp32) or at the threshold: no refusal.
    assert run_all.slow_bf16_refusal(fp32_gflops=90.0, bf16_gflops=200.0, prog="run_all.py") is None
    assert run_all.slow_bf16_refusal(fp32_gflops=100.0, bf16_gflops=100.0 * run_all.SLOW_BF16_RATIO,
                                     prog="run_all.py") is None
    assert run_all.check_bf16_speed([run_all.ALLOW_SLOW_BF16], prog="run_all.py")  # measures nothing
    assert _names([run_all.ALLOW_SLOW_BF16, "bench_cluster"]) == ["bench_cluster"]  # a flag, not a script


def test_main_refuses_slow_bf16_with_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(run_all, "matmul_gflops", lambda dtype, **k: 1.2 if "bfloat16" in str(dtype) else 62.0)
    monkeypatch.setattr(run_all.subprocess, "call", lambda *a, **k: pytest.fail("no benchmark may start"))
    assert run_all.main(["bench_cluster"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bf16 matmul" in err and "bench_validation" in err


def test_benchmarks_without_bf16_matmul_run_on_such_a_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(run_all, "matmul_gflops", lambda dtype, **k: 1.2 if "bfloat16" in str(dtype) else 62.0)
    ran = []
    monkeypatch.setattr(run_all.subprocess, "call", lambda cmd, **k: ran.append(Path(cmd[1]).name) or 0)
    monkeypatch.setattr(run_all, "SECTION_DIR", tmp_path)
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    assert run_all.main(["bench_validation", "bench_codec_kernel"]) == 0
    assert ran == ["bench_codec_kernel.py", "bench_validation.py"]


def test_assemble_runs_nothing_and_rebuilds_the_page_from_the_sections(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(run_all.subprocess, "call", lambda *a, **k: pytest.fail("--assemble runs no benchmark"))
    monkeypatch.setattr(run_all, "matmul_gflops", lambda *a, **k: pytest.fail("--assemble measures nothing"))
    monkeypatch.setattr(run_all, "SECTION_DIR", tmp_path / "docs" / "bench")
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    (tmp_path / "docs" / "bench").mkdir(parents=True)
    (tmp_path / "docs" / "bench" / "b.md").write_text("## B\n\nsecond\n")
    (tmp_path / "docs" / "bench" / "a.md").write_text("## A\n\nfirst\n")
    assert run_all.main([run_all.ASSEMBLE]) == 0
    page = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert page.startswith("# Benchmarks\n\nAssembled by `python benchmarks/run_all.py --assemble` (each section "
                           "as its benchmark last wrote it), on ")
    assert page.index("## A") < page.index("## B") and "first" in page and "second" in page
    # it takes nothing else: a script name or a flag beside it is refused in one line, exit 2
    assert run_all.main([run_all.ASSEMBLE, "bench_cluster"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--assemble runs nothing" in err
