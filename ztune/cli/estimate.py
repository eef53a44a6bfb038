"""`ztune estimate`: will it fit, and how fast? Parse flags, call the cost model, render.

The cost model, the profiles and the config loader are imported when the command runs, so that
`ztune --help` and the other commands do not pay for them; nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from ztune.errors import UserError

COMMAND_SETTINGS = {"help": "Memory, communication and step time per GPU for every ZeRO configuration."}

GIB = 1 << 30


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _offload_label(est: Any) -> str:
    from ztune.config.schema import Offload

    z = est.config.zero
    names = [n for n, o in (("opt", z.offload_optimizer), ("params", z.offload_params)) if o is Offload.CPU]
    return "+".join(names) or "none"


def _zero_label(z: Any) -> str:
    """The stage, with ZeRO++'s parts where on: "3 qwZ+hpZ8"."""
    parts = (["qwZ"] if z.quantized_weights else []) + ([f"hpZ{z.hpz_partition_size}"] if z.hpz_partition_size > 1
                                                         else []) + (["qgZ"] if z.quantized_gradients else [])
    return f"{z.stage} {'+'.join(parts)}" if parts else str(z.stage)


def row_dict(est: Any) -> dict:
    """One row of the stable --json schema."""
    c = est.config
    return {
        "stage": c.zero.stage,
        "offload_optimizer": c.zero.offload_optimizer.value,
        "offload_params": c.zero.offload_params.value,
        "checkpointing": c.activations.checkpointing.value,
        "compression": c.compression.method.value,
        # ZeRO++ (stage 3): qwZ (int8 weight all-gather), hpZ partition size (1 = off), qgZ (int4 gradients)
        "zeropp": {"quantized_weights": c.zero.quantized_weights, "hpz_partition_size": c.zero.hpz_partition_size,
                   "quantized_gradients": c.zero.quantized_gradients},
        "micro_batch": est.micro_batch,
        "memory_per_gpu": est.memory_per_gpu.as_dict(),
        "init_peak": est.init_peak_bytes,  # bytes per GPU during initialize, only where above the steady state
        "trainable_params": est.trainable_params,
        "cpu_memory_per_host": est.cpu_memory_per_host,
        "comm_bytes_per_step": est.comm_bytes_per_step,
        "step_time_s": est.step_time_s,
        "tokens_per_s": est.tokens_per_s,
        "mfu": est.mfu,
        "fits": est.fits,
    }


def _render(estimates: list, *, show_compression: bool) -> Any:
    from rich import box

    from ztune.console import table

    cols = ["#", "ZeRO", "offload", "ckpt"] + (["compress"] if show_compression else []) + [
        "micro", "accum", "params", "grads", "optim", "activ", "buffers", "total", "host/node",
        "comm/step", "step s", "tokens/s", "MFU", "fits"]
    show_init = any(e.init_peak_bytes is not None for e in estimates)
    if show_init:  # only when some configuration's initialisation peaks above its steady state
        cols.insert(cols.index("total") + 1, "init")
    rows = []
    for i, e in enumerate(estimates, 1):
        m = e.memory_per_gpu
        rows.append([i, _zero_label(e.config.zero), _offload_label(e), e.config.activations.checkpointing.value]
                    + ([e.config.compression.method.value] if show_compression else [])
                    + [e.micro_batch, e.grad_accum, _gib(m.params), _gib(m.grads), _gib(m.optimizer),
                       _gib(m.activations), _gib(m.buffers), _gib(m.total)]
                    + ([_gib(e.init_peak_bytes) if e.init_peak_bytes is not None else "-"] if show_init else [])
                    + [_gib(e.cpu_memory_per_host),
                       _gib(e.comm_bytes_per_step), f"{e.step_time_s:.2f}", f"{e.tokens_per_s:,.0f}",
                       f"{e.mfu:.1%}", "yes" if e.fits else "NO"])
    numeric = [c for c in cols if c not in ("offload", "ckpt", "compress", "fits")]
    e = estimates[0]
    title = (f"{e.model.name} on {e.num_nodes} x {e.hardware.name} ({e.world_size} GPUs, seq {e.config.seq_len}); "
             "memory in GiB per GPU, host GiB per node, comm GiB sent per GPU per step")
    t = table(title, cols, rows, justify_right=numeric)
    t.box = box.SIMPLE_HEAD  # 18 columns: no vertical rules, so the table stays readable
    t.padding = (0, 1)
    for col in t.columns:
        col.no_wrap = True  # cells are short numbers; skipping rich's word-wrap pass halves render time
    return t



def _split_models(model: str | None, params: str | None) -> Any:
    from ztune.profiles import load_model, model_from_params

    if (model is None) == (params is None):
        raise UserError("give exactly one of --model (profile, YAML or config.json) or --params (e.g. 70B)")
    return load_model(model) if model is not None else model_from_params(params)


def parse_trainable(text: str | None) -> float:
    """--trainable as a fraction in (0, 1]: "2%" -> 0.02, "0.02" -> 0.02; None -> 1 (full fine-tune)."""
    import math

    if text is None:
        return 1.0
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise UserError(f"--trainable: got {text!r}; give the trainable share of the parameters as a percentage "
                        "(e.g. 2%) or a fraction in (0, 1] (e.g. 0.02)")
    return value


