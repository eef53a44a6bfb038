"""Codec rates of this host's ranks: how many elements/s one rank (its threads on a CPU host, its GPU on a GPU
host) pushes through each of the runtime's compressors, for the cost model's codec term (ztune/cost/codec.py,
Hardware.codec_*_elements_per_s).

Timed are the runtime's own functions, each on an fp32 vector the size of the call it stands for (cost/codec.py
says which count where):
- int8 / onebit / topk (gradient compression, 1-bit Adam) run once per reduce bucket (25M elements by default) or
  per fp32 master: timed on CODEC_BUCKET_NUMEL elements (36 MiB); encode = `ErrorFeedback.compress` (residual
  add, encode, decode, subtract), decode = `Codec.decode`; top-k at compression.topk_ratio's default 0.01;
- qwz (`quantize_shard` / `dequantize_pieces`, int8 blocks of 2048) and qgz (`quantize_int4` /
  `dequantize_int4`) run per ZeRO-3 unit or shard: timed on CODEC_UNIT_NUMEL elements (8 MiB).
The size matters: on the 2-core EPYC box (32 MiB L3) a 1M-element call ran up to 6x faster per element than a
10M one, and one whose buffers exceed glibc's largest heap-served size (32 MiB) gets them from the kernel afresh
on every call and faults them in (the 1-bit decode 4x slower at 10M than at 4M), as a bucket's do in a run.
Each call is timed CODEC_PROBE_REPEATS times after one untimed pass over all of them, and the median counts, as
for the workload (ztune/probe_workload.py: on a shared machine the best run is the exception). About 1.5 s per
rank on a core of its own. On a GPU the same calls run on device tensors, each timed between
`torch.cuda.synchronize` calls (the runtime's codecs are torch ops on the tensors' own device).
torch is imported inside the function, so importing this module is cheap.
"""

from __future__ import annotations

import statistics
import time

from ztune.cost.codec import rate_field

CODEC_BUCKET_NUMEL = 9 << 20  # 36 MiB of fp32: a bucket beyond the heap's largest mmap threshold (32 MiB)
CODEC_UNIT_NUMEL = 2 << 20  # 8 MiB of fp32: a ZeRO-3 unit of a small model (tiny-llama's blocks: 2.8M)
CODEC_PROBE_REPEATS = 2


def measure_codec_rates(*, threads: int, bucket_numel: int = CODEC_BUCKET_NUMEL, unit_numel: int = CODEC_UNIT_NUMEL,
                        repeats: int = CODEC_PROBE_REPEATS, device: str = "cpu") -> dict[str, float]:
    """{Hardware field name: elements/s} for every codec format and side, on `device` ("cpu": `threads` torch
    threads, one rank's; "cuda:N": that GPU): the error-feedback codecs on `bucket_numel` elements, qwZ / qgZ on
    `unit_numel` (module docstring). Each rate is the call's elements / its median time."""
    import torch

    from ztune.config.schema import Compression
    from ztune.runtime.comm.compress import Codec, ErrorFeedback
    from ztune.runtime.qgz import dequantize_int4, int4_piece_bytes, quantize_int4
    from ztune.runtime.zeropp import dequantize_pieces, quantize_shard, qwz_piece_bytes

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(bucket_numel, generator=gen).to(dev)
        u = torch.randn(unit_numel, generator=gen).to(dev)
        calls = {}  # field -> (elements, the call to time)
        for method, fmt in ((Compression.INT8, "int8"), (Compression.ONEBIT, "onebit"), (Compression.TOPK, "topk")):
            codec = Codec(method)
            feedback = ErrorFeedback(codec, numel=bucket_numel, device=dev)
            buf = codec.encode(x)
            calls[rate_field(fmt, "encode")] = bucket_numel, lambda f=feedback: f.compress(x)
            calls[rate_field(fmt, "decode")] = bucket_numel, lambda c=codec, b=buf: c.decode(b, numel=bucket_numel)
        qwz = torch.empty(qwz_piece_bytes(unit_numel), dtype=torch.uint8, device=dev)
        out = torch.empty(unit_numel, device=dev)
        calls[rate_field("qwz", "encode")] = unit_numel, lambda: quantize_shard(u, qwz)
        calls[rate_field("qwz", "decode")] = unit_numel, lambda: dequantize_pieces(qwz, out, num_pieces=1)
        qgz = torch.empty(int4_piece_bytes(unit_numel), dtype=torch.uint8, device=dev)
        calls[rate_field("qgz", "encode")] = unit_numel, lambda: quantize_int4(u, qgz)
        calls[rate_field("qgz", "decode")] = unit_numel, lambda: dequantize_int4(qgz, numel=unit_numel)
        # One untimed pass over every call first: the allocator then serves each call's temporaries as it does
        # in a run's steady state (a first pass measured the int8 decode 8x slower than later ones).
        for _, fn in calls.values():
            fn()
        sync()
        rates: dict[str, float] = {}
        for name, (numel, fn) in calls.items():
            times = []
            for _ in range(max(1, repeats)):
                start = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - start)
            rates[name] = numel / statistics.median(times)
    finally:
        torch.set_num_threads(saved)
    return rates


def slowest(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Per field, the slowest rank's rate: ranks run in lockstep, so the slowest sets the step's pace."""
    return {name: min(r[name] for r in per_rank) for name in per_rank[0]} if per_rank else {}
