"""1-bit Adam's compression-stage update, C++ kernel against the torch fallback, on tiny-llama's masters.

    python benchmarks/bench_onebit_kernel.py [--repeats 5] [--threads 1] [--json]

Each row times runtime/onebit_adam.py's own functions over 30.9M fp32 elements (tiny-llama's masters: what each
rank of a stage-0 1-bit Adam job updates per step) twice: with the kernel (runtime/onebit_kernels.py) and with it
switched off for the process (the torch ops that ZTUNE_DISABLE_CPP_ONEBIT_ADAM=1 selects):
- momentum_ (equation (4): lerp_), mask_unfrozen_ ((8): masked_fill_ where v == 0), adam_update_ ((7)) and
  bounded_update_ ((7) with (9)), weight decay 0.01, bias correction on (step 7 after a freeze at 3);
- "update as probed": ztune probe's time_onebit_step sequence without the exchange and the 16-bit refresh:
  momentum_, mask_unfrozen_, adam_update_ (what the cost model charges as the compression stage's compute);
- "update as step() runs it": the same, with the mask done in adam_update_'s pass (mask_zero_variance; the torch
  path runs mask_unfrozen_ then the update, as the probe's sequence);
- "local momentum, before the exchange": momentum_ and mask_unfrozen_ on the local buffer, then its copy into m.
Every call restores its inputs first (untimed), so both paths see the same values each time; the outputs are
compared bit for bit (tests/unit/test_onebit_kernels.py checks it over sizes and special values). Median of
`--repeats` calls after one warm-up call each. The load average is printed: on a shared machine it moves every
number. Part of `make bench` (seconds): the table goes to docs/bench/onebit_kernel.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from run_all import report_kernel_rows  # benchmarks/ is on sys.path when run as a script

from ztune.runtime import onebit_kernels
from ztune.runtime.kernel_loader import Backend
from ztune.runtime.onebit_adam import adam_step_bound, adam_update_, bounded_update_, mask_unfrozen_, momentum_

TINY_LLAMA_NUMEL = 30_900_000
BETAS = (0.9, 0.999)
HYPER = dict(lr=1e-4, eps=1e-8, weight_decay=0.01, c1=1 - 0.9 ** 7, c2=1 - 0.999 ** 3)


def _median_ms(fn: Callable[[], object], reset: Callable[[], object], repeats: int) -> float:
    reset()
    fn()  # warm-up: the kernel's load, first touch of scratch buffers
    times = []
    for _ in range(repeats):
        reset()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _cases() -> dict[str, tuple[Callable[[], object], Callable[[], object], Callable[[], list[torch.Tensor]]]]:
    """name -> (the call, the untimed reset of its inputs, the tensors to compare between the two paths)."""
    g = torch.Generator().manual_seed(0)
    n = TINY_LLAMA_NUMEL
    p0, m0 = torch.randn(n, generator=g), torch.randn(n, generator=g).mul_(1e-3)
    grad = torch.randn(n, generator=g).mul_(1e-3)
    v = torch.rand(n, generator=g).mul_(1e-6)
    v[::1000] = 0.0  # a few elements without a warm-up gradient, so the mask has work
    p, m, own = torch.empty(n), torch.empty(n), torch.empty(n)

    def reset():
        p.copy_(p0)
        m.copy_(m0)
        own.copy_(m0)

    def probed():
        momentum_(m, grad, beta1=BETAS[0])
        mask_unfrozen_(m, v)
        adam_update_(p, m, v, **HYPER)

    def stepped():
        momentum_(m, grad, beta1=BETAS[0])
        adam_update_(p, m, v, mask_zero_variance=True, **HYPER)

    def local():
        mask_unfrozen_(momentum_(own, grad, beta1=BETAS[0]), v)
        m.copy_(own)

    bound = adam_step_bound(beta1=BETAS[0], beta2=BETAS[1])
    return {
        "momentum_ (lerp_)": (lambda: momentum_(m, grad, beta1=BETAS[0]), reset, lambda: [m]),
        "mask_unfrozen_": (lambda: mask_unfrozen_(m, v), reset, lambda: [m]),
        "adam_update_": (lambda: adam_update_(p, m, v, **HYPER), reset, lambda: [p]),
        "bounded_update_": (lambda: bounded_update_(p, m, v, bound=bound, **HYPER), reset, lambda: [p]),
        "update as probed (momentum, mask, adam)": (probed, reset, lambda: [p, m]),
        "update as step() runs it (momentum; mask in adam)": (stepped, reset, lambda: [p, m]),
        "local momentum, before the exchange": (local, reset, lambda: [own, m]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the kernel uses as many)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if onebit_kernels.kernel_backend() != "cpp":
        raise SystemExit(f"the 1-bit Adam kernel did not load: {onebit_kernels._get_backend().reason}")
    kernel = onebit_kernels._LOADER.reset()
    rows = []
    for name, (call, reset, result) in _cases().items():
        onebit_kernels._LOADER.restore(kernel)
        cpp_ms = _median_ms(call, reset, args.repeats)
        cpp_out = [t.clone() for t in result()]
        onebit_kernels._LOADER.restore(Backend(lib=None, reason="benchmark: the torch path"))
        torch_ms = _median_ms(call, reset, args.repeats)
        same = all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(cpp_out, result(),
                                                                                         strict=True))
        rows.append({"call": name, "cpp_ms": round(cpp_ms, 2), "torch_ms": round(torch_ms, 2),
                     "speedup": round(torch_ms / cpp_ms, 2), "identical": same})
    onebit_kernels._LOADER.restore(kernel)
    report_kernel_rows(
        rows, title="C++ 1-bit Adam kernel against the torch ops (compression-stage update)",
        command=f"python benchmarks/bench_onebit_kernel.py --repeats {args.repeats} --threads {args.threads}",
        section="onebit_kernel",
        setup=f"{args.threads} torch thread(s) (the kernel uses as many), median of {args.repeats} calls after a "
              f"warm-up. {TINY_LLAMA_NUMEL / 1e6:.1f}M fp32 masters (tiny-llama, one rank at stage 0; module "
              "docstring); `identical`: both paths wrote the same bits. The kernel's update still has torch take the "
              "square root of the frozen variance (MKL's, not correctly rounded; runtime/onebit_kernels.py), chunk "
              "by chunk; torch's lerp_ is one pass already, so momentum_ gains nothing alone.",
        as_json=args.json, json_extra={"threads": args.threads, "numel": TINY_LLAMA_NUMEL})


if __name__ == "__main__":
    main()
