"""Fused CPU Adam/AdamW step for offloaded optimizer shards, with a pure-torch fallback.

The C++ kernel (csrc/cpu_adam.cpp) is built on first use with torch.utils.cpp_extension.load into a cache
directory keyed by the sources, flags and torch version, so later processes reuse it
(runtime/kernel_loader.py build_cpp_library, which also describes the cache). It exposes a plain C ABI called
through ctypes: no torch/pybind11 headers, so the build takes seconds, and ctypes releases the GIL for the
call. When it cannot be built (no compiler, no ninja) or ZTUNE_DISABLE_CPP_ADAM=1 is set, the same math runs as
torch ops, with one warning per process saying why.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from ztune.errors import UserError
from ztune.runtime.kernel_loader import DTYPE_CODES, Backend, LazyBackend, build_cpp_library, check_adam_tensors

__all__ = [
    "CppAdamFallbackWarning",
    "adam_step_",
    "available_simd",
    "kernel_backend",
]

log = logging.getLogger(__name__)

# Kept in step with csrc/cpu_adam.cpp (enum Simd).
_SIMD_CODES = {"portable": 0, "avx2": 1, "avx512": 2}
# /proc/cpuinfo flags each path needs; mirrors cpu_has() in csrc/cpu_adam.cpp.
_SIMD_CPU_FLAGS = {"avx2": ("avx2", "fma", "f16c"), "avx512": ("avx512f", "avx512bw", "avx2", "fma", "f16c")}
_SOURCES = ("cpu_adam.cpp", "cpu_adam.h")
# -fno-math-errno lets sqrt vectorise; -ffp-contract=off keeps a*b+c unfused so rounding follows torch's
# kernels op for op (the FMA sites are explicit in cpu_adam.h). No -march: ISA paths are picked at run time.
_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off")
_LDFLAGS = ("-fopenmp",)
_DISABLE_ENV = "ZTUNE_DISABLE_CPP_ADAM"


class CppAdamFallbackWarning(UserWarning):
    """The fused C++ Adam kernel is unavailable; the pure-torch fallback runs instead."""


# The library, built on first use; tests reset it (_LOADER.reset()). The lambda reads _build_library at call time.
_LOADER = LazyBackend(lambda: _build_library(), disable_env=_DISABLE_ENV, warning=CppAdamFallbackWarning,
                      kernel="fused C++ Adam kernel", fallback="the slower pure-torch step")


def _get_backend() -> Backend:
    return _LOADER.get()


def available_simd() -> list[str]:
    """SIMD paths this CPU can run, best first; "portable" is always last.

    Read from /proc/cpuinfo flags (which the kernel clears where the OS does not save AVX state), without
    building anything; the C++ side checks again with __builtin_cpu_supports before running a path.
    """
    return list(_cpu_simd_paths())


@functools.cache
def _cpu_simd_paths() -> tuple[str, ...]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    found = [name for name in ("avx512", "avx2") if all(flag in flags for flag in _SIMD_CPU_FLAGS[name])]
    return (*found, "portable")


def kernel_backend() -> str:
    """ "cpp" when the fused kernel is loaded (building it on first call), else "torch-fallback"."""
    return "cpp" if _get_backend().lib is not None else "torch-fallback"


def adam_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw: bool,
    grad_scale: float = 1.0,
    out: torch.Tensor | None = None,
    simd: str | None = None,
    bias_correction: bool = True,
) -> None:
    """One Adam (adamw=False: L2 decay added to the gradient) or AdamW (decoupled decay) step, in place.

    param, exp_avg, exp_avg_sq: contiguous fp32 CPU tensors of the same numel (a flat shard); grad: fp32, bf16
    or fp16, same numel, read only; it is divided by `grad_scale` first (fp16 loss-scale unscale). `step` is
    the 1-based step count after this update, for bias correction. If `out` (bf16 or fp16) is given, it
    receives the updated parameter rounded to nearest even. Results match torch.optim.Adam/AdamW's
    single-tensor path. bias_correction=False: no 1 - beta**step corrections (DeepSpeed's Adam option).
    `simd` forces "avx512", "avx2" or "portable" (UserError if this CPU lacks it); None picks the best.
    Uses torch.get_num_threads() threads.
    """
    check_adam_tensors(param, grad, exp_avg, exp_avg_sq, out=out, step=step, device_type="cpu")
    if simd is not None and simd not in _cpu_simd_paths():
        raise UserError(f"simd={simd!r} is not available on this CPU; choose one of {available_simd()}")
    lib = _get_backend().lib
    if lib is None:
        torch_adam_step(param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2,
                        eps=eps, weight_decay=weight_decay, adamw=adamw, grad_scale=grad_scale, out=out,
                        bias_correction=bias_correction)
        return
    rc = lib.zt_adam_step(
        param.data_ptr(), grad.data_ptr(), DTYPE_CODES[grad.dtype], exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
        out.data_ptr() if out is not None else None, DTYPE_CODES[out.dtype] if out is not None else 0,
        param.numel(), step, lr, beta1, beta2, eps, weight_decay, int(adamw), grad_scale,
        -1 if simd is None else _SIMD_CODES[simd], torch.get_num_threads(), int(bias_correction),
    )
    if rc != 0:  # only reachable if /proc/cpuinfo and cpuid disagree, or the codes above drift
        raise RuntimeError(f"zt_adam_step failed with code {rc} (simd={simd!r}, grad dtype {grad.dtype})")


def torch_adam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay, adamw,
                    grad_scale, out, bias_correction: bool = True) -> None:
    """The same step as torch ops, in the order of torch.optim.adam._single_tensor_adam (torch 2.13); any
    device (no argument checks: adam_step_ does them for the kernel's callers)."""
    g = grad.float()  # a copy only when grad is not fp32; every op on g below is out of place
    if grad_scale != 1.0:
        g = g / grad_scale
    if weight_decay != 0:
        if adamw:
            param.mul_(1 - lr * weight_decay)
        else:
            g = g.add(param, alpha=weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_f = float(step)  # torch keeps step as a float tensor
    if bias_correction:
        step_size = lr / (1 - beta1**step_f)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step_f) ** 0.5).add_(eps)
    else:
        step_size = lr
        denom = exp_avg_sq.sqrt().add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    if out is not None:
        out.copy_(param)


def _build_library() -> ctypes.CDLL:
    lib = build_cpp_library(name="ztune_cpu_adam", sources=_SOURCES, cflags=_CFLAGS, ldflags=_LDFLAGS)
    lib.zt_adam_step.restype = ctypes.c_int
    lib.zt_adam_step.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_double,
        ctypes.c_int, ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ]
    lib.zt_cpu_supports.restype = ctypes.c_int
    lib.zt_cpu_supports.argtypes = [ctypes.c_int]
    return lib
