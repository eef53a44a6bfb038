"""Codec compute per optimizer step: the elements each rank encodes and decodes for gradient compression, 1-bit
Adam and ZeRO++ (qwZ, qgZ), and the seconds that takes at a profile's measured codec rates.

Why it is charged: compressing trades bytes on the wire for work on the cores (or SMs) that also compute. On
one host with shared memory the runtime's int8 compression took 817 ms/step against 209 ms uncompressed
(docs/bench/compression.md), and in the cluster in a box 1-bit Adam and ZeRO++ measured 0.5-4.6 s/step slower
than flat stage 0 though they send ~10x fewer bytes (docs/bench/cost_cluster.md): a model that leaves the codec
out calls compression free and recommends it everywhere.

What is counted, per rank, mirroring the runtime's code paths (each function below names the one it mirrors):
- `encode`: the sender's work. For the error-feedback codecs (int8, onebit, topk: runtime/comm/compress.py
  `ErrorFeedback.compress`) that is residual += x, encode, decode, residual -= decode(encode): the rate the
  probe measures is of that whole call. For qwZ / qgZ (no error feedback) it is the quantiser alone.
- `decode`: the receiver's decodes (`Codec.decode`, `dequantize_pieces`, `dequantize_int4`), not counting the
  decode inside ErrorFeedback.compress (part of `encode`).
Sums of decoded pieces, copies and the all-to-all buffers' allocation are left out (one streaming pass each,
small beside the codec's several passes).

Rates: elements/s per rank for each format and side, `Hardware.codec_<format>_<side>_elements_per_s`, measured
by `ztune probe` on CPU ranks (ztune/probe_codec.py, the runtime's own functions on one rank's threads) and 0
(unknown) elsewhere: nothing here guesses a GPU's codec speed (torch.topk, for one, is not bandwidth-bound).

How it enters the step (cost/compute.py step_time): serially. The encode runs in the backward hooks on the
thread that computes the backward (runtime/grad_reduce.py `_launch`), the decodes when the step waits for the
reduction (`_complete`) or inside the optimizer step (1-bit Adam) or right before a unit's forward (qwZ's
dequantisation in `_wait`): all on the cores the compute uses and on the communication's critical path, so
none of it hides behind compute or behind the transfer it feeds.
"""

from __future__ import annotations

from dataclasses import dataclass

from ztune.config.schema import Compression

# The formats the runtime encodes with, and the Hardware fields holding their rates.
CODEC_FORMATS = ("int8", "onebit", "topk", "qwz", "qgz")
SIDES = ("encode", "decode")


def rate_field(fmt: str, side: str) -> str:
    """The Hardware field with `fmt`'s `side` rate: 'codec_int8_encode_elements_per_s'."""
    if fmt not in CODEC_FORMATS or side not in SIDES:
        raise ValueError(f"unknown codec {fmt!r} / side {side!r}")
    return f"codec_{fmt}_{side}_elements_per_s"


RATE_FIELDS = tuple(rate_field(f, s) for f in CODEC_FORMATS for s in SIDES)


@dataclass(frozen=True)
class CodecWork:
    """Elements one rank encodes and decodes in format `fmt` per optimizer step (module docstring)."""

    fmt: str
    encode_numel: float
    decode_numel: float

    def __add__(self, other: CodecWork) -> CodecWork:
        if other.fmt != self.fmt:
            raise ValueError(f"cannot add {self.fmt} and {other.fmt} work")
        return CodecWork(self.fmt, self.encode_numel + other.encode_numel, self.decode_numel + other.decode_numel)

    def scaled(self, times: float) -> CodecWork:
        return CodecWork(self.fmt, self.encode_numel * times, self.decode_numel * times)


_EF_FORMATS = {Compression.INT8: "int8", Compression.ONEBIT: "onebit", Compression.TOPK: "topk"}


def compressed_exchange_work(*, method: Compression, padded_numel: float, world_size: int, gather: bool
                             ) -> CodecWork:
    """One runtime/grad_reduce.py CompressedExchange of a flat buffer of `padded_numel` elements over
    `world_size` ranks: `start` error-feedback-compresses the whole buffer (n pieces of P/n), `reduce` decodes
    the n received pieces of this rank's shard (P); with `gather` (stage 0 and 1-bit Adam, which need the whole
    reduced vector) `gather` error-feedback-compresses the reduced shard (P/n) and decodes all n gathered
    shards (P)."""
    if method not in _EF_FORMATS:
        raise ValueError(f"compression {method.value!r} has no compressed exchange")
    p, n = float(padded_numel), world_size
    encode, decode = p, p
    if gather:
        encode += p / n
        decode += p
    return CodecWork(_EF_FORMATS[method], encode, decode)


