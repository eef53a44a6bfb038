"""A C++ CPU kernel for 1-bit Adam's compression-stage update, with the torch ops as the fallback.

csrc/onebit_adam.cpp does in one pass per op what runtime/onebit_adam.py's momentum_ (lerp_), mask_unfrozen_
(masked_fill_) and adam_update_ / bounded_update_ (mul_, sqrt, div_, add_, addcdiv_ / div, div_, clamp_, add_) do
as chains of torch ops over the flat fp32 masters, with bitwise the same results (the file's header says how each
rounding matches torch). The one op it does not do is the square root of the frozen variance: torch's float32
sqrt on x86 is MKL's, not correctly rounded, so `update_` has torch compute it into a scratch buffer of
SQRT_CHUNK_NUMEL elements (in cache) one chunk at a time and the kernel reads it from there.

It is a library of its own (not csrc/codec.cpp's): it is the optimizer's arithmetic, not a codec, and a job
that disables the codec kernel (ZTUNE_DISABLE_CPP_CODEC) keeps this one and the other way round. It is built on
first use into the extension cache (runtime/kernel_loader.py build_cpp_library) and called through ctypes. When
it cannot be built, the torch ops run and one CppOneBitAdamFallbackWarning per process says why;
ZTUNE_DISABLE_CPP_ONEBIT_ADAM=1 selects the torch ops without a warning.

Each function returns the element ranges (begin, end) of the flat buffers that the kernel left to the caller's
torch ops: none when it wrote the whole result; [(0, numel)] when it does not take the tensors (no kernel; not
contiguous fp32 CPU tensors of one numel); otherwise, per thread, the range from its first block holding inf or
NaN on (nothing written there: the ops are elementwise, so the split changes no value). The kernel runs on
torch.get_num_threads() threads, as torch's own ops and the fused CPU Adam do.
"""

from __future__ import annotations

import ctypes
import functools
import platform

import torch

from ztune.runtime.kernel_loader import Backend, LazyBackend, build_cpp_library

__all__ = ["SQRT_CHUNK_NUMEL", "CppOneBitAdamFallbackWarning", "Ranges", "kernel_backend", "mask_", "momentum_",
           "update_"]

_SOURCES = ("onebit_adam.cpp", "cpu_adam.h")
# As runtime/codec_kernels.py: -ffp-contract=off (the FMA sites are explicit), -fno-trapping-math lets the clamp's
# selects become min/max and vectorise (no value changes), no -ffast-math, no -march (ISA chosen at run time).
_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off")
_LDFLAGS = ("-fopenmp",)  # the thread team, as runtime/ops.py's fused Adam
_DISABLE_ENV = "ZTUNE_DISABLE_CPP_ONEBIT_ADAM"
# Elements per thread per torch sqrt into the scratch buffer: 256 KiB, inside a core's L2, and few enough chunks
# (~480 for 31M masters on one thread) that the Python loop costs a few ms against the ~100 ms of the torch ops it
# replaces.
SQRT_CHUNK_NUMEL = 1 << 16
_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
Ranges = list[tuple[int, int]]


class CppOneBitAdamFallbackWarning(UserWarning):
    """The C++ 1-bit Adam kernel is unavailable; the torch ops run instead."""


# The library, built on first use; tests reset it (_LOADER.reset()). The lambda reads _build_library at call time.
_LOADER = LazyBackend(lambda: _build_library(), disable_env=_DISABLE_ENV, warning=CppOneBitAdamFallbackWarning,
                      kernel="C++ 1-bit Adam kernel", fallback="the torch ops")


def _get_backend() -> Backend:
    return _LOADER.get()


def kernel_backend() -> str:
    """ "cpp" when the kernel is loaded (building it on first call), else "torch-fallback"."""
    return "cpp" if _get_backend().lib is not None else "torch-fallback"


