"""The C++ kernel of 1-bit Adam's compression-stage update (csrc/onebit_adam.cpp via
ztune.runtime.onebit_kernels) against the torch ops it replaces, bit for bit: the momentum (lerp_), the
frozen-variance mask (masked_fill_), both updates (adam_update_, bounded_update_) with weight decay and bias
correction on and off, whole OneBitAdam steps on one rank, on the AVX-512, AVX2 and baseline instances; inputs
of odd sizes and vector tails, exact zeros, huge and tiny values, inf and NaN (which the kernel leaves to
torch); torch's DEFAULT (no FMA) and AVX2 kernels in a subprocess; and the fallback when the build fails or
ZTUNE_DISABLE_CPP_ONEBIT_ADAM is set."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ztune.runtime import onebit_adam, onebit_kernels
from ztune.runtime.comm import Comm
from ztune.runtime.kernel_loader import Backend
from ztune.runtime.onebit_adam import (
    OneBitAdam,
    adam_update_,
    bounded_update_,
    local_momentum_,
    mask_unfrozen_,
    momentum_,
)

REPO = Path(__file__).resolve().parents[2]
# 1, vector tails of 8 / 16 lanes (and torch's 2-vector unroll), the kernel's 1,024-element check blocks
SIZES = [1, 2, 15, 16, 17, 31, 33, 1023, 1025, 5 * 1024 + 3]


ISA_CAPS = {"avx512": 2, "avx2": 1, "baseline": 0}


@pytest.fixture(scope="module", params=list(ISA_CAPS))
def isa(request):
    """Runs each test on each instance this CPU can run (AVX-512, AVX2, baseline)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: only the torch fallback can run here")
    assert onebit_kernels.kernel_backend() == "cpp", onebit_kernels._get_backend().reason
    lib = onebit_kernels._get_backend().lib
    # on a CPU without the instance asked for, the best one below it runs (the same tests again)
    lib.zt_onebit_adam_isa_cap(ISA_CAPS[request.param])
    yield request.param
    lib.zt_onebit_adam_isa_cap(2)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 as int32 bit patterns, so that NaNs compare by payload and -0.0 differs from 0.0."""
    return t.contiguous().view(torch.int32)


def _inputs(numel: int, seed: int) -> dict[str, torch.Tensor]:
    """p, m, grad and a frozen v over wide magnitude ranges, with exact zeros (and -0.0) in v and m."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(numel, generator=g) * torch.logspace(-30, 30, numel)
    m = torch.randn(numel, generator=g) * torch.logspace(-38, 3, numel)
    grad = torch.randn(numel, generator=g) * torch.logspace(3, -40, numel)  # down to fp32 subnormals
    v = torch.rand(numel, generator=g) * torch.logspace(-44, 4, numel)
    v[::5] = 0.0
    v[3::11] = -0.0
    m[::7] = 0.0
    return {"p": p, "m": m, "grad": grad, "v": v}


def _torch_momentum_(m, grad, *, beta1):
    return m.lerp_(grad, 1.0 - beta1)


def _torch_mask_(m, v):
    return m.masked_fill_(v == 0, 0.0)


def _torch_local_momentum_(own, m, grad, v, *, beta1):
    """runtime/onebit_adam.py's equation (4') before the kernel: lerp_, masked_fill_, copy_."""
    _torch_mask_(_torch_momentum_(own, grad, beta1=beta1), v)
    m.copy_(own)


UPDATES = [  # (name, kernel-or-fallback function, the torch ops, extra keyword arguments)
    ("adam", adam_update_, onebit_adam._torch_adam_update_, {}),
    ("bounded", bounded_update_, onebit_adam._torch_bounded_update_, {"bound": 3.1622776601683795}),
]
SCALARS = [  # lr, weight decay, (c1, c2): bias correction off / on (step 7 after a freeze at 3)
    (1e-3, 0.0, (1.0, 1.0)), (1e-3, 0.01, (1.0, 1.0)), (3e-2, 0.1, (1 - 0.9 ** 7, 1 - 0.999 ** 3)),
    (1e-4, 0.0, (1 - 0.9 ** 7, 1 - 0.999 ** 3)),
]


