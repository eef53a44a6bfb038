"""The runtime's codecs on a GPU, as `ztune probe` times them there (ztune/probe_codec.py, device "cuda:0"):
every codec gives on CUDA what it gives on the CPU for the same input, and the probe's rates are positive
and finite for every Hardware.codec_* field. Skipped without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_codecs_agree_with_the_cpu_and_the_probe_measures_every_rate() -> None:
    from ztune.config.schema import Compression
    from ztune.cost.codec import RATE_FIELDS
    from ztune.probe_codec import measure_codec_rates
    from ztune.runtime.comm.compress import Codec
    from ztune.runtime.qgz import dequantize_int4, int4_piece_bytes, quantize_int4
    from ztune.runtime.zeropp import dequantize_pieces, quantize_shard, qwz_piece_bytes

    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    for method in (Compression.INT8, Compression.ONEBIT, Compression.TOPK):
        codec = Codec(method)
        on_cpu = codec.decode(codec.encode(x), numel=x.numel())
        on_gpu = codec.decode(codec.encode(x.cuda()), numel=x.numel()).cpu()
        torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-6, atol=1e-6, msg=f"{method}")
    for dev in ("cpu", "cuda"):
        q = torch.empty(qwz_piece_bytes(x.numel()), dtype=torch.uint8, device=dev)
        quantize_shard(x.to(dev), q)
        out = torch.empty(x.numel(), device=dev)
        dequantize_pieces(q, out, num_pieces=1)
        g = torch.empty(int4_piece_bytes(x.numel()), dtype=torch.uint8, device=dev)
        quantize_int4(x.to(dev), g)
        got = (out.cpu(), dequantize_int4(g, numel=x.numel()).cpu())
        if dev == "cpu":
            want = got
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    rates = measure_codec_rates(threads=1, device="cuda:0", bucket_numel=1 << 22, unit_numel=1 << 20)
    assert set(rates) == set(RATE_FIELDS)
    assert all(math.isfinite(r) and r > 0 for r in rates.values()), rates
    for name, r in sorted(rates.items()):
        print(f"{name}: {r / 1e9:.3g} G elements/s")
