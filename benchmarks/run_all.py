"""`make bench`: run every benchmark, then assemble docs/benchmarks.md from the sections they write.

Each benchmark script is standalone (`python benchmarks/bench_X.py`) and writes docs/bench/<name>.md; this
script runs them in sequence and concatenates the sections under one header with the machine and date.

    python benchmarks/run_all.py [--cluster] [NAME ...]
    python benchmarks/run_all.py --assemble      (run nothing: rebuild docs/benchmarks.md from docs/bench/*.md)

NAMEs (script stems, e.g. bench_cluster) run only those. The cluster-in-a-box benchmarks (bench_cluster.py,
bench_autotune_cluster.py, bench_cost_cluster.py: network namespaces, need root) run only with --cluster or by name
(`make bench-cluster`, `make bench-autotune-cluster`, `make bench-cost-cluster`); the sections they wrote last are
assembled either way.

Most benchmarks train in bf16, as DESIGN.md's targets are stated. On a CPU without a native bf16 matrix unit
(no avx512_bf16 or amx_bf16) torch multiplies bf16 with a fallback kernel ~50x slower than fp32 (1.2 against
62 GFLOP/s on an AVX2-only EPYC core): the run would take hours and time that kernel rather than ztune. So it
first times one small product in each dtype and refuses such a CPU in one line (exit 2) unless given
--allow-slow-bf16.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
SECTION_DIR = ROOT / "docs" / "bench"


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = psutil.virtual_memory().total / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


# Arguments per script that keep `make bench` near 30 minutes on a 2-core machine. The compression
# benchmark's own default is DESIGN.md's 200 steps (about 20 minutes here, int8/1-bit coding being slow on
# CPU); run it alone for the full figure.
# 1-bit Adam's benchmark keeps its targets' 300 steps x 3 seeds x 2 optimizers on the cut-down demo shape
# ("mini", ~0.8M parameters): on tiny-gpt that is 1,800 steps of a 21M-element 1-bit exchange coded on the CPU.
SCRIPT_ARGS = {"bench_compression.py": ["--steps", "60"], "bench_onebit_adam.py": ["--model", "mini"]}
# Modules the benchmarks import, not benchmarks themselves.
def report_kernel_rows(rows: list[dict], *, title: str, command: str, setup: str, section: str, as_json: bool,
                       json_extra: dict) -> None:
    """Print and write a kernel-against-torch benchmark (bench_codec_kernel.py, bench_onebit_kernel.py). Each row is
    a dict with call, cpp_ms, torch_ms, speedup, identical. Prints the rows (as JSON with `json_extra` when
    `as_json`, and then writes nothing), else writes docs/bench/<section>.md: `title`, the command, date,
    machine, `setup` (threads, sizes), the load average and the table. SystemExit when a row's two paths differ."""
    import json
    import os

    load = os.getloadavg()
    if as_json:
        print(json.dumps({"rows": rows, "loadavg": load, **json_extra}, indent=2))
        return
    width = max(len(r["call"]) for r in rows) + 2
    print(f"{'call':{width}} {'C++ ms':>9} {'torch ms':>9} {'speed-up':>9}  identical")
    for r in rows:
        print(f"{r['call']:{width}} {r['cpp_ms']:9.2f} {r['torch_ms']:9.2f} {r['speedup']:8.2f}x  {r['identical']}")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    lines = [
        f"## {title}", "",
        f"Command: `{command}`. Date: {dt.datetime.now().isoformat(timespec='seconds')}. Machine: {machine_line()}. "
        f"{setup} Load average (1, 5, 15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.", "",
        "| call | C++ ms | torch ms | speed-up | identical |", "|---|---:|---:|---:|:---:|",
        *(f"| {r['call']} | {r['cpp_ms']:.1f} | {r['torch_ms']:.1f} | {r['speedup']:.1f}x | "
          f"{'yes' if r['identical'] else 'NO'} |" for r in rows), "",
    ]
    (SECTION_DIR / f"{section}.md").write_text("\n".join(lines))
    if not all(r["identical"] for r in rows):
        raise SystemExit("the kernel and the torch path wrote different bytes")


LIBRARIES = {"netns.py", "cluster_box.py", "cluster_worker.py"}
# One-off diagnostics run by hand with their own arguments (each docstring says how; some need root): no section of
# docs/benchmarks.md, so `make bench` neither runs them nor takes them by name (cost_cluster_parts.py needs
# --variant and would exit 2; gloo_pair_turns.py builds a box as root; onebit_exchange_sim.py trains tiny-llama 300
# steps per variant).
DIAGNOSTICS = {"cost_cluster_parts.py", "gloo_pair_turns.py", "onebit_exchange_sim.py"}


# Scripts that `make bench` runs only when asked (--cluster, or by name): they need root.
OPT_IN = {"--cluster": ("bench_cluster", "bench_autotune_cluster", "bench_cost_cluster")}
ALLOW_SLOW_BF16 = "--allow-slow-bf16"
# Rebuild docs/benchmarks.md from the sections the benchmarks wrote last (e.g. after one was run by hand), run nothing.
ASSEMBLE = "--assemble"
# Scripts with their own entry point in the Makefile, which run check_bf16_speed themselves.
CHECKS_BF16_ITSELF = {"bench_cost_cluster.py"}
# Scripts that never multiply matrices in bf16 (arithmetic only, CLI timing, element-wise kernels): they run on any
# CPU, so asking for only these skips the check.
NO_BF16_MATMUL = {"bench_validation.py", "bench_estimate.py", "bench_codec_kernel.py", "bench_onebit_kernel.py",
                  "bench_offload_adam.py"}
