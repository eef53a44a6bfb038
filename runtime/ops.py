"""Fused CPU Adam/AdamW step for offloaded optimizer shards, with a pure-torch fallback.

The C++ kernel (csrc/cpu_adam.cpp) is built on first use with torch.utils.cpp_extension.load into a cache
directory keyed by the sources, flags and torch version, so later processes reuse it. It exposes a plain C
ABI called through ctypes: no torch/pybind11 headers, so the build takes seconds, and ctypes releases the GIL
for the call. When it cannot be built (no compiler, no ninja) or ZTUNE_DISABLE_CPP_ADAM=1 is set, the same math
runs as torch ops, with one warning per process saying why.

Build cache: $ZTUNE_EXT_DIR (default ~/.cache/ztune/ext) / <16 hex digits of sha256(sources, flags, torch
version, $CXX)>; torch's file lock there makes concurrent first builds (several ranks) safe. After a build, a
marker file records the library's size and mtime; a later process that finds both loads the library directly,
without torch's builder. That matters: cpp_extension.load re-runs ninja in every new process, and two ninja
versions on one machine (a system /usr/bin/ninja 1.11 writing `.ninja_log` v5, the PyPI wheel's 1.13 in the
venv writing v7) each discard the other's log and recompile: ~11.5 s per spawned rank on 2 cores, even though
the library was up to date. The direct load also skips importing setuptools (~0.3 s).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import logging
import os
import shutil
from pathlib import Path

import torch

from ztune.errors import UserError
from ztune.runtime.kernel_loader import DTYPE_CODES, Backend, LazyBackend, check_adam_tensors

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
_EXT_DIR_ENV = "ZTUNE_EXT_DIR"


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
    src_dir = importlib.resources.files("ztune.csrc")
    sources = [Path(str(src_dir / name)) for name in _SOURCES]
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    compiler = os.environ.get("CXX", "c++")
    digest.update(repr((_CFLAGS, _LDFLAGS, torch.__version__, compiler)).encode())
    key = digest.hexdigest()[:16]
    root = Path(os.environ.get(_EXT_DIR_ENV) or Path.home() / ".cache" / "ztune" / "ext")
    build_dir = root / key
    name = f"ztune_cpu_adam_{key}"
    lib_path = build_dir / f"{name}.so"
    marker = build_dir / f"{name}.built"
    if not _marker_matches(marker, lib_path):
        from torch.utils import cpp_extension  # imported here: it is slow and only needed for a build

        build_dir.mkdir(parents=True, exist_ok=True)
        _ensure_ninja_on_path()
        built = cpp_extension.load(
            name=name, sources=[str(sources[0])], extra_cflags=list(_CFLAGS), extra_ldflags=list(_LDFLAGS),
            build_directory=str(build_dir), is_python_module=False, verbose=False,
        )
        # torch returns the library path here; older versions returned None after loading it.
        lib_path = Path(built) if isinstance(built, str) else lib_path
        _write_marker(marker, lib_path)
    lib = ctypes.CDLL(str(lib_path))
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


def _library_stamp(lib_path: Path) -> str:
    st = lib_path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def _marker_matches(marker: Path, lib_path: Path) -> bool:
    """Whether `lib_path` is the library a finished build left (the key already covers sources and flags)."""
    try:
        return marker.read_text(encoding="utf-8") == _library_stamp(lib_path)
    except OSError:  # no marker or no library yet
        return False


def _write_marker(marker: Path, lib_path: Path) -> None:
    """Written after torch's build (and its lock) finished; renamed into place so a reader sees all or nothing."""
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(_library_stamp(lib_path), encoding="utf-8")
    os.replace(tmp, marker)


def _ensure_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; a venv used without activation has it only in its bin dir."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # the PyPI wheel ships the binary
    except ImportError:
        return  # the build then fails with torch's own "Ninja is required" message, which the warning repeats
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