def _framework(*, selective_policy: str, reduce_fp32: bool, loss: str, loss_chunk: int, trainable: str | None = None,
               lora_rank: int | None = None, init: str = "meta") -> Any:
    """The cost model's Framework from the flags; bad values are one-line user errors."""
    from ztune.cost.activations import LOSS_MODES, SELECTIVE_POLICIES
    from ztune.cost.estimate import Framework
    from ztune.cost.finetune import CONSTRUCTIONS
    from ztune.inputs import int_flag

    fraction = parse_trainable(trainable)
    if lora_rank is not None:
        if trainable is not None:
            raise UserError("give --trainable or --lora-rank, not both (LoRA trains only its adapters)")
        int_flag("--lora-rank", lora_rank, hi=1 << 16)
    if init not in CONSTRUCTIONS:
        raise UserError(f"--init: got {init!r}; allowed: {', '.join(CONSTRUCTIONS)}")

    if selective_policy not in SELECTIVE_POLICIES:
        raise UserError(f"--selective-policy: got {selective_policy!r}; allowed: {', '.join(SELECTIVE_POLICIES)}")
    if loss not in LOSS_MODES:
        raise UserError(f"--loss: got {loss!r}; allowed: {', '.join(LOSS_MODES)}")
    if loss_chunk < 0 or (loss == "chunked") != (loss_chunk > 0):
        raise UserError("--loss chunked needs --loss-chunk N (tokens per chunk, N >= 1), and --loss-chunk "
                        "needs --loss chunked")
    return Framework(selective_policy=selective_policy, reduce_bytes=4 if reduce_fp32 else None, loss_mode=loss,
                     loss_chunk_tokens=loss_chunk, trainable_fraction=fraction, lora_rank=lora_rank or 0,
                     construction=init)


