"""What the CPU (runtime/ops.py) and CUDA (runtime/cuda_adam.py) Adam kernels share: loading a compiled
library once per process with a torch fallback, and the argument rules of one fused Adam step.

A library is built (or found in the cache) on first use. When the build fails, the fallback runs and one
warning per process says why; when the kernel's disable variable is set, the fallback runs without a warning.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ztune import envvars

log = logging.getLogger(__name__)

# Kept in step with csrc/cpu_adam.h (enum DType), which both kernels include.
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


@dataclass(frozen=True)
class Backend:
    lib: ctypes.CDLL | None
    reason: str  # why the fallback runs; empty when lib is set


class LazyBackend:
    """The library `build()` returns, built on the first `get()` of the process (thread-safe), or the fallback.

    build: returns the loaded library or raises (any exception means "use the fallback", its first line is the
    reason). disable_env: a boolean variable declared in ztune/envvars.py that, when true, selects the
    fallback without building (a value that is not a boolean is an EnvVarError). warning: the category
    warned once when a build fails; `fallback` names what runs instead.
    """

    def __init__(self, build: Callable[[], ctypes.CDLL], *, disable_env: str, warning: type[Warning],
                 kernel: str, fallback: str):
        self._build = build
        self._disable_env = disable_env
        self._warning = warning
        self._kernel = kernel
        self._fallback = fallback
        self._backend: Backend | None = None
        self._lock = threading.Lock()

    def get(self) -> Backend:
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = self._load()
        return self._backend

    def reset(self) -> Backend | None:
        """Forget the loaded backend (tests: the next get() loads again); returns the one forgotten."""
        with self._lock:
            old, self._backend = self._backend, None
        return old

    def restore(self, backend: Backend | None) -> None:
        with self._lock:
            self._backend = backend

    def _load(self) -> Backend:
        if envvars.read(self._disable_env):
            log.info("%s is set: using %s", self._disable_env, self._fallback)
            return Backend(lib=None, reason=f"{self._disable_env} is set")
        try:
            lib = self._build()
        except Exception as exc:  # noqa: BLE001 -- any build failure means "use the fallback", and says why
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reason = f"{type(exc).__name__}: {first_line}"
            warnings.warn(f"ztune: {self._kernel} unavailable ({reason}); using {self._fallback} instead",
                          self._warning, stacklevel=5)
            return Backend(lib=None, reason=reason)
        return Backend(lib=lib, reason="")


def check_adam_tensors(param, grad, exp_avg, exp_avg_sq, *, out, step: int, device_type: str,
                       other_path: str = "") -> None:
    """The rules of one fused Adam step on a flat shard; raises ValueError/TypeError naming the tensor.

    param, exp_avg, exp_avg_sq: contiguous fp32 tensors of one numel on one `device_type` device; grad: fp32,
    bf16 or fp16, same numel and device; out: None or bf16/fp16, same numel and device; step >= 1.
    `other_path` is appended to the device error (where tensors on another device should go).
    """
    tensors = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if out is not None:
        tensors["out"] = out
    for name, t in tensors.items():
        if t.device.type != device_type or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {device_type.upper()} tensor (got device {t.device}, "
                             f"contiguous={t.is_contiguous()}){other_path}")
        if t.device != param.device:
            raise ValueError(f"{name} is on {t.device}, param on {param.device}: all must be on one device")
        if t.numel() != param.numel():
            raise ValueError(f"{name} has {t.numel()} elements, param has {param.numel()}")
    for name in ("param", "exp_avg", "exp_avg_sq"):
        if tensors[name].dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {tensors[name].dtype}")
    if grad.dtype not in DTYPE_CODES:
        raise TypeError(f"grad must be float32, bfloat16 or float16, got {grad.dtype}")
    if out is not None and out.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"out must be bfloat16 or float16, got {out.dtype}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the count after this update), got {step}")