# bf16 matmul slower than this fraction of fp32's: no native bf16 unit (with one, bf16 is faster than fp32).
SLOW_BF16_RATIO = 0.25


def matmul_gflops(dtype, *, size: int = 256, repeats: int = 3) -> float:
    """GFLOP/s of the best of `repeats` size x size products (2 size^3 FLOP each) in `dtype` on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 2 * size**3 / best / 1e9


def slow_bf16_refusal(*, fp32_gflops: float, bf16_gflops: float, prog: str) -> str | None:
    """The one-line refusal for a CPU whose bf16 matmul runs below SLOW_BF16_RATIO of its fp32 rate, else None."""
    if bf16_gflops >= SLOW_BF16_RATIO * fp32_gflops:
        return None
    return (f"{prog}: bf16 matmul on this CPU runs at {bf16_gflops:.1f} GFLOP/s, {fp32_gflops / bf16_gflops:.0f}x "
            f"slower than fp32 ({fp32_gflops:.0f} GFLOP/s: no avx512_bf16 or amx_bf16, torch's fallback kernel); "
            f"the bf16 benchmarks would take hours and time that kernel, not ztune. Run them on a CPU with one of "
            f"those flags in /proc/cpuinfo, or pass {ALLOW_SLOW_BF16} (make: BENCH_ARGS={ALLOW_SLOW_BF16}; by name, "
            f"{', '.join(sorted(n.removesuffix('.py') for n in NO_BF16_MATMUL))} run anywhere)")


def check_bf16_speed(argv: list[str], *, prog: str) -> bool:
    """False (after printing slow_bf16_refusal) where this CPU's bf16 is too slow and `argv` lacks
    --allow-slow-bf16; True otherwise."""
    if ALLOW_SLOW_BF16 in argv:
        return True
    import torch

    refusal = slow_bf16_refusal(fp32_gflops=matmul_gflops(torch.float32), bf16_gflops=matmul_gflops(torch.bfloat16),
                                prog=prog)
    if refusal:
        print(refusal, file=sys.stderr)
    return refusal is None


def select_scripts(argv: list[str]) -> list[Path]:
    """The benchmark scripts `argv` asks for (see the module docstring). ValueError on an unknown option."""
    flags = {a for a in argv if a.startswith("--") and a != ALLOW_SLOW_BF16}
    unknown = flags - set(OPT_IN)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; known: {sorted([*OPT_IN, ALLOW_SLOW_BF16, ASSEMBLE])}")
    only = {a for a in argv if not a.startswith("--")}
    opted_in = {stem for f in flags for stem in OPT_IN[f]} | only
    opt_in_stems = {stem for stems in OPT_IN.values() for stem in stems}
    # Every script here but this one, the libraries, the diagnostics and the GPU check (`make gpu-check`: needs a
    # CUDA GPU, writes its own report; docs/gpu-check.md).
    return sorted(p for p in BENCH_DIR.glob("*.py")
                  if p.name not in {"run_all.py", "peers.py"} | LIBRARIES | DIAGNOSTICS
                  and not p.name.startswith("gpu_check")
                  and (not only or p.stem in only)
                  and (p.stem not in opt_in_stems or p.stem in opted_in))


def main(argv: list[str]) -> int:
    if ASSEMBLE in argv:
        if argv != [ASSEMBLE]:
            print(f"run_all.py: {ASSEMBLE} runs nothing, so it takes no other argument (got {' '.join(argv)})",
                  file=sys.stderr)
            return 2
        return assemble([], how="assembled by `python benchmarks/run_all.py --assemble` (each section as its "
                                "benchmark last wrote it)")
    try:
        scripts = select_scripts(argv)
    except ValueError as exc:
        print(f"run_all.py: {exc}", file=sys.stderr)
        return 2
    if any(p.name not in NO_BF16_MATMUL for p in scripts) and not check_bf16_speed(argv, prog="run_all.py"):
        return 2
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        start = time.perf_counter()
        extra = [ALLOW_SLOW_BF16] if script.name in CHECKS_BF16_ITSELF else []  # checked above already
        rc = subprocess.call([sys.executable, str(script), *SCRIPT_ARGS.get(script.name, []), *extra], cwd=ROOT)
        print(f"== {script.name}: exit {rc} in {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(script.name)
    return assemble(failed, how="generated by `make bench` (`python benchmarks/run_all.py`)")


def assemble(failed: list[str], *, how: str) -> int:
    """Write docs/benchmarks.md: a header (`how` it was made, today's date, this machine) and every section in
    docs/bench/*.md in name order; 1 when `failed` names benchmarks that failed, else 0."""
    sections = sorted(SECTION_DIR.glob("*.md"))
    head = [
        "# Benchmarks",
        "",
        f"{how[0].upper()}{how[1:]}, on {dt.date.today().isoformat()}.",
        f"Machine: {machine_line()}.",
        "Each section below names its own command and date. Ratios are measured side by side within one section's",
        "run; absolute times on this shared 2-core machine drift by up to ±50%.",
        "",
    ]
    if failed:
        head += [f"**Benchmarks that failed in this run:** {', '.join(failed)}", ""]
    body = [s.read_text().rstrip() + "\n" for s in sections]
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(head) + "\n" + "\n".join(body))
    print(f"wrote docs/benchmarks.md ({len(sections)} sections)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
