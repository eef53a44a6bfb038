"""C++ CPU kernels for the runtime's quantization codecs, with the torch code as the fallback.

csrc/codec.cpp does in one pass per block what runtime/qgz.py (qgZ int4), runtime/comm/compress.py (int8 blocks:
qwZ and int8 gradient compression; 1-bit signs) and runtime/zeropp.py do as chains of torch ops, with bitwise
the same output (the file's header says how each rounding step matches torch). It is built on first use into the
extension cache (runtime/kernel_loader.py build_cpp_library) and called through ctypes, as the fused CPU Adam
is (runtime/ops.py). When it cannot be built, the torch code runs and one CppCodecFallbackWarning per process
says why; ZTUNE_DISABLE_CPP_CODEC=1 selects the torch code without a warning.

Each function here returns True when the kernel wrote the whole result, and False when the caller must run its
torch code instead: no kernel, a tensor the kernel does not take (not a contiguous CPU tensor of a supported
dtype), or input holding inf or NaN (rare: an fp16 overflow step; torch's casts of NaN come from its vector
instructions, so those inputs always take the torch path and match it by construction).
"""

from __future__ import annotations

import ctypes

import torch

from ztune.runtime.kernel_loader import DTYPE_CODES, Backend, LazyBackend, build_cpp_library

__all__ = ["CppCodecFallbackWarning", "kernel_backend"]

_SOURCES = ("codec.cpp", "codec.h", "cpu_adam.h")  # codec.h includes cpu_adam.h (dtype codes, conversions)
# -ffp-contract=off: no multiply-add is fused (torch's codec ops round each product and sum on its own);
# -fno-trapping-math lets GCC turn the clamps' selects into min/max and vectorise them (it changes no value:
# only whether FP exceptions may be raised); no -ffast-math: IEEE rounding and NaN rules everywhere.
# No -march: the AVX2 path is chosen at run time.
_CFLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off")
_LDFLAGS: tuple[str, ...] = ()
_DISABLE_ENV = "ZTUNE_DISABLE_CPP_CODEC"
_OK, _NON_FINITE = 0, 1  # kept in step with csrc/codec.cpp (kOk, kNonFinite)
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class CppCodecFallbackWarning(UserWarning):
    """The C++ codec kernel is unavailable; the torch codec ops run instead."""


# The library, built on first use; tests reset it (_LOADER.reset()). The lambda reads _build_library at call time.
_LOADER = LazyBackend(lambda: _build_library(), disable_env=_DISABLE_ENV, warning=CppCodecFallbackWarning,
                      kernel="C++ codec kernel", fallback="the torch codec ops")


def _get_backend() -> Backend:
    return _LOADER.get()


def kernel_backend() -> str:
    """ "cpp" when the codec kernel is loaded (building it on first call), else "torch-fallback"."""
    return "cpp" if _get_backend().lib is not None else "torch-fallback"


