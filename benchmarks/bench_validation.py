"""The cost model against published cluster measurements (issue #14; docs/validation.md).

Reads benchmarks/validation_rows.yaml (each row: a published ZeRO-3 / FSDP run, its source and what was read
there), predicts each with `ztune.cost.estimate.estimate` and the shipped hardware profiles, and prints
published vs predicted vs relative error, with the mean and max absolute error over throughput rows and
over peak-memory rows, and every row predicted not to fit (a run that ran must fit). Writes
docs/bench/validation.md. Pure arithmetic: runs in about a second, no GPU.

    python benchmarks/bench_validation.py [--rows PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ROWS_PATH = ROOT / "benchmarks" / "validation_rows.yaml"
SECTION = ROOT / "docs" / "bench" / "validation.md"
GiB = 1 << 30

# MPT (llm-foundry scripts/train/yamls/pretrain/mpt-*.yaml): vocab 50368, MLP expansion 4, learned positions
# as long as the run's sequence, biases and LayerNorm bias on (the README's NumParams count them).
MPT_VOCAB = 50368
# The 10B GPT-2-like model of the ZeRO-Offload row (50 layers x 4096, GPT-2 vocabulary and context).
GPT_10B = dict(hidden_size=4096, num_layers=50, num_heads=32, vocab_size=50257)


@dataclass(frozen=True)
class Result:
    row: dict
    published: float
    predicted: float
    error: float  # (predicted - published) / published
    memory_gib: float
    memory_error: float | None
    fits: bool
    reason: str
    params: int


def load_rows(path: Path = ROWS_PATH) -> tuple[list[dict], dict]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    shapes = {name: {"architecture": "gpt2", **s} for name, s in data["mpt_shapes"].items()}
    shapes |= {name: {"architecture": "llama", **s} for name, s in data.get("llama_shapes", {}).items()}
    return data["rows"], shapes


def _model(row: dict, mpt_shapes: dict):
    from ztune.profiles import load_model
    from ztune.specs import Architecture, ModelSpec

    name = row["model"]
    if mpt_shapes.get(name, {}).get("architecture") == "llama":
        s = mpt_shapes[name]
        return ModelSpec(name=name, architecture=Architecture.LLAMA, vocab_size=s.get("vocab_size", 32000),
                         hidden_size=s["hidden_size"], num_layers=s["num_layers"], num_heads=s["num_heads"],
                         num_kv_heads=s["num_kv_heads"], intermediate_size=s["intermediate_size"],
                         max_seq_len=row["seq"], tied_embeddings=False, attention_bias=False,
                         attention_out_bias=False)
    if name in mpt_shapes or name == "gpt-10b":
        shape = mpt_shapes[name] if name in mpt_shapes else GPT_10B
        h = shape["hidden_size"]
        return ModelSpec(name=name, architecture=Architecture.GPT2, vocab_size=shape.get("vocab_size", MPT_VOCAB),
                         hidden_size=h, num_layers=shape["num_layers"], num_heads=shape["num_heads"],
                         num_kv_heads=shape["num_heads"], intermediate_size=4 * h, max_seq_len=row["seq"],
                         tied_embeddings=True, attention_bias=True, attention_out_bias=True)
    return load_model(name)


def _config(row: dict):
    from ztune.config.schema import (
        ActivationConfig,
        BatchConfig,
        Checkpointing,
        Offload,
        Precision,
        TrainConfig,
        ZeroConfig,
    )

    zero = ZeroConfig(stage=row.get("stage", 3),
                      offload_optimizer=Offload.CPU if row.get("offload_optimizer") else Offload.NONE)
    return TrainConfig(
        zero=zero, precision=Precision(row.get("precision", "bf16")), seq_len=row["seq"],
        batch=BatchConfig(micro=row["micro"], global_=row["global"]),
        activations=ActivationConfig(checkpointing=Checkpointing(row["checkpointing"]), every=row.get("every", 1)),
    )


def predict(row: dict, mpt_shapes: dict) -> Result:
    """One row's prediction. Throughput rows compare tokens/s per GPU; `tflops_per_gpu` rows compare the
    hardware FLOP/s per GPU (recomputation included)."""
    from ztune.cost.estimate import Framework, estimate
    from ztune.profiles import load_hardware
    from ztune.specs import count_params

    spec = _model(row, mpt_shapes)
    hw = load_hardware(row["hardware"])
    if row.get("hardware_overrides"):
        hw = dataclasses.replace(hw, **row["hardware_overrides"])
    if row["gpus"] % hw.gpus_per_node:
        raise ValueError(f"{row['id']}: {row['gpus']} GPUs is not a whole number of {hw.name} nodes")
    framework = Framework(selective_policy=row.get("selective_policy", "attention"),
                          reduce_bytes=row.get("reduce_bytes"), loss_mode=row.get("loss", "upcast"),
                          checkpoint_impl=row.get("checkpoint_impl", "non_reentrant"))
    est = estimate(spec, hw, _config(row), num_nodes=row["gpus"] // hw.gpus_per_node, framework=framework)
    if row.get("metric", "tokens_per_s_per_gpu") == "tflops_per_gpu":
        predicted = est.hardware_flops_per_step / est.step_time_s / 1e12
    else:
        predicted = est.tokens_per_s / est.world_size
    published = float(row["published"])
    memory_gib = est.memory_per_gpu.total / GiB
    mem_pub = row.get("published_memory_gib")
    return Result(row=row, published=published, predicted=predicted, error=(predicted - published) / published,
                  memory_gib=memory_gib, memory_error=None if mem_pub is None else (memory_gib - mem_pub) / mem_pub,
                  fits=est.fits, reason=est.reason, params=count_params(spec).total)


def _stats(errors: list[float]) -> tuple[float, float]:
    absolute = [abs(e) for e in errors]
    return (sum(absolute) / len(absolute), max(absolute)) if absolute else (0.0, 0.0)


def render(results: list[Result]) -> str:
    lines = [
        "## Cost model vs published clusters",
        "",
        f"`python benchmarks/bench_validation.py` ({dt.date.today().isoformat()}): every row of "
        "benchmarks/validation_rows.yaml, predicted with the shipped hardware profiles; error = "
        "(predicted - published) / published. Method, sources and which rows informed what: docs/validation.md.",
        "",
        "| id | set | model | hardware | GPUs | seq | micro | ckpt | published | predicted | error | "
        "memory GiB (published) | fits |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        row = r.row
        ckpt = row["checkpointing"] + (f"/{row['every']}" if row.get("every", 1) > 1 else "")
        if row["checkpointing"] == "selective":
            ckpt += f" ({row.get('selective_policy', 'attention')})"
        unit = " TFLOPS" if row.get("metric") == "tflops_per_gpu" else ""
        mem = f"{r.memory_gib:.1f}"
        if r.memory_error is not None:
            mem += f" ({row['published_memory_gib']}, {r.memory_error:+.1%})"
        flag = "" if row.get("verified", True) is True else " (unverified)"
        lines.append(
            f"| {row['id']}{flag} | {row['set']} | {row['model']} | {row['hardware']} | {row['gpus']} | {row['seq']} | "
            f"{row['micro']} | {ckpt} | {r.published:,.0f}{unit} | {r.predicted:,.0f}{unit} | {r.error:+.1%} | "
            f"{mem} | {'yes' if r.fits else 'NO: ' + r.reason} |")
    lines.append("")
    for label, subset in (("all rows", results), ("issue #14 rows", [r for r in results if r.row["set"] == "issue14"]),
                          ("own rows", [r for r in results if r.row["set"] == "own"]),
                          ("held-out rows (read after the model's last change)",
                           [r for r in results if r.row["set"] == "heldout"]),
                          ("verified rows only", [r for r in results if r.row.get("verified", True) is True])):
        mean, worst = _stats([r.error for r in subset])
        lines.append(f"- Throughput, {label} ({len(subset)}): mean |error| {mean:.1%}, max {worst:.1%}.")
    mem = [r.memory_error for r in results if r.memory_error is not None]
    mean, worst = _stats(mem)
    lines.append(f"- Peak memory where published ({len(mem)} rows): mean |error| {mean:.1%}, max {worst:.1%}.")
    misfits = [r.row["id"] for r in results if not r.fits]
    lines.append(f"- Runs that ran but are predicted not to fit: {', '.join(misfits) if misfits else 'none'}.")
    params = [r.row["id"] for r in results if r.row.get("published_params") not in (None, r.params)]
    lines.append(f"- Rows whose published parameter count differs from ztune's: {', '.join(params) or 'none'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=Path, default=ROWS_PATH)
    args = parser.parse_args(argv)
    rows, shapes = load_rows(args.rows)
    results = [predict(row, shapes) for row in rows]
    text = render(results)
    print(text)
    SECTION.parent.mkdir(parents=True, exist_ok=True)
    SECTION.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
