"""The phases of benchmarks/gpu_check.py that run ztune's runtime, one per process.

    python benchmarks/gpu_check_workers.py kernel  --result r.json
    python benchmarks/gpu_check_workers.py train   --result r.json --mode z0|offload --shape-json '{...}' ...
    python benchmarks/gpu_check_workers.py parity  --result r.json --shape-json '{...}' ...

Each phase runs in its own process so that a CUDA error (sticky for the rest of a process), a hang or an
out-of-memory in one phase cannot take the others' results with it, and so that each one starts with the
whole GPU. A worker writes its result JSON atomically to `--result` as it goes (after set-up and after every
step), so a phase stopped at its time budget still reports the steps it finished.

The model is a transformers LlamaForCausalLM built from a config with random weights (no download), on the
training device when there is one (random init of a billion parameters on the CPU would take minutes).
With one process and no torchrun environment, ztune.initialize runs a world of one without a process group
(runtime/initialize.py: _process_group), on cuda:0 when CUDA is available, else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

# The team's parity tolerance for fp32 (HELPERS.md): relative difference of the trained parameters.
FP32_RTOL = 1e-5


def write_result(path: Path, result: dict) -> None:
    """Atomic: a reader (the orchestrator, after a kill) sees the previous or the new result, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_llama(shape: dict, *, seed: int, device: torch.device, config_json: Path | None = None):
    """A LlamaForCausalLM with `shape` (LlamaConfig keyword arguments), random init from `seed`, on `device`.
    Writes the config as a Hugging Face config.json to `config_json` (what `ztune estimate --model` reads)."""
    import transformers

    cfg = transformers.LlamaConfig(**shape, use_cache=False)
    if config_json is not None:
        config_json.write_text(cfg.to_json_string())
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    return model


def train_config(*, mode: str, precision: str, micro: int, seq_len: int) -> dict:
    """ztune config for `mode`: z0 = ZeRO stage 0 on the device; offload = ZeRO-Offload on one GPU, i.e.
    stage 2 with the optimizer states, fp32 masters and the CPU Adam step in host memory (offload needs stage
    >= 1, as in DeepSpeed; with one rank stages 1 and 2 shard nothing, and stage 2 also frees the device
    gradient shard between steps)."""
    zero = {"stage": 0} if mode == "z0" else {"stage": 2, "offload_optimizer": "cpu"}
    return {"zero": zero, "precision": precision, "batch": {"micro": micro, "grad_accum": 1}, "seq_len": seq_len,
            "optimizer": {"type": "AdamW", "lr": 1e-4, "weight_decay": 0.01}, "gradient_clipping": 1.0}


class TransferClock:
    """Times the host<->device copies of a runtime.offload.HostOffload, per optimizer step, by wrapping its
    `_download`/`_upload`/`step` on the instance (measurement only: the copies themselves are unchanged).

    CUDA: D2H is every gradient group queued back to back on the side stream, so one timing-enabled event
    pair around the whole queue gives the achieved rate. Uploads are spread over the step (one per group,
    after the CPU Adam of that group), so each gets its own event pair and their times are summed: the rate of
    the copies themselves, not of the pipeline around them. CPU (dry run): the copies are synchronous memcpys,
    timed with perf_counter."""

    def __init__(self, offload) -> None:
        self.offload = offload
        self.cuda = offload.cuda
        self.steps: list[dict] = []
        self._pending: list[tuple] = []  # (kind, bytes, start, end) of the step in progress
        download, upload, step = offload._download, offload._upload, offload.step
        offload._download = lambda grads: self._time(download, "d2h", grads, sum(_nbytes(g) for g in grads))
        offload._upload = lambda dst, src: self._time(upload, "h2d", (dst, src), _nbytes(src))
        offload.step = lambda *a, **k: self._step(step, *a, **k)

    def _time(self, fn, kind: str, args, nbytes: int):
        o = self.offload
        if not self.cuda:
            start = time.perf_counter()
            out = fn(*args) if kind == "h2d" else fn(args)
            self._pending.append((kind, nbytes, start, time.perf_counter()))
            return out
        stream = o._d2h if kind == "d2h" else o._h2d
        if kind == "d2h":  # what `_download` waits for first: start the clock after it, not before
            stream.wait_stream(torch.cuda.current_stream(o.device))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        out = fn(*args) if kind == "h2d" else fn(args)
        end.record(stream)
        self._pending.append((kind, nbytes, start, end))
        return out

    def _step(self, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)  # returns when every upload is done (HostOffload.step)
        wall_s = time.perf_counter() - start
        if self.cuda:
            torch.cuda.synchronize(self.offload.device)
        totals = {"d2h_bytes": 0, "d2h_s": 0.0, "h2d_bytes": 0, "h2d_s": 0.0}
        for kind, nbytes, t0, t1 in self._pending:
            seconds = t0.elapsed_time(t1) / 1e3 if self.cuda else t1 - t0
            totals[f"{kind}_bytes"] += nbytes
            totals[f"{kind}_s"] += seconds
        self._pending.clear()
        self.steps.append({**totals, "offload_step_s": wall_s})
        return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _gbps(nbytes: float, seconds: float) -> float | None:
    return nbytes / seconds / 1e9 if seconds > 0 else None


