"""ztune.probe without measuring: the alpha-beta fit, NVML absent or present, and the profile round trip."""

import dataclasses
import math
import random
from pathlib import Path

import pytest

from ztune import probe
from ztune.profiles import load_hardware
from ztune.specs import Hardware


def _ring_times(sizes, *, n, alpha_s, busbw):
    return [2 * (n - 1) * alpha_s + 2 * (n - 1) / n * s / busbw for s in sizes]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_alpha_beta_fit_recovers_exact_parameters(n):
    sizes = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
    times = _ring_times(sizes, n=n, alpha_s=40e-6, busbw=1.5e9)
    fit = probe.fit_alpha_beta(sizes, times, world_size=n)
    assert fit.latency_from == "fit"
    assert fit.latency_s == pytest.approx(40e-6, rel=1e-9)
    assert fit.busbw_bytes_per_s == pytest.approx(1.5e9, rel=1e-9)


def test_alpha_beta_fit_tolerates_noise():
    rng = random.Random(0)
    sizes = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
    times = [t * (1 + rng.uniform(-0.03, 0.03)) for t in _ring_times(sizes, n=2, alpha_s=50e-6, busbw=2e9)]
    fit = probe.fit_alpha_beta(sizes, times, world_size=2)
    # Relative weighting keeps the intercept: an unweighted fit is dominated by the 64 MiB point's noise
    # (3% of 64 ms = 2 ms, 20x the latency term).
    assert fit.latency_s == pytest.approx(50e-6, rel=0.15)
    assert fit.busbw_bytes_per_s == pytest.approx(2e9, rel=0.05)


def test_alpha_beta_fit_takes_busbw_from_the_largest_message_on_a_bursty_link():
    # A token-bucket link (tc-tbf): the first 256 KiB of a message pass at 10x the sustained rate. The bulk of a
    # step's bytes travel in large messages, so the profile must hold the sustained rate, not a line through
    # every size (which the small, burst-fast messages pull up: to 143 MB/s here).
    sustained, burst = 120e6, 256 << 10
    sizes = [4 << 10, 64 << 10, 1 << 20, 8 << 20, 64 << 20]
    times = [0.6e-3 + min(s, burst) / (10 * sustained) + max(s - burst, 0) / sustained for s in sizes]
    fit = probe.fit_alpha_beta(sizes, times, world_size=2)
    assert fit.busbw_bytes_per_s == pytest.approx(sustained, rel=0.02)
    assert fit.latency_from == "fit" and 0 < fit.latency_s < 1e-3


def test_quick_and_full_probe_measure_the_link_up_to_a_gradient_buckets_size():
    for quick in (True, False):
        plan = probe.plan_for(quick=quick, on_gpu=False)
        assert max(plan.link_sizes) >= 64 << 20 and min(plan.link_sizes) <= 4 << 10


def test_alpha_beta_fit_falls_back_when_intercept_is_not_positive():
    # Bandwidth-bound only (t proportional to size, minus a little): the intercept comes out <= 0.
    sizes = [1 << 20, 4 << 20, 16 << 20]
    times = [s / 1e9 - 1e-6 for s in sizes]
    fit = probe.fit_alpha_beta(sizes, times, world_size=2)
    assert fit.latency_from == "smallest message"
    assert fit.latency_s == pytest.approx(times[0] / 2)
    assert fit.busbw_bytes_per_s > 0


@pytest.mark.parametrize("sizes, times, n", [([1, 2], [1.0, 2.0], 1), ([8], [1.0], 2), ([8, 8], [1.0, 2.0], 2),
                                             ([1, 2], [0.0, 1.0], 2)])
def test_alpha_beta_fit_rejects_degenerate_input(sizes, times, n):
    with pytest.raises(ValueError):
        probe.fit_alpha_beta(sizes, times, world_size=n)


