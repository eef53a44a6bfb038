"""`ztune estimate`'s work without typer: validate the flags, call the cost model, render.

`ztune/cli/estimate.py` declares the command's flags for typer and calls `run_estimate`; `ztune.cli.main` calls
`parse_fast` first and, when it understands every word of the command line, `run_estimate` directly, so the
common `ztune estimate ...` never imports typer (whose parameter coercion builds pydantic adapters: about half
the command's wall time). Anything `parse_fast` does not recognise (--help, an unknown flag, a value that is
not a plain number) goes to typer, which gives the usual help and errors. tests/cli/test_estimate_fast.py
checks that both paths hand `run_estimate` the same arguments.

Nothing here imports torch; the cost model, profiles and config loader load when the command runs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ztune.errors import UserError

if TYPE_CHECKING:
    from ztune.config.validate import BatchKeys

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
        "grad_accum": est.grad_accum,  # micro-steps per optimizer step (the table's accum column)
        "memory_per_gpu": est.memory_per_gpu.as_dict(),
        "init_peak": est.init_peak_bytes,  # bytes per GPU during initialize, only where above the steady state
        "trainable_params": est.trainable_params,
        "cpu_memory_per_host": est.cpu_memory_per_host,
        "comm_bytes_per_step": est.comm_bytes_per_step,
        "step_time_s": est.step_time_s,
        # the step's parts, seconds (cost/compute.py StepTime): compute, all communication, the part of it not
        # hidden behind compute, offload, codecs, the optimizer step on device-resident states, and the wall time of the
        # collectives' CPU work where the ranks fill the cores (the step charges the larger of it and exposed_comm_s),
        # and the runtime's own CPU work (hooks' copies, unit gathers, parameter refresh) on CPU ranks
        "step": {"compute_s": est.step.compute_s, "comm_s": est.step.comm_s,
                 "exposed_comm_s": est.step.exposed_comm_s, "offload_s": est.step.offload_s,
                 "codec_s": est.step.codec_s, "optimizer_s": est.step.optimizer_s,
                 "comm_cpu_s": est.step.comm_cpu_s, "runtime_s": est.step.runtime_s},
        # compression / 1-bit Adam / ZeRO++ codecs whose rate the profile lacks (their time is not in step_time_s)
        "codec_unknown": list(est.codec.unknown) if est.codec is not None else [],
        "tokens_per_s": est.tokens_per_s,
        "mfu": est.mfu,
        "fits": est.fits,
    }


def _table_rows(estimates: list, *, show_compression: bool) -> tuple[list[str], list[list[str]]]:
    """Column names and cell texts of the estimate table."""
    cols = ["#", "ZeRO", "offload", "ckpt"] + (["compress"] if show_compression else []) + [
        "micro", "accum", "params", "grads", "optim", "activ", "buffers", "total", "host/node",
        "comm/step", "step s", "tokens/s", "MFU", "fits"]
    show_init = any(e.init_peak_bytes is not None for e in estimates)
    if show_init:  # only when some configuration's initialisation peaks above its steady state
        cols.insert(cols.index("total") + 1, "init")
    rows = []
    for i, e in enumerate(estimates, 1):
        m = e.memory_per_gpu
        rows.append([str(c) for c in
                     [i, _zero_label(e.config.zero), _offload_label(e), e.config.activations.checkpointing.value]
                     + ([e.config.compression.method.value] if show_compression else [])
                     + [e.micro_batch, e.grad_accum, _gib(m.params), _gib(m.grads), _gib(m.optimizer),
                        _gib(m.activations), _gib(m.buffers), _gib(m.total)]
                     + ([_gib(e.init_peak_bytes) if e.init_peak_bytes is not None else "-"] if show_init else [])
                     + [_gib(e.cpu_memory_per_host),
                        _gib(e.comm_bytes_per_step), f"{e.step_time_s:.2f}", f"{e.tokens_per_s:,.0f}",
                        f"{e.mfu:.1%}", "yes" if e.fits else "NO"]])
    return cols, rows


TEXT_COLUMNS = ("offload", "ckpt", "compress", "fits")  # left-justified; every other column is a number


Segments = list[tuple[str, str | None]]  # (text, rich style or None), printed one after another


def table_segments(estimates: list, *, show_compression: bool) -> Segments:
    """The estimate table laid out as rich's Table with box.SIMPLE_HEAD, padding (0, 1), no wrapping, a bold
    header and the title above (tests/cli/test_estimate_fast.py compares the two). Composed here because
    rich's table layout pass measures every cell several times: for the ~30 x 18 cells of a sweep it cost
    more than the whole estimate."""
    cols, rows = _table_rows(estimates, show_compression=show_compression)
    widths = [max([len(c)] + [len(r[j]) for r in rows]) for j, c in enumerate(cols)]
    total = sum(widths) + 3 * len(widths) + 1  # padding 1 + cell + padding 1 per column, one divider between

    def line(cells: list[str]) -> str:
        parts = [cell.rjust(w) if col not in TEXT_COLUMNS else cell.ljust(w)
                 for col, cell, w in zip(cols, cells, widths, strict=True)]
        return " " + " ".join(f" {p} " for p in parts) + " "

    e = estimates[0]
    title = (f"{e.model.name} on {e.num_nodes} x {e.hardware.name} ({e.world_size} GPUs, seq {e.config.seq_len}); "
             "memory in GiB per GPU, host GiB per node, comm GiB sent per GPU per step")
    return [(title.ljust(total), "table.title"), ("\n" + " " * total + "\n", None), (line(cols), "bold"),
            ("\n " + "\u2500" * (total - 2) + " \n", None), ("\n".join(line(r) for r in rows), None),
            ("\n" + " " * total, None)]


def render_table(estimates: list, *, show_compression: bool) -> Any:
    """table_segments as one rich Text (no wrapping)."""
    from rich.text import Text

    return Text.assemble(*table_segments(estimates, show_compression=show_compression), no_wrap=True,
                         overflow="ignore")


def _plain_stdout() -> bool:
    """True where rich would print without styles anyway (stdout not a terminal, no FORCE_COLOR /
    TTY_COMPATIBLE, no notebook): the lines are then written directly and rich is never imported."""
    import os
    import sys

    if os.environ.get("FORCE_COLOR") or os.environ.get("TTY_COMPATIBLE") or "IPython" in sys.modules:
        return False
    isatty = getattr(sys.stdout, "isatty", None)
    return isatty is not None and not isatty()


def print_lines(lines: list[Segments]) -> None:
    """Each line's segments, styled through the one rich console on a terminal, as plain text otherwise.
    Text is never markup (a model path may hold brackets)."""
    import sys

    if _plain_stdout():
        sys.stdout.write("".join("".join(text for text, _ in line) + "\n" for line in lines))
        sys.stdout.flush()
        return
    from rich.text import Text

    from ztune.console import console

    for line in lines:
        # soft_wrap: never squeeze or wrap (pipes and CI logs default to 80 columns)
        console.print(Text.assemble(*line, no_wrap=True, overflow="ignore"), soft_wrap=True)


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



# Every flag of `ztune estimate`: flag -> (parameter of run_estimate, kind, default). Kinds: "str", "int"
# (non-negative decimal digits only; anything else goes to typer), "path", "flag" (a boolean switch).
# tests/cli/test_estimate_fast.py checks this table against the typer command's signature.
ESTIMATE_FLAGS: dict[str, tuple[str, str, Any]] = {
    "--hardware": ("hardware", "str", None),
    "--model": ("model", "str", None),
    "--params": ("params", "str", None),
    "--nodes": ("nodes", "int", 1),
    "--seq": ("seq", "int", None),
    "--micro-batch": ("micro_batch", "int", None),
    "--global-batch": ("global_batch", "int", None),
    "--config": ("config", "path", None),
    "--stage": ("stage", "int", None),
    "--precision": ("precision", "str", None),
    "--compression": ("compression", "flag", False),
    "--zeropp": ("zeropp", "flag", None),
    "--no-zeropp": ("zeropp", "off", None),
    "--json": ("json_out", "flag", False),
    "--plot": ("plot", "path", None),
    "--check": ("check", "flag", False),
    "--selective-policy": ("selective_policy", "str", "attention"),
    "--reduce-fp32": ("reduce_fp32", "flag", False),
    "--loss": ("loss", "str", "upcast"),
    "--loss-chunk": ("loss_chunk", "int", 0),
    "--trainable": ("trainable", "str", None),
    "--lora-rank": ("lora_rank", "int", None),
    "--init": ("init", "str", "meta"),
}
_DIGITS = re.compile(r"[0-9]+")


def parse_fast(argv: list[str]) -> dict[str, Any] | None:
    """`run_estimate`'s keyword arguments for `argv` = ["estimate", flags...], or None when `argv` holds
    anything but known flags with plain values (typer then parses it, with its help and error messages).
    A flag given twice keeps its last value, as typer does."""
    if not argv or argv[0] != "estimate":
        return None
    kwargs = {name: default for name, _, default in ESTIMATE_FLAGS.values()}
    words = iter(argv[1:])
    for word in words:
        flag, eq, value = word.partition("=")
        spec = ESTIMATE_FLAGS.get(flag)
        if spec is None:
            return None
        name, kind, _ = spec
        if kind in ("flag", "off"):
            if eq:
                return None
            kwargs[name] = kind == "flag"
            continue
        if not eq:
            value = next(words, None)
            if value is None:
                return None
        if value.startswith("-") or not value:
            return None
        if kind == "int":
            if not _DIGITS.fullmatch(value):
                return None
            kwargs[name] = int(value)
        else:
            kwargs[name] = Path(value) if kind == "path" else value
    return kwargs


def batch_keys(*, micro_batch: int | None, global_batch: int | None,
               config_keys: BatchKeys | None) -> BatchKeys:
    """How batch-size errors name each size: by its flag where --micro-batch / --global-batch gave it, else by
    the config's key as written (`config_keys`, a BatchKeys; None: no config). With a batch flag the gradient
    accumulation is derived, so no key of the user's holds it."""
    from ztune.config.validate import BatchKeys

    if config_keys is None:
        return BatchKeys(global_="--global-batch", micro="--micro-batch", grad_accum="the gradient accumulation")
    if micro_batch is None and global_batch is None:
        return config_keys
    return BatchKeys(global_="--global-batch" if global_batch is not None else config_keys.global_,
                     micro="--micro-batch" if micro_batch is not None else config_keys.micro,
                     grad_accum="the gradient accumulation")