def estimate(
    hardware: Annotated[str | None, typer.Option("--hardware", help="Hardware profile name or YAML path "
                                                                    "(required).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model profile, YAML or HF config.json.")] = None,
    params: Annotated[str | None, typer.Option("--params", help="Derive a Llama-like shape from a size, "
                                                                 "e.g. 70B.")] = None,
    nodes: Annotated[int, typer.Option("--nodes", help="Number of nodes.")] = 1,
    seq: Annotated[int | None, typer.Option("--seq", help="Sequence length (default: min(model max, "
                                                          "4096)).")] = None,
    micro_batch: Annotated[int | None, typer.Option("--micro-batch", help="Micro-batch per GPU (default: "
                                                                          "largest that fits).")] = None,
    global_batch: Annotated[int | None, typer.Option("--global-batch", help="Samples per optimizer "
                                                                            "step.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Estimate this ztune YAML or DeepSpeed "
                                                                 "JSON config only.")] = None,
    stage: Annotated[int | None, typer.Option("--stage", help="Only this ZeRO stage.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="bf16, fp16 or fp32 (default: the "
                                                                      "config's, else bf16).")] = None,
    compression: Annotated[bool, typer.Option("--compression", help="Also sweep gradient "
                                                                    "compression.")] = False,
    zeropp: Annotated[bool, typer.Option("--zeropp", help="Also sweep ZeRO++ at stage 3 (qwZ int8 weight "
                                                          "all-gather + hpZ inside each node + qgZ int4 "
                                                          "gradients) on several nodes.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of memory per GPU by "
                                                             "category.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 if --config does not fit.")] = False,
    selective_policy: Annotated[str, typer.Option("--selective-policy", help="What selective checkpointing "
                                                  "recomputes: attention (ztune, Megatron) or op "
                                                  "(torchtitan).")] = "attention",
    reduce_fp32: Annotated[bool, typer.Option("--reduce-fp32", help="Gradients are reduced in fp32 (FSDP "
                                                                  "reduce_dtype=float32).")] = False,
    loss: Annotated[str, typer.Option("--loss", help="Cross-entropy: upcast (logits.float()), fused, or "
                                                     "chunked (with --loss-chunk).")] = "upcast",
    loss_chunk: Annotated[int, typer.Option("--loss-chunk", help="Tokens per chunk of a chunked loss.")] = 0,
    trainable: Annotated[str | None, typer.Option("--trainable", help="Partial fine-tune: share of the "
                                                  "parameters that train, e.g. 2% or 0.02 (the rest "
                                                  "frozen).")] = None,
    lora_rank: Annotated[int | None, typer.Option("--lora-rank", help="LoRA fine-tune at this rank on PEFT's "
                                                  "default targets (q_proj+v_proj; GPT-2 c_attn), base "
                                                  "frozen.")] = None,
    init: Annotated[str, typer.Option("--init", help="How the model is built, for stage 3's init peak: meta "
                                                     "(ztune.zero_init) or eager (built whole, then "
                                                     "sharded).")] = "meta",
) -> None:
    """Estimate memory per GPU and host, communication, step time and MFU; recommend a configuration."""
    from ztune.config.schema import Compression, Precision
    from ztune.cost.estimate import estimate as estimate_one
    from ztune.cost.estimate import recommend, sweep
    from ztune.inputs import MAX_BATCH, MAX_RANKS, MAX_SEQ, int_flag
    from ztune.profiles import load_hardware

    if hardware is None:
        raise UserError("--hardware is required: a profile name (e.g. dgx-h100, cpu-local) or a YAML path")
    if check and config is None:
        raise UserError("--check needs --config (the configuration to check)")
    if stage is not None and stage not in (0, 1, 2, 3):
        raise UserError(f"--stage must be 0, 1, 2 or 3, got {stage}")
    for flag, value, hi in (("--nodes", nodes, MAX_RANKS), ("--seq", seq, MAX_SEQ), ("--micro-batch", micro_batch,
                            MAX_BATCH), ("--global-batch", global_batch, MAX_BATCH)):
        int_flag(flag, value, hi=hi)
    try:
        prec = Precision(precision.lower()) if precision is not None else None
    except ValueError:
        raise UserError(f"--precision: got {precision!r}; allowed: bf16, fp16, fp32") from None
    framework = _framework(selective_policy=selective_policy, reduce_fp32=reduce_fp32, loss=loss,
                           loss_chunk=loss_chunk, trainable=trainable, lora_rank=lora_rank, init=init)
    spec = _split_models(model, params)
    hw = load_hardware(hardware)
    seq_len = seq or min(spec.max_seq_len, 4096)

    ignored: tuple[str, ...] = ()
    if config is not None:
        # The loader (YAML, DeepSpeed JSON) only when a config is given. DeepSpeed "auto" values are resolved
        # from the model's hidden size and --precision (deepspeed_auto.py).
        from ztune.config import AutoContext, load_detailed, resolve_batch

        loaded = load_detailed(config, context=AutoContext(hidden_size=spec.hidden_size, precision=prec))
        cfg, ignored = loaded.config, loaded.ignored
        batch = cfg.batch
        if micro_batch is not None or global_batch is not None:
            batch = dataclasses.replace(batch, micro=micro_batch or batch.micro,
                                        global_=global_batch or batch.global_, grad_accum=None)
        else:  # the config's own batch keys: errors name them as written
            batch = resolve_batch(batch, nodes * hw.gpus_per_node, keys=loaded.batch_keys)
        zero = dataclasses.replace(cfg.zero, stage=stage) if stage is not None else cfg.zero
        cfg = dataclasses.replace(cfg, batch=batch, zero=zero, seq_len=seq or cfg.seq_len,
                                  precision=prec or cfg.precision)
        estimates = [estimate_one(spec, hw, cfg, num_nodes=nodes, framework=framework)]
    else:
        methods = tuple(Compression) if compression else (Compression.NONE,)
        estimates = sweep(spec, hw, num_nodes=nodes, seq_len=seq_len, global_batch=global_batch,
                          micro_batch=micro_batch, stages=(stage,) if stage is not None else (0, 1, 2, 3),
                          compression=methods, precision=prec or Precision.BF16, framework=framework,
                          zeropp=(False, True) if zeropp else (False,))
    best, reason = recommend(estimates)
    best_index = next((i for i, e in enumerate(estimates) if e is best), None)

    if plot is not None:
        from ztune.plot import plot_memory

        plot_memory(estimates, plot)

    if json_out:
        from ztune.console import emit_json

        emit_json({
            "model": {"name": spec.name, "params": estimates[0].num_params,
                      "trainable_params": estimates[0].trainable_params},
            "hardware": hw.name,
            "rows": [row_dict(e) for e in estimates],
            "recommendation": {"index": best_index, "label": best.label if best else None, "reason": reason},
            "ignored_deepspeed_keys": list(ignored),
        })
    else:
        from ztune.console import console

        rendered = _render(estimates, show_compression=compression)
        # Never squeeze columns into ellipses (pipes and CI logs default to 80 columns): widen instead.
        widths = [max([len(str(col.header))] + [len(str(c)) for c in col.cells]) for col in rendered.columns]
        needed = sum(widths) + 3 * len(widths) + 1
        width = console.width
        console.width = max(width, needed)
        try:
            console.print(rendered)
        finally:
            console.width = width
        head = f"recommended: #{best_index + 1} {best.label}" if best else "recommended: none"
        console.print(f"[bold]{head}[/] - {reason}", soft_wrap=True)
        if params is not None:
            console.print(f"[dim]model shape: {spec.source or 'derived from --params ' + params}[/]", soft_wrap=True)
        console.print("[dim]assumptions: " + "; ".join(estimates[0].notes) + "[/]", soft_wrap=True)
        if ignored:
            console.print("ignored DeepSpeed keys: " + ", ".join(ignored), soft_wrap=True, markup=False)
        if plot is not None:
            console.print(f"wrote {plot}")
    if check and not estimates[0].fits:
        from ztune.console import error

        error(f"does not fit: {estimates[0].reason}")
        raise typer.Exit(1)