class _FakeNvml:
    """Stands in for pynvml: NVMLError hierarchy, init that may fail, two GPUs."""

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    def __init__(self, *, fail_init=False):
        self.fail_init, self.shutdown_calls = fail_init, 0

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3" if handle == 0 else "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Mem", (), {"total": 85_520_809_984})()


def test_missing_nvml_library_means_no_gpu_not_a_crash():
    scan = probe.read_gpus(nvml=_FakeNvml(fail_init=True))
    assert scan.gpus == () and "no NVIDIA GPU/driver found" in scan.status


def test_real_pynvml_never_raises():
    scan = probe.read_gpus()  # this machine has no driver: NVMLError_LibraryNotFound inside
    assert isinstance(scan.status, str) and scan.status
    assert all(g.memory_bytes > 0 for g in scan.gpus)


def test_nvml_gpus_are_read_and_nvml_shut_down():
    fake = _FakeNvml()
    scan = probe.read_gpus(nvml=fake)
    assert [g.index for g in scan.gpus] == [0, 1]
    assert {g.name for g in scan.gpus} == {"NVIDIA H100 80GB HBM3"}
    assert scan.gpus[0].memory_bytes == 85_520_809_984 and fake.shutdown_calls == 1


def _measurements(*, gpu: bool, ranks: int = 2, collective: bool = True):
    host = probe.HostInfo("box-1", 16, 128 << 30)
    gpus = probe.GpuScan(tuple(probe.GpuInfo(i, "GPU-X", 80 << 30) for i in range(ranks)) if gpu else (), "x")
    memory = probe.MemoryBandwidth(copy_bytes_per_s=20e9, triad_bytes_per_s=24e9, threads=16)
    flops = probe.FlopRates(50e12 if gpu else 2e11, 700e12 if gpu else 1e12, "cuda:0" if gpu else "cpu", 1024)
    coll = None
    if collective:
        sizes = (4096, 1 << 20, 64 << 20)
        fit = probe.fit_alpha_beta(sizes, _ring_times(sizes, n=ranks, alpha_s=1e-5, busbw=3e9), world_size=ranks)
        coll = probe.CollectiveResult("nccl" if gpu else "gloo", ranks, sizes, (1.0, 2.0, 3.0), fit)
    hd = probe.HostDeviceBandwidth(25e9, 20e9) if gpu else None
    return probe.Measurements(host, gpus, ranks, memory, flops, coll, hd)


@pytest.mark.parametrize("gpu, ranks, collective", [(False, 2, True), (True, 8, True), (True, 1, False),
                                                    (False, 1, False)])
def test_profile_round_trips_through_yaml_and_load_hardware(tmp_path, gpu, ranks, collective):
    m = _measurements(gpu=gpu, ranks=ranks, collective=collective)
    hw = probe.build_profile(m, inter_node_gbps=3200.0)
    notes = probe.field_notes(m, inter_node_gbps=3200.0)
    path = tmp_path / "probed.yaml"
    path.write_text(probe.to_yaml(hw, notes))
    loaded = load_hardware(str(path))
    for field in dataclasses.fields(Hardware):
        want, got = getattr(hw, field.name), getattr(loaded, field.name)
        if isinstance(want, float):
            assert math.isclose(got, want, rel_tol=1e-4), field.name  # 5 significant digits in the file
        else:
            assert got == want, field.name
    # Every numeric field says where it came from.
    numeric = [f.name for f in dataclasses.fields(Hardware) if f.name not in ("name", "source")]
    assert set(numeric) <= set(notes)
    assert all(n.split(":")[0] in ("measured", "read", "assumed") for n in notes.values())