def run_estimate(*, hardware: str | None, model: str | None, params: str | None, nodes: int, seq: int | None,
                 micro_batch: int | None, global_batch: int | None, config: Path | None, stage: int | None,
                 precision: str | None, compression: bool, zeropp: bool | None, json_out: bool,
                 plot: Path | None, check: bool,
                 selective_policy: str, reduce_fp32: bool, loss: str, loss_chunk: int, trainable: str | None,
                 lora_rank: int | None, init: str) -> int:
    """Estimate memory per GPU and host, communication, step time and MFU; recommend a configuration. Prints
    the table (or JSON); returns the exit code (1: --check and the config does not fit). Bad input raises
    UserError. compression: sweep gradient compression too (opt-in; its codec's compute is charged at the
    profile's measured codec rates, cost/codec.py, and rows on a profile without them are not recommended).
    zeropp: sweep ZeRO++ at stage 3 too; None (the default)
    sweeps it on several nodes, where the inter-node link is what it saves (issue 15: "estimate includes these
    choices where the network makes them pay"), and leaves it out on one node."""
    from ztune.config.schema import Compression, Precision
    from ztune.cost.estimate import estimate as estimate_one
    from ztune.cost.estimate import recommend, sweep
    from ztune.inputs import MAX_BATCH, MAX_RANKS, MAX_SEQ, int_flag
    from ztune.profiles import load_hardware

    if hardware is None:
        raise UserError("--hardware is required: a profile name (e.g. dgx-h100, cpu-local) or a YAML path")
    if check and config is None:
        raise UserError("--check needs --config (the configuration to check)")
    if config is not None:  # sweep flags: the config names one configuration, so they would do nothing
        swept = [f for f, given in (("--compression", compression), ("--zeropp/--no-zeropp", zeropp is not None))
                 if given]
        if swept:
            raise UserError(f"{' and '.join(swept)} only widen the sweep, which --config replaces by its one "
                            "configuration: drop them, or set compression / zero keys in the config")
    if stage is not None and stage not in (0, 1, 2, 3):
        raise UserError(f"--stage must be 0, 1, 2 or 3, got {stage}")
    for flag, value, hi in (("--nodes", nodes, MAX_RANKS), ("--seq", seq, MAX_SEQ), ("--micro-batch", micro_batch,
                            MAX_BATCH), ("--global-batch", global_batch, MAX_BATCH)):
        int_flag(flag, value, hi=hi)
    try:
        prec = Precision(precision.lower()) if precision is not None else None
    except ValueError:
        raise UserError(f"--precision: got {precision!r}; allowed: bf16, fp16, fp32") from None
    if zeropp is None:
        zeropp = nodes > 1
    framework = _framework(selective_policy=selective_policy, reduce_fp32=reduce_fp32, loss=loss,
                           loss_chunk=loss_chunk, trainable=trainable, lora_rank=lora_rank, init=init)
    spec = _split_models(model, params)
    hw = load_hardware(hardware)
    seq_len = seq or min(spec.max_seq_len, 4096)

    ignored: tuple[str, ...] = ()
    batch_note = ""  # a config value a flag replaced without naming it (the gradient accumulation)
    if config is not None:
        # The loader (YAML, DeepSpeed JSON) only when a config is given. DeepSpeed "auto" values are resolved
        # from the model's hidden size and --precision (deepspeed_auto.py).
        from ztune.config import AutoContext, load_detailed, resolve_batch

        loaded = load_detailed(config, context=AutoContext(
            hidden_size=spec.hidden_size, precision=prec,
            batch_from_caller=micro_batch is not None or global_batch is not None))
        cfg, ignored = loaded.config, loaded.ignored
        batch = cfg.batch
        if micro_batch is not None or global_batch is not None:
            batch = dataclasses.replace(batch, micro=micro_batch or batch.micro,
                                        global_=global_batch or batch.global_, grad_accum=None)
        # errors name each size as the user gave it: the flag, or the config's key as written
        keys = batch_keys(micro_batch=micro_batch, global_batch=global_batch, config_keys=loaded.batch_keys)
        batch = resolve_batch(batch, nodes * hw.gpus_per_node, keys=keys)
        given = cfg.batch.grad_accum
        if (micro_batch is not None or global_batch is not None) and given is not None \
                and given != batch.grad_accum:  # a batch flag re-derives it: say so, the config's value is gone
            accum_key = loaded.batch_keys.grad_accum if loaded.batch_keys is not None else "batch.grad_accum"
            batch_note = (f"batch: {accum_key} {given} in {config} is derived again from the flags: "
                          f"{batch.grad_accum} (global {batch.global_} = micro {batch.micro} x {batch.grad_accum} "
                          f"x {nodes * hw.gpus_per_node} GPUs)")
        zero = dataclasses.replace(cfg.zero, stage=stage) if stage is not None else cfg.zero
        # a DeepSpeed config has no sequence length: the model's, as without --config (ztune YAML has seq_len)
        cfg = dataclasses.replace(cfg, batch=batch, zero=zero,
                                  seq_len=seq or (seq_len if loaded.deepspeed else cfg.seq_len),
                                  precision=prec or cfg.precision)
        overrides = [f"{flag} {value}" for flag, value in (("--stage", stage), ("--seq", seq),
                                                           ("--precision", precision)) if value is not None]
        from ztune.config.validate import check as check_config
        from ztune.config.validate import check_zeropp_layout
        from ztune.errors import ConfigError

        if overrides:  # the config's cross-key checks again, on what the flags made of it
            try:
                cfg = check_config(cfg)
            except ConfigError as exc:
                if loaded.deepspeed:  # the check names ztune's keys; a DeepSpeed config wrote zero_optimization.*
                    from ztune.config.deepspeed import renamed_for_deepspeed

                    exc = renamed_for_deepspeed(exc)
                raise UserError(f"{config}: with {', '.join(overrides)}: {exc}") from None
        try:  # what the ranks would refuse on this job's shape (ZeRO++'s layout), named as the runtime names it
            check_zeropp_layout(cfg, world_size=nodes * hw.gpus_per_node, ranks_per_node=hw.gpus_per_node)
        except ConfigError as exc:
            text = str(exc)
            if not loaded.deepspeed:  # the check names DeepSpeed's keys; a ztune YAML wrote zero.*
                text = text.replace("zero_optimization.zero_", "zero.")
            raise UserError(f"{config}: on {nodes} x {hw.name} ({hw.gpus_per_node} GPUs per node): {text}") from None
        estimates = [estimate_one(spec, hw, cfg, num_nodes=nodes, framework=framework)]
    else:
        world = nodes * hw.gpus_per_node
        if global_batch is not None and micro_batch is not None:  # what the sweep would refuse, by flag
            from ztune.config import BatchConfig, resolve_batch

            resolve_batch(BatchConfig(micro=micro_batch, global_=global_batch), world,
                          keys=batch_keys(micro_batch=micro_batch, global_batch=global_batch, config_keys=None))
        elif global_batch is not None and global_batch % world:  # each candidate's micro-batch divides it
            raise UserError(f"--global-batch {global_batch} is not divisible by the {world} GPUs ({nodes} x "
                            f"{hw.gpus_per_node}); pick a multiple of {world}")
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
            **({"batch_note": batch_note} if batch_note else {}),
        })
    else:
        head = f"recommended: #{best_index + 1} {best.label}" if best else "recommended: none"
        lines: list[Segments] = [table_segments(estimates, show_compression=compression),
                                 [(head, "bold"), (f" - {reason}", None)]]
        if params is not None:
            lines.append([(f"model shape: {spec.source or 'derived from --params ' + params}", "dim")])
        from ztune.cost.estimate import codec_unknown_note

        # One line for every codec a row runs whose rate the profile lacks (a sweep's first row may run none).
        unknown = dict.fromkeys(f for e in estimates if e.codec_unknown for f in e.codec.unknown)
        notes = [n for n in estimates[0].notes if not n.startswith("codec time unknown")]
        if unknown:
            notes.append(codec_unknown_note(hw.name, unknown))
        lines.append([("assumptions: " + "; ".join(notes), "dim")])
        if ignored:
            lines.append([("ignored DeepSpeed keys: " + ", ".join(ignored), None)])
        if batch_note:
            lines.append([(batch_note, None)])
        if plot is not None:
            lines.append([(f"wrote {plot}", None)])
        print_lines(lines)
    if check and not estimates[0].fits:
        from ztune.console import error

        error(f"does not fit: {estimates[0].reason}")
        return 1
    return 0
