"""Fused Adam/AdamW step on CUDA shards: ztune's kernel (csrc/cuda/adam.cu) or torch's fused one.

`adam_step_` mirrors runtime/ops.py's CPU `adam_step_` for CUDA tensors: one pass reads the gradient (fp32,
bf16 or fp16), updates the fp32 parameter and both moments in place and, optionally, writes the parameter
rounded to bf16/fp16, asynchronously on torch's current stream. `kernel` picks the implementation:
- "ztune": csrc/cuda/adam.cu, built on first use with nvcc into a shared library and called through ctypes
  (plain C ABI taking device pointers and a cudaStream_t: no torch headers, no pybind11). Its element math is
  csrc/cpu_adam.h, i.e. torch.optim's single-tensor Adam op for op.
- "torch": torch's `_fused_adam_` / `_fused_adamw_` (what torch.optim.Adam/AdamW(fused=True) run), with a 16-bit
  gradient upcast first and `out` copied after: the path ztune's runtime uses on CUDA by default.
When "ztune" is asked for but the library cannot be built (no nvcc, a compile error) or ZTUNE_DISABLE_CUDA_ADAM=1
is set, the torch path runs, with one CudaAdamFallbackWarning per process saying why (none for the variable).

The runtime (runtime/optim_shard.py) steps CUDA-resident shards with torch's fused optimizer unless
ZTUNE_CUDA_ADAM=ztune selects this kernel: which one is faster is what `make gpu-check` measures
(tests/gpu/test_cuda_adam.py), so torch's stays the default until a GPU run says otherwise.

Build: nvcc from $ZTUNE_NVCC, else $CUDA_HOME/bin/nvcc, else PATH, else /usr/local/cuda/bin/nvcc; SASS for
sm_80 (A100; runs on all 8.x) and sm_90 (H100/H200) plus compute_90 PTX (later GPUs JIT-compile it), CUDA
runtime linked statically (torch's CUDA runtime need not be on the loader path; streams and device pointers
are driver-level handles, valid across runtimes in one process). Cache: $ZTUNE_EXT_DIR (default
~/.cache/ztune/ext) / cuda-<16 hex digits of sha256(sources, flags, `nvcc --version`)>; the library is written
to a temporary name and renamed into place, so concurrent first builds (several ranks) are safe.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from ztune.runtime.kernel_loader import DTYPE_CODES, Backend, LazyBackend, check_adam_tensors

__all__ = ["CudaAdamFallbackWarning", "KERNELS", "adam_step_", "find_nvcc", "kernel_backend"]

log = logging.getLogger(__name__)

KERNELS = ("ztune", "torch")
_SOURCES = ("cuda/adam.cu", "cpu_adam.h")
_GENCODE = ("arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90")
_NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
               *(f for g in _GENCODE for f in ("-gencode", g)))
_BUILD_TIMEOUT_S = 600.0  # wide: three targets take ~8 s of CPU, far longer on a loaded machine
_DISABLE_ENV = "ZTUNE_DISABLE_CUDA_ADAM"
_EXT_DIR_ENV = "ZTUNE_EXT_DIR"
_NVCC_ENV = "ZTUNE_NVCC"


class CudaAdamFallbackWarning(UserWarning):
    """ztune's CUDA Adam kernel is unavailable; torch's fused Adam runs instead."""


# The library, built on first use; tests reset it (_LOADER.reset()). The lambda reads _build_library at call time.
_LOADER = LazyBackend(lambda: _build_library(), disable_env=_DISABLE_ENV, warning=CudaAdamFallbackWarning,
                      kernel="CUDA Adam kernel", fallback="torch's fused Adam")


def _get_backend() -> Backend:
    return _LOADER.get()


def kernel_backend() -> str:
    """ "cuda" when ztune's CUDA kernel is loaded (building it on first call), else "torch-fused-fallback"."""
    return "cuda" if _get_backend().lib is not None else "torch-fused-fallback"


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
    kernel: str = "ztune",
) -> None:
    """One Adam (adamw=False: L2 decay added to the gradient) or AdamW (decoupled decay) step, in place, queued
    on torch's current stream of the tensors' device.

    param, exp_avg, exp_avg_sq: contiguous fp32 CUDA tensors of the same numel on one device (a flat shard);
    grad: fp32, bf16 or fp16, same numel and device, read only (never modified); it is divided by
    `grad_scale` first. `step` is the 1-based step count after this update, for bias correction. If `out`
    (bf16 or fp16) is given, it receives the updated parameter rounded to nearest even. kernel: "ztune"
    (csrc/cuda/adam.cu; torch's fused op if it cannot be built) or "torch" (torch's fused op).
    Raises ValueError/TypeError for tensors that break these rules, ValueError for an unknown `kernel`.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {list(KERNELS)}")
    check_adam_tensors(param, grad, exp_avg, exp_avg_sq, out=out, step=step, device_type="cuda",
                       other_path="; CPU shards go through ztune.runtime.ops.adam_step_")
    lib = _get_backend().lib if kernel == "ztune" else None
    if lib is None:
        _torch_fused_step(param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                          weight_decay=weight_decay, adamw=adamw, grad_scale=grad_scale, out=out)
        return
    with torch.cuda.device(param.device):  # makes the device's primary context current for the launch
        stream = torch.cuda.current_stream(param.device).cuda_stream
        rc = lib.zt_adam_step_cuda(
            param.data_ptr(), grad.data_ptr(), DTYPE_CODES[grad.dtype], exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
            out.data_ptr() if out is not None else None, DTYPE_CODES[out.dtype] if out is not None else 0,
            param.numel(), step, lr, beta1, beta2, eps, weight_decay, int(adamw), grad_scale, stream,
        )
    if rc != 0:  # -2: the dtype codes above drifted from cpu_adam.h; > 0: the launch's cudaError_t
        raise RuntimeError(f"zt_adam_step_cuda failed with code {rc} (grad dtype {grad.dtype}, numel "
                           f"{param.numel()}, device {param.device})")


def _torch_fused_step(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay, adamw,
                      grad_scale, out) -> None:
    """The step as torch.optim.Adam/AdamW(fused=True) runs it (torch._fused_adam_ / _fused_adamw_, any device
    torch's fused kernels cover: CUDA, and CPU since torch 2.4)."""
    g = grad.float()  # a copy only when grad is not fp32
    scale = None
    if grad_scale != 1.0:
        # The fused op divides by `grad_scale` as it reads and writes the unscaled gradient back (GradScaler's
        # contract); grad is read only here, so an fp32 grad is copied first.
        g = g.clone() if g is grad else g
        scale = torch.full((), grad_scale, dtype=torch.float32, device=param.device)
    # torch.optim keeps the step count as a float32 tensor on the parameters' device for the fused kernels.
    step_t = torch.full((), float(step), dtype=torch.float32, device=param.device)
    fused = torch._fused_adamw_ if adamw else torch._fused_adam_
    fused([param], [g], [exp_avg], [exp_avg_sq], [], [step_t], lr=lr, beta1=beta1, beta2=beta2,
          weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False, grad_scale=scale, found_inf=None)
    if out is not None:
        out.copy_(param)


# -------------------------------------------------------------------------------------------- the build
def find_nvcc() -> str | None:
    """The nvcc this module builds with: $ZTUNE_NVCC, $CUDA_HOME/bin/nvcc, PATH, /usr/local/cuda/bin/nvcc."""
    explicit = os.environ.get(_NVCC_ENV)
    if explicit:
        return explicit  # used as given: a wrong path then fails the build, which says so
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [str(Path(home) / "bin" / "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _build_library() -> ctypes.CDLL:
    """Build (or find in the cache) and load the library. Raises RuntimeError when nvcc is missing or fails."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set ZTUNE_NVCC or CUDA_HOME, or put it on PATH)")
    src_dir = importlib.resources.files("ztune.csrc")
    sources = [Path(str(src_dir.joinpath(*name.split("/")))) for name in _SOURCES]
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    digest.update(repr((_NVCC_FLAGS, nvcc, _nvcc_version(nvcc))).encode())
    key = digest.hexdigest()[:16]
    root = Path(os.environ.get(_EXT_DIR_ENV) or Path.home() / ".cache" / "ztune" / "ext")
    lib_path = root / f"cuda-{key}" / f"ztune_cuda_adam_{key}.so"
    if not lib_path.exists():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib_path.with_name(f"{lib_path.name}.{os.getpid()}.tmp")
        argv = [nvcc, *_NVCC_FLAGS, str(sources[0]), "-o", str(tmp)]
        log.info("building the CUDA Adam kernel: %s", " ".join(argv))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            detail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[:3])
            raise RuntimeError(f"nvcc failed (exit {proc.returncode}): {detail}")
        os.replace(tmp, lib_path)  # atomic: a concurrent reader sees no library or a whole one
    lib = ctypes.CDLL(str(lib_path))
    lib.zt_adam_step_cuda.restype = ctypes.c_int
    lib.zt_adam_step_cuda.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_double,
        ctypes.c_int, ctypes.c_double, ctypes.c_void_p,
    ]
    return lib


def _nvcc_version(nvcc: str) -> str:
    try:
        proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot run {nvcc}: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"{nvcc} --version failed (exit {proc.returncode})")
    return proc.stdout.strip()
