"""The report of benchmarks/gpu_check.py: machine facts, derived numbers (MFU, predicted against measured),
and the Markdown and JSON it writes. Pure functions of the phases' results, plus the machine reading.

MFU (PaLM, Chowdhery et al. 2022, appendix B; DESIGN.md): model FLOPs per token 6 Psi + 12 L h s
(ztune.cost.compute.model_flops_per_token, the formula `ztune estimate` uses), times tokens/s, over a peak:
the datasheet's dense bf16 rate (DATASHEET_BF16_FLOPS) and the bf16 matmul rate `ztune probe` measured
(the profile `ztune estimate` ran on, so that predicted and measured MFU share a denominator).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import socket
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

GIB = 1 << 30
ROOT = Path(__file__).resolve().parent.parent

# Dense bf16 tensor-core peaks, FLOP/s. NVIDIA's datasheets quote bf16 "with sparsity"; dense is half.
# H200 Tensor Core GPU datasheet (2024): SXM 1,979 TFLOPS, NVL 1,671. H100 datasheet (2023): SXM 1,979,
# NVL 1,671, PCIe 1,513. Matched on the NVML name, most specific first.
DATASHEET_BF16_FLOPS = (
    ("H200 NVL", 835.5e12, "NVIDIA H200 datasheet: 1,671 TFLOPS bf16 with sparsity / 2"),
    ("H200", 989.5e12, "NVIDIA H200 datasheet: 1,979 TFLOPS bf16 with sparsity / 2"),
    ("H100 NVL", 835.5e12, "NVIDIA H100 datasheet: 1,671 TFLOPS bf16 with sparsity / 2"),
    ("H100 PCIe", 756.5e12, "NVIDIA H100 datasheet: 1,513 TFLOPS bf16 with sparsity / 2"),
    ("H100", 989.5e12, "NVIDIA H100 datasheet (SXM): 1,979 TFLOPS bf16 with sparsity / 2"),
)


def datasheet_peak(gpu_name: str) -> tuple[float, str] | None:
    for key, flops, source in DATASHEET_BF16_FLOPS:
        if key in gpu_name:
            return flops, source
    return None


# ------------------------------------------------------------------------------------------------ reading
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _gpus() -> dict:
    try:
        import pynvml as nvml

        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 -- no library or no driver: a CPU machine
        return {"status": f"no NVIDIA GPU/driver found ({type(exc).__name__})", "devices": []}
    try:
        driver = nvml.nvmlSystemGetDriverVersion()
        devices = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(handle)
            devices.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                            "memory_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).total)})
        return {"status": f"{len(devices)} NVIDIA GPU(s)", "driver": str(driver), "devices": devices}
    finally:
        nvml.nvmlShutdown()


def machine_info() -> dict:
    """Host, CPU, memory, GPUs (NVML: no CUDA context is created here), software versions, git commit."""
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown (no git)"
    return {"hostname": socket.gethostname(), "cpu": cpu, "cpu_cores_logical": psutil.cpu_count(),
            "cpu_cores_physical": psutil.cpu_count(logical=False), "memory_bytes": psutil.virtual_memory().total,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": _version("transformers"),
            "gpus": _gpus(), "git_commit": commit}


def read_junit(path: Path) -> dict:
    """Counts and per-test outcomes from pytest's --junitxml file."""
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        cases.append({"name": f"{case.get('classname', '')}::{case.get('name', '')}",
                      "outcome": outcome, "time_s": float(case.get("time") or 0.0), "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    # Numbers tests record with pytest's record_testsuite_property (tests/gpu/test_cuda_adam.py: JSON values).
    properties = {}
    for prop in root.iter("property"):
        value = prop.get("value", "")
        try:
            properties[prop.get("name", "")] = json.loads(value)
        except ValueError:
            properties[prop.get("name", "")] = value
    return {"counts": counts, "cases": cases, "properties": properties}


def cuda_adam_rows(properties: dict) -> tuple[list[list], list[list]]:
    """(timing rows, accuracy rows) for the report from tests/gpu/test_cuda_adam.py's recorded properties."""
    timing, accuracy = [], []
    for name, r in sorted(properties.items()):
        if name.startswith("cuda_adam.timing.") and isinstance(r, dict):
            timing.append([r["grad_dtype"], f"{r['numel']:,}", f"{r['ztune_ms']:.3f}", f"{r['ztune_gbps']:,.0f}",
                           f"{r['torch_fused_ms']:.3f}", f"{r['torch_fused_gbps']:,.0f}",
                           f"{r['torch_over_ztune']:.2f}"])
        elif name.startswith("cuda_adam.accuracy.") and isinstance(r, dict):
            accuracy.append([name.removeprefix("cuda_adam.accuracy."), f"{r['max_rel_param_vs_single']:.2g}",
                             f"{r['max_rel_param_vs_fused']:.2g}", f"{r['max_abs_exp_avg_vs_fused']:.2g}"])
    return timing, accuracy


# ---------------------------------------------------------------------------------------------- deriving
def _flops_per_token(model_json: Path, *, seq_len: int) -> tuple[float, int] | None:
    """(6 Psi + 12 L h s, Psi) for the trained model, from its config.json through ztune's own model spec."""
    if not model_json.exists():
        return None
    from ztune.cost.compute import model_flops_per_token
    from ztune.profiles import load_model
    from ztune.specs import count_params

    spec = load_model(str(model_json))
    counts = count_params(spec)
    flops = model_flops_per_token(active_params=counts.active_per_token, num_layers=spec.num_layers,
                                  attention_width=spec.num_heads * spec.head_size, seq_len=seq_len)
    return flops, counts.total


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def build(meta: dict, phases: dict, *, wall_s: float, model_json: Path) -> dict:
    """The JSON document: meta, every phase as recorded, and `derived` (MFU, predicted against measured)."""
    gpus = meta["machine"]["gpus"]["devices"]
    peak = datasheet_peak(gpus[0]["name"]) if gpus and not meta["dry_run"] else None
    probe = phases["probe"]["data"]
    probed_bf16 = probe.get("profile", {}).get("peak_flops_bf16")
    derived: dict = {"datasheet_bf16_flops": peak[0] if peak else None,
                     "datasheet_source": peak[1] if peak else "no datasheet figure for this device",
                     "probed_bf16_flops": probed_bf16, "runs": {}, "predicted_vs_measured": []}
    for mode in ("z0", "offload"):
        run = phases[f"train-{mode}"]["data"]
        if not run.get("tokens_per_s"):
            continue
        fpt = _flops_per_token(model_json, seq_len=run["seq_len"])
        achieved = run["tokens_per_s"] * fpt[0] if fpt else None
        derived["runs"][mode] = {
            "flops_per_token": fpt[0] if fpt else None, "spec_params": fpt[1] if fpt else None,
            "achieved_flops": achieved, "mfu_datasheet": _ratio(achieved, peak[0] if peak else None),
            "mfu_probed": _ratio(achieved, probed_bf16)}
        est = phases["estimate"]["data"].get(mode, {}).get("rows", [{}])[0]
        if est:
            mem = run.get("memory_report", {})
            states = sum(mem.get(k, 0) for k in ("params", "grads", "optimizer")) if mem else None
            pred_mem = est["memory_per_gpu"]
            for quantity, predicted, measured in (
                ("step time s", est["step_time_s"], run["step_s_median"]),
                ("tokens/s", est["tokens_per_s"], run["tokens_per_s"]),
                ("MFU (of probed bf16 matmul)", est["mfu"], derived["runs"][mode]["mfu_probed"]),
                ("model states on GPU GiB", sum(pred_mem[k] for k in ("params", "grads", "optimizer")) / GIB,
                 states / GIB if states is not None else None),
                ("GPU memory total GiB (measured: max allocated)", pred_mem["total"] / GIB,
                 run["max_allocated_bytes"] / GIB if "max_allocated_bytes" in run else None),
                ("host memory GiB (measured: offload buffers)", est["cpu_memory_per_host"] / GIB,
                 mem.get("host_total", 0) / GIB if mem else None),
            ):
                derived["predicted_vs_measured"].append({"run": mode, "quantity": quantity, "predicted": predicted,
                                                         "measured": measured,
                                                         "measured_over_predicted": _ratio(measured, predicted)})
    failed = [n for n, p in phases.items() if p["status"] not in ("ok", "skipped")]
    return {"schema": "ztune-gpu-check/1", **meta, "wall_s": wall_s,
            "result": "all phases passed" if not failed else f"not passed: {', '.join(failed)}",
            "phases": phases, "derived": derived}


# ------------------------------------------------------------------------------------------------ Markdown
def _f(value, fmt: str = "{:,.3g}") -> str:
    if value is None:
        return "–"
    return fmt.format(value) if isinstance(value, (int, float)) else str(value)


def _per_gib(nbytes):
    return nbytes / GIB if nbytes is not None else None


def _table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines + [""]


def markdown(doc: dict) -> str:
    m, ph, d = doc["machine"], doc["phases"], doc["derived"]
    gpus = m["gpus"]
    gpu_text = "; ".join(f"{g['name']} ({g['memory_bytes'] / GIB:.0f} GiB)" for g in gpus["devices"]) or gpus["status"]
    out = ["# GPU check" + (" (dry run: CPU, tiny sizes; the numbers check the script, not a GPU)"
                            if doc["dry_run"] else ""), "",
           f"- Date (UTC): {doc['date_utc']}", f"- Command: `{doc['command']}`",
           f"- Machine: {m['hostname']}; {gpu_text}" + (f", driver {gpus['driver']}" if gpus.get("driver") else "")
           + f"; {m['cpu']}, {m['cpu_cores_logical']} logical cores, {m['memory_bytes'] / GIB:.0f} GiB RAM; {m['os']}",
           f"- Software: Python {m['python']}, torch {m['torch']} (CUDA {m['torch_cuda']}), transformers "
           f"{m['transformers']}; ztune commit {m['git_commit']}",
           f"- Result: {doc['result']}; {doc['wall_s']:.0f} s wall", "", "## Phases", ""]
    out += _table(["phase", "status", "wall s", "budget s", "note"],
                  [[n, p["status"], f"{p['wall_s']:.1f}", f"{p['budget_s']:.0f}", p["error"] or ""]
                   for n, p in ph.items()])
    for n, p in ph.items():
        if p.get("output_tail"):
            out += [f"Last lines of {n}:", "", "```", *p["output_tail"], "```", ""]
    tests = ph["tests"]["data"]
    if tests:
        out += ["## tests/gpu", "", ", ".join(f"{v} {k}" for k, v in tests["counts"].items()), ""]
        out += _table(["test", "outcome", "s", "message"],
                      [[c["name"], c["outcome"], f"{c['time_s']:.2f}", c["message"]] for c in tests["cases"]])
    kernel = ph["kernel"]["data"]
    if kernel:
        out += [f"CPU Adam kernel: {kernel.get('backend')} ({', '.join(kernel.get('simd', []))})"
                + (f"; fallback because {kernel['fallback_reason']}" if kernel.get("fallback_reason") else ""), ""]
        if kernel.get("cuda_backend"):
            out += [f"CUDA Adam kernel: {kernel['cuda_backend']}"
                    + (f" (built or loaded in {kernel['cuda_seconds']:.1f} s)" if kernel.get("cuda_seconds") else "")
                    + (f"; fallback because {kernel['cuda_fallback_reason']}"
                       if kernel.get("cuda_fallback_reason") else ""), ""]
    timing, accuracy = cuda_adam_rows(tests.get("properties", {}) if tests else {})
    if timing:
        out += ["## CUDA Adam: ztune's kernel against torch.optim.AdamW(fused=True), one step", "",
                "Median of 20 CUDA-event timings after 3 warm-ups (tests/gpu/test_cuda_adam.py). GB/s counts 28 "
                "bytes per element, every array read and written once; torch's bf16 path also upcasts the grad "
                "and copies the master into the bf16 shard (what the runtime does), so it moves more.", ""]
        out += _table(["grads", "elements", "ztune ms", "ztune GB/s", "torch fused ms", "torch fused GB/s",
                       "torch / ztune"], timing)
    if accuracy:
        out += ["CUDA Adam accuracy after 100 steps: parameter difference against torch's single-tensor and "
                "fused paths as max |ours - torch| / max(|torch|, 1e-3), and the max absolute exp_avg difference "
                "against fused:", ""]
        out += _table(["case", "param vs single", "param vs fused", "exp_avg vs fused"], accuracy)
    rows = []
    for mode in ("z0", "offload"):
        r, dr = ph[f"train-{mode}"]["data"], d["runs"].get(mode, {})
        if r.get("timed_steps"):
            label = "ZeRO-0" if mode == "z0" else "ZeRO-2 + offload_optimizer cpu"
            n = r["num_params"]
            size = f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
            rows.append([label, size, f"{r['micro_batch']} x {r['seq_len']}",
                         f"{r['step_s_median'] * 1e3:,.0f} ({r['timed_steps']})", _f(r["tokens_per_s"], "{:,.0f}"),
                         _f(dr.get("mfu_datasheet"), "{:.1%}"), _f(dr.get("mfu_probed"), "{:.1%}"),
                         _f(_per_gib(r.get("max_allocated_bytes")), "{:.1f}"), _f(r["host_rss_bytes"] / GIB, "{:.1f}"),
                         f"{r['first_loss']:.3f} → {r['last_loss']:.3f}"])
    if rows:
        out += ["## Training: transformers Llama, random init, bf16, one device", "",
                f"MFU = tokens/s x (6 Psi + 12 L h s) / peak; datasheet peak {_f(d['datasheet_bf16_flops'])} FLOP/s "
                f"({d['datasheet_source']}); probed bf16 matmul {_f(d['probed_bf16_flops'])} FLOP/s.", ""]
        out += _table(["run", "params", "micro x seq", "step ms (median of n)", "tokens/s", "MFU datasheet",
                       "MFU probed", "GPU max alloc GiB", "host RSS GiB", "loss"], rows)
    off = ph["train-offload"]["data"].get("offload")
    if off:
        hd = ph["probe"]["data"].get("measured", {}).get("host_device") or {}
        out += ["## Offload transfers during training (per optimizer step)", ""]
        out += _table(["direction", "bytes/step", "s/step", "achieved GB/s", "probe pinned copy GB/s"], [
            ["D2H (gradients)", _f(off["d2h_bytes_per_step"], "{:,.0f}"), _f(off["d2h_s_per_step"], "{:.4f}"),
             _f(off["d2h_gbps"], "{:.2f}"), _f((hd.get("d2h_bytes_per_s") or 0) / 1e9 or None, "{:.2f}")],
            ["H2D (parameters)", _f(off["h2d_bytes_per_step"], "{:,.0f}"), _f(off["h2d_s_per_step"], "{:.4f}"),
             _f(off["h2d_gbps"], "{:.2f}"), _f((hd.get("h2d_bytes_per_s") or 0) / 1e9 or None, "{:.2f}")]])
        out += [f"Offloaded optimizer step (download, CPU Adam, upload; median): "
                f"{off['offload_step_s_median'] * 1e3:,.0f} ms.", ""]
    par = ph["parity"]["data"]
    if "rel_diff" in par:
        out += ["## Parity: offloaded against not offloaded (fp32, small Llama)", "",
                f"{par['num_params']:,} parameters, {par['steps']} steps on {par['device']}: relative difference "
                f"{par['rel_diff']:.3g} (tolerance {par['rtol']:g}; worst tensor {par['worst_tensor']} "
                f"{par['worst_tensor_rel_diff']:.3g}; losses within {par['loss_rel_diff']:.3g}): "
                f"{'PASS' if par['passed'] else 'FAIL'}.", ""]
    prof = ph["probe"]["data"].get("profile")
    if prof:
        out += ["## ztune probe", ""]
        out += _table(["field", "value", "how"], [[k, _f(v), ph["probe"]["data"]["provenance"].get(k, "")]
                                                   for k, v in prof.items() if k not in ("name", "source")])
    if d["predicted_vs_measured"]:
        out += ["## Predicted (ztune estimate on the probed profile) against measured", ""]
        out += _table(["run", "quantity", "predicted", "measured", "measured / predicted"],
                      [[r["run"], r["quantity"], _f(r["predicted"]), _f(r["measured"]),
                        _f(r["measured_over_predicted"], "{:.2f}")] for r in d["predicted_vs_measured"]])
    return "\n".join(out)