def gradient_compression_work(*, method: Compression, trainable_params: int, world_size: int, stage: int,
                              grad_accum: int) -> CodecWork | None:
    """Gradient compression (compression.method int8 / onebit / topk) per optimizer step. runtime/grad_reduce.py
    GradReducer: stages 0/1 launch their groups' exchanges on the boundary micro-step only, stages 2/3 on every
    micro-step; only stage 0 (unsharded optimizer) runs the exchange's `gather`. None for none / bf16 (bf16 is
    a cast reduced natively by the ordinary collectives: no codec)."""
    if method not in _EF_FORMATS:
        return None
    per_step = 1 if stage in (0, 1) else grad_accum
    return compressed_exchange_work(method=method, padded_numel=trainable_params, world_size=world_size,
                                    gather=stage == 0).scaled(per_step)


def onebit_adam_work(*, trainable_params: int, world_size: int) -> CodecWork:
    """One compression-stage step of runtime/onebit_adam.py OneBitAdam (steps after freeze_step; the warm-up's
    steps are a plain all-reduce and encode nothing): `exchange_momentum_` runs one CompressedExchange with its
    gather over each fp32 master (the momentum), 1-bit format."""
    return compressed_exchange_work(method=Compression.ONEBIT, padded_numel=trainable_params,
                                    world_size=world_size, gather=True)


def qwz_work(*, num_params: int, world_size: int, grad_accum: int, hpz: bool,
             backward_gather_numel: int | None = None) -> CodecWork:
    """qwZ per optimizer step (runtime/zeropp.py ZeroPlusPlus.start_quantized, per unit gather): quantize_shard
    of this rank's shard (P/n), dequantize_pieces of all n gathered shards (P). A unit is gathered for forward
    and, without hpZ (whose backward gathers the secondary shard, unquantized), again for backward
    (runtime/param_gather.py `_start`), every micro-step: `backward_gather_numel` elements (default P; the
    runtime does not re-gather a plain nn.Embedding unit, ztune/specs.py no_backward_gather_units)."""
    p, n = float(num_params), world_size
    per_micro = p if hpz else p + float(p if backward_gather_numel is None else backward_gather_numel)
    return CodecWork("qwz", grad_accum * per_micro / n, grad_accum * per_micro)


def qgz_work(*, trainable_params: int, ranks_per_node: int, grad_accum: int) -> CodecWork:
    """qgZ per optimizer step (runtime/qgz.py QgzExchange, every micro-step): `start` quantises the whole bucket
    (L pieces of P/L), `reduce` dequantises the L received pieces (P), re-quantises the N rows of the partial
    sums (P/L) and dequantises the N received rows (P/L)."""
    p, ell = float(trainable_params), ranks_per_node
    return CodecWork("qgz", grad_accum * (p + p / ell), grad_accum * (p + p / ell))


@dataclass(frozen=True)
class CodecTime:
    """Seconds of codec work per optimizer step per rank, and the work behind it. `unknown` names the formats
    whose rate the profile does not have (0): their work is not in `seconds`."""

    seconds: float
    work: tuple[CodecWork, ...]
    unknown: tuple[str, ...] = ()


def rates_of(hw) -> dict[str, float]:
    """`hw`'s codec rates by field name (0 = unknown)."""
    return {name: float(getattr(hw, name, 0.0) or 0.0) for name in RATE_FIELDS}


def codec_time(work: list[CodecWork], *, rates: dict[str, float]) -> CodecTime:
    """sum(encode_numel / encode rate + decode_numel / decode rate) over `work` (module docstring)."""
    seconds, unknown = 0.0, []
    for w in work:
        enc, dec = rates.get(rate_field(w.fmt, "encode"), 0.0), rates.get(rate_field(w.fmt, "decode"), 0.0)
        if (w.encode_numel and enc <= 0) or (w.decode_numel and dec <= 0):
            if w.fmt not in unknown:
                unknown.append(w.fmt)
            continue
        seconds += (w.encode_numel / enc if w.encode_numel else 0.0) + (w.decode_numel / dec if w.decode_numel
                                                                          else 0.0)
    return CodecTime(seconds, tuple(work), tuple(unknown))


def step_codec_work(*, method: Compression, onebit_adam: bool, stage: int, trainable_params: int,
                    num_params: int, world_size: int, ranks_per_node: int, grad_accum: int,
                    quantized_weights: bool, hpz: bool, quantized_gradients: bool,
                    backward_gather_numel: int | None = None) -> list[CodecWork]:
    """Every codec one rank runs per optimizer step for a config (the runtime's choices, runtime/engine.py):
    1-bit Adam's momentum exchange replaces gradient compression (its reducer gets compression none); qgZ
    replaces the gradient exchange at stage 3; qwZ adds to either."""
    work = []
    if onebit_adam:
        work.append(onebit_adam_work(trainable_params=trainable_params, world_size=world_size))
    elif stage == 3 and quantized_gradients:
        work.append(qgz_work(trainable_params=trainable_params, ranks_per_node=ranks_per_node, grad_accum=grad_accum))
    else:
        grad = gradient_compression_work(method=method, trainable_params=trainable_params, world_size=world_size,
                                         stage=stage, grad_accum=grad_accum)
        if grad is not None:
            work.append(grad)
    if stage == 3 and quantized_weights:
        work.append(qwz_work(num_params=num_params, world_size=world_size, grad_accum=grad_accum, hpz=hpz,
                             backward_gather_numel=backward_gather_numel))
    return work
