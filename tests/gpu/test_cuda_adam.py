"""ztune's CUDA Adam kernel (csrc/cuda/adam.cu via ztune.runtime.cuda_adam) against torch.optim.Adam/AdamW on the
GPU: accuracy over 100 steps and time on ~100M elements. Skipped without CUDA.

Two references:
- torch's single-tensor path on CUDA (foreach=False, fused=False), whose op order the kernel copies
  (csrc/cpu_adam.h): the CPU kernel tests' tolerances, rtol 1e-6 / atol 1e-7.
- torch.optim.Adam/AdamW(fused=True), what ztune's runtime uses on CUDA by default. Its AdamW decay subtracts
  lr*wd*param, where the single-tensor path multiplies by (1 - lr*wd) rounded to float32 once (Python float to
  float32); that rounding (0.23 ulp at lr=1e-3, wd=0.01) is the same every step, so the parameter drifts by up
  to steps x |float32(1 - lr*wd) - (1 - lr*wd)| relative: 1.4e-6 after 100 steps. The tolerance adds that
  bound to rtol 1e-6 for AdamW with decay; everything else is held to 1e-6.
The timing test asserts nothing about speed: it prints the ratio and the bandwidth achieved and records them as
junit testsuite properties (`cuda_adam.timing.*`), which benchmarks/gpu_check.py puts in its report.
"""

from __future__ import annotations

import json
import os
import statistics
import warnings

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HYPER = {"lr": 1e-3, "beta2": 0.999}
RTOL, ATOL = 1e-6, 1e-7
# Bytes one step moves per element when every array is read and written once: read grad (4 or 2), param,
# exp_avg, exp_avg_sq (12); write them (12) and the 16-bit out (2, with a 16-bit grad). 28 in both cases.
BYTES_PER_ELEMENT = 28
BENCH_NUMEL = int(os.environ.get("ZTUNE_CUDA_ADAM_BENCH_NUMEL", 100_000_000))


@pytest.fixture(scope="module")
def kernel():
    """ztune's kernel, built (or found in the cache) here: a build failure fails the tests, with nvcc's reason."""
    from ztune.runtime import cuda_adam

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cuda_adam.CudaAdamFallbackWarning)
        backend = cuda_adam.kernel_backend()
    assert backend == "cuda", cuda_adam._get_backend().reason
    return cuda_adam


def _decay_drift(*, steps: int, lr: float, weight_decay: float, adamw: bool) -> float:
    if not (adamw and weight_decay):
        return 0.0
    keep = 1.0 - lr * weight_decay
    keep_f32 = torch.tensor(keep, dtype=torch.float32).item()
    return steps * abs(keep_f32 - keep) / keep


