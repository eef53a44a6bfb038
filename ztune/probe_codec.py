"""Codec rates of this host's CPU ranks: how many elements/s one rank's threads push through each of the
runtime's compressors, for the cost model's codec term (ztune/cost/codec.py, Hardware.codec_*_elements_per_s).

Timed are the runtime's own functions on one fp32 vector of CODEC_PROBE_NUMEL elements (4 MiB: beyond the
per-core caches, like a gradient bucket), the same calls a step makes (cost/codec.py says which count where):
- int8 / onebit / topk (gradient compression, 1-bit Adam): encode = `ErrorFeedback.compress` (residual add,
  encode, decode, subtract), decode = `Codec.decode`; top-k at compression.topk_ratio's default 0.01;
- qwz: `quantize_shard` / `dequantize_pieces` (int8, blocks of 2048); qgz: `quantize_int4` / `dequantize_int4`.
Each call is timed CODEC_PROBE_REPEATS times after a warm-up and the median counts, as for the workload
(ztune/probe_workload.py: on a shared machine the best run is the exception). About 0.2-0.5 s per rank in all.
torch is imported inside the function, so importing this module is cheap.
"""

from __future__ import annotations

import statistics
import time

from ztune.cost.codec import rate_field

CODEC_PROBE_NUMEL = 1 << 20  # 4 MiB of fp32
CODEC_PROBE_REPEATS = 3


def measure_codec_rates(*, threads: int, numel: int = CODEC_PROBE_NUMEL, repeats: int = CODEC_PROBE_REPEATS
                        ) -> dict[str, float]:
    """{Hardware field name: elements/s} for every codec format and side, on `threads` torch threads (one
    rank's), CPU. Raises nothing for a slow host; each rate is numel / the median call."""
    import torch

    from ztune.config.schema import Compression
    from ztune.runtime.comm.compress import Codec, ErrorFeedback
    from ztune.runtime.qgz import dequantize_int4, int4_piece_bytes, quantize_int4
    from ztune.runtime.zeropp import dequantize_pieces, quantize_shard, qwz_piece_bytes

    def median_s(fn) -> float:
        fn()  # warm-up: allocator, first touch
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    rates: dict[str, float] = {}
    try:
        x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
        cpu = torch.device("cpu")
        for method, fmt in ((Compression.INT8, "int8"), (Compression.ONEBIT, "onebit"), (Compression.TOPK, "topk")):
            codec = Codec(method)
            feedback = ErrorFeedback(codec, numel=numel, device=cpu)
            buf = codec.encode(x)
            rates[rate_field(fmt, "encode")] = numel / median_s(lambda f=feedback: f.compress(x))
            rates[rate_field(fmt, "decode")] = numel / median_s(lambda c=codec, b=buf: c.decode(b, numel=numel))
        qwz = torch.empty(qwz_piece_bytes(numel), dtype=torch.uint8)
        out = torch.empty(numel)
        rates[rate_field("qwz", "encode")] = numel / median_s(lambda: quantize_shard(x, qwz))
        rates[rate_field("qwz", "decode")] = numel / median_s(lambda: dequantize_pieces(qwz, out, num_pieces=1))
        qgz = torch.empty(int4_piece_bytes(numel), dtype=torch.uint8)
        rates[rate_field("qgz", "encode")] = numel / median_s(lambda: quantize_int4(x, qgz))
        rates[rate_field("qgz", "decode")] = numel / median_s(lambda: dequantize_int4(qgz, numel=numel))
    finally:
        torch.set_num_threads(saved)
    return rates


def slowest(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Per field, the slowest rank's rate: ranks run in lockstep, so the slowest sets the step's pace."""
    return {name: min(r[name] for r in per_rank) for name in per_rank[0]} if per_rank else {}
