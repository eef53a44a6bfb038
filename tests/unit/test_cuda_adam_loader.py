"""The CUDA Adam loader (ztune.runtime.cuda_adam) on a machine without a GPU: the nvcc build into a shared library
and its C ABI as far as it runs without a device, the cache, argument checks, the one-warning fallback and the
fallback's math (torch's fused Adam, which also runs on the CPU). tests/gpu/test_cuda_adam.py runs the kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from ztune.runtime import cuda_adam

HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
NVCC = cuda_adam.find_nvcc()
# CI (.ci/run) installs no CUDA toolkit: there the build can only be checked where nvcc is.
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA kernel can only be built where the "
                                                     "CUDA toolkit is (set ZTUNE_NVCC or CUDA_HOME)")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The library built once by the loader itself into an empty cache (~8 s of CPU for three targets)."""
    ext_dir = tmp_path_factory.mktemp("ext")
    old = os.environ.get("ZTUNE_EXT_DIR")
    os.environ["ZTUNE_EXT_DIR"] = str(ext_dir)
    try:
        lib = cuda_adam._build_library()
    finally:
        if old is None:
            del os.environ["ZTUNE_EXT_DIR"]
        else:
            os.environ["ZTUNE_EXT_DIR"] = old
    return lib, ext_dir


@needs_nvcc
def test_build_gives_a_library_whose_c_abi_answers_without_a_device(built):
    lib, ext_dir = built
    libs = list(ext_dir.glob("cuda-*/ztune_cuda_adam_*.so"))
    assert len(libs) == 1 and not list(ext_dir.glob("cuda-*/*.tmp"))
    # Calls that return before touching CUDA: a bad dtype code (-2) and an empty shard (0).
    args = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, adamw=1, grad_scale=1.0)

    def call(grad_dtype, out_dtype, n):
        return lib.zt_adam_step_cuda(None, None, grad_dtype, None, None, None, out_dtype, n, *args.values(), None)

    assert call(9, 0, 10) == -2  # unknown grad dtype
    assert call(1, 1, 10) == -2  # fp32 is not an `out` dtype
    assert call(2, 2, 0) == 0


@needs_nvcc
def test_build_is_cached_by_source_hash(built, monkeypatch):
    _, ext_dir = built
    monkeypatch.setenv("ZTUNE_EXT_DIR", str(ext_dir))
    real_run = subprocess.run

    def no_compile(argv, *a, **kw):
        assert "--version" in argv, f"a cached build must not run nvcc again: {argv}"
        return real_run(argv, *a, **kw)

    monkeypatch.setattr(cuda_adam.subprocess, "run", no_compile)
    cuda_adam._build_library()
    assert len(list(ext_dir.glob("cuda-*"))) == 1


def test_bad_arguments_are_rejected_on_cpu():
    x = torch.zeros(8)
    kw = dict(step=1, weight_decay=0.0, adamw=True, **HYPER)
    with pytest.raises(ValueError, match="param must be a contiguous CUDA tensor"):
        cuda_adam.adam_step_(x, x, x.clone(), x.clone(), **kw)
    with pytest.raises(ValueError, match="kernel='cutlass'"):
        cuda_adam.adam_step_(x, x, x.clone(), x.clone(), kernel="cutlass", **kw)


def test_unknown_runtime_choice_is_one_clear_error(monkeypatch):
    from ztune.config.schema import OptimizerType
    from ztune.errors import ConfigError
    from ztune.runtime.optim_shard import build_shard_optimizer

    monkeypatch.setenv("ZTUNE_CUDA_ADAM", "fast")
    with pytest.raises(ConfigError, match="ZTUNE_CUDA_ADAM='fast'.*torch.*ztune"):
        build_shard_optimizer([torch.zeros(4)], kind=OptimizerType.ADAMW, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=0.0, momentum=0.0, fused_cpu=False)


@pytest.mark.parametrize("value", ["ztune", "torch", ""])
def test_runtime_choice_leaves_cpu_masters_to_their_optimizer(monkeypatch, value):
    from ztune.config.schema import OptimizerType
    from ztune.runtime.optim_shard import FusedCpuAdam, build_shard_optimizer

    monkeypatch.setenv("ZTUNE_CUDA_ADAM", value)
    kw = dict(kind=OptimizerType.ADAMW, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum=0.0)
    plain = build_shard_optimizer([torch.zeros(4)], fused_cpu=False, **kw)
    assert type(plain) is torch.optim.AdamW and plain.defaults["fused"]
    assert isinstance(build_shard_optimizer([torch.zeros(4)], fused_cpu=True, **kw), FusedCpuAdam)


