"""Gradient compressors (runtime/comm/compress.py): round-trip error bounds, byte sizes against the cost model,
byte packing, and error feedback (the sum of what was sent tracks the sum of the inputs)."""

from __future__ import annotations

import math

import pytest
import torch

from ztune.config.schema import Compression
from ztune.cost.comm import INT8_CHUNK_NUMEL, ONEBIT_CHUNK_NUMEL, wire_bytes_per_element
from ztune.runtime.comm.compress import (
    Codec,
    ErrorFeedback,
    bf16_compress,
    bf16_decompress,
    int8_compress,
    int8_decompress,
    onebit_compress,
    onebit_decompress,
    topk_compress,
    topk_decompress,
    topk_numel,
)

# Sizes that are and are not whole chunks / whole bytes of signs.
NUMELS = [1, 7, 512, 2048, 5000, 3 * 2048 + 13]


def _x(numel: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Mixed magnitudes, as in a flat bucket holding several parameters.
    return torch.randn(numel, generator=gen) * torch.logspace(-3, 0, numel)


def test_bf16_round_trip_within_unit_roundoff():
    x = _x(5000)
    y = bf16_decompress(bf16_compress(x))
    assert ((y - x).abs() <= x.abs() * 2**-8).all()  # bf16: 8-bit mantissa, round to nearest


@pytest.mark.parametrize("numel", NUMELS)
def test_int8_error_at_most_half_a_step_per_chunk(numel):
    x = _x(numel)
    values, scales = int8_compress(x)
    assert values.dtype == torch.int8 and values.numel() == numel
    assert scales.numel() == math.ceil(numel / INT8_CHUNK_NUMEL)
    y = int8_decompress(values, scales)
    for c in range(scales.numel()):
        sl = slice(c * INT8_CHUNK_NUMEL, (c + 1) * INT8_CHUNK_NUMEL)
        assert scales[c] == pytest.approx(x[sl].abs().max().item() / 127, rel=1e-6)
        assert (y[sl] - x[sl]).abs().max() <= scales[c] / 2 * (1 + 1e-5)


def test_int8_zero_chunk_stays_zero():
    x = torch.zeros(1024)
    x[600] = 3.0
    y = int8_decompress(*int8_compress(x))
    assert torch.equal(y, x)


@pytest.mark.parametrize("numel", NUMELS)
def test_onebit_is_sign_times_chunk_mean_magnitude(numel):
    x = _x(numel, seed=1)
    packed, scales = onebit_compress(x)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 8)
    y = onebit_decompress(packed, scales, numel=numel)
    assert torch.equal(y >= 0, x >= 0)
    for c in range(scales.numel()):
        sl = slice(c * ONEBIT_CHUNK_NUMEL, (c + 1) * ONEBIT_CHUNK_NUMEL)
        assert torch.allclose(y[sl].abs(), x[sl].abs().mean().expand(y[sl].numel()), rtol=1e-6)


def test_onebit_packs_most_significant_bit_first():
    x = torch.tensor([1.0, -1, -1, -1, -1, -1, -1, 1, -2])
    packed, _ = onebit_compress(x)
    assert packed.tolist() == [0b1000_0001, 0]


@pytest.mark.parametrize("numel", [10, 5000])
def test_topk_keeps_exactly_the_largest(numel):
    x = _x(numel, seed=2)
    k = topk_numel(numel, 0.1)
    values, indices = topk_compress(x, k=k)
    y = topk_decompress(values, indices, numel=numel)
    kept = y != 0
    assert int(kept.sum()) == k
    assert torch.equal(y[kept], x[kept])  # fp32 values are sent exactly
    assert x[kept].abs().min() >= x[~kept].abs().max()


@pytest.mark.parametrize("method", [Compression.INT8, Compression.ONEBIT, Compression.TOPK])
@pytest.mark.parametrize("numel", NUMELS)
def test_codec_packs_the_pure_functions(method, numel):
    codec = Codec(method, topk_ratio=0.05)
    x = _x(numel, seed=3)
    buf = codec.encode(x)
    assert buf.dtype == torch.uint8 and buf.numel() == codec.payload_bytes(numel) and buf.numel() % 4 == 0
    y = codec.decode(buf, numel=numel)
    if method is Compression.INT8:
        want = int8_decompress(*int8_compress(x))
    elif method is Compression.ONEBIT:
        want = onebit_decompress(*onebit_compress(x), numel=numel)
    else:
        want = topk_decompress(*topk_compress(x, k=topk_numel(numel, 0.05)), numel=numel)
    assert torch.equal(y, want)