@pytest.mark.parametrize("numel", SIZES)
def test_momentum_and_mask_match_torch(isa, numel):
    x = _inputs(numel, seed=numel)
    for beta1 in (0.9, 0.99, 0.5, 0.3, 0.0):  # 1 - b1 below 0.5 and not: torch's two lerp forms
        ours, ref = x["m"].clone(), x["m"].clone()
        assert onebit_kernels.momentum_(ours, x["grad"], weight=1.0 - beta1) == []
        _torch_momentum_(ref, x["grad"], beta1=beta1)
        assert torch.equal(_bits(ours), _bits(ref)), beta1
        assert torch.equal(_bits(momentum_(x["m"].clone(), x["grad"], beta1=beta1)), _bits(ref))
        own, m, ref_m = x["m"].clone(), torch.full_like(x["m"], 7.0), torch.empty_like(x["m"])
        local_momentum_(own, m, x["grad"], x["v"], beta1=beta1)
        ref = x["m"].clone()
        _torch_local_momentum_(ref, ref_m, x["grad"], x["v"], beta1=beta1)
        assert torch.equal(_bits(own), _bits(ref)) and torch.equal(_bits(m), _bits(ref_m)), beta1
    ours, ref = x["m"].clone(), x["m"].clone()
    v = x["v"].clone()
    v[numel // 2] = float("nan")  # NaN == 0 is false: kept
    assert onebit_kernels.mask_(ours, v) == []
    assert torch.equal(_bits(ours), _bits(_torch_mask_(ref, v)))
    assert torch.equal(_bits(mask_unfrozen_(x["m"].clone(), v)), _bits(ref))


@pytest.mark.parametrize("numel", SIZES)
def test_updates_match_torch(isa, numel, monkeypatch):
    monkeypatch.setattr(onebit_kernels, "SQRT_CHUNK_NUMEL", 1000)  # several sqrt chunks, a short last one
    x = _inputs(numel, seed=100 + numel)
    for name, update, reference, extra in UPDATES:
        for lr, wd, (c1, c2) in SCALARS:
            for eps in (1e-8, 0.0):  # eps 0 with v == 0: 0 / 0 in both
                kw = dict(lr=lr, eps=eps, weight_decay=wd, c1=c1, c2=c2, **extra)
                ours, via, ref = x["p"].clone(), x["p"].clone(), x["p"].clone()
                done = onebit_kernels.update_(ours, x["m"], x["v"], bound=extra.get("bound"),
                                              **{k: kw[k] for k in ("lr", "eps", "weight_decay", "c1", "c2")})
                update(via, x["m"], x["v"], **kw)
                reference(ref, x["m"], x["v"], **kw)
                assert done == []
                assert torch.equal(_bits(ours), _bits(ref)), (name, lr, wd, c1, eps)
                assert torch.equal(_bits(via), _bits(ref)), (name, lr, wd, c1, eps)
                # with the mask of equation (8) in the same pass: m is written too
                ours, m, ref, ref_m = x["p"].clone(), x["m"].clone(), x["p"].clone(), x["m"].clone()
                update(ours, m, x["v"], mask_zero_variance=True, **kw)
                reference(ref, _torch_mask_(ref_m, x["v"]), x["v"], **kw)
                assert torch.equal(_bits(ours), _bits(ref)) and torch.equal(_bits(m), _bits(ref_m)), name


def test_bounded_update_clamps_where_torch_does(isa):
    """Steps far past the bound (v tiny against m) and far inside it, both signs."""
    numel = 4099
    g = torch.Generator().manual_seed(7)
    m = torch.randn(numel, generator=g)
    v = torch.where(torch.rand(numel, generator=g) < 0.5, 1e-20, 4.0) * torch.rand(numel, generator=g)
    p = torch.randn(numel, generator=g)
    kw = dict(lr=1e-2, eps=1e-8, weight_decay=0.01, c1=1 - 0.9 ** 5, c2=1 - 0.999 ** 2, bound=3.16)
    ours, ref = p.clone(), p.clone()
    bounded_update_(ours, m, v, **kw)
    onebit_adam._torch_bounded_update_(ref, m, v, **kw)
    assert torch.equal(_bits(ours), _bits(ref))
    clamped = ((p * (1 - 1e-4) - ours).abs() > 3.159e-2).sum()
    assert 0 < int(clamped) < numel  # both regimes present


@pytest.mark.parametrize("where", [0, 1023, 1024, 3000, 4098])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_takes_the_torch_path_from_its_block(isa, where, value):
    """An inf/NaN in grad, m or p: the kernel stops at that element's 1,024-element block and torch does the rest;
    the whole result is torch's, bit for bit (NaN payloads included)."""
    numel = 4099
    x = _inputs(numel, seed=where)
    for target in ("grad", "m"):
        y = {k: t.clone() for k, t in x.items()}
        y[target][where] = value
        ours, ref = y["m"].clone(), y["m"].clone()
        assert onebit_kernels.momentum_(y["m"].clone(), y["grad"], weight=0.1) == [(where // 1024 * 1024, numel)]
        momentum_(ours, y["grad"], beta1=0.9)
        _torch_momentum_(ref, y["grad"], beta1=0.9)
        assert torch.equal(_bits(ours), _bits(ref)), target
        own, m, ref, ref_m = y["m"].clone(), torch.zeros_like(ref), y["m"].clone(), torch.zeros_like(ref)
        local_momentum_(own, m, y["grad"], y["v"], beta1=0.9)
        _torch_local_momentum_(ref, ref_m, y["grad"], y["v"], beta1=0.9)
        assert torch.equal(_bits(own), _bits(ref)) and torch.equal(_bits(m), _bits(ref_m)), target
    for target in ("p", "m", "v"):
        y = {k: t.clone() for k, t in x.items()}
        y[target][where] = abs(value) if target == "v" else value
        for _, update, reference, extra in UPDATES:
            kw = dict(lr=1e-3, eps=1e-8, weight_decay=0.01, c1=0.5, c2=0.25, **extra)
            ours, ref = y["p"].clone(), y["p"].clone()
            update(ours, y["m"], y["v"], **kw)
            reference(ref, y["m"], y["v"], **kw)
            assert torch.equal(_bits(ours), _bits(ref)), target
            ours, m, ref, ref_m = y["p"].clone(), y["m"].clone(), y["p"].clone(), y["m"].clone()
            update(ours, m, y["v"], mask_zero_variance=True, **kw)
            reference(ref, _torch_mask_(ref_m, y["v"]), y["v"], **kw)
            assert torch.equal(_bits(ours), _bits(ref)) and torch.equal(_bits(m), _bits(ref_m)), target


def test_contiguous_tensors_of_any_shape_are_read_flat(isa, monkeypatch):
    monkeypatch.setattr(onebit_kernels, "SQRT_CHUNK_NUMEL", 64)  # chunks that split rows
    x = {k: t.view(30, 10) for k, t in _inputs(300, seed=5).items()}
    ours, m, ref, ref_m = x["p"].clone(), x["m"].clone(), x["p"].clone(), x["m"].clone()
    bounded_update_(ours, m, x["v"], lr=1e-2, eps=1e-8, weight_decay=0.1, c1=0.5, c2=0.1, bound=3.0,
                    mask_zero_variance=True)
    onebit_adam._torch_bounded_update_(ref, _torch_mask_(ref_m, x["v"]), x["v"], lr=1e-2, eps=1e-8,
                                       weight_decay=0.1, c1=0.5, c2=0.1, bound=3.0)
    assert torch.equal(_bits(ours), _bits(ref)) and torch.equal(_bits(m), _bits(ref_m))


def test_threads_leave_only_their_own_non_finite_ranges(isa):
    """On 2 threads (torch.get_num_threads(), as the kernel reads it) each thread takes a contiguous range: an inf
    in the first range leaves that range's rest to torch and nothing else; the results are torch's bit for bit."""
    numel = 3 * 65536 + 77  # 2 threads of >= 65,536 elements each
    x = _inputs(numel, seed=11)
    x["grad"][5000] = float("inf")
    x["p"][5000] = float("nan")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        half = (numel // 2 + 1023) // 1024 * 1024  # the second thread's first element (block-aligned cut)
        m = x["m"].clone()
        assert onebit_kernels.momentum_(m, x["grad"], weight=0.1) == [(4096, half)]
        ours, ref = x["m"].clone(), x["m"].clone()
        momentum_(ours, x["grad"], beta1=0.9)
        assert torch.equal(_bits(ours), _bits(_torch_momentum_(ref, x["grad"], beta1=0.9)))
        for _, update, reference, extra in UPDATES:
            kw = dict(lr=1e-3, eps=1e-8, weight_decay=0.01, c1=0.5, c2=0.25, **extra)
            ours, m, ref, ref_m = x["p"].clone(), x["m"].clone(), x["p"].clone(), x["m"].clone()
            update(ours, m, x["v"], mask_zero_variance=True, **kw)
            reference(ref, _torch_mask_(ref_m, x["v"]), x["v"], **kw)
            assert torch.equal(_bits(ours), _bits(ref)) and torch.equal(_bits(m), _bits(ref_m))
    finally:
        torch.set_num_threads(threads)


def test_tensors_the_kernel_does_not_take_run_torch(isa):
    """Not fp32, not contiguous, or numel mismatch: the kernel declines (0 done) and the torch ops run."""
    x = _inputs(300, seed=3)
    assert onebit_kernels.momentum_(x["m"].clone(), x["grad"].bfloat16(), weight=0.1) == [(0, 300)]
    assert onebit_kernels.momentum_(x["m"].clone()[::2], x["grad"][::2], weight=0.1) == [(0, 150)]
    assert onebit_kernels.mask_(x["m"].clone(), x["v"][:299]) == [(0, 300)]
    assert onebit_kernels.update_(x["p"].clone().double(), x["m"], x["v"], lr=1e-3, eps=1e-8, weight_decay=0.0,
                                  c1=1.0, c2=1.0, bound=None) == [(0, 300)]
    m2, ref = x["m"].clone().view(15, 20), x["m"].clone().view(15, 20)
    g2 = x["grad"].view(20, 15).t()  # a transposed (non-contiguous) gradient
    momentum_(m2, g2, beta1=0.9)
    assert torch.equal(_bits(m2), _bits(ref.lerp_(g2, 1.0 - 0.9)))


def _run_optimizer(*, numel: int, local_momentum: bool, step_bound: bool, weight_decay: float,
                   bias_correction: bool) -> tuple[torch.Tensor, dict]:
    """Seven OneBitAdam steps (freeze at 3) on a world of one over one master with zero-gradient elements through
    the warm-up (so the mask matters) and a padded tail; returns the master and the optimizer state."""
    grads = [torch.randn(numel, generator=torch.Generator().manual_seed(20 + t)) for t in range(7)]
    for g in grads[:3]:
        g[128:256] = 0.0
    master = torch.randn(numel, generator=torch.Generator().manual_seed(19))
    opt = OneBitAdam([master], comm=Comm(group=None, rank=0, world_size=1), freeze_step=3, lr=1e-2,
                     betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, bias_correction=bias_correction,
                     step_bound=step_bound, local_momentum=local_momentum, valid_numel={id(master): numel - 5})
    for g in grads:
        master.grad = g.clone()
        opt.step()
    return master, opt.state[master]


@pytest.mark.parametrize(("local_momentum", "step_bound", "weight_decay", "bias_correction"),
                         [(False, False, 0.0, True), (True, False, 0.01, True), (False, True, 0.01, False),
                          (True, True, 0.0, False)])
def test_optimizer_steps_are_bitwise_the_torch_path(isa, local_momentum, step_bound, weight_decay, bias_correction):
    kw = dict(numel=1000 + 3, local_momentum=local_momentum, step_bound=step_bound, weight_decay=weight_decay,
              bias_correction=bias_correction)
    master, state = _run_optimizer(**kw)
    saved = onebit_kernels._LOADER.reset()
    onebit_kernels._LOADER.restore(Backend(lib=None, reason="test: the torch path"))
    try:
        ref_master, ref_state = _run_optimizer(**kw)
    finally:
        onebit_kernels._LOADER.restore(saved)
    assert torch.equal(_bits(master), _bits(ref_master))
    assert set(state) == set(ref_state)
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1:
            assert torch.equal(_bits(value), _bits(ref_state[key])), key
    assert (state["exp_avg"][128:256] == 0).all()  # the mask ran


_CAPABILITY_SCRIPT = """
import sys
import torch
from ztune.runtime import onebit_adam, onebit_kernels
assert torch.backends.cpu.get_cpu_capability() == sys.argv[1], torch.backends.cpu.get_cpu_capability()
assert onebit_kernels.torch_uses_fma() == (sys.argv[1] != "DEFAULT") and onebit_kernels.kernel_backend() == "cpp"
bits = lambda t: t.view(torch.int32)
for n in (1, 17, 33, 1025, 3001):
    g = torch.Generator().manual_seed(n)
    p, m, grad = (torch.randn(n, generator=g) * 3 for _ in range(3))
    v = torch.rand(n, generator=g) * 1e-6
    for beta1 in (0.9, 0.3):
        ours, ref = m.clone(), m.clone()
        onebit_adam.momentum_(ours, grad, beta1=beta1)
        assert torch.equal(bits(ours), bits(ref.lerp_(grad, 1.0 - beta1))), ("lerp", n, beta1)
    kw = dict(lr=1e-2, eps=1e-8, weight_decay=0.01, c1=0.3, c2=0.01, bound=3.16)
    ours, ref = p.clone(), p.clone()
    onebit_adam.bounded_update_(ours, m, v, **kw)
    onebit_adam._torch_bounded_update_(ref, m, v, **kw)
    assert torch.equal(bits(ours), bits(ref)), ("bounded", n)
print("ok")
"""


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_torch_kernels_of_another_capability_are_matched(capability):
    """torch's DEFAULT kernels (ATEN_CPU_CAPABILITY=default) round a multiply-add twice, its AVX2 ones once, as its
    AVX-512 ones do: the kernel follows each (a subprocess: torch reads the variable once, at start-up)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: only the torch fallback can run here")
    if capability == "AVX2" and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no AVX2: torch cannot run its AVX2 kernels here")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower(), "OMP_NUM_THREADS": "1"}
    env.pop("ZTUNE_DISABLE_CPP_ONEBIT_ADAM", None)
    out = subprocess.run([sys.executable, "-c", _CAPABILITY_SCRIPT, capability], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    def broken_build():
        raise RuntimeError("Error building extension 'ztune_onebit_adam': c++: not found")

    monkeypatch.setattr(onebit_kernels, "_build_library", broken_build)
    monkeypatch.setattr(onebit_kernels._LOADER, "_backend", None)
    monkeypatch.delenv("ZTUNE_DISABLE_CPP_ONEBIT_ADAM", raising=False)
    x = _inputs(2000, seed=9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert onebit_kernels.kernel_backend() == "torch-fallback"
        ours, ref = x["m"].clone(), x["m"].clone()
        momentum_(ours, x["grad"], beta1=0.9)
        mask_unfrozen_(ours, x["v"])
        assert onebit_kernels.update_(x["p"], x["m"], x["v"], lr=1e-3, eps=1e-8, weight_decay=0.0, c1=1.0,
                                      c2=1.0, bound=None) == [(0, 2000)]
        p, ref_p = x["p"].clone(), x["p"].clone()
        adam_update_(p, ours, x["v"], lr=1e-3, eps=1e-8, weight_decay=0.01, c1=0.5, c2=0.3)
    ours_warnings = [w for w in caught if issubclass(w.category, onebit_kernels.CppOneBitAdamFallbackWarning)]
    assert len(ours_warnings) == 1 and "c++: not found" in str(ours_warnings[0].message)
    _torch_mask_(_torch_momentum_(ref, x["grad"], beta1=0.9), x["v"])
    onebit_adam._torch_adam_update_(ref_p, ref, x["v"], lr=1e-3, eps=1e-8, weight_decay=0.01, c1=0.5, c2=0.3)
    assert torch.equal(_bits(ours), _bits(ref)) and torch.equal(_bits(p), _bits(ref_p))


def test_disable_env_forces_fallback_without_warning(monkeypatch):
    monkeypatch.setenv("ZTUNE_DISABLE_CPP_ONEBIT_ADAM", "1")
    monkeypatch.setattr(onebit_kernels, "_build_library", lambda: pytest.fail("must not build"))
    monkeypatch.setattr(onebit_kernels._LOADER, "_backend", None)
    x = _inputs(500, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", onebit_kernels.CppOneBitAdamFallbackWarning)
        assert onebit_kernels.kernel_backend() == "torch-fallback"
        assert onebit_kernels.momentum_(x["m"].clone(), x["grad"], weight=0.1) == [(0, 500)]
        ours = momentum_(x["m"].clone(), x["grad"], beta1=0.9)
    assert torch.equal(_bits(ours), _bits(_torch_momentum_(x["m"].clone(), x["grad"], beta1=0.9)))
