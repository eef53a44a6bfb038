"""The fused CPU Adam kernel (csrc/cpu_adam.cpp via ztune.runtime.ops) against torch.optim, on every SIMD path
this CPU has, plus its pure-torch fallback and the CUDA twin's compile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from importlib import resources
from pathlib import Path

import pytest
import torch

from ztune.errors import UserError
from ztune.runtime import ops

SIMD_PATHS = ops.available_simd()
HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
# torch's x86 float32 sqrt (MKL VML) is not correctly rounded and the kernel's is, so parameters agree to about
# one ulp per step rather than bit for bit; atol covers elements near zero (1 ulp of a unit-scale value).
RTOL, ATOL = 1e-6, 1e-7


def _compiler_present() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture(scope="module")
def cpp_backend() -> None:
    if not _compiler_present():
        pytest.skip("no C++ compiler: only the torch fallback can run here")
    assert ops.kernel_backend() == "cpp", ops._get_backend().reason


def _run_pair(*, n, steps, adamw, weight_decay, simd, grad_dtype=torch.float32, out_dtype=None, beta1=0.9,
              grad_scale=1.0, eps=1e-8, seed=0):
    """Run the kernel and torch.optim side by side; return (param, exp_avg, exp_avg_sq, out, torch_opt, ref)."""
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, generator=gen)
    ref = p0.clone().requires_grad_(True)
    opt_cls = torch.optim.AdamW if adamw else torch.optim.Adam
    opt = opt_cls([ref], lr=HYPER["lr"], betas=(beta1, HYPER["beta2"]), eps=eps,
                  weight_decay=weight_decay, foreach=False)
    param, exp_avg, exp_avg_sq = p0.clone(), torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=out_dtype) if out_dtype is not None else None
    for step in range(1, steps + 1):
        grad = (torch.randn(n, generator=gen) * grad_scale).to(grad_dtype)
        ref.grad = grad.float() / grad_scale if grad_scale != 1.0 else grad.float()
        opt.step()
        ops.adam_step_(param, grad, exp_avg, exp_avg_sq, step=step, lr=HYPER["lr"], beta1=beta1,
                       beta2=HYPER["beta2"], eps=eps, weight_decay=weight_decay, adamw=adamw,
                       grad_scale=grad_scale, out=out, simd=simd)
    return param, exp_avg, exp_avg_sq, out, opt, ref


@pytest.mark.parametrize("simd", SIMD_PATHS)
@pytest.mark.parametrize(("adamw", "weight_decay", "beta1", "eps"),
                         [(True, 0.01, 0.9, 1e-8), (False, 0.01, 0.9, 1e-8), (True, 0.0, 0.9, 1e-8),
                          (True, 0.1, 0.3, 1e-8), (False, 0.1, 0.9, 0.1)])
def test_matches_torch_fp32_grads_100_steps(cpp_backend, simd, adamw, weight_decay, beta1, eps):
    # beta1=0.3 takes the other branch of torch's lerp (weight 0.7 >= 0.5); eps=0.1 makes eps's handling visible.
    param, exp_avg, exp_avg_sq, _, opt, ref = _run_pair(n=1007, steps=100, adamw=adamw, eps=eps,
                                                        weight_decay=weight_decay, simd=simd, beta1=beta1)
    state = opt.state[ref]
    torch.testing.assert_close(param, ref.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("simd", SIMD_PATHS)
@pytest.mark.parametrize(("grad_dtype", "out_dtype"), [(torch.bfloat16, torch.bfloat16),
                                                       (torch.float16, torch.float16),
                                                       (torch.float32, torch.bfloat16),
                                                       (torch.bfloat16, torch.float16)])
def test_low_precision_grads_and_rounded_output(cpp_backend, simd, grad_dtype, out_dtype):
    param, _, _, out, _, ref = _run_pair(n=1007, steps=20, adamw=True, weight_decay=0.01, simd=simd,
                                         grad_dtype=grad_dtype, out_dtype=out_dtype)
    torch.testing.assert_close(param, ref.detach(), rtol=RTOL, atol=ATOL)
    assert torch.equal(out, param.to(out_dtype))


@pytest.mark.parametrize("simd", SIMD_PATHS)
@pytest.mark.parametrize("n", [0, 1, 7, 15, 16, 17, 31, 33, 65, 130])
def test_tiny_and_odd_lengths(cpp_backend, simd, n):
    param, exp_avg, _, out, opt, ref = _run_pair(n=n, steps=5, adamw=False, weight_decay=0.1, simd=simd,
                                                 grad_dtype=torch.bfloat16, out_dtype=torch.bfloat16)
    torch.testing.assert_close(param, ref.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(exp_avg, opt.state[ref]["exp_avg"], rtol=RTOL, atol=ATOL)
    assert torch.equal(out, param.to(torch.bfloat16))


@pytest.mark.parametrize("simd", SIMD_PATHS)
def test_grad_scale_unscales_fp16_grads(cpp_backend, simd):
    param, _, _, _, _, ref = _run_pair(n=515, steps=10, adamw=True, weight_decay=0.01, simd=simd,
                                       grad_dtype=torch.float16, grad_scale=1024.0)
    torch.testing.assert_close(param, ref.detach(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("simd", SIMD_PATHS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_rounding_of_special_values(cpp_backend, simd, out_dtype):
    # lr=0 and zero grads leave param unchanged, so `out` is exactly the rounding of these values.
    info = torch.finfo(out_dtype)
    values = [1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-9, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65519.0, 65520.0,
              1e6, -1e30, info.tiny, info.tiny * 0.75, 2**-24, 2**-25, 1.5 * 2**-25, 3 * 2**-26, 1e-40,
              float("inf"), float("-inf"), float("nan"), 0.0]
    param = torch.tensor(values * 3, dtype=torch.float32)  # 66 elements: vector body and scalar tail
    expected = param.to(out_dtype)
    zeros = torch.zeros_like(param)
    out = torch.empty_like(param, dtype=out_dtype)
    ops.adam_step_(param, zeros, zeros.clone(), zeros.clone(), step=1, lr=0.0, beta1=0.9, beta2=0.999,
                   eps=1e-8, weight_decay=0.0, adamw=True, out=out, simd=simd)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan], expected[~nan])


def test_threads_split_the_shard_without_gaps(cpp_backend):
    n = 300_007
    gen = torch.Generator().manual_seed(3)
    p0, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen).bfloat16()
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            param, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
            ops.adam_step_(param, grad, m, v, step=1, weight_decay=0.01, adamw=True, **HYPER)
            results.append(param)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert not torch.equal(results[0], p0)


def test_available_simd_agrees_with_cpuid(cpp_backend):
    assert SIMD_PATHS[-1] == "portable"
    lib = ops._get_backend().lib
    for name, code in ops._SIMD_CODES.items():
        assert bool(lib.zt_cpu_supports(code)) == (name in SIMD_PATHS), name


def test_bad_arguments_are_rejected():
    x = torch.zeros(8)
    kw = dict(step=1, weight_decay=0.0, adamw=True, **HYPER)
    with pytest.raises(UserError, match="simd='avx9'"):
        ops.adam_step_(x, x, x.clone(), x.clone(), simd="avx9", **kw)
    with pytest.raises(ValueError, match="elements"):
        ops.adam_step_(x, torch.zeros(7), x.clone(), x.clone(), **kw)
    with pytest.raises(TypeError, match="exp_avg must be float32"):
        ops.adam_step_(x, x, x.half(), x.clone(), **kw)
    with pytest.raises(TypeError, match="out must be"):
        ops.adam_step_(x, x, x.clone(), x.clone(), out=x.clone(), **kw)
    with pytest.raises(ValueError, match="step must be"):
        ops.adam_step_(x, x, x.clone(), x.clone(), **{**kw, "step": 0})


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    def broken_build():
        raise RuntimeError("Error building extension 'ztune_cpu_adam': c++: not found")

    monkeypatch.setattr(ops, "_build_library", broken_build)
    monkeypatch.setattr(ops._LOADER, "_backend", None)
    monkeypatch.delenv("ZTUNE_DISABLE_CPP_ADAM", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops.kernel_backend() == "torch-fallback"
        param, exp_avg, exp_avg_sq, out, opt, ref = _run_pair(n=1007, steps=30, adamw=False, weight_decay=0.01,
                                                              simd=None, grad_dtype=torch.bfloat16,
                                                              out_dtype=torch.bfloat16)
    ours = [w for w in caught if issubclass(w.category, ops.CppAdamFallbackWarning)]
    assert len(ours) == 1 and "c++: not found" in str(ours[0].message)
    # The fallback is torch's own op sequence, so it matches torch.optim bit for bit.
    assert torch.equal(param, ref.detach())
    assert torch.equal(exp_avg_sq, opt.state[ref]["exp_avg_sq"])
    assert torch.equal(out, param.bfloat16())


def test_disable_env_forces_fallback_without_warning(monkeypatch):
    monkeypatch.setenv("ZTUNE_DISABLE_CPP_ADAM", "1")
    monkeypatch.setattr(ops._LOADER, "_backend", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ops.CppAdamFallbackWarning)
        assert ops.kernel_backend() == "torch-fallback"
        param, _, _, _, _, ref = _run_pair(n=100, steps=3, adamw=True, weight_decay=0.01, simd=None)
    assert torch.equal(param, ref.detach())


def test_missing_compiler_in_fresh_process_falls_back(tmp_path):
    # A real failed build: no compiler, empty cache. The child reports what it saw as JSON.
    script = textwrap.dedent("""
        import json, warnings, torch
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from ztune.runtime import ops
            p, m, v = torch.ones(64), torch.zeros(64), torch.zeros(64)
            for step in (1, 2):
                ops.adam_step_(p, torch.full((64,), 0.5), m, v, step=step, lr=0.1, beta1=0.9, beta2=0.999,
                               eps=1e-8, weight_decay=0.0, adamw=True)
            backend = ops.kernel_backend()
        ref = torch.ones(64, requires_grad=True)
        opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.0)
        for _ in range(2):
            ref.grad = torch.full((64,), 0.5)
            opt.step()
        ours = [str(w.message) for w in caught if w.category is ops.CppAdamFallbackWarning]
        print(json.dumps({"backend": backend, "warnings": ours, "equal": torch.equal(p, ref.detach())}))
    """)
    env = {**os.environ, "CXX": "/nonexistent/c++", "ZTUNE_EXT_DIR": str(tmp_path / "ext")}
    env.pop("ZTUNE_DISABLE_CPP_ADAM", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["backend"] == "torch-fallback"
    assert len(report["warnings"]) == 1, report["warnings"]
    assert report["equal"]


def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists()
                                    else None)
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA kernel can only be compile-checked where the CUDA toolkit is")
    source = resources.files("ztune.csrc") / "cuda" / "adam.cu"
    obj = tmp_path / "adam.o"
    proc = subprocess.run([nvcc, "-c", "-O3", "-std=c++17", str(source), "-o", str(obj)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert obj.stat().st_size > 0