def _build_library() -> ctypes.CDLL:
    lib = build_cpp_library(name="ztune_codec", sources=_SOURCES, cflags=_CFLAGS, ldflags=_LDFLAGS)
    signatures = {
        "zt_quantize_int4": [_P, _INT, _I64, _I64, _I64, _I64, _P, _I64],
        "zt_dequantize_int4": [_P, _I64, _I64, _P, _INT],
        "zt_quantize_int8": [_P, _INT, _I64, _I64, _P, _P],
        "zt_dequantize_int8": [_P, _P, _I64, _I64, _P, _INT, _INT],
        "zt_onebit_encode": [_P, _INT, _I64, _I64, _INT, _P, _P],
        "zt_onebit_decode": [_P, _P, _I64, _I64, _P, _INT],
        "zt_codec_baseline_only": [_INT],  # tests: run the baseline-ISA instance on an AVX2 host
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = argtypes
    return lib


def _lib_for(*tensors_dtypes: tuple[torch.Tensor, tuple[torch.dtype, ...]], rows_ok: torch.Tensor | None = None):
    """The library when every tensor is a contiguous CPU tensor of one of its dtypes, else None. `rows_ok`, one
    of them, may instead be 2-D with unit column stride (rows laid apart: see _rows)."""
    for t, dtypes in tensors_dtypes:
        layout_ok = t.is_contiguous() or (t is rows_ok and t.dim() == 2 and t.stride(1) == 1
                                          and t.stride(0) >= t.shape[1])
        if t.device.type != "cpu" or not layout_ok or t.dtype not in dtypes:
            return None
    return _get_backend().lib


def _rows(x: torch.Tensor) -> tuple[int, int]:
    """(row_numel, row_stride) in elements of `x` read row-major: a contiguous tensor is one row."""
    if x.is_contiguous() or x.dim() != 2:
        return x.numel(), x.numel()
    return x.shape[1], x.stride(0)


def _num_blocks(numel: int, block_numel: int) -> int:
    return max(1, -(-numel // block_numel))


def _mode(mode: int) -> int:
    if mode not in (0, 1, -1):
        raise ValueError(f"mode must be 0 (write), 1 (add) or -1 (subtract), got {mode!r}")
    return mode


def _check(rc: int, name: str) -> bool:
    if rc == _OK:
        return True
    if rc == _NON_FINITE:
        return False
    raise RuntimeError(f"{name} rejected its arguments (code {rc}); runtime/codec_kernels.py and "
                       "csrc/codec.cpp disagree")


_FLOATS = tuple(DTYPE_CODES)
_BYTES = (torch.uint8,)


def quantize_int4(x: torch.Tensor, out: torch.Tensor, *, block_numel: int) -> bool:
    """runtime/qgz.py's int4 piece of `x` (fp32/bf16/fp16; contiguous, or 2-D rows with unit column stride, read
    row-major as x.reshape(-1) is, without that copy) into `out` (uint8, at least the piece's bytes; the bytes
    after the packed values are zeroed)."""
    lib = _lib_for((x, _FLOATS), (out, _BYTES), rows_ok=x)
    if lib is None or out.numel() < 4 * _num_blocks(x.numel(), block_numel) + -(-x.numel() // 2):
        return False  # too small an `out`: the torch code raises its own error
    rc = lib.zt_quantize_int4(x.data_ptr(), DTYPE_CODES[x.dtype], x.numel(), *_rows(x), block_numel,
                              out.data_ptr(), out.numel())
    return _check(rc, "zt_quantize_int4")


def dequantize_int4(buf: torch.Tensor, out: torch.Tensor, *, numel: int, block_numel: int, mode: int = 0) -> bool:
    """fp32 `out` [numel] from a piece written by quantize_int4 (uint8 `buf`): `out = piece` (mode 0),
    `out += piece` (1) or `out -= piece` (-1), each rounded as those torch ops round."""
    mode = _mode(mode)
    lib = _lib_for((buf, _BYTES), (out, (torch.float32,)))
    if lib is None or out.numel() != numel or buf.numel() < 4 * _num_blocks(numel, block_numel) + -(-numel // 2):
        return False
    rc = lib.zt_dequantize_int4(buf.data_ptr(), numel, block_numel, out.data_ptr(), mode)
    return _check(rc, "zt_dequantize_int4")


def quantize_int8(x: torch.Tensor, scales: torch.Tensor, values: torch.Tensor, *, chunk_numel: int) -> bool:
    """int8 blocks of 1-D `x` (fp32/bf16/fp16): fp32 scales as raw bytes into `scales` (uint8 [4 x blocks], or a
    float32 [blocks]), values into `values` (int8 or uint8 [numel])."""
    lib = _lib_for((x, _FLOATS), (scales, (torch.uint8, torch.float32)), (values, (torch.int8, torch.uint8)))
    if (lib is None or values.numel() < x.numel()
            or scales.numel() * scales.element_size() < 4 * _num_blocks(x.numel(), chunk_numel)):
        return False
    rc = lib.zt_quantize_int8(x.data_ptr(), DTYPE_CODES[x.dtype], x.numel(), chunk_numel, scales.data_ptr(),
                              values.data_ptr())
    return _check(rc, "zt_quantize_int8")


def dequantize_int8(scales: torch.Tensor, values: torch.Tensor, out: torch.Tensor, *, chunk_numel: int,
                    mode: int = 0) -> bool:
    """float(value) x scale into `out` (fp32, bf16 or fp16 [numel]; bf16/fp16 rounded as torch's copy_ rounds)
    from int8 blocks: `scales` (uint8 bytes or float32) and `values` (int8 or uint8 bytes, numel of them).
    mode 1 / -1 (fp32 `out` only): added to / subtracted from `out` instead."""
    mode = _mode(mode)
    lib = _lib_for((scales, (torch.uint8, torch.float32)), (values, (torch.int8, torch.uint8)), (out, _FLOATS))
    if (lib is None or values.numel() != out.numel() or (mode != 0 and out.dtype != torch.float32)
            or scales.numel() * scales.element_size() < 4 * _num_blocks(out.numel(), chunk_numel)):
        return False
    rc = lib.zt_dequantize_int8(scales.data_ptr(), values.data_ptr(), out.numel(), chunk_numel, out.data_ptr(),
                                DTYPE_CODES[out.dtype], mode)
    return _check(rc, "zt_dequantize_int8")


def onebit_encode(x: torch.Tensor, scales: torch.Tensor, packed: torch.Tensor, *, chunk_numel: int,
                  mean_scales: bool) -> bool:
    """The signs of 1-D `x` (fp32/bf16/fp16) into `packed` (uint8 [ceil(numel / 8)], most significant bit
    first, 1 = x >= 0); with mean_scales, also each chunk's mean |x| into `scales` (uint8 bytes or float32
    [chunks]), summed in element order as torch's vector_norm(ord=1) sums a row (runtime/comm/compress.py checks
    that once per process); without, `scales` is not touched."""
    lib = _lib_for((x, _FLOATS), (scales, (torch.uint8, torch.float32)), (packed, _BYTES))
    if (lib is None or packed.numel() < -(-x.numel() // 8)
            or scales.numel() * scales.element_size() < 4 * _num_blocks(x.numel(), chunk_numel)):
        return False
    rc = lib.zt_onebit_encode(x.data_ptr(), DTYPE_CODES[x.dtype], x.numel(), chunk_numel, int(mean_scales),
                              scales.data_ptr(), packed.data_ptr())
    return _check(rc, "zt_onebit_encode")


def onebit_decode(packed: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, *, chunk_numel: int,
                  mode: int = 0) -> bool:
    """fp32 `out` [numel] = +scale where a sign bit is set, -scale elsewhere; mode 1 / -1: added to / subtracted
    from `out` instead."""
    mode = _mode(mode)
    lib = _lib_for((packed, _BYTES), (scales, (torch.uint8, torch.float32)), (out, (torch.float32,)))
    numel = out.numel()
    if (lib is None or packed.numel() < -(-numel // 8)
            or scales.numel() * scales.element_size() < 4 * _num_blocks(numel, chunk_numel)):
        return False
    rc = lib.zt_onebit_decode(packed.data_ptr(), scales.data_ptr(), numel, chunk_numel, out.data_ptr(), mode)
    return _check(rc, "zt_onebit_decode")