def _build_library() -> ctypes.CDLL:
    lib = build_cpp_library(name="ztune_onebit_adam", sources=_SOURCES, cflags=_CFLAGS, ldflags=_LDFLAGS)
    signatures = {
        "zt_onebit_momentum": (_I64, [_P, _P, _I64, _F, _P, _P, _INT, _INT, _P]),
        "zt_onebit_mask": (_I64, [_P, _P, _I64, _INT, _P]),
        "zt_onebit_update": (_I64, [_P, _P, _P, _P, _I64, _INT, _INT, _F, _F, _F, _F, _F, _F, _F, _INT, _INT, _P]),
        "zt_onebit_adam_isa_cap": (_INT, [_INT]),  # tests: run the AVX2 / baseline instance on an AVX-512 host
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


@functools.cache  # torch picks its kernels once per process (ATEN_CPU_CAPABILITY is read at start-up)
def torch_uses_fma() -> bool:
    """Whether torch's vectorised CPU kernels round a multiply-add once (fmadd): its AVX2/AVX-512 kernels on x86
    (Vectorized<float>::fmadd is _mm256/_mm512_fmadd_ps), NEON/SVE on arm; not its DEFAULT kernels on x86
    (ATEN_CPU_CAPABILITY=default), whose fmadd is a * b + c in a translation unit built without FMA."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    return True


def _lib_for(*tensors: torch.Tensor):
    """The library when every tensor is a contiguous fp32 CPU tensor of the first one's numel, else None."""
    numel = tensors[0].numel()
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != numel:
            return None
    return _get_backend().lib


def _run(name: str, fn, *args) -> Ranges:
    """Call the kernel function `fn` with `args`, torch's thread count and the buffer of ranges left; returns them."""
    threads = max(1, torch.get_num_threads())
    left = (ctypes.c_int64 * (2 * threads))()
    count = fn(*args, threads, left)
    if count < 0:
        raise RuntimeError(f"{name} rejected its arguments (code {count}); runtime/onebit_kernels.py and "
                           "csrc/onebit_adam.cpp disagree")
    return [(left[2 * i], left[2 * i + 1]) for i in range(count)]


def momentum_(m: torch.Tensor, grad: torch.Tensor, *, weight: float, v: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> Ranges:
    """m <- m.lerp(grad, weight) in place (fp32 [numel] all). With `v` and `out` (1-bit Adam's local momentum, in
    the same pass): then m <- 0 where v == 0, and out <- m. Returns the ranges left to torch (module docstring)."""
    if (v is None) != (out is None):
        raise ValueError("momentum_: pass both v and out, or neither")
    lib = _lib_for(m, grad) if v is None else _lib_for(m, grad, v, out)
    if lib is None:
        return [(0, m.numel())]
    return _run("zt_onebit_momentum", lib.zt_onebit_momentum, m.data_ptr(), grad.data_ptr(), m.numel(), weight,
                None if v is None else v.data_ptr(), None if out is None else out.data_ptr(), int(torch_uses_fma()))


def mask_(m: torch.Tensor, v: torch.Tensor) -> Ranges:
    """m <- 0 where v == 0, in place (fp32 [numel] both). Returns the ranges left to torch: none, or all (no
    kernel)."""
    lib = _lib_for(m, v)
    if lib is None:
        return [(0, m.numel())]
    return _run("zt_onebit_mask", lib.zt_onebit_mask, m.data_ptr(), v.data_ptr(), m.numel())


def update_(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, eps: float, weight_decay: float,
            c1: float, c2: float, bound: float | None, mask: bool = False) -> Ranges:
    """runtime/onebit_adam.py's adam_update_ (bound None) or bounded_update_ on p in place (p, m, v fp32 [numel]);
    with `mask`, first mask_unfrozen_ on m (m <- 0 where v == 0, written to m). The scalars are rounded to fp32
    from the same Python floats as torch rounds them (ctypes.c_float rounds to nearest, as ATen's static_cast of a
    double scalar does). Returns the ranges left to torch (module docstring)."""
    lib = _lib_for(p, m, v)
    if lib is None:
        return [(0, p.numel())]
    numel = p.numel()
    fma = int(torch_uses_fma())
    bounded = bound is not None
    scalars = (int(bool(weight_decay)), int(bounded), 1.0 - lr * weight_decay, c2 ** 0.5, eps, -lr / c1, c1,
               bound if bounded else 0.0, -lr, fma)
    chunk = SQRT_CHUNK_NUMEL * max(1, torch.get_num_threads())  # each thread's share stays L2-sized
    scratch = torch.empty(min(numel, chunk))
    p_ptr, m_ptr, v_ptr, flat_v = p.data_ptr(), m.data_ptr(), v.data_ptr(), v.view(-1)
    left: Ranges = []
    for begin in range(0, numel, chunk):
        n = min(chunk, numel - begin)
        sqrt_v = torch.sqrt(flat_v[begin:begin + n], out=scratch[:n])
        ranges = _run("zt_onebit_update", lib.zt_onebit_update, p_ptr + 4 * begin, m_ptr + 4 * begin,
                      sqrt_v.data_ptr(), v_ptr + 4 * begin if mask else None, n, *scalars)
        left += [(begin + b, begin + e) for b, e in ranges]
    return left
