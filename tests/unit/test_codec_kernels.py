"""The C++ codec kernel (csrc/codec.cpp via ztune.runtime.codec_kernels) against the torch code it replaces, bit
for bit: qgZ's int4 pieces (runtime/qgz.py), the int8 blocks of qwZ (runtime/zeropp.py) and of int8 gradient
compression, and the 1-bit signs with mean and rms scales (runtime/comm/compress.py), on the AVX2 and the
baseline instance, over dtypes, sizes and special blocks; plus the fallback when the build fails or
ZTUNE_DISABLE_CPP_CODEC is set."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

from ztune.config.schema import Compression
from ztune.cost.comm import INT8_CHUNK_NUMEL, ONEBIT_CHUNK_NUMEL
from ztune.runtime import codec_kernels, qgz, zeropp
from ztune.runtime.comm import compress

SIZES = [1, 2, 2047, 2048, 2049, 10_001, 5 * 2048 + 3]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", params=["best", "baseline"])
def isa(request):
    """Runs each test on the best instance this CPU has and on the baseline one."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: only the torch fallback can run here")
    assert codec_kernels.kernel_backend() == "cpp", codec_kernels._get_backend().reason
    lib = codec_kernels._get_backend().lib
    avx2 = lib.zt_codec_baseline_only(int(request.param == "baseline"))
    assert not (request.param == "baseline" and avx2)
    yield request.param
    lib.zt_codec_baseline_only(0)