@pytest.mark.parametrize("method", [Compression.INT8, Compression.ONEBIT, Compression.TOPK])
def test_payload_bytes_match_the_cost_model(method):
    numel = 1 << 20
    codec = Codec(method, topk_ratio=0.01)
    want = numel * wire_bytes_per_element(method=method, grad_bytes=4, topk_ratio=0.01)
    assert codec.payload_bytes(numel) == pytest.approx(want, rel=1e-4)
    ratio = codec.payload_bytes(numel) / (4 * numel)
    print(f"{method.value}: {ratio:.4f}x of fp32")
    assert ratio <= {Compression.INT8: 0.27, Compression.ONEBIT: 0.04, Compression.TOPK: 0.021}[method]


def test_topk_values_in_bf16_take_two_bytes():
    codec = Codec(Compression.TOPK, topk_ratio=0.01, value_dtype=torch.bfloat16)
    assert codec.payload_bytes(100_000) == 1000 * (4 + 2)
    x = _x(100_000).to(torch.bfloat16)
    y = codec.decode(codec.encode(x), numel=x.numel())
    assert torch.equal(y[y != 0], x.float()[y != 0])


@pytest.mark.parametrize("method", [Compression.INT8, Compression.ONEBIT, Compression.TOPK])
def test_error_feedback_sum_of_sent_tracks_sum_of_inputs(method):
    """With error feedback, sum(sent) = sum(inputs) - residual exactly, and the residual grows more slowly
    than the sum, so the relative error of the running sum falls with the number of steps; without feedback
    each step's bias adds up and it does not fall. (Sign compression of a vector with magnitudes spread over
    two decades is a weak contraction, so its residual settles slowly: 0.27 -> 0.10 from 20 to 200 steps.)"""
    numel = 4096
    codec = Codec(method, topk_ratio=0.05)
    ef = ErrorFeedback(codec, numel=numel, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(4)
    mean = torch.randn(numel, generator=gen) * torch.logspace(-2, 0, numel)  # a persistent gradient direction
    sum_x, sum_sent, sum_plain = torch.zeros(numel), torch.zeros(numel), torch.zeros(numel)
    errors = {}
    for step in range(1, 201):
        x = mean + 0.5 * torch.randn(numel, generator=gen) * mean.abs()
        sum_x += x
        sum_sent += codec.decode(ef.compress(x), numel=numel)
        sum_plain += codec.decode(codec.encode(x), numel=numel)
        errors[step] = ((sum_sent - sum_x).norm() / sum_x.norm()).item()
    torch.testing.assert_close(sum_sent, sum_x - ef.residual, rtol=1e-4, atol=1e-3)
    err_plain = ((sum_plain - sum_x).norm() / sum_x.norm()).item()
    print(f"{method.value}: relative error of the running sum with feedback {errors[20]:.4f} after 20 steps, "
          f"{errors[200]:.4f} after 200; without feedback {err_plain:.4f}")
    assert errors[200] < errors[20] / 2.5
    assert errors[200] < err_plain / 5
    assert errors[200] < 0.15


def test_error_feedback_over_pieces_equals_piecewise_encoding():
    codec = Codec(Compression.INT8)
    x = _x(4000, seed=5)
    ef = ErrorFeedback(codec, numel=4000, device=torch.device("cpu"))
    buf = ef.compress(x, pieces=4)
    piece_bytes = codec.payload_bytes(1000)
    assert buf.numel() == 4 * piece_bytes
    for r in range(4):
        assert torch.equal(buf[r * piece_bytes:(r + 1) * piece_bytes], codec.encode(x[r * 1000:(r + 1) * 1000]))


@pytest.mark.parametrize("method", [Compression.INT8, Compression.ONEBIT, Compression.TOPK])
def test_non_finite_gradient_does_not_poison_the_residual(method):
    codec = Codec(method, topk_ratio=0.1)
    ef = ErrorFeedback(codec, numel=1000, device=torch.device("cpu"))
    ef.compress(_x(1000))
    bad = _x(1000)
    bad[10] = float("inf")
    bad[20] = float("nan")
    assert not codec.is_finite(codec.encode(bad), numel=1000)
    ef.compress(bad)
    assert torch.equal(ef.residual, torch.zeros(1000))  # the fp16 overflow step is skipped and forgotten
    ef.compress(_x(1000, seed=1))
    assert torch.isfinite(ef.residual).all()