def test_profile_values_follow_the_measurements():
    cpu = probe.build_profile(_measurements(gpu=False))
    assert cpu.gpus_per_node == 2
    assert cpu.gpu_memory_bytes == ((128 << 30) - probe.CPU_RESERVED_BYTES) // 2
    assert cpu.intra_node_bw_bytes_per_s == pytest.approx(3e9)
    assert cpu.intra_node_latency_s == pytest.approx(1e-5)
    assert cpu.host_memory_bw_bytes_per_s == 24e9  # the better of copy and triad
    assert cpu.host_device_bw_bytes_per_s == pytest.approx(20e9 / 2 / 2)  # bytes copied/s, per rank
    gpu = probe.build_profile(_measurements(gpu=True, ranks=8), inter_node_gbps=3200.0)
    assert gpu.gpu_memory_bytes == 80 << 30 and gpu.peak_flops_bf16 == 700e12
    assert gpu.host_device_bw_bytes_per_s == 20e9  # slower direction
    # 8 x 400 Gb/s NICs shared by 8 GPUs at 90%: the 45 GB/s of dgx-h100.yaml, with IB latency.
    assert gpu.inter_node_bw_bytes_per_s == pytest.approx(45e9)
    assert gpu.inter_node_latency_s == probe.INFINIBAND_LATENCY_S


def test_default_inter_node_link_is_stated_and_assumed():
    m = _measurements(gpu=False)
    hw = probe.build_profile(m)
    assert hw.inter_node_bw_bytes_per_s == pytest.approx(probe.DEFAULT_INTER_NODE_GBPS * 1e9 / 8 * 0.9 / 2)
    notes = probe.field_notes(m)
    assert notes["inter_node_bw_bytes_per_s"].startswith("assumed:") and "--inter-node-gbps" in notes[
        "inter_node_bw_bytes_per_s"]


def test_matmul_size_follows_the_cube_of_the_time_and_stays_in_bounds():
    # 256^2 took 10 ms: 8x the time (80 ms) buys 2x the size.
    assert probe._matmul_size(first_s=0.01, first_size=256, limit=4096, max_product_s=0.08) == 512
    assert probe._matmul_size(first_s=0.01, first_size=256, limit=384, max_product_s=0.08) == 384  # the size asked
    assert probe._matmul_size(first_s=100.0, first_size=256, limit=4096, max_product_s=0.25) == 64  # the floor
    assert probe._matmul_size(first_s=0.01, first_size=256, limit=4096, max_product_s=math.inf) == 4096


def test_slow_matmuls_are_measured_at_a_smaller_size():
    # A CPU without bf16 units multiplies bf16 ~40x slower than fp32: `--quick` once spent 40 s on it.
    capped = probe.measure_matmul_flops(device="cpu", matrix_size=512, repeats=1, max_product_s=1e-9)
    assert (capped.size_for("fp32"), capped.size_for("bf16"), capped.matrix_size) == (64, 64, 512)
    assert capped.fp32_flops_per_s > 0 and capped.bf16_flops_per_s > 0
    plain = probe.measure_matmul_flops(device="cpu", matrix_size=128, repeats=1)
    assert (plain.fp32_size, plain.bf16_size, plain.size_for("bf16")) == (None, None, 128)
    notes = probe.field_notes(dataclasses.replace(_measurements(gpu=False), flops=capped))
    assert "bf16 64^2 matmul" in notes["peak_flops_bf16"] and "fp32 64^2" in notes["peak_flops_fp32"]