# --------------------------------------------------------------------------------------------- phases
def run_kernel(args) -> dict:
    """Build (or load) the fused CPU Adam kernel the offloaded runs use, so its build is not timed there, and,
    on a GPU, the CUDA Adam kernel tests/gpu runs."""
    from ztune.runtime import ops

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = ops.kernel_backend()
    reasons = [str(w.message) for w in caught if issubclass(w.category, ops.CppAdamFallbackWarning)]
    result = {"backend": backend, "fallback_reason": reasons[0] if reasons else None,
              "simd": ops.available_simd(), "seconds": time.perf_counter() - start}
    # The CUDA kernel tests/gpu/test_cuda_adam.py runs: built here (nvcc, ~8 s of CPU) so the tests phase finds
    # it in the cache. Only with a GPU: the dry run has none, and the unit tests already build it on the CPU.
    if torch.cuda.is_available():
        from ztune.runtime import cuda_adam

        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result["cuda_backend"] = cuda_adam.kernel_backend()
        result["cuda_seconds"] = time.perf_counter() - start
        reasons = [str(w.message) for w in caught if issubclass(w.category, cuda_adam.CudaAdamFallbackWarning)]
        result["cuda_fallback_reason"] = reasons[0] if reasons else None
    else:
        result["cuda_backend"] = "not built: no CUDA device"
    return result


