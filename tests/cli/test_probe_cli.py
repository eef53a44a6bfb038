"""`ztune probe` end to end in a subprocess: real (quick) measurements on this host, gloo between 2 ranks."""

import json
import subprocess
import sys

import pytest

from tests.helpers.load import scaled_limit_s
from ztune.profiles import load_hardware


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ztune", "probe", *args], capture_output=True, text=True,
                          timeout=scaled_limit_s(120), cwd=cwd)


# A Llama small enough that --model's two ranks train it in well under a second per step.
SMALL_MODEL = """name: probe-small-llama
architecture: llama
vocab_size: 128
hidden_size: 64
num_layers: 2
num_heads: 4
num_kv_heads: 2
intermediate_size: 128
max_seq_len: 64
"""


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """One quick probe with --json and --force over an existing file, shared by the tests below (each probe
    costs seconds: two ranks start and import torch)."""
    d = tmp_path_factory.mktemp("probe")
    (d / "probed.yaml").write_text("old: file\n")
    (d / "small.yaml").write_text(SMALL_MODEL)
    out = run("--quick", "--output", "probed.yaml", "--json", "--ranks", "2", "--force", "--inter-node-gbps", "100",
              "--model", "small.yaml", "--seq", "32", cwd=d)
    return d, out


def test_quick_probe_overwrites_with_force_and_writes_a_loadable_profile(probed):
    d, out = probed
    assert out.returncode == 0, out.stderr
    hw = load_hardware(str(d / "probed.yaml"))
    assert hw.gpus_per_node == 2 and hw.cpu_cores >= 1
    assert hw.intra_node_bw_bytes_per_s > 1e6 and 0 < hw.intra_node_latency_s < 0.1
    assert hw.peak_flops_fp32 > 1e8 and hw.host_memory_bw_bytes_per_s > 1e8
    assert hw.inter_node_bw_bytes_per_s == pytest.approx(100e9 / 8 * 0.9 / 2, rel=1e-4)
    assert not list(d.glob(".probed.yaml.*"))  # no temporary file left behind


def test_json_keys(probed):
    d, out = probed
    data = json.loads(out.stdout)
    assert set(data) == {"output", "profile", "provenance", "host", "gpus", "measured"}
    assert set(data["measured"]) == {"memory", "matmul", "collective", "host_device", "inter_node", "workload",
                                     "codec"}
    # the runtime's codec rates, timed on both ranks after the workload (ztune/probe_codec.py), in the profile
    from ztune.cost.codec import RATE_FIELDS

    assert set(data["measured"]["codec"]) == set(RATE_FIELDS)
    assert all(data["profile"][k] == data["measured"]["codec"][k] > 0 for k in RATE_FIELDS)
    assert all(data["provenance"][k].startswith("measured: the runtime's codec on 2 ranks at once")
               for k in RATE_FIELDS)
    # --model: the small model trained on both ranks at once, its rate / the bf16 matmul rate in the profile
    work = data["measured"]["workload"]
    assert work["model"] == "probe-small-llama" and work["ranks"] == 2 and work["seq_len"] == 32
    assert work["step_s"] > 0 and work["flops_per_s"] > 0
    assert data["profile"]["train_flops_efficiency"] == pytest.approx(
        min(1.0, work["flops_per_s"] / data["measured"]["matmul"]["bf16_flops_per_s"]))
    assert data["provenance"]["train_flops_efficiency"].startswith("measured:")
    # and the workload's wall per CPU second (>= ~1: a step cannot use more CPU than 1 thread's wall), its
    # 1-bit Adam update rate; the shared-memory all_reduce's CPU per byte
    assert data["profile"]["cpu_contention"] == work["cpu_stretch"] > 0.5
    assert data["profile"]["onebit_step_elements_per_s"] == work["onebit_elements_per_s"] > 0
    assert 0 < data["profile"]["intra_node_cpu_s_per_byte"] < 1e-6
    assert data["profile"]["inter_node_cpu_s_per_byte"] == 0.0  # no link measured
    assert data["provenance"]["cpu_contention"].startswith("measured:")
    # and the runtime's own CPU per parameter at each stage (time_engine_stages), beyond plain forward + backward
    for kind in ("micro", "accum", "step"):
        measured = work[f"runtime_{kind}_cpu_s_per_param"]
        assert len(measured) == 4 and all(v >= 0 for v in measured)
        for stage, value in enumerate(measured):
            name = f"runtime_{kind}_cpu_s_per_param_stage{stage}"
            assert data["profile"][name] == pytest.approx(value, rel=1e-4)
            assert data["provenance"][name].startswith("measured:")
    assert data["measured"]["inter_node"] is None  # a single-host probe measures no inter-host link
    coll = data["measured"]["collective"]
    # Local CPU ranks share memory here, so the runtime's transport is what gets measured (runtime/comm/shm.py).
    assert coll["backend"] == "gloo" and coll["transport"] == "gloo + shared memory" and coll["world_size"] == 2
    assert len(coll["times_s"]) == len(coll["sizes_bytes"])
    assert data["profile"]["intra_node_bw_bytes_per_s"] == pytest.approx(coll["fit"]["busbw_bytes_per_s"])
    assert data["provenance"]["inter_node_bw_bytes_per_s"].startswith("assumed: this single-host probe measured no")
    assert data["provenance"]["intra_node_bw_bytes_per_s"].startswith("measured:")