def test_autotune_cpu_compute_comes_from_a_measured_matmul():
    # `ztune autotune` on a CPU profile ranks with this host's measured matmul rate, not the profile's guess.
    from ztune.config.schema import BatchConfig, TrainConfig
    from ztune.cost.estimate import estimate
    from ztune.profiles import load_model

    cpu = load_hardware("cpu-local")
    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return probe.FlopRates(50e9, 20e9, "cpu", kwargs["matrix_size"])

    measured, got = probe.with_measured_cpu_compute(cpu, threads=1, measure=fake)
    assert got.train_flops_efficiency is None
    assert (measured.peak_flops_fp32, measured.peak_flops_bf16) == (50e9, 20e9)
    assert dataclasses.replace(measured, peak_flops_fp32=cpu.peak_flops_fp32,
                               peak_flops_bf16=cpu.peak_flops_bf16) == cpu
    assert seen == {"device": "cpu", "matrix_size": 1024, "repeats": 3, "threads": 1, "max_product_s": 0.25}
    cfg = TrainConfig(batch=BatchConfig(micro=2, global_=8), seq_len=64)
    slow, fast = (estimate(load_model("tiny-gpt"), hw, cfg, num_nodes=1) for hw in (measured, cpu))
    assert slow.step.compute_s == pytest.approx(fast.step.compute_s * cpu.peak_flops_bf16 / 20e9)


    # With the workload: its timed training rate over the matmul rate becomes the achieved fraction.
    trained, got = probe.with_measured_cpu_compute(cpu, threads=1, measure=fake, model=load_model("tiny-gpt"),
                                                   seq_len=64, micro_batch=2, measure_train=lambda *a, **k: 40e9)
    assert got.train_flops_efficiency == trained.train_flops_efficiency == pytest.approx(0.8)
    assert dataclasses.replace(trained, train_flops_efficiency=0.0) == measured


def test_measured_cpu_compute_is_a_real_rate():
    from ztune.cost.compute import model_flops_per_token
    from ztune.profiles import load_model
    from ztune.specs import count_params

    spec = load_model("tiny-llama")
    small = lambda **k: probe.measure_matmul_flops(**{**k, "matrix_size": 256, "repeats": 1})  # noqa: E731
    measured, got = probe.with_measured_cpu_compute(load_hardware("cpu-local"), threads=1, model=spec, seq_len=32,
                                                    micro_batch=1, measure=small)
    assert measured.peak_flops_fp32 == got.rates.fp32_flops_per_s > 1e8  # any CPU core of this decade
    assert 0 < measured.train_flops_efficiency == got.train_flops_efficiency <= 1
    per_token = model_flops_per_token(active_params=count_params(spec).active_per_token, num_layers=spec.num_layers,
                                      attention_width=spec.num_heads * spec.head_size, seq_len=32)
    assert got.train_flops_per_s > 0 and per_token > 0


def test_measured_workload_sets_train_flops_efficiency():
    # probe --model: the workload's rate per rank over the matmul rate of its dtype (bf16 here: 1e12 FLOP/s)
    from ztune.probe_workload import WorkloadRate

    m = _measurements(gpu=False)
    assert probe.build_profile(m).train_flops_efficiency == 0.0  # not measured: the generic default applies
    w = WorkloadRate("tiny-llama", 2, 128, 1, "bf16", 1, step_s=0.5, flops_per_s=4e10)
    hw = probe.build_profile(dataclasses.replace(m, workload=w))
    assert hw.train_flops_efficiency == pytest.approx(0.04)
    assert hw.peak_flops_bf16 * hw.train_flops_efficiency == pytest.approx(4e10)  # the measured rate, exactly
    assert probe.field_notes(dataclasses.replace(m, workload=w))["train_flops_efficiency"].startswith("measured:")
    fast = dataclasses.replace(w, dtype="fp32", flops_per_s=5e11)  # above the fp32 matmul rate: capped at 1
    assert probe.build_profile(dataclasses.replace(m, workload=fast)).train_flops_efficiency == 1.0