def _pair(*, n, steps, adamw, weight_decay, grad_dtype, out_dtype, grad_scale=1.0, seed=0):
    """The fallback step against torch.optim.Adam/AdamW(fused=True) on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, generator=gen)
    ref = p0.clone().requires_grad_(True)
    opt = (torch.optim.AdamW if adamw else torch.optim.Adam)([ref], lr=HYPER["lr"],
                                                             betas=(HYPER["beta1"], HYPER["beta2"]),
                                                             eps=HYPER["eps"], weight_decay=weight_decay, fused=True)
    param, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=out_dtype) if out_dtype is not None else None
    for step in range(1, steps + 1):
        grad = (torch.randn(n, generator=gen) * grad_scale).to(grad_dtype)
        kept = grad.clone()
        ref.grad = grad.float() / grad_scale if grad_scale != 1.0 else grad.float()
        opt.step()
        cuda_adam._torch_fused_step(param, grad, m, v, step=step, weight_decay=weight_decay, adamw=adamw,
                                    grad_scale=grad_scale, out=out, **HYPER)
        assert torch.equal(grad, kept), "the gradient must be read only"
    return param, m, v, out, opt.state[ref], ref.detach()


@pytest.mark.parametrize(("adamw", "grad_dtype", "out_dtype", "grad_scale"),
                         [(True, torch.float32, None, 1.0), (False, torch.float32, None, 1.0),
                          (True, torch.bfloat16, torch.bfloat16, 1.0), (True, torch.float32, None, 1024.0)])
def test_fallback_is_torch_fused_adam(adamw, grad_dtype, out_dtype, grad_scale):
    param, m, v, out, state, ref = _pair(n=1007, steps=30, adamw=adamw, weight_decay=0.01, grad_dtype=grad_dtype,
                                         out_dtype=out_dtype, grad_scale=grad_scale)
    # The same op on the same inputs (the scale divides inside the op in both, or before it in the reference:
    # by a power of two, exact either way), so bit for bit.
    assert torch.equal(param, ref)
    assert torch.equal(m, state["exp_avg"]) and torch.equal(v, state["exp_avg_sq"])
    if out is not None:
        assert torch.equal(out, param.to(out_dtype))


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    def broken_build():
        raise RuntimeError("nvcc failed (exit 1): adam.cu(3): error: something")

    monkeypatch.setattr(cuda_adam, "_build_library", broken_build)
    monkeypatch.setattr(cuda_adam._LOADER, "_backend", None)
    monkeypatch.delenv("ZTUNE_DISABLE_CUDA_ADAM", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cuda_adam.kernel_backend() == "torch-fused-fallback"
        assert cuda_adam.kernel_backend() == "torch-fused-fallback"
    ours = [w for w in caught if issubclass(w.category, cuda_adam.CudaAdamFallbackWarning)]
    assert len(ours) == 1 and "adam.cu(3): error" in str(ours[0].message)


def test_disable_env_falls_back_without_warning(monkeypatch):
    monkeypatch.setenv("ZTUNE_DISABLE_CUDA_ADAM", "1")
    monkeypatch.setattr(cuda_adam._LOADER, "_backend", None)
    monkeypatch.setattr(cuda_adam, "_build_library", lambda: pytest.fail("must not build"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", cuda_adam.CudaAdamFallbackWarning)
        assert cuda_adam.kernel_backend() == "torch-fused-fallback"


def test_missing_nvcc_in_fresh_process_falls_back(tmp_path):
    script = textwrap.dedent("""
        import json, warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from ztune.runtime import cuda_adam
            backends = [cuda_adam.kernel_backend(), cuda_adam.kernel_backend()]
        ours = [str(w.message) for w in caught if w.category is cuda_adam.CudaAdamFallbackWarning]
        print(json.dumps({"backends": backends, "warnings": ours}))
    """)
    env = {**os.environ, "ZTUNE_NVCC": str(tmp_path / "no-nvcc"), "ZTUNE_EXT_DIR": str(tmp_path / "ext")}
    env.pop("ZTUNE_DISABLE_CUDA_ADAM", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["backends"] == ["torch-fused-fallback"] * 2
    assert len(report["warnings"]) == 1 and "no-nvcc" in report["warnings"][0], report["warnings"]
