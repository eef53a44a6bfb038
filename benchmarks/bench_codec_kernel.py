"""The runtime's codec calls, C++ codec kernel against the torch fallback, on tiny-llama-sized inputs, one thread.

    python benchmarks/bench_codec_kernel.py [--repeats 5] [--json]

Each row times one public call of the runtime (what a rank runs per step, and what `ztune probe` times) twice:
with the kernel (runtime/codec_kernels.py) and with the kernel switched off for the process (the torch code
that ZTUNE_DISABLE_CPP_CODEC=1 selects). Sizes follow tiny-llama (30.9M parameters) on 2 hosts x 2 ranks:
- qgz: quantize_int4 of a 15.5M-element bf16 gradient bucket piece / dequantize_int4 of it (runtime/qgz.py);
- qwz: quantize_shard of a 7.7M-element bf16 shard / dequantize_pieces of 4 pieces of 1.9M into bf16
  (runtime/zeropp.py);
- int8, onebit (mean and rms scales): Codec.encode / Codec.decode of a 15.5M-element fp32 buffer
  (runtime/comm/compress.py; 1-bit Adam's momentum exchange, int8 gradient compression);
- whole exchanges, every codec call of one rank per step with the network left out (a stand-in communicator
  whose peers send what this rank sends): qgZ's reduce-scatter of tiny-llama's 30.9M gradients on 2 hosts x 2
  (QgzExchange.start + reduce) and 1-bit Adam's momentum exchange of 30.9M on 4 ranks (CompressedExchange
  start + reduce + gather, worker and server error feedback included).
Median of `--repeats` calls after one warm-up call each; both paths produce the same bytes (checked here too,
and bit for bit in tests/unit/test_codec_kernels.py). The load average is printed: on a shared machine it
moves every number. Part of `make bench` (seconds): the table goes to docs/bench/codec_kernel.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from run_all import report_kernel_rows  # benchmarks/ is on sys.path when run as a script

from ztune.config.schema import Compression
from ztune.runtime import codec_kernels, qgz, zeropp
from ztune.runtime.comm.compress import Codec
from ztune.runtime.grad_reduce import CompressedExchange
from ztune.runtime.kernel_loader import Backend

TINY_LLAMA_NUMEL = 30_900_000  # divisible by 4 ranks
QGZ_NUMEL = 15_500_000  # about half of tiny-llama's 30.9M gradient elements: one qgZ piece
QWZ_SHARD_NUMEL = 7_700_000  # a quarter of tiny-llama's parameters: one rank's shard of 4
BUFFER_NUMEL = 15_500_000


class _Done:
    def wait(self) -> None:
        pass


class _LoopbackComm:
    """`world_size` ranks played by one process: every peer sends what this rank sends (no network)."""

    def __init__(self, world_size: int):
        self.world_size, self.rank = world_size, 0

    def all_to_all(self, output, input, *, async_op=False):
        output.copy_(input)
        return _Done() if async_op else None

    def all_gather(self, output, shard, *, async_op=False, group=None):
        output.view(self.world_size, -1).copy_(shard.view(1, -1).expand(self.world_size, -1))
        return _Done() if async_op else None


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch of the output buffers, the kernel's load
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _cases() -> dict[str, tuple[Callable[[], object], Callable[[], torch.Tensor]]]:
    """name -> (the call, what to compare between the two paths after it)."""
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(QGZ_NUMEL, generator=g).bfloat16()
    piece = torch.empty(qgz.int4_piece_bytes(QGZ_NUMEL), dtype=torch.uint8)
    qgz.quantize_int4(grad, piece)
    deq = {}
    shard = torch.randn(QWZ_SHARD_NUMEL, generator=g).bfloat16()
    qwz_piece = torch.empty(zeropp.qwz_piece_bytes(QWZ_SHARD_NUMEL), dtype=torch.uint8)
    pieces = torch.empty(4 * zeropp.qwz_piece_bytes(QWZ_SHARD_NUMEL // 4), dtype=torch.uint8)
    for r, p in enumerate(pieces.view(4, -1)):
        zeropp.quantize_shard(shard[r * (QWZ_SHARD_NUMEL // 4):(r + 1) * (QWZ_SHARD_NUMEL // 4)], p)
    weights = torch.empty(4 * (QWZ_SHARD_NUMEL // 4), dtype=torch.bfloat16)
    buffer = torch.randn(BUFFER_NUMEL, generator=g)
    cases = {
        "qgz encode (bf16)": (lambda: qgz.quantize_int4(grad, piece), lambda: piece),
        "qgz decode": (lambda: deq.__setitem__("qgz", qgz.dequantize_int4(piece, numel=QGZ_NUMEL)),
                       lambda: deq["qgz"]),
        "qwz encode (bf16)": (lambda: zeropp.quantize_shard(shard, qwz_piece), lambda: qwz_piece),
        "qwz decode (4 pieces, bf16)": (lambda: zeropp.dequantize_pieces(pieces, weights, num_pieces=4),
                                        lambda: weights),
    }
    for name, codec in [("int8", Codec(Compression.INT8)), ("onebit mean", Codec(Compression.ONEBIT)),
                        ("onebit rms", Codec(Compression.ONEBIT, onebit_scale="rms"))]:
        wire = torch.empty(codec.payload_bytes(BUFFER_NUMEL), dtype=torch.uint8)
        cases[f"{name} encode"] = (lambda c=codec, w=wire: c.encode(buffer, w), lambda w=wire: w)
        cases[f"{name} decode"] = (
            lambda c=codec, w=wire, k=name: deq.__setitem__(k, c.decode(w, numel=BUFFER_NUMEL)),
            lambda k=name: deq[k])
    grads = torch.randn(TINY_LLAMA_NUMEL, generator=g).bfloat16()
    qgz_ex = qgz.QgzExchange(intra=_LoopbackComm(2), inter=_LoopbackComm(2), padded_numel=TINY_LLAMA_NUMEL)

    def qgz_exchange():
        work, recv = qgz_ex.start(grads)
        work.wait()
        deq["qgz exchange"] = qgz_ex.reduce(recv)

    cases["qgz exchange (30.9M, 2x2)"] = (qgz_exchange, lambda: deq["qgz exchange"])
    momentum = torch.randn(TINY_LLAMA_NUMEL, generator=g)
    onebit_ex = CompressedExchange(Codec(Compression.ONEBIT), comm=_LoopbackComm(4), padded_numel=TINY_LLAMA_NUMEL,
                                   device=torch.device("cpu"))
    exchanged = torch.empty(TINY_LLAMA_NUMEL)

    def onebit_exchange():
        for feedback in (onebit_ex.worker, onebit_ex.server):  # zero residuals: both paths see the same inputs
            if feedback.residual is not None:
                feedback.residual.zero_()
        work, recv = onebit_ex.start(momentum)
        work.wait()
        onebit_ex.gather(onebit_ex.reduce(recv).div_(4), exchanged)

    cases["1-bit Adam exchange (30.9M, 4)"] = (onebit_exchange, lambda: exchanged)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if codec_kernels.kernel_backend() != "cpp":
        raise SystemExit(f"the codec kernel did not load: {codec_kernels._get_backend().reason}")
    kernel = codec_kernels._LOADER.reset()
    rows = []
    for name, (call, result) in _cases().items():
        codec_kernels._LOADER.restore(kernel)
        cpp_ms = _median_ms(call, args.repeats)
        cpp_out = result().clone()
        codec_kernels._LOADER.restore(Backend(lib=None, reason="benchmark: the torch path"))
        torch_ms = _median_ms(call, args.repeats)
        same = torch.equal(cpp_out.view(torch.uint8), result().view(torch.uint8))
        rows.append({"call": name, "cpp_ms": round(cpp_ms, 2), "torch_ms": round(torch_ms, 2),
                     "speedup": round(torch_ms / cpp_ms, 2), "identical": same})
    codec_kernels._LOADER.restore(kernel)
    report_kernel_rows(
        rows, title="C++ codec kernel against the torch codec ops (qgZ, qwZ, int8, 1-bit)",
        command=f"python benchmarks/bench_codec_kernel.py --repeats {args.repeats}", section="codec_kernel",
        setup=f"One thread, median of {args.repeats} calls after a warm-up. Sizes: tiny-llama on 2 hosts x 2 ranks "
              "(module docstring); `identical`: both paths wrote the same bytes.",
        as_json=args.json, json_extra={"threads": 1})


if __name__ == "__main__":
    main()