def test_measured_optimizer_rate_goes_into_the_profile_and_round_trips(tmp_path):
    from ztune.probe_workload import WorkloadRate

    m = _measurements(gpu=False)
    assert probe.build_profile(m).optimizer_step_elements_per_s == 0.0  # not measured: not charged
    assert probe.field_notes(m)["optimizer_step_elements_per_s"].startswith("assumed: 0 = unknown")
    w = WorkloadRate("tiny-llama", 2, 128, 1, "bf16", 1, step_s=0.5, flops_per_s=4e10,
                     optimizer_elements_per_s=1.5e8)
    with_w = dataclasses.replace(m, workload=w)
    hw, notes = probe.build_profile(with_w), probe.field_notes(with_w)
    assert hw.optimizer_step_elements_per_s == 1.5e8
    assert notes["optimizer_step_elements_per_s"].startswith("measured: gradient norm + AdamW")
    assert hw.onebit_step_elements_per_s == 0.0 and notes["onebit_step_elements_per_s"].startswith("assumed: 0")
    w1 = dataclasses.replace(w, onebit_elements_per_s=4e7)
    hw1 = probe.build_profile(dataclasses.replace(m, workload=w1))
    assert hw1.onebit_step_elements_per_s == 4e7
    assert probe.field_notes(dataclasses.replace(m, workload=w1))["onebit_step_elements_per_s"].startswith("measured:")
    path = tmp_path / "p.yaml"
    path.write_text(probe.to_yaml(hw, notes))
    assert load_hardware(str(path)).optimizer_step_elements_per_s == pytest.approx(1.5e8, rel=1e-4)
    path.write_text(probe.to_yaml(dataclasses.replace(hw, optimizer_step_elements_per_s=-1.0)))
    from ztune.errors import UserError

    with pytest.raises(UserError, match="optimizer_step_elements_per_s must be >= 0"):
        load_hardware(str(path))


def test_time_optimizer_step_runs_the_runtime_step():
    """A real timing of the runtime's step (norm + step_shards) on a small shard; the shard it steps changes."""
    import torch

    from ztune import probe_workload
    from ztune.runtime import optim_shard

    calls = []
    real = optim_shard.step_shards

    def spy(optimizer, **kw):
        before = kw["masters"][0].clone()
        real(optimizer, **kw)
        calls.append((type(optimizer).__name__, kw["grads"][0].dtype, kw["param_shards"][0].dtype,
                      bool((kw["masters"][0] != before).any())))

    optim_shard.step_shards = spy
    try:
        times = probe_workload.time_optimizer_step(numel=4096, dtype="bf16", repeats=3)
    finally:
        optim_shard.step_shards = real
    assert len(times) == 3 and all(t > 0 for t in times)
    assert len(calls) == 4  # one untimed step first
    assert all(c[1] == c[2] == torch.bfloat16 and c[3] for c in calls)
    assert all("AdamW" in c[0] for c in calls)



def test_time_onebit_step_runs_the_runtime_update_in_order(monkeypatch):
    """1-bit Adam's probe update is the runtime's own compression-stage step (OneBitAdam.step through step_shards,
    as runtime/engine.py runs it after the freeze): momentum_, then adam_update_ with the frozen-variance mask in
    its pass, no separate mask_unfrozen_ pass and no exchange; it moves the masters."""
    import torch

    from ztune import probe_workload
    from ztune.runtime import onebit_adam, optim_shard

    calls, compressing, masters = [], [], []
    for name in ("momentum_", "local_momentum_", "mask_unfrozen_", "adam_update_", "bounded_update_"):
        real = getattr(onebit_adam, name)

        def spy(*a, _r=real, _n=name, **k):
            calls.append((_n, k.get("mask_zero_variance")))
            return _r(*a, **k)
        monkeypatch.setattr(onebit_adam, name, spy)
    real_step = onebit_adam.OneBitAdam.step

    def step(self, closure=None):
        compressing.append(self.compressing)
        masters.append(self.param_groups[0]["params"][0].clone())
        return real_step(self, closure)
    monkeypatch.setattr(onebit_adam.OneBitAdam, "step", step)
    monkeypatch.setattr(onebit_adam.OneBitAdam, "exchange_momentum_",
                        lambda *a, **k: pytest.fail("the probe's update must leave the exchange out"))
    shards = []
    real_shards = optim_shard.step_shards
    monkeypatch.setattr(optim_shard, "step_shards", lambda opt, **k: (shards.append(type(opt).__name__),
                                                                      real_shards(opt, **k))[1])
    times = probe_workload.time_onebit_step(numel=4096, dtype="bf16", repeats=2)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert shards[0] != "OneBitAdam" and shards[1:] == ["OneBitAdam"] * 3  # the warm-up's AdamW, then 1 + 2
    assert compressing == [True] * 3
    assert calls == [("momentum_", None), ("adam_update_", True)] * 3
    assert not torch.equal(masters[0], masters[-1])


