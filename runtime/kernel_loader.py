"""What the compiled kernels share: building a C++ library with a plain C ABI into the extension cache
(runtime/ops.py's Adam, runtime/codec_kernels.py's codecs), loading a library once per process with a torch
fallback (those two and runtime/cuda_adam.py), and the argument rules of one fused Adam step.

A library is built (or found in the cache) on first use. When the build fails, the fallback runs and one
warning per process says why; when the kernel's disable variable is set, the fallback runs without a warning.

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
import hashlib
import importlib.resources
import logging
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ztune import envvars

log = logging.getLogger(__name__)

# Kept in step with csrc/cpu_adam.h (enum DType), which both kernels include.
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
EXT_DIR_ENV = "ZTUNE_EXT_DIR"


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


def build_cpp_library(*, name: str, sources: Sequence[str], cflags: Sequence[str], ldflags: Sequence[str]
                      ) -> ctypes.CDLL:
    """Build (or find in the cache, module docstring) and load the shared library `name`_<key>.so.

    sources: file names in the ztune.csrc package; the first is compiled, all of them (headers too) are hashed
    into the key. cflags/ldflags: the compiler's and linker's extra flags (also in the key). Raises whatever
    torch.utils.cpp_extension raises when the build fails (no compiler, no ninja, a compile error); the caller's
    LazyBackend turns that into the fallback and one warning.
    """
    src_dir = importlib.resources.files("ztune.csrc")
    paths = [Path(str(src_dir.joinpath(*source.split("/")))) for source in sources]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    compiler = os.environ.get("CXX", "c++")
    digest.update(repr((tuple(cflags), tuple(ldflags), torch.__version__, compiler)).encode())
    key = digest.hexdigest()[:16]
    root = Path(os.environ.get(EXT_DIR_ENV) or Path.home() / ".cache" / "ztune" / "ext")
    build_dir = root / key
    full_name = f"{name}_{key}"
    lib_path = build_dir / f"{full_name}.so"
    marker = build_dir / f"{full_name}.built"
    if not _marker_matches(marker, lib_path):
        from torch.utils import cpp_extension  # imported here: it is slow and only needed for a build

        build_dir.mkdir(parents=True, exist_ok=True)
        _ensure_ninja_on_path()
        built = cpp_extension.load(
            name=full_name, sources=[str(paths[0])], extra_cflags=list(cflags), extra_ldflags=list(ldflags),
            build_directory=str(build_dir), is_python_module=False, verbose=False,
        )
        # torch returns the library path here; older versions returned None after loading it.
        lib_path = Path(built) if isinstance(built, str) else lib_path
        _write_marker(marker, lib_path)
    return ctypes.CDLL(str(lib_path))


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