def run_train(args) -> dict:
    """Train the Llama of --shape-json for --warmup + --steps optimizer steps; time the last --steps."""
    import psutil

    import ztune
    from ztune.runtime.data import batches, synthetic_corpus

    device = _device()
    shape = json.loads(args.shape_json)
    result: dict = {"mode": args.mode, "device": str(device), "shape": shape, "seq_len": args.seq_len,
                    "micro_batch": args.micro, "precision": args.precision, "steps": []}
    start = time.perf_counter()
    model = build_llama(shape, seed=0, device=device, config_json=Path(args.config_json))
    result["num_params"] = sum(p.numel() for p in model.parameters())
    result["build_s"] = time.perf_counter() - start
    config = train_config(mode=args.mode, precision=args.precision, micro=args.micro, seq_len=args.seq_len)
    result["config"] = config
    Path(args.ztune_config).write_text(json.dumps(config))  # what `ztune estimate --config` reads
    start = time.perf_counter()
    engine, *_ = ztune.initialize(model, config)
    result["initialize_s"] = time.perf_counter() - start
    clock = TransferClock(engine._offload) if engine._offload is not None else None
    result["kernel_backend"] = None
    if clock is not None:
        from ztune.runtime import ops

        result["kernel_backend"] = ops.kernel_backend()
    write_result(args.result, result)

    total = args.warmup + args.steps
    corpus = synthetic_corpus(vocab_size=shape["vocab_size"], num_tokens=(total + 1) * args.micro * args.seq_len,
                              seed=0)
    data = batches(corpus, batch_size=args.micro, seq_len=args.seq_len, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(total):
        ids, labels = (t.to(device) for t in next(data))
        _sync(device)
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        loss_value = loss.item()
        _sync(device)
        step = {"step": i + 1, "warmup": i < args.warmup, "step_s": time.perf_counter() - t0, "loss": loss_value}
        if clock is not None and clock.steps:
            step.update(clock.steps[-1])
        result["steps"].append(step)
        print(f"{args.mode} step {i + 1}/{total}{' (warm-up)' if step['warmup'] else ''}: "
              f"{step['step_s'] * 1e3:.0f} ms, loss {loss_value:.3f}", flush=True)
        _summarise(result, tokens_per_step=args.micro * args.seq_len)
        if device.type == "cuda":
            result["max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            result["max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["host_rss_bytes"] = psutil.Process().memory_info().rss
        result["memory_report"] = engine.memory_report()
        write_result(args.result, result)
    return result


def _summarise(result: dict, *, tokens_per_step: int) -> None:
    timed = [s for s in result["steps"] if not s["warmup"]]
    if not timed:
        return
    step_s = statistics.median(s["step_s"] for s in timed)
    result.update(timed_steps=len(timed), step_s_median=step_s, step_s_min=min(s["step_s"] for s in timed),
                  tokens_per_s=tokens_per_step / step_s, first_loss=result["steps"][0]["loss"],
                  last_loss=result["steps"][-1]["loss"])
    if "d2h_bytes" in timed[0]:
        d2h_b, d2h_s = sum(s["d2h_bytes"] for s in timed), sum(s["d2h_s"] for s in timed)
        h2d_b, h2d_s = sum(s["h2d_bytes"] for s in timed), sum(s["h2d_s"] for s in timed)
        result["offload"] = {
            "d2h_bytes_per_step": d2h_b / len(timed), "h2d_bytes_per_step": h2d_b / len(timed),
            "d2h_gbps": _gbps(d2h_b, d2h_s), "h2d_gbps": _gbps(h2d_b, h2d_s),
            "d2h_s_per_step": d2h_s / len(timed), "h2d_s_per_step": h2d_s / len(timed),
            "offload_step_s_median": statistics.median(s["offload_step_s"] for s in timed)}


def run_parity(args) -> dict:
    """fp32: the same small Llama, seed and batches through stage 0 on the device and through stage 2 with
    the optimizer offloaded (host masters, CPU Adam, D2H/H2D pipeline); the trained parameters must agree
    within FP32_RTOL relative (norm of the difference over norm of the reference, all parameters together)."""
    import ztune
    from ztune.runtime.data import batches, synthetic_corpus

    device = _device()
    shape = json.loads(args.shape_json)
    corpus = synthetic_corpus(vocab_size=shape["vocab_size"], num_tokens=(args.steps + 1) * args.micro * args.seq_len,
                              seed=1)
    states, losses = {}, {}
    for mode in ("z0", "offload"):
        model = build_llama(shape, seed=1, device=device)
        engine, *_ = ztune.initialize(model, train_config(mode=mode, precision="fp32", micro=args.micro,
                                                          seq_len=args.seq_len))
        data = batches(corpus, batch_size=args.micro, seq_len=args.seq_len, seed=1)
        losses[mode] = []
        for _ in range(args.steps):
            ids, labels = (t.to(device) for t in next(data))
            loss = engine(input_ids=ids, labels=labels).loss
            engine.backward(loss)
            engine.step()
            losses[mode].append(loss.item())
        states[mode] = {k: v.detach().float().cpu() for k, v in engine.full_state_dict().items()}
        print(f"parity {mode}: losses {' '.join(f'{x:.5f}' for x in losses[mode])}", flush=True)
        del engine, model
    names = sorted(states["z0"])
    ref = torch.cat([states["z0"][k].reshape(-1) for k in names])
    got = torch.cat([states["offload"][k].reshape(-1) for k in names])
    rel = float((got - ref).norm() / ref.norm())
    per_tensor = {k: float((states["offload"][k] - states["z0"][k]).norm())
                  / max(float(states["z0"][k].norm()), 1e-30) for k in names}
    worst = max(per_tensor, key=per_tensor.get)
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(losses["offload"], losses["z0"], strict=True))
    return {"device": str(device), "shape": shape, "steps": args.steps, "num_params": int(ref.numel()),
            "rel_diff": rel, "worst_tensor": worst, "worst_tensor_rel_diff": per_tensor[worst],
            "loss_rel_diff": loss_rel,
            "losses": losses, "rtol": FP32_RTOL, "passed": math.isfinite(rel) and rel < FP32_RTOL}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("kernel", "train", "parity"))
    p.add_argument("--result", type=Path, required=True, help="where to write the result JSON")
    p.add_argument("--mode", choices=("z0", "offload"), default="z0")
    p.add_argument("--shape-json", default="{}", help="LlamaConfig keyword arguments, as JSON")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--config-json", default=os.devnull, help="write the model's HF config.json here")
    p.add_argument("--ztune-config", default=os.devnull, help="write the ztune training config here")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    run = {"kernel": run_kernel, "train": run_train, "parity": run_parity}[args.phase]
    write_result(args.result, run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