def _random(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # blocks of very different ranges, so scales differ block to block
    return (torch.randn(numel, generator=g) * torch.logspace(-3, 2, numel)).to(dtype)


def _special(dtype: torch.dtype, *, b: int = qgz.QGZ_BLOCK_NUMEL, kmax: int = 7) -> dict[str, torch.Tensor]:
    """Blocks (of `b` elements, values quantized to +-kmax) that stress one rule each; all finite."""
    torch.manual_seed(b)
    big = torch.finfo(dtype).max
    steps = torch.arange(-float(kmax), kmax + 0.5, 0.5)  # absmax kmax: scale 1, so every x.5 is a tie
    ties = steps.repeat(b // steps.numel() + 1)[:b]
    tiny = torch.full((b,), 2.0 ** -140 if dtype == torch.float32 else torch.finfo(dtype).tiny)  # subnormal scale
    tiny[::3] *= -1
    one_huge = torch.randn(b)
    one_huge[17] = big
    neg_zero = torch.full((b + 5,), -0.0)
    return {
        "all_zero": torch.cat([torch.zeros(b), torch.randn(b + 7)]),
        "neg_zero": neg_zero,
        "one_huge": torch.cat([one_huge, torch.randn(9)]),
        "ties": torch.cat([ties, ties * 3, ties[:101] / 7]),
        "tiny": torch.cat([tiny, torch.randn(b)]),
    }


def _non_finite(b: int = qgz.QGZ_BLOCK_NUMEL) -> dict[str, torch.Tensor]:
    x = torch.randn(2 * b + 11, generator=torch.Generator().manual_seed(b))
    out = {}
    cases = [("nan", float("nan"), 5), ("inf", float("inf"), b + 3), ("-inf", float("-inf"), 2 * b + 10),
             ("nan_tail", float("nan"), 2 * b + 9)]
    for name, value, where in cases:
        y = x.clone()
        y[where] = value
        out[name] = y
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 as int32 bit patterns, so that NaNs compare by payload."""
    return t.contiguous().view(torch.int32)


def _int4_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(kernel-or-fallback bytes via the public function, the torch path's bytes, whether the kernel wrote)."""
    n = x.numel()
    ours = torch.full((qgz.int4_piece_bytes(n),), 0xAB, dtype=torch.uint8)  # stale bytes must be overwritten
    ran = codec_kernels.quantize_int4(x, ours.clone(), block_numel=qgz.QGZ_BLOCK_NUMEL)
    qgz.quantize_int4(x, ours)
    ref = qgz._torch_quantize_int4(x, torch.full_like(ours, 0xCD))
    return ours, ref, ran


def _check_int4_dequant(buf: torch.Tensor, numel: int, *, expect_kernel: bool) -> None:
    ref = qgz._torch_dequantize_int4(buf, numel=numel)
    out = torch.empty(numel)
    ran = codec_kernels.dequantize_int4(buf, out, numel=numel, block_numel=qgz.QGZ_BLOCK_NUMEL)
    assert ran == expect_kernel
    assert torch.equal(_bits(qgz.dequantize_int4(buf, numel=numel)), _bits(ref))
    # accumulating: add_to += piece, as `partial += dequantize_int4(...)` rounds it
    base = torch.randn(numel)
    expected = base + ref
    assert torch.equal(_bits(qgz.dequantize_int4(buf, numel=numel, add_to=base.clone())), _bits(expected))
    out = base.clone()
    ran = codec_kernels.dequantize_int4(buf, out, numel=numel, block_numel=qgz.QGZ_BLOCK_NUMEL, mode=-1)
    assert ran == expect_kernel
    if ran:
        assert torch.equal(_bits(out), _bits(base - ref))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", SIZES)
def test_int4_random_matches_torch(isa, dtype, numel):
    x = _random(numel, dtype, seed=numel)
    ours, ref, ran = _int4_pair(x)
    assert ran
    assert torch.equal(ours, ref)
    _check_int4_dequant(ours, numel, expect_kernel=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_special_blocks_match_torch(isa, dtype):
    for name, x in _special(dtype).items():
        x = x.to(dtype)
        ours, ref, ran = _int4_pair(x)
        assert ran, name
        assert torch.equal(ours, ref), name
        _check_int4_dequant(ours, x.numel(), expect_kernel=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_non_finite_input_takes_the_torch_path(isa, dtype):
    for name, x in _non_finite().items():
        x = x.to(dtype)
        ours, ref, ran = _int4_pair(x)
        assert not ran, name  # the kernel declines; quantize_int4 ran the torch code
        assert torch.equal(ours, ref), name
        _check_int4_dequant(ours, x.numel(), expect_kernel=False)  # non-finite scales: the torch code again


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_reads_qgz_strided_slices_in_place(isa, dtype):
    """QgzExchange quantizes full.view(N, L, s).transpose(0, 1)[j]: rows of s elements, L x s apart; blocks of
    2048 straddle the rows. The kernel reads that slice in place, as its reshape(-1) copy would be read."""
    for hosts, local, shard in [(2, 2, 3000), (3, 2, 1021), (2, 4, 4096), (1, 2, 2049)]:
        full = _random(hosts * local * shard, dtype, seed=shard)
        by_local = full.view(hosts, local, shard).transpose(0, 1)
        for j in range(local):
            piece = by_local[j]
            ref = qgz._torch_quantize_int4(piece.reshape(-1), torch.empty(qgz.int4_piece_bytes(piece.numel()),
                                                                         dtype=torch.uint8))
            out = torch.full_like(ref, 0xAB)
            assert codec_kernels.quantize_int4(piece, out, block_numel=qgz.QGZ_BLOCK_NUMEL)
            assert torch.equal(out, ref)
            assert torch.equal(qgz.quantize_int4(piece, torch.full_like(ref, 0xCD)), ref)


def test_int4_arguments_the_kernel_does_not_take(isa):
    x = torch.randn(4096)
    out = torch.empty(qgz.int4_piece_bytes(2048), dtype=torch.uint8)
    assert not codec_kernels.quantize_int4(x[::2], out, block_numel=qgz.QGZ_BLOCK_NUMEL)  # not contiguous
    big = torch.empty(qgz.int4_piece_bytes(4096), dtype=torch.uint8)
    assert codec_kernels.quantize_int4(x.view(64, 64), big, block_numel=qgz.QGZ_BLOCK_NUMEL)
    assert not codec_kernels.quantize_int4(x.view(64, 64).t(), big, block_numel=qgz.QGZ_BLOCK_NUMEL)  # columns
    assert not codec_kernels.quantize_int4(x.double(), out, block_numel=qgz.QGZ_BLOCK_NUMEL)
    assert not codec_kernels.quantize_int4(x, out, block_numel=qgz.QGZ_BLOCK_NUMEL)  # `out` too small
    ours = qgz.quantize_int4(x[::2], out)  # the public function still works, through torch
    assert torch.equal(ours, qgz._torch_quantize_int4(x[::2].contiguous(), torch.empty_like(out)))


# -- int8 blocks: int8_compress / int8_decompress (gradient compression), quantize_shard / dequantize_pieces (qwZ)
INT8_CHUNKS = [INT8_CHUNK_NUMEL, zeropp.QWZ_BLOCK_NUMEL]


def _check_int8(x: torch.Tensor, chunk: int, *, expect_kernel: bool) -> None:
    n = x.numel()
    h = 4 * max(1, -(-n // chunk))
    ran = codec_kernels.quantize_int8(x, torch.empty(h, dtype=torch.uint8), torch.empty(n, dtype=torch.int8),
                                      chunk_numel=chunk)
    assert ran == expect_kernel
    values, scales = compress.int8_compress(x, chunk_numel=chunk)
    ref_values, ref_scales = compress._torch_int8_compress(x, chunk_numel=chunk)
    assert torch.equal(values, ref_values) and torch.equal(_bits(scales), _bits(ref_scales))
    packed = compress.int8_compress_into(x, torch.full((h + n + 3,), 0xAB, dtype=torch.uint8), chunk_numel=chunk)
    assert torch.equal(packed, torch.cat([ref_scales.view(torch.uint8), ref_values.view(torch.uint8),
                                          torch.zeros(3, dtype=torch.uint8)]))
    out = torch.empty(n)
    assert codec_kernels.dequantize_int8(scales, values, out, chunk_numel=chunk) == expect_kernel
    ref = compress._torch_int8_decompress(ref_values, ref_scales, chunk_numel=chunk)
    assert torch.equal(_bits(compress.int8_decompress(values, scales, chunk_numel=chunk)), _bits(ref))


@pytest.mark.parametrize("chunk", INT8_CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_random_and_special_blocks_match_torch(isa, dtype, chunk):
    for numel in SIZES:
        _check_int8(_random(numel, dtype, seed=numel), chunk, expect_kernel=True)
    for x in _special(dtype, b=chunk, kmax=127).values():
        _check_int8(x.to(dtype), chunk, expect_kernel=True)
    for x in _non_finite(chunk).values():
        _check_int8(x.to(dtype), chunk, expect_kernel=False)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_qwz_pieces_match_torch(isa, out_dtype):
    """quantize_shard / dequantize_pieces, the rounding of the dequantized values to a bf16/fp16 `out` included
    (fp16: values past 65504 round to inf as torch's copy_ rounds them)."""
    shard = 2 * zeropp.QWZ_BLOCK_NUMEL + 77
    cases = {"random": _random(3 * shard, torch.float32, seed=3),
             "fp16_overflow": torch.randn(3 * shard) * 4e4,
             "nan_in_piece_2": torch.randn(3 * shard).index_fill_(0, torch.tensor([2 * shard + 5]), float("nan"))}
    for name, flat in cases.items():
        piece = zeropp.qwz_piece_bytes(shard)
        gathered = torch.full((3 * piece,), 0xAB, dtype=torch.uint8)
        ref_gathered = torch.empty_like(gathered)
        for r in range(3):
            zeropp.quantize_shard(flat[r * shard:(r + 1) * shard], gathered[r * piece:(r + 1) * piece])
            values, scales = compress._torch_int8_compress(flat[r * shard:(r + 1) * shard],
                                                           chunk_numel=zeropp.QWZ_BLOCK_NUMEL)
            ref_piece = ref_gathered[r * piece:(r + 1) * piece].zero_()
            ref_piece[:scales.numel() * 4].copy_(scales.view(torch.uint8))
            ref_piece[scales.numel() * 4:scales.numel() * 4 + shard].copy_(values.view(torch.uint8))
        assert torch.equal(gathered, ref_gathered), name
        out, ref = torch.empty(3 * shard, dtype=out_dtype), torch.empty(3 * shard, dtype=out_dtype)
        zeropp.dequantize_pieces(gathered, out, num_pieces=3)
        zeropp._torch_dequantize_pieces(gathered, ref, num_pieces=3)
        as_int = torch.int16 if out_dtype != torch.float32 else torch.int32
        assert torch.equal(out.view(as_int), ref.view(as_int)), name
        if name == "fp16_overflow" and out_dtype == torch.float16:
            assert ref.isinf().any()  # the case does reach fp16's overflow to inf


def test_int8_codec_encode_decode_match_torch(isa):
    codec = compress.Codec(Compression.INT8)
    for numel in SIZES:
        x = _random(numel, torch.float32, seed=numel + 1)
        buf = codec.encode(x)
        values, scales = compress._torch_int8_compress(x, chunk_numel=INT8_CHUNK_NUMEL)
        h = 4 * scales.numel()
        assert buf.numel() == codec.payload_bytes(numel)
        assert torch.equal(buf[:h], scales.view(torch.uint8)) and torch.equal(buf[h:h + numel],
                                                                             values.view(torch.uint8))
        assert not buf[h + numel:].any()
        assert torch.equal(codec.decode(buf, numel=numel),
                           compress._torch_int8_decompress(values, scales, chunk_numel=INT8_CHUNK_NUMEL))


# -- 1-bit signs: onebit_compress / onebit_decompress, Codec ONEBIT encode/decode --------------------------------
ONEBIT_SIZES = [1, 7, 8, 127, 128, 129, 2049, 10_001]


def _check_onebit(x: torch.Tensor, scale: str, *, expect_kernel: bool) -> None:
    n, chunk = x.numel(), ONEBIT_CHUNK_NUMEL
    nb = max(1, -(-n // chunk))
    ran = compress._kernel_onebit_encode(x, torch.empty(nb), torch.empty(-(-n // 8), dtype=torch.uint8),
                                         chunk_numel=chunk, scale=scale)
    assert ran == expect_kernel
    packed, scales = compress.onebit_compress(x, scale=scale)
    ref_packed, ref_scales = compress._torch_onebit_compress(x, chunk_numel=chunk, scale=scale)
    assert torch.equal(packed, ref_packed) and torch.equal(_bits(scales), _bits(ref_scales))
    finite_scales = bool(ref_scales.isfinite().all())
    assert codec_kernels.onebit_decode(ref_packed, ref_scales, torch.empty(n), chunk_numel=chunk) == finite_scales
    ref = compress._torch_onebit_decompress(ref_packed, ref_scales, numel=n, chunk_numel=chunk)
    assert torch.equal(_bits(compress.onebit_decompress(ref_packed, ref_scales, numel=n)), _bits(ref))
    codec = compress.Codec(Compression.ONEBIT, onebit_scale=scale)
    buf = codec.encode(x, torch.full((codec.payload_bytes(n),), 0xAB, dtype=torch.uint8))
    h = 4 * nb
    assert torch.equal(buf[:h], ref_scales.view(torch.uint8))
    assert torch.equal(buf[h:h + ref_packed.numel()], ref_packed) and not buf[h + ref_packed.numel():].any()
    assert torch.equal(_bits(codec.decode(buf, numel=n)), _bits(ref))


@pytest.mark.parametrize("scale", ["mean", "rms"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_onebit_matches_torch(isa, dtype, scale):
    for numel in ONEBIT_SIZES:
        _check_onebit(_random(numel, dtype, seed=numel), scale, expect_kernel=True)
    for x in _special(dtype, b=ONEBIT_CHUNK_NUMEL).values():  # -0.0 packs as non-negative; zero chunks: scale 0
        _check_onebit(x.to(dtype), scale, expect_kernel=True)
    for x in _non_finite(ONEBIT_CHUNK_NUMEL).values():
        # mean: the kernel's own sum is non-finite, so it declines; rms: torch's scales, the kernel's signs
        _check_onebit(x.to(dtype), scale, expect_kernel=scale == "rms")


@pytest.mark.parametrize("scale", ["mean", "rms"])
def test_onebit_scales_equal_the_padded_matrix_norms(scale):
    """_onebit_scales pads only the last chunk; each row's norm is reduced on its own, so it equals the norms of
    the whole zero-padded (chunks, 128) matrix bit for bit, with 1 thread and with several."""
    chunk = ONEBIT_CHUNK_NUMEL
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            for numel in [1, 127, 128, 129, 40 * chunk + 77, 300_001]:
                x = _random(numel, torch.float32, seed=numel).float()
                padded = torch.nn.functional.pad(x, (0, -numel % chunk)).view(-1, chunk)
                counts = torch.full((padded.shape[0],), float(chunk))
                counts[-1] = numel - (padded.shape[0] - 1) * chunk
                if scale == "rms":
                    want = torch.linalg.vector_norm(padded, ord=2, dim=1) / counts.sqrt_()
                else:
                    want = torch.linalg.vector_norm(padded, ord=1, dim=1) / counts
                assert torch.equal(compress._onebit_scales(x, chunk_numel=chunk, scale=scale), want), numel
    finally:
        torch.set_num_threads(threads)


def test_onebit_mean_scales_from_torch_when_the_kernel_sum_differs(isa, monkeypatch):
    """Where the once-per-process check finds another summation order in torch, torch sums and the kernel packs."""
    assert compress._kernel_mean_scales_match(ONEBIT_CHUNK_NUMEL)  # this torch build: the kernel's order
    monkeypatch.setattr(compress, "_kernel_mean_scales_match", lambda chunk_numel: False)
    _check_onebit(_random(3000, torch.float32, seed=5), "mean", expect_kernel=True)


@pytest.mark.parametrize("method", [Compression.INT8, Compression.ONEBIT, Compression.TOPK])
def test_codec_decode_into_matches_torch_ops(isa, method):
    """Codec.decode_into: copy_ / add_ / sub_ of decode()'s result, without the temporary where the kernel runs
    (fp32 targets; a bf16 target for the plain write), also for a buffer with a NaN scale (the torch ops)."""
    codec = compress.Codec(method)
    n = 3 * 2048 + 5
    x = _random(n, torch.float32, seed=7)
    with_nan = x.clone()
    with_nan[100] = float("nan")
    for source in (x, with_nan):
        buf = codec.encode(source)
        decoded = codec.decode(buf, numel=n)
        base = torch.randn(n)
        for mode, op in [(0, torch.Tensor.copy_), (1, torch.Tensor.add_), (-1, torch.Tensor.sub_)]:
            got = codec.decode_into(buf, base.clone(), mode=mode)
            assert torch.equal(_bits(got), _bits(op(base.clone(), decoded))), mode
        got16 = codec.decode_into(buf, torch.empty(n, dtype=torch.bfloat16))
        assert torch.equal(got16.view(torch.int16), decoded.bfloat16().view(torch.int16))


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    def broken_build():
        raise RuntimeError("Error building extension 'ztune_codec': c++: not found")

    monkeypatch.setattr(codec_kernels, "_build_library", broken_build)
    monkeypatch.setattr(codec_kernels._LOADER, "_backend", None)
    monkeypatch.delenv("ZTUNE_DISABLE_CPP_CODEC", raising=False)
    x = _random(5000, torch.bfloat16, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert codec_kernels.kernel_backend() == "torch-fallback"
        ours, ref, ran = _int4_pair(x)
        deq = qgz.dequantize_int4(ours, numel=x.numel())
        for method in (Compression.INT8, Compression.ONEBIT):  # every codec runs its torch code, no new warning
            codec = compress.Codec(method)
            buf = codec.encode(x.float())
            assert torch.equal(codec.decode_into(buf, torch.zeros(x.numel()), mode=1), codec.decode(buf, numel=5000))
        pieces = torch.empty(2 * zeropp.qwz_piece_bytes(2500), dtype=torch.uint8)
        for r, piece in enumerate(pieces.view(2, -1)):
            zeropp.quantize_shard(x[r * 2500:(r + 1) * 2500], piece)
        weights, ref_weights = torch.empty(5000, dtype=torch.bfloat16), torch.empty(5000, dtype=torch.bfloat16)
        zeropp.dequantize_pieces(pieces, weights, num_pieces=2)
        zeropp._torch_dequantize_pieces(pieces, ref_weights, num_pieces=2)
        assert torch.equal(weights, ref_weights)
    ours_warnings = [w for w in caught if issubclass(w.category, codec_kernels.CppCodecFallbackWarning)]
    assert len(ours_warnings) == 1 and "c++: not found" in str(ours_warnings[0].message)
    assert not ran and torch.equal(ours, ref)
    assert torch.equal(deq, qgz._torch_dequantize_int4(ref, numel=x.numel()))


def test_disable_env_forces_fallback_without_warning(monkeypatch):
    monkeypatch.setenv("ZTUNE_DISABLE_CPP_CODEC", "1")
    monkeypatch.setattr(codec_kernels, "_build_library", lambda: pytest.fail("must not build"))
    monkeypatch.setattr(codec_kernels._LOADER, "_backend", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", codec_kernels.CppCodecFallbackWarning)
        assert codec_kernels.kernel_backend() == "torch-fallback"
        ours, ref, ran = _int4_pair(_random(3000, torch.float32, seed=2))
    assert not ran and torch.equal(ours, ref)