def _run(kernel, *, n, steps, adamw, weight_decay, beta1=0.9, eps=1e-8, grad_dtype=torch.float32, out_dtype=None,
         grad_scale=1.0, seed=0):
    """The kernel and both torch references side by side on cuda:0; returns (ours, single, fused), each a dict
    of param / exp_avg / exp_avg_sq (and out for ours)."""
    dev = torch.device("cuda", 0)
    gen = torch.Generator(device=dev).manual_seed(seed)
    p0 = torch.randn(n, generator=gen, device=dev)
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    kw = dict(lr=HYPER["lr"], betas=(beta1, HYPER["beta2"]), eps=eps, weight_decay=weight_decay)
    refs = {name: p0.clone().requires_grad_(True) for name in ("single", "fused")}
    opts = {"single": cls([refs["single"]], foreach=False, fused=False, **kw),
            "fused": cls([refs["fused"]], fused=True, **kw)}
    param, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    out = torch.empty(n, dtype=out_dtype, device=dev) if out_dtype is not None else None
    for step in range(1, steps + 1):
        grad = (torch.randn(n, generator=gen, device=dev) * grad_scale).to(grad_dtype)
        for name, ref in refs.items():
            ref.grad = grad.float() / grad_scale if grad_scale != 1.0 else grad.float()
            opts[name].step()
        kernel.adam_step_(param, grad, m, v, step=step, lr=HYPER["lr"], beta1=beta1, beta2=HYPER["beta2"], eps=eps,
                          weight_decay=weight_decay, adamw=adamw, grad_scale=grad_scale, out=out, kernel="ztune")
    torch.cuda.synchronize()
    ours = {"param": param, "exp_avg": m, "exp_avg_sq": v, "out": out}
    theirs = {name: {"param": ref.detach(), "exp_avg": opts[name].state[ref]["exp_avg"],
                     "exp_avg_sq": opts[name].state[ref]["exp_avg_sq"]} for name, ref in refs.items()}
    return ours, theirs["single"], theirs["fused"]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, 1e-3): relative, except near zero where it is absolute / 1e-3."""
    return float(((a - b).abs() / b.abs().clamp_min(1e-3)).max())


CASES = [  # (adamw, weight_decay, beta1, eps, grad dtype, out dtype)
    (True, 0.01, 0.9, 1e-8, torch.float32, None),
    (False, 0.01, 0.9, 1e-8, torch.float32, None),
    (True, 0.0, 0.9, 1e-8, torch.float32, None),
    (True, 0.1, 0.3, 1e-8, torch.float32, None),  # beta1=0.3: torch's other lerp branch
    (False, 0.1, 0.9, 0.1, torch.float32, None),  # a large eps
    (True, 0.01, 0.9, 1e-8, torch.bfloat16, torch.bfloat16),
    (False, 0.01, 0.9, 1e-8, torch.bfloat16, torch.bfloat16),
    (True, 0.01, 0.9, 1e-8, torch.float16, torch.float16),
]


def _case_id(c) -> str:
    adamw, wd, beta1, eps, g, o = c
    return (f"{'adamw' if adamw else 'adam'}-wd{wd}-b{beta1}-eps{eps}-{str(g).split('.')[-1]}"
            + (f"-out{str(o).split('.')[-1]}" if o is not None else ""))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_torch_100_steps(kernel, case, record_testsuite_property):
    adamw, wd, beta1, eps, grad_dtype, out_dtype = case
    steps = 100
    ours, single, fused = _run(kernel, n=1_000_003, steps=steps, adamw=adamw, weight_decay=wd, beta1=beta1, eps=eps,
                               grad_dtype=grad_dtype, out_dtype=out_dtype)
    record_testsuite_property(f"cuda_adam.accuracy.{_case_id(case)}", json.dumps(
        {"max_rel_param_vs_single": _max_rel(ours["param"], single["param"]),
         "max_rel_param_vs_fused": _max_rel(ours["param"], fused["param"]),
         "max_abs_exp_avg_vs_fused": float((ours["exp_avg"] - fused["exp_avg"]).abs().max())}))
    for key in ("param", "exp_avg"):
        torch.testing.assert_close(ours[key], single[key], rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")
    torch.testing.assert_close(ours["exp_avg_sq"], single["exp_avg_sq"], rtol=RTOL, atol=1e-12)
    drift = _decay_drift(steps=steps, lr=HYPER["lr"], weight_decay=wd, adamw=adamw)
    torch.testing.assert_close(ours["param"], fused["param"], rtol=RTOL + drift, atol=ATOL)
    torch.testing.assert_close(ours["exp_avg"], fused["exp_avg"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours["exp_avg_sq"], fused["exp_avg_sq"], rtol=RTOL, atol=1e-12)
    if out_dtype is not None:
        assert torch.equal(ours["out"], ours["param"].to(out_dtype))


def test_grad_scale_and_a_grid_longer_than_one_launch(kernel):
    # 20M elements > 65,536 blocks x 256 threads: the grid-stride loop covers the rest.
    ours, single, _ = _run(kernel, n=20_000_001, steps=3, adamw=True, weight_decay=0.01, grad_dtype=torch.float16,
                           grad_scale=1024.0, out_dtype=torch.bfloat16)
    torch.testing.assert_close(ours["param"], single["param"], rtol=RTOL, atol=ATOL)
    assert torch.equal(ours["out"], ours["param"].to(torch.bfloat16))


def test_runs_on_the_current_stream(kernel):
    dev = torch.device("cuda", 0)
    n = 1 << 20
    grad = torch.randn(n, device=dev)
    side = torch.cuda.Stream(dev)
    param, m, v = torch.ones(n, device=dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        kernel.adam_step_(param, grad, m, v, step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                          adamw=True)
        done = torch.cuda.Event()
        done.record(side)
    done.synchronize()
    ref = torch.ones(n, device=dev, requires_grad=True)
    opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.0, foreach=False)
    ref.grad = grad
    opt.step()
    torch.testing.assert_close(param, ref.detach(), rtol=RTOL, atol=ATOL)


def test_runtime_optimizer_selects_the_kernel(kernel, monkeypatch):
    """ZTUNE_CUDA_ADAM=ztune: the runtime's shard optimizer steps CUDA masters with the kernel, writing the bf16
    shard itself; the result matches the default (torch's fused) path."""
    from ztune.config.schema import OptimizerType
    from ztune.runtime.optim_shard import FusedCpuAdam, build_shard_optimizer, step_shards

    dev = torch.device("cuda", 0)
    gen = torch.Generator(device=dev).manual_seed(1)
    p0 = torch.randn(100_003, generator=gen, device=dev)
    grads = [torch.randn(p0.numel(), generator=gen, device=dev).bfloat16() for _ in range(5)]
    results = {}
    for choice in ("torch", "ztune"):
        monkeypatch.setenv("ZTUNE_CUDA_ADAM", choice)
        master = p0.clone()
        shard = master.bfloat16()
        opt = build_shard_optimizer([master], kind=OptimizerType.ADAMW, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=0.0, momentum=0.0, fused_cpu=False)
        assert isinstance(opt, FusedCpuAdam) == (choice == "ztune")
        for g in grads:
            step_shards(opt, masters=[master], grads=[g.clone()], param_shards=[shard], grad_divisor=2.0)
        torch.cuda.synchronize()
        assert torch.equal(shard, master.bfloat16())
        results[choice] = master
    # weight_decay=0: no decay drift, so the fp32 tolerance holds against the fused path too.
    torch.testing.assert_close(results["ztune"], results["torch"], rtol=RTOL, atol=ATOL)


def _time_ms(fn, *, warmup: int = 3, reps: int = 20) -> float:
    """Median of `reps` CUDA-event timings of fn() (each one step), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_time_against_torch_fused(kernel, grad_dtype, record_testsuite_property):
    """Not an assertion of speed: one step on BENCH_NUMEL elements, each way, printed and recorded.

    fp32: fp32 grads, no 16-bit copy. bf16: bf16 grads and a bf16 parameter shard to refresh, as the runtime
    steps a bf16 model: ztune reads the bf16 grad and writes the bf16 shard in its one pass; torch upcasts the
    grad, runs AdamW(fused=True) and copies the master into the shard (runtime/optim_shard.py step_shards)."""
    dev = torch.device("cuda", 0)
    n = BENCH_NUMEL
    gen = torch.Generator(device=dev).manual_seed(0)
    grad = torch.randn(n, generator=gen, device=dev).to(grad_dtype)
    low = grad_dtype != torch.float32
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, adamw=True)

    st = {"param": torch.randn(n, generator=gen, device=dev), "m": torch.zeros(n, device=dev),
          "v": torch.zeros(n, device=dev), "out": torch.empty(n, dtype=grad_dtype, device=dev) if low else None,
          "step": 0}

    def ours():
        st["step"] += 1
        kernel.adam_step_(st["param"], grad, st["m"], st["v"], step=st["step"], out=st["out"], kernel="ztune",
                          **hyper)

    ours_ms = _time_ms(ours)
    st.clear()  # frees its 1.2 GB before torch's run allocates its own

    ref = torch.randn(n, generator=gen, device=dev).requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=hyper["lr"], weight_decay=hyper["weight_decay"], fused=True)
    shard = torch.empty(n, dtype=grad_dtype, device=dev) if low else None

    def theirs():
        ref.grad = grad.float() if low else grad
        opt.step()
        if shard is not None:
            shard.copy_(ref.detach())

    torch_ms = _time_ms(theirs)
    result = {"numel": n, "grad_dtype": str(grad_dtype).split(".")[-1], "ztune_ms": ours_ms, "torch_fused_ms": torch_ms,
              "torch_over_ztune": torch_ms / ours_ms, "bytes_per_element": BYTES_PER_ELEMENT,
              "ztune_gbps": BYTES_PER_ELEMENT * n / (ours_ms * 1e-3) / 1e9,
              "torch_fused_gbps": BYTES_PER_ELEMENT * n / (torch_ms * 1e-3) / 1e9,
              "device": torch.cuda.get_device_name(dev)}
    record_testsuite_property(f"cuda_adam.timing.{result['grad_dtype']}", json.dumps(result))
    print(f"\ncuda adam {result['grad_dtype']} grads, {n:,} elements: ztune {ours_ms:.3f} ms "
          f"({result['ztune_gbps']:.0f} GB/s), torch fused {torch_ms:.3f} ms ({result['torch_fused_gbps']:.0f} GB/s "
          f"at {BYTES_PER_ELEMENT} B/element); torch/ztune = {result['torch_over_ztune']:.2f}")
    assert ours_ms > 0 and torch_ms > 0