def test_refuses_to_overwrite_without_force(probed):
    d, _ = probed
    before = (d / "probed.yaml").read_bytes()
    out = run("--quick", "--output", "probed.yaml", cwd=d)
    assert out.returncode == 2 and "--force" in out.stderr and "Traceback" not in out.stderr
    assert (d / "probed.yaml").read_bytes() == before


def test_table_says_what_was_measured_and_what_assumed(monkeypatch, tmp_path):
    from rich.console import Console

    from ztune import console as console_mod
    from ztune import probe
    from ztune.cli.probe import _render

    sizes = (4096, 1 << 20)
    times = (1e-4, 1e-3)
    coll = probe.CollectiveResult("gloo", 2, sizes, times, probe.fit_alpha_beta(sizes, times, world_size=2))
    m = probe.Measurements(probe.HostInfo("h", 2, 8 << 30), probe.GpuScan((), "no NVIDIA GPU/driver found"), 2,
                           probe.MemoryBandwidth(10e9, 12e9, 2), probe.FlopRates(1e11, 1e12, "cpu", 512), coll, None)
    hw = probe.build_profile(m)
    recorder = Console(record=True, width=200)
    monkeypatch.setattr(console_mod, "console", recorder)
    _render(m, hw, probe.field_notes(m), tmp_path / "x.yaml")
    text = recorder.export_text()
    assert "measured" in text and "assumed" in text and "single-host probe measured no inter-host link" in text
    assert "1.049" in text  # 1 MiB all_reduce in 1 ms over 2 ranks: busbw = 2(2-1)/2 x 2**20 B / 1 ms


@pytest.mark.parametrize("args", [["--ranks", "0"], ["--ranks", "100000"], ["--inter-node-gbps", "-1"],
                                  ["--output", "nodir/x.yaml"], ["--output", "x.txt"], ["--node-rank", "1"],
                                  ["--inter-node-master", "h0"],
                                  ["--inter-node-master", "h0:x", "--node-rank", "0"],
                                  ["--inter-node-master", "h0", "--node-rank", "2"],
                                  ["--inter-node-master", "h0", "--node-rank", "0", "--inter-node-gbps", "10"],
                                  ["--model", "tiny-llama", "--precision", "int8"], ["--model", "no-such-model"],
                                  ["--model", "tiny-llama", "--seq", "0"]])
def test_bad_flags_exit_2_before_measuring(tmp_path, args):
    out = run(*args, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.startswith("error:")


def test_cli_import_does_not_load_torch():
    code = "import sys, ztune.cli, ztune.probe; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=scaled_limit_s(60)).returncode == 0
