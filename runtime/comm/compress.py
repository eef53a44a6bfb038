"""Gradient compressors: pure compress/decompress pairs, their byte packing, and error feedback.

Formats (bytes per element must match ztune.cost.comm.wire_bytes_per_element, which the estimate uses):
- bf16: a cast; reduced natively in bf16 by the ordinary collectives (no error feedback needed: the rounding
  error is unbiased and 2^-9 relative).
- int8: per chunk of INT8_CHUNK_NUMEL elements, one fp32 scale absmax / 127 and round-to-nearest int8 values.
- onebit: per chunk of ONEBIT_CHUNK_NUMEL elements, one fp32 scale mean(|x|) and the signs, 8 per byte
  (Seide et al. 2014, "1-bit SGD"; Tang et al. 2021, "1-bit Adam", which uses the same scale).
- topk: the k = ceil(ratio x numel) largest-magnitude values in the gradient dtype plus int32 indices
  (Lin et al. 2018, "Deep Gradient Compression").

The lossy formats (int8, onebit, topk) are biased per step, so each sender keeps an error-feedback residual:
it compresses x + e and keeps e <- (x + e) - decompress(compress(x + e)), so what is not sent now is sent
later and the sum of what was sent tracks the sum of the inputs (Seide et al. 2014; Karimireddy et al. 2019,
"Error Feedback Fixes SignSGD"; used by 1-bit Adam for workers and server alike, and by DGC as local
gradient accumulation).

Wire buffers are one flat uint8 tensor per compressed piece, so a piece goes through a single collective:
scales (fp32) or indices (int32) first, then the values, padded to a multiple of 4 bytes so that pieces laid
end to end stay aligned for the fp32/int32 views.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ztune.config.schema import Compression
from ztune.cost.comm import INT8_CHUNK_NUMEL, ONEBIT_CHUNK_NUMEL, TOPK_INDEX_BYTES
from ztune.runtime import codec_kernels

_INT8_MAX = 127  # symmetric range: -128 is never produced, so the scale maps absmax to exactly 127
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
# Row b: the 8 signs (+1.0 for a set bit, -1.0 otherwise) that byte value b packs, most significant bit first.
_SIGN_TABLE = ((torch.arange(256, dtype=torch.uint8)[:, None] & _BIT_WEIGHTS) != 0).float().mul_(2).sub_(1)


def _align4(nbytes: int) -> int:
    return -(-nbytes // 4) * 4


def _chunked(x: torch.Tensor, chunk_numel: int) -> torch.Tensor:
    """`x` (1-D fp32) zero-padded to whole chunks, shaped (num_chunks, chunk_numel)."""
    num_chunks = max(1, -(-x.numel() // chunk_numel))
    pad = num_chunks * chunk_numel - x.numel()
    return (torch.nn.functional.pad(x, (0, pad)) if pad else x).view(num_chunks, chunk_numel)


# -- pure compress / decompress pairs (1-D tensors in, 1-D fp32 out) ------------------------------------------
def bf16_compress(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16)


def bf16_decompress(values: torch.Tensor) -> torch.Tensor:
    return values.float()


def int8_compress(x: torch.Tensor, *, chunk_numel: int = INT8_CHUNK_NUMEL) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (values int8 [numel], scales fp32 [ceil(numel / chunk)]). |decompress - x| <= scale / 2 per element.
    The C++ codec kernel (runtime/codec_kernels.py) computes it where it can, bitwise as _torch_int8_compress."""
    values = torch.empty(x.numel(), dtype=torch.int8, device=x.device)
    scales = torch.empty(max(1, -(-x.numel() // chunk_numel)), dtype=torch.float32, device=x.device)
    if codec_kernels.quantize_int8(x, scales, values, chunk_numel=chunk_numel):
        return values, scales
    return _torch_int8_compress(x, chunk_numel=chunk_numel)


def int8_compress_into(x: torch.Tensor, out: torch.Tensor, *, chunk_numel: int) -> torch.Tensor:
    """int8_compress of 1-D `x` laid into `out` (uint8 [>= 4 x chunks + numel]): the fp32 scales, the values,
    then zeros to the end of `out`."""
    numel, h = x.numel(), 4 * max(1, -(-x.numel() // chunk_numel))
    if not codec_kernels.quantize_int8(x, out[:h], out[h:h + numel], chunk_numel=chunk_numel):
        values, scales = _torch_int8_compress(x, chunk_numel=chunk_numel)
        out[:h].copy_(scales.view(torch.uint8))
        out[h:h + numel].copy_(values.view(torch.uint8))
    out[h + numel:].zero_()
    return out


def _torch_int8_compress(x: torch.Tensor, *, chunk_numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunks = _chunked(x.float(), chunk_numel)
    scales = chunks.abs().amax(dim=1) / _INT8_MAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(chunks / safe[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return values.view(-1)[:x.numel()], scales


def int8_decompress(values: torch.Tensor, scales: torch.Tensor, *, chunk_numel: int = INT8_CHUNK_NUMEL
                    ) -> torch.Tensor:
    """fp32 [numel] from int8_compress's (values, scales); the kernel where it can (runtime/codec_kernels.py)."""
    out = torch.empty(values.numel(), dtype=torch.float32, device=values.device)
    if codec_kernels.dequantize_int8(scales, values, out, chunk_numel=chunk_numel):
        return out
    return _torch_int8_decompress(values, scales, chunk_numel=chunk_numel)


def _torch_int8_decompress(values: torch.Tensor, scales: torch.Tensor, *, chunk_numel: int) -> torch.Tensor:
    numel = values.numel()
    return (_chunked(values.float(), chunk_numel) * scales[:, None]).view(-1)[:numel]


def onebit_compress(x: torch.Tensor, *, chunk_numel: int = ONEBIT_CHUNK_NUMEL, scale: str = "mean"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (signs packed 8 per byte, most significant bit first, 1 = non-negative [ceil(numel / 8)],
    scales fp32 [ceil(numel / chunk)]). decompress(x) = sign(x) * scale, the scale per chunk being
    scale="mean": mean |x|, the one that minimises the squared error for a fixed sign pattern (Seide et al. 2014);
    scale="rms": ||x|| / sqrt(chunk), the one whose code has the chunk's norm (DeepSpeed's OnebitAdam, there one
    per worker buffer and one per server chunk). The C++ codec kernel (runtime/codec_kernels.py) packs the signs
    (and sums the mean scales) where it can, bitwise as _torch_onebit_compress."""
    numel = x.numel()
    packed = torch.empty(-(-numel // 8), dtype=torch.uint8, device=x.device)
    scales = torch.empty(max(1, -(-numel // chunk_numel)), dtype=torch.float32, device=x.device)
    if _kernel_onebit_encode(x, scales, packed, chunk_numel=chunk_numel, scale=scale):
        return packed, scales
    return _torch_onebit_compress(x, chunk_numel=chunk_numel, scale=scale)


def onebit_compress_into(x: torch.Tensor, out: torch.Tensor, *, chunk_numel: int = ONEBIT_CHUNK_NUMEL,
                         scale: str = "mean") -> torch.Tensor:
    """onebit_compress of 1-D `x` laid into `out` (uint8 [>= 4 x chunks + ceil(numel / 8)]): the fp32 scales,
    the packed signs, then zeros to the end of `out`."""
    numel = x.numel()
    h, p = 4 * max(1, -(-numel // chunk_numel)), -(-numel // 8)
    if not _kernel_onebit_encode(x, out[:h], out[h:h + p], chunk_numel=chunk_numel, scale=scale):
        packed, scales = _torch_onebit_compress(x, chunk_numel=chunk_numel, scale=scale)
        out[:h].copy_(scales.view(torch.uint8))
        out[h:h + p].copy_(packed)
    out[h + p:].zero_()
    return out


def _kernel_onebit_encode(x: torch.Tensor, scales: torch.Tensor, packed: torch.Tensor, *, chunk_numel: int,
                          scale: str) -> bool:
    """The kernel's signs, with its mean scales where they are torch's bit for bit (checked once per process
    and chunk size), else torch's scales; False when the kernel does not run (the caller runs the torch code)."""
    if codec_kernels.kernel_backend() != "cpp" or not x.is_contiguous() or x.device.type != "cpu":
        return False
    if scale == "mean" and _kernel_mean_scales_match(chunk_numel):
        return codec_kernels.onebit_encode(x, scales, packed, chunk_numel=chunk_numel, mean_scales=True)
    theirs = _onebit_scales(x.float(), chunk_numel=chunk_numel, scale=scale)
    if not codec_kernels.onebit_encode(x, scales, packed, chunk_numel=chunk_numel, mean_scales=False):
        return False
    scales.view(-1).copy_(theirs.view(torch.uint8) if scales.dtype == torch.uint8 else theirs)
    return True


@functools.cache
def _kernel_mean_scales_match(chunk_numel: int) -> bool:
    """Whether the kernel's mean |x| per chunk is torch's bit for bit on this torch build: 64 chunks of values
    spanning 8 decades, where any other summation order would round differently somewhere."""
    g = torch.Generator().manual_seed(0)
    numel = 64 * chunk_numel + chunk_numel // 2 + 3
    x = torch.randn(numel, generator=g) * torch.logspace(-4, 4, numel)[torch.randperm(numel, generator=g)]
    ours = torch.empty(max(1, -(-numel // chunk_numel)), dtype=torch.float32)
    packed = torch.empty(-(-numel // 8), dtype=torch.uint8)
    if not codec_kernels.onebit_encode(x, ours, packed, chunk_numel=chunk_numel, mean_scales=True):
        return False
    return torch.equal(ours, _onebit_scales(x, chunk_numel=chunk_numel, scale="mean"))


def _onebit_scales(x: torch.Tensor, *, chunk_numel: int, scale: str) -> torch.Tensor:
    """Per-chunk scales of 1-D fp32 `x` (onebit_compress's), fp32 [ceil(numel / chunk)]."""
    numel = x.numel()
    num_chunks = max(1, -(-numel // chunk_numel))
    counts = torch.full((num_chunks,), float(chunk_numel), device=x.device)
    counts[-1] = numel - (num_chunks - 1) * chunk_numel
    ord_ = 2 if scale == "rms" else 1  # ord 1: sum |x| in one pass, no |x| copy
    # Each row's norm is reduced on its own, so the whole chunks (a view) and the zero-padded last one (a copy
    # of one chunk, not of all of x) give the norms of the padded (num_chunks, chunk) matrix bit for bit.
    whole = numel // chunk_numel
    if whole in (0, num_chunks):
        norms = torch.linalg.vector_norm(_chunked(x, chunk_numel), ord=ord_, dim=1)
    else:
        split = whole * chunk_numel
        norms = torch.cat([torch.linalg.vector_norm(x[:split].reshape(whole, chunk_numel), ord=ord_, dim=1),
                           torch.linalg.vector_norm(_chunked(x[split:], chunk_numel), ord=ord_, dim=1)])
    return norms / counts.sqrt_() if scale == "rms" else norms / counts


def _torch_onebit_compress(x: torch.Tensor, *, chunk_numel: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    numel = x.numel()
    scales = _onebit_scales(x, chunk_numel=chunk_numel, scale=scale)
    bits = x >= 0
    pad = -numel % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    # Shift-or of the 8 columns: one pass over the signs, 8x fewer byte ops than a weighted sum of all of them.
    columns = bits.view(torch.uint8).view(-1, 8)
    packed = columns[:, 0] << 7
    for k in range(1, 8):
        packed |= columns[:, k] << (7 - k)
    return packed, scales


def onebit_decompress(packed: torch.Tensor, scales: torch.Tensor, *, numel: int,
                      chunk_numel: int = ONEBIT_CHUNK_NUMEL) -> torch.Tensor:
    """fp32 [numel]: +scale for a set bit, -scale otherwise; the kernel where it can (runtime/codec_kernels.py),
    bitwise as _torch_onebit_decompress."""
    out = torch.empty(numel, dtype=torch.float32, device=packed.device)
    if codec_kernels.onebit_decode(packed, scales, out, chunk_numel=chunk_numel):
        return out
    return _torch_onebit_decompress(packed, scales, numel=numel, chunk_numel=chunk_numel)


def _torch_onebit_decompress(packed: torch.Tensor, scales: torch.Tensor, *, numel: int, chunk_numel: int
                             ) -> torch.Tensor:
    # One gather of each byte's 8 signs from a 256-row table, then the scales in place: 2 passes over the
    # output instead of unpacking bit by bit (about 5x faster on a 31M-element tiny-llama momentum).
    signs = _SIGN_TABLE.to(packed.device).index_select(0, packed.long()).view(-1)[:numel]
    return _chunked(signs, chunk_numel).mul_(scales[:, None]).view(-1)[:numel]


def topk_numel(numel: int, ratio: float) -> int:
    """Values top-k keeps out of `numel`: ceil(ratio x numel), at least 1."""
    return min(numel, max(1, math.ceil(ratio * numel)))


def topk_compress(x: torch.Tensor, *, k: int, value_dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (values [k] in value_dtype, indices int32 [k]) of the k largest |x|."""
    indices = x.abs().topk(k, sorted=False).indices
    return x[indices].to(value_dtype), indices.to(torch.int32)


def topk_decompress(values: torch.Tensor, indices: torch.Tensor, *, numel: int) -> torch.Tensor:
    out = torch.zeros(numel, dtype=torch.float32, device=values.device)
    out[indices.long()] = values.float()
    return out


# -- codecs: a format plus its byte packing ------------------------------------------------------------------
@dataclass(frozen=True)
class Codec:
    """One lossy format with error feedback: encode(x) -> uint8 [payload_bytes(numel)], decode -> fp32."""

    method: Compression
    topk_ratio: float = 0.01
    value_dtype: torch.dtype = torch.float32  # top-k's values are sent in the gradient dtype
    onebit_scale: str = "mean"  # onebit's per-chunk scale: "mean" |x| or "rms" (onebit_compress)

    def payload_bytes(self, numel: int) -> int:
        """Wire bytes for `numel` elements, padded to a multiple of 4."""
        if self.method is Compression.INT8:
            return _align4(4 * -(-numel // INT8_CHUNK_NUMEL) + numel)
        if self.method is Compression.ONEBIT:
            return _align4(4 * -(-numel // ONEBIT_CHUNK_NUMEL) + -(-numel // 8))
        if self.method is Compression.TOPK:
            value_bytes = torch.tensor([], dtype=self.value_dtype).element_size()
            return _align4(topk_numel(numel, self.topk_ratio) * (TOPK_INDEX_BYTES + value_bytes))
        raise ValueError(f"no error-feedback codec for compression {self.method.value!r}")

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Compress 1-D `x` into `out` (uint8 [payload_bytes(numel)], allocated when None)."""
        numel = x.numel()
        if out is None:
            out = torch.empty(self.payload_bytes(numel), dtype=torch.uint8, device=x.device)
        if self.method is Compression.INT8:
            return int8_compress_into(x, out, chunk_numel=INT8_CHUNK_NUMEL)
        if self.method is Compression.ONEBIT:
            return onebit_compress_into(x, out, scale=self.onebit_scale)
        values, head = topk_compress(x, k=topk_numel(numel, self.topk_ratio), value_dtype=self.value_dtype)
        head_bytes, value_bytes = head.view(torch.uint8), values.reshape(-1).view(torch.uint8)
        h, v = head_bytes.numel(), value_bytes.numel()
        out[:h].copy_(head_bytes)
        out[h:h + v].copy_(value_bytes)
        out[h + v:].zero_()
        return out

    def is_finite(self, buf: torch.Tensor, *, numel: int) -> bool:
        """Whether the input of an encoded buffer was finite, from its scales (or top-k values) alone."""
        if self.method is Compression.TOPK:
            k = topk_numel(numel, self.topk_ratio)
            value_bytes = k * torch.tensor([], dtype=self.value_dtype).element_size()
            head = buf[4 * k:4 * k + value_bytes].view(self.value_dtype)
        else:
            chunk = INT8_CHUNK_NUMEL if self.method is Compression.INT8 else ONEBIT_CHUNK_NUMEL
            head = buf[:4 * -(-numel // chunk)].view(torch.float32)
        return bool(torch.isfinite(head).all())

    def decode_into(self, buf: torch.Tensor, out: torch.Tensor, *, mode: int = 0) -> torch.Tensor:
        """Decode a buffer written by encode (of out.numel() elements) into `out`: `out.copy_(decoded)` (mode 0),
        `out += decoded` (1) or `out -= decoded` (-1), rounded as those torch ops round, without the decoded
        temporary where the C++ codec kernel runs (runtime/codec_kernels.py). Returns `out`."""
        numel = out.numel()
        done = False
        if self.method is Compression.INT8:
            h = 4 * -(-numel // INT8_CHUNK_NUMEL)
            done = codec_kernels.dequantize_int8(buf[:h], buf[h:h + numel], out, chunk_numel=INT8_CHUNK_NUMEL,
                                                 mode=mode)
        elif self.method is Compression.ONEBIT:
            h = 4 * -(-numel // ONEBIT_CHUNK_NUMEL)
            done = codec_kernels.onebit_decode(buf[h:h + -(-numel // 8)], buf[:h], out,
                                               chunk_numel=ONEBIT_CHUNK_NUMEL, mode=mode)
        if not done:
            decoded = self._decode(buf, numel=numel)
            {0: out.copy_, 1: out.add_, -1: out.sub_}[mode](decoded)
        return out

    def decode(self, buf: torch.Tensor, *, numel: int) -> torch.Tensor:
        """fp32 [numel] from a buffer written by encode."""
        return self._decode(buf, numel=numel)

    def _decode(self, buf: torch.Tensor, *, numel: int) -> torch.Tensor:
        # decode's body, which decode_into also runs (so that a count of decode calls sees each decode once)
        if self.method is Compression.INT8:
            h = 4 * -(-numel // INT8_CHUNK_NUMEL)
            return int8_decompress(buf[h:h + numel].view(torch.int8), buf[:h].view(torch.float32))
        if self.method is Compression.ONEBIT:
            h = 4 * -(-numel // ONEBIT_CHUNK_NUMEL)
            return onebit_decompress(buf[h:h + -(-numel // 8)], buf[:h].view(torch.float32), numel=numel)
        k = topk_numel(numel, self.topk_ratio)
        value_bytes = k * torch.tensor([], dtype=self.value_dtype).element_size()
        indices = buf[:4 * k].view(torch.int32)
        values = buf[4 * k:4 * k + value_bytes].view(self.value_dtype)
        return topk_decompress(values, indices, numel=numel)


class ErrorFeedback:
    """A sender's residual for one flat buffer of `numel` elements (fp32, allocated on first use)."""

    def __init__(self, codec: Codec, *, numel: int, device: torch.device):
        self.codec = codec
        self.numel = numel
        self.device = device
        self.residual: torch.Tensor | None = None

    def compress(self, x: torch.Tensor, *, pieces: int = 1) -> torch.Tensor:
        """Encode x + residual as `pieces` equal slices laid end to end (uint8 [pieces x
        payload_bytes(numel / pieces)]), and keep what the encoding lost as the new residual."""
        if self.residual is None:
            self.residual = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        y = self.residual.add_(x)  # y aliases the residual: it is overwritten slice by slice below
        piece_numel = self.numel // pieces
        piece_bytes = self.codec.payload_bytes(piece_numel)
        out = torch.empty(pieces * piece_bytes, dtype=torch.uint8, device=self.device)
        for r in range(pieces):
            piece = y[r * piece_numel:(r + 1) * piece_numel]
            buf = self.codec.encode(piece, out[r * piece_bytes:(r + 1) * piece_bytes])
            self.codec.decode_into(buf, piece, mode=-1)  # piece -= decode(buf)
        # An fp16 overflow step (inf/nan gradients) is skipped by the engine; do not carry it into later steps.
        # Any non-finite input makes a scale (a max or a sum) or a top-k value non-finite: check those only.
        if not all(self.codec.is_finite(out[r * piece_bytes:(r + 1) * piece_bytes], numel=piece_numel)
                   for r in range(pieces)):
            self.residual.zero_()
        return out