@pytest.mark.dist
def test_workload_probe_measures_the_optimizer_rate_on_all_ranks():
    """measure_workload_rate on 2 spawned ranks of a tiny Llama: a positive optimizer rate, the slowest rank's."""
    from ztune.probe_workload import measure_workload_rate
    from ztune.specs import Architecture, ModelSpec

    spec = ModelSpec(name="probe-test-llama", architecture=Architecture.LLAMA, vocab_size=128, hidden_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=64)
    w = measure_workload_rate(spec, ranks=2, seq_len=16, micro_batch=1, dtype="bf16", threads=1, repeats=2,
                              codec=False, timeout_s=300)
    assert w.flops_per_s > 0 and 0 < w.optimizer_elements_per_s < 1e12
    assert 0 < w.onebit_elements_per_s < 1e12
    assert w.codec_rates == {}
    # the runtime itself at each stage (time_engine_stages): stage 3 gathers each unit into a fresh buffer and
    # copies every gradient into a bucket, work that plain forward + backward does not do
    runtime = w.runtime_micro_cpu_s_per_param + w.runtime_accum_cpu_s_per_param + w.runtime_step_cpu_s_per_param
    assert len(runtime) == 12 and all(v >= 0 for v in runtime)
    assert w.runtime_micro_cpu_s_per_param[3] > 0


def test_codec_rates_measured_go_into_the_profile_and_round_trip(tmp_path):
    """ztune/probe_codec.py times the runtime's own codecs; build_profile writes them; the YAML loads back."""
    from ztune.cost.codec import RATE_FIELDS
    from ztune.probe_codec import measure_codec_rates, slowest

    rates = measure_codec_rates(threads=1, bucket_numel=8192, unit_numel=4096, repeats=1)
    assert set(rates) == set(RATE_FIELDS) and all(r > 0 for r in rates.values())
    assert slowest([rates, {k: v / 2 for k, v in rates.items()}]) == {k: v / 2 for k, v in rates.items()}
    m = dataclasses.replace(_measurements(gpu=False), codec=rates, codec_note="the runtime's codec, test")
    hw = probe.build_profile(m)
    assert all(getattr(hw, k) == rates[k] for k in RATE_FIELDS)
    notes = probe.field_notes(m)
    assert all(notes[k].startswith("measured: the runtime's codec") for k in RATE_FIELDS)
    path = tmp_path / "p.yaml"
    path.write_text(probe.to_yaml(hw, notes))
    loaded = load_hardware(str(path))
    assert all(getattr(loaded, k) == pytest.approx(rates[k], rel=1e-4) for k in RATE_FIELDS)
    # A GPU probe measures none: 0 = unknown, and the provenance says so; the long field names still parse.
    gpu = _measurements(gpu=True)
    assert probe.build_profile(gpu).codec_int8_encode_elements_per_s == 0
    assert probe.field_notes(gpu)["codec_int8_encode_elements_per_s"].startswith("assumed: 0 = unknown")
    path.write_text(probe.to_yaml(probe.build_profile(gpu), probe.field_notes(gpu)))
    assert load_hardware(str(path)).codec_qgz_decode_elements_per_s == 0


def test_negative_codec_rate_is_rejected(tmp_path):
    from ztune.errors import UserError

    text = (Path(__file__).resolve().parents[2] / "profiles/hardware/cpu-local.yaml").read_text()
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("codec_qgz_decode_elements_per_s: 718.0e+6", "codec_qgz_decode_elements_per_s: -1"))
    with pytest.raises(UserError, match="codec_qgz_decode_elements_per_s must be >= 0"):
        load_hardware(str(path))
