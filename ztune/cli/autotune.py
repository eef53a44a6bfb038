"""`ztune autotune`: the fastest config that fits, found by estimate then measurement.

Parse flags, build the search space, run the tuner (ztune/tune/tuner.py) with a progress display, render
the trials table, the plot and the best config. torch is never imported here: trials run in torchrun
subprocesses.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ztune.errors import UserError
from ztune.inputs import MAX_BATCH, MAX_RANKS, MAX_SEQ, MAX_STEPS, int_flag, seconds_flag, text_flag
from ztune.tune.records import COMPUTE_FIELDS

COMMAND_SETTINGS = {"help": "Benchmark the most promising configs on this machine and write the fastest."}

# ASCII only: without re.ASCII, \d takes any Unicode digit and float() reads it ("２GiB" was 2 GiB).
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE | re.ASCII)
_SMOKE = {"model": "tiny-gpt", "hardware": "cpu-local", "nproc": 2, "global_batch": 8, "seq": 64,
          "stages": "0,2,3", "warmup": 1, "steps": 3, "max_trials": 4, "time_budget": 100.0}


def timed_step_activation_bytes(model: Any, *, seq_len: int, micro_batch: int, precision: str) -> int:
    """Bytes of activations one unsharded training step of `model` (micro_batch x seq_len tokens, no
    checkpointing, eager attention) keeps for its backward: per layer 34 s b h + 5 a s^2 b bytes in 16-bit
    (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1), twice
    that in fp32. An upper bound for the measurement's memory check, so that a large --micro or --seq skips the
    timed step instead of exhausting the host."""
    s, b = int(seq_len), int(micro_batch)
    per_layer = 34 * s * b * model.hidden_size + 5 * model.num_heads * s * s * b
    return model.num_layers * per_layer * (2 if precision == "fp32" else 1)


def _measured_cpu_compute(hw: Any, err_console: Any, *, model: Any, seq_len: int, precision: str,
                          micro_batch: int, codec: bool = False) -> Any:
    """A CPU profile with the compute this host measures now (probe.with_measured_cpu_compute: a timed matmul
    for the peak, one timed training step of `model` at the middle candidate micro-batch for the achieved
    fraction) for the cost model's ranking; the journal's fingerprint keeps the profile as written, so a
    rerun still resumes. Trials run OMP_NUM_THREADS threads per rank (1 unless set; tune/bench.py), and so
    do the measurements. With `codec` (some candidate compresses, or 1-bit Adam), also the runtime's codec rates
    (ztune/probe_codec.py), which price compression and ZeRO++ in the ranking (cost/codec.py)."""
    import psutil

    from ztune import envvars
    from ztune.probe import with_measured_cpu_compute
    from ztune.specs import count_params

    threads = envvars.omp_num_threads()
    # The timed step holds the whole model unsharded with its gradients, no optimizer (8 bytes a parameter in
    # fp32, 16 with headroom), and one micro-batch's activations (timed_step_activation_bytes). Where that would
    # crowd this host's memory, time no step.
    need = count_params(model).total * 16 + timed_step_activation_bytes(model, seq_len=seq_len,
                                                                       micro_batch=micro_batch, precision=precision)
    timed = need <= psutil.virtual_memory().available // 4
    measured, cpu = with_measured_cpu_compute(hw, threads=threads, model=model if timed else None,
                                              seq_len=seq_len, micro_batch=micro_batch, dtype=precision)
    r = cpu.rates
    step = (f"{model.name} training step at micro-batch {micro_batch} {precision}: "
            f"{cpu.train_flops_per_s / 1e9:.0f} GFLOP/s = {cpu.train_flops_efficiency:.0%} of the matmul rate"
            if timed else f"{model.name} too large to time a step here: the profile's achieved fraction is kept")
    err_console.print(
        f"compute per rank, measured now ({threads} thread(s)): {r.size_for('fp32')}^2 matmul fp32 "
        f"{r.fp32_flops_per_s / 1e9:.0f} GFLOP/s, bf16 {r.bf16_flops_per_s / 1e9:.0f} GFLOP/s (profile {hw.name}: "
        f"{hw.peak_flops_fp32 / 1e9:.0f} and {hw.peak_flops_bf16 / 1e9:.0f}); {step}", soft_wrap=True)
    if codec:
        from ztune.probe_codec import measure_codec_rates

        rates = measure_codec_rates(threads=threads)
        measured = dataclasses.replace(measured, **rates)
        err_console.print("codec per rank, measured now: " + ", ".join(
            f"{name[len('codec_'):-len('_elements_per_s')]} {value / 1e6:,.0f}M/s" for name, value in rates.items()),
            soft_wrap=True)
    return measured


# The profile fields _measured_cpu_compute replaces (probe.with_measured_cpu_compute), and with `codec` also
# cost/codec.py's RATE_FIELDS.
_COMPUTE_FIELDS = COMPUTE_FIELDS  # what a compute record holds (tune/records.py checks it when the journal is read)


def _codec_fields() -> tuple[str, ...]:
    from ztune.cost.codec import RATE_FIELDS

    return RATE_FIELDS


def _journalled_compute(hw: Any, journal: Any, err_console: Any) -> Any:
    """`hw` with the compute the journal recorded when this run started (a resume), else None. A resumed run
    ranks its remaining candidates as the killed run did instead of re-measuring a machine whose load has
    changed since (journal.py, ``compute`` records)."""
    rec = (journal.state.compute or {}).get("measured")
    # the compute fields, and the codec rates where the run measured them
    known = (set(_COMPUTE_FIELDS), {*_COMPUTE_FIELDS, *_codec_fields()})
    if not isinstance(rec, dict) or set(rec) not in known or not all(
            isinstance(v, (int, float)) and v >= 0 for v in rec.values()) or not (
            rec["peak_flops_fp32"] > 0 and rec["peak_flops_bf16"] > 0):
        return None  # none recorded (a run from before the record existed), or not one this code wrote
    err_console.print("compute per rank: as measured when this run started (its journal), "
                      f"fp32 {rec['peak_flops_fp32'] / 1e9:.0f} GFLOP/s, bf16 {rec['peak_flops_bf16'] / 1e9:.0f} "
                      f"GFLOP/s, achieved fraction {rec['train_flops_efficiency']:.0%}", soft_wrap=True)
    return dataclasses.replace(hw, **rec)


# The least --memory-cap may be. The cap is RLIMIT_DATA on every trial process (tune/bench.py), and Python with
# torch maps more than 128 MiB of data before training starts (measured: `import torch` aborts under a 128 MiB
# cap, runs under 256 MiB): below this every trial fails before its first step. A bare number is bytes, so
# `--memory-cap 2` meant 2 bytes.
MIN_MEMORY_CAP_BYTES = 256 << 20
MAX_MEMORY_CAP_BYTES = 1 << 60  # 1 EiB


def parse_size(text: str) -> int:
    """'1.5GiB', '800M', '2G' -> bytes (binary units: 1G = 1GiB = 2**30; a bare number is bytes), from
    MIN_MEMORY_CAP_BYTES (256 MiB) to 1 EiB."""
    m = _SIZE_RE.match(text)
    if not m or len(m.group(1)) > 24:
        raise UserError(f"--memory-cap: cannot read {text!r}; write e.g. 800MiB or 2GiB")
    scale = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[(m.group(2) or "")[:1].lower()]
    size = float(m.group(1)) * scale
    if size < MIN_MEMORY_CAP_BYTES:
        raise UserError(f"--memory-cap {text!r} is {size:,.0f} byte(s), under the {MIN_MEMORY_CAP_BYTES >> 20} MiB a "
                        "trial's Python and torch need before training (a bare number is bytes); write e.g. "
                        "800MiB or 2GiB")
    if size > MAX_MEMORY_CAP_BYTES:
        raise UserError(f"--memory-cap {text!r} is out of range (at most 1 EiB); write e.g. 800MiB or 2GiB")
    return int(size)


def _ints(text: str | None, flag: str, *, lo: int = 0, hi: int = MAX_BATCH) -> tuple[int, ...] | None:
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:  # was: --stages '' silently meant stage 0 only, --micro '' every micro-batch
        raise UserError(f"{flag}: empty; give comma-separated integers (e.g. {flag} 1,2,4), or leave it out")
    if len(items) > 1024 or not all(x.isascii() and x.lstrip("-").isdigit() and len(x) <= 12 for x in items):
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}")
    values = tuple(int(x) for x in items)
    for v in values:
        int_flag(flag, v, lo=lo, hi=hi)
    return values


def _host_trials(hosts: Any, *, nproc: int | None, memory_cap: str | None) -> tuple[Any, int | None, int]:
    """(`hosts`, ranks per host, number of hosts) when trials run on hosts (-H, or a Slurm allocation of several
    nodes), else (None, None, 1). `hosts`: the HostTrials the flags give. Every host must offer the same number
    of slots."""
    import os

    from ztune.launch import LaunchRequest, resolve_hosts
    from ztune.launch.hostfile import hosts_from_slurm

    slurm = hosts_from_slurm(dict(os.environ)) if hosts.hostfile is None else None
    if hosts.hostfile is None and (slurm is None or len(slurm) < 2):
        if hosts.include or hosts.exclude:
            raise UserError("--include/--exclude select hosts: give them with -H/--hostfile")
        return None, None, 1
    int_flag("--master-port", hosts.base_port, lo=1, hi=65535 - 1000)
    resolved, _local = resolve_hosts(LaunchRequest(script="", hostfile=hosts.hostfile, include=hosts.include,
                                                   exclude=hosts.exclude), os.environ)
    slots = {h.num_slots for h in resolved}
    if len(slots) != 1:
        raise UserError(f"autotune -H needs the same number of slots on every host, got "
                        f"{', '.join(f'{h.name}={h.num_slots}' for h in resolved)}; use --include/--exclude")
    per_host = slots.pop()
    if nproc is not None and nproc != per_host:
        raise UserError(f"--nproc {nproc}: with hosts, each trial runs the hostfile's {per_host} slot(s) per "
                        "host; drop --nproc or change the slots")
    if memory_cap is not None:
        raise UserError("--memory-cap caps local trial processes only; it cannot be combined with -H")
    return hosts, per_host, len(resolved)


def _event_handler(progress: Any, state: dict) -> Any:
    def on_event(kind: str, **data: Any) -> None:
        if kind == "plan":
            state["task"] = progress.add_task(f"{data['grid_size']} candidates, {data['resumed']} trials from "
                                              "the journal", total=None)
        elif kind == "trial_start":
            c = data["candidate"]
            state["steps"] = data["total_steps"]
            progress.update(state["task"], description=f"trial {data['index']}: {c.key} (est "
                            f"{data['estimate_s'] * 1e3:.0f} ms/step)", total=data["total_steps"], completed=0)
        elif kind == "trial_poll":
            progress.update(state["task"], completed=data["steps"])
        elif kind == "trial_end":
            r = data["record"]
            got = f"{r.step_time_s * 1e3:.0f} ms/step" if r.step_time_s else f"{r.status}: {r.reason[:60]}"
            progress.console.print(f"  trial {r.index} {r.candidate.key}: {got} ({r.wall_s:.0f} s)")
        elif kind == "repeat_end":
            r = data["record"]
            got = f"{r.step_time_s * 1e3:.0f} ms/step" if r.step_time_s else f"{r.status}: {r.reason[:60]}"
            progress.console.print(f"  trial {r.index} {r.key} (confirmation round {r.round}): {got} "
                                   f"({r.wall_s:.0f} s)")
        elif kind == "stale":
            progress.console.print(f"  ended trial {data['key']} left running by an earlier tuner")
    return on_event


def result_json(result: Any) -> dict:
    best = result.best
    runs = result.samples_s
    return {
        # step_time_s of the best is the median it was chosen on; samples_s its search trial and repeats.
        "best": None if best is None else {"key": best.candidate.key, **dataclasses.asdict(best.candidate),
                                           "step_time_s": result.best_median_s,
                                           "samples_s": runs[best.candidate.key]},
        "best_config": None if result.best_config is None else _to_dict(result.best_config),
        "trained": result.trained,
        "stop_reason": result.stop_reason,
        "grid_size": result.grid_size,
        "num_trials": len(result.trials),  # distinct candidates measured
        "new_trials": result.new_trials,
        "num_repeats": len(result.repeats),  # confirmation trials of already measured candidates
        "new_repeats": result.new_repeats,
        "total_trials": len(result.trials) + len(result.repeats),
        "confirmation": result.confirm_note,
        "repeats": [{"index": r.index, "key": r.key, "round": r.round, "status": r.status, "reason": r.reason,
                     "step_time_s": r.step_time_s, "wall_s": r.wall_s, "from_journal": r.resumed}
                    for r in result.repeats],
        "wall_s": result.wall_s,
        "efficiency": dataclasses.asdict(result.fit.efficiency),
        "micro_step_overhead_s": result.fit.calibration.micro_step_overhead_s,
        "step_time_error": {"mean_abs": result.fit.mean_abs_error, "max_abs": result.fit.max_abs_error,
                            "out_of_sample_mean_abs": result.fit.out_of_sample_mean_abs_error,
                            "out_of_sample_max_abs": result.fit.out_of_sample_max_abs_error},
        "memory_offset_bytes": result.memory.offset_bytes,
        "memory_limit_bytes": result.memory.limit_bytes,
        "exported": list(result.exported),
        "trials": [
            {"index": r.index, "key": r.candidate.key, **dataclasses.asdict(r.candidate), "status": r.status,
             "reason": r.reason, "step_time_s": r.step_time_s, "samples_s": runs.get(r.candidate.key, []),
             "median_step_time_s": _median_or_none(runs.get(r.candidate.key)),
             "prior_step_time_s": r.prior_step_time_s,
             "calibrated_step_time_s": result.calibrated[r.candidate.key][0],
             "peak_memory_bytes": r.peak_memory_bytes, "estimated_memory_bytes": r.estimated_memory_bytes,
             "predicted_memory_bytes": result.calibrated[r.candidate.key][1], "wall_s": r.wall_s,
             "first_loss": r.first_loss, "last_loss": r.last_loss, "from_journal": r.resumed}
            for r in result.trials
        ],
    }


def _median_or_none(xs: list[float] | None) -> float | None:
    from ztune.tune.confirm import median

    return median(xs) if xs else None


def recommendation(result: Any, workload: Any = None) -> str:
    """One line: the pick, the median it was chosen on and its samples, in ms/step; for a ZeRO++ pick (given
    the `workload`) why it pays (tune/rank.py zeropp_reason)."""
    best, runs = result.best, result.samples_s
    if best is None:
        return "no configuration trained"
    mine = runs[best.candidate.key]
    others = [f"{k} {_median_or_none(v) * 1e3:,.0f}" for k, v in sorted(runs.items(), key=lambda kv: _median_or_none(
        kv[1])) if k != best.candidate.key and len(v) > 1]
    why = ""
    if workload is not None and best.candidate.zeropp:
        from ztune.tune.rank import zeropp_reason

        why = zeropp_reason(workload, best.candidate, efficiency=result.fit.efficiency,
                            measured_s={k: _median_or_none(v) for k, v in runs.items()})
    return (f"{best.candidate.key} at a median of {result.best_median_s * 1e3:,.0f} ms/step over "
            f"{len(mine)} sample(s) ({', '.join(f'{x * 1e3:,.0f}' for x in mine)})"
            + (f"; other confirmed leaders' medians: {', '.join(others)}" if others else "")
            + (f". Why: {why}" if why else ""))


def _to_dict(cfg: Any) -> dict:
    from ztune.config.io import to_dict

    return to_dict(cfg)


def _render(result: Any) -> Any:
    """The trials table; knob columns only for knobs that vary. Failure reasons go below the table."""
    from rich import box

    from ztune.console import table

    mib = float(1 << 20)
    trials = result.trials
    knobs = [("ZeRO", lambda c: c.stage), ("offl", lambda c: "cpu" if c.offload_optimizer else "-"),
             ("ckpt", lambda c: c.checkpointing), ("prec", lambda c: c.precision),
             ("comp", lambda c: c.compression), ("zpp", lambda c: "on" if c.zeropp else "-"),
             ("mb", lambda c: c.micro)]
    shown = [(name, get) for name, get in knobs
             if name in ("ZeRO", "mb") or len({get(r.candidate) for r in trials}) > 1]
    runs = result.samples_s
    confirmed = bool(result.repeats)  # a median column (with its sample count) only where repeats ran
    rows = []
    for r in trials:
        cal_s, _ = result.calibrated[r.candidate.key]
        mine = runs.get(r.candidate.key, [])
        med = [f"{_median_or_none(mine) * 1e3:.0f} ({len(mine)})" if mine else "-"] if confirmed else []
        meas = f"{r.step_time_s * 1e3:.0f}" if r.step_time_s else "-"
        err = f"{(cal_s - r.step_time_s) / r.step_time_s:+.0%}" if r.step_time_s else "-"
        mark = "*" if result.best is r else ""
        rows.append([f"{r.index}{mark}", *(get(r.candidate) for _, get in shown), r.status,
                     f"{r.prior_step_time_s * 1e3:.0f}", f"{cal_s * 1e3:.0f}", meas, *med, err,
                     f"{r.estimated_memory_bytes / mib:.0f}",
                     f"{r.peak_memory_bytes / mib:.0f}" if r.peak_memory_bytes else "-"])
    cols = ["#", *(name for name, _ in shown), "status", "est", "cal", "meas", *(["median (n)"] if confirmed else []),
            "err", "est", "meas"]
    t = table(f"autotune: {len(trials)} trials of {result.grid_size} candidates (* best); step time in ms "
              "(cost model, calibrated, measured" + (", median of the n samples with confirmation repeats"
                                                     if confirmed else "")
              + "); memory in MiB per rank (cost model, measured peak)",
              cols, rows, justify_right=["#", "ZeRO", "mb", "est", "cal", "meas", "median (n)", "err"])
    t.box = box.SIMPLE_HEAD
    t.padding = (0, 1)
    for col in t.columns:
        col.no_wrap = True
    return t


def plot_trials(result: Any, path: Path, *, global_batch: int) -> Path | None:
    """PNG: measured throughput (samples/s) vs measured peak memory per rank, one point per trial; failed
    trials drawn at their estimated memory on the x axis line. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ztune.console import warn

        warn("autotune.png not written: matplotlib is not installed (pip install 'ztune[plot]', or pass --no-plot)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    gib = float(1 << 30)
    for r in result.trials:
        if r.status == "ok" and r.step_time_s and r.peak_memory_bytes:
            x, y = r.peak_memory_bytes / gib, global_batch / r.step_time_s
            ax.scatter([x], [y], s=60 if r is result.best else 25, color="C3" if r is result.best else "C0",
                       zorder=3)
            ax.annotate(r.candidate.key, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        else:
            ax.scatter([r.estimated_memory_bytes / gib], [0], marker="x", color="C7", zorder=3)
            ax.annotate(f"{r.candidate.key} ({r.status})", (r.estimated_memory_bytes / gib, 0), fontsize=6,
                        xytext=(3, 3), textcoords="offset points", rotation=30)
    ax.set_xlabel("peak memory per rank (GiB, measured; x = failed trial at its estimate)")
    ax.set_ylabel("samples/s (measured)")
    ax.set_title("ztune autotune: throughput vs memory per trial (red = chosen)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def autotune(
    model: Annotated[str, typer.Option("--model", help="Model profile name or YAML path.")] = "tiny-gpt",
    hardware: Annotated[str, typer.Option("--hardware", help="Hardware profile of this machine.")] = "cpu-local",
    nproc: Annotated[int | None, typer.Option("--nproc", help="Ranks per trial (default: the profile's GPUs "
                                                              "per node).")] = None,
    global_batch: Annotated[int, typer.Option("--global-batch", help="Samples per optimizer step (fixed).")] = 16,
    seq: Annotated[int | None, typer.Option("--seq", help="Sequence length (default: min(model max, "
                                                          "128)).")] = None,
    vary: Annotated[str | None, typer.Option("--vary", help="Knobs that may vary: stage, offload, "
                                             "checkpointing, micro, precision, compression, zeropp (ZeRO++ at "
                                             "stage 3; only with several hosts) (default: stage,checkpointing,"
                                             "micro; plus offload on GPU profiles).")] = None,
    stages: Annotated[str, typer.Option("--stages", help="ZeRO stages to consider.")] = "0,1,2,3",
    micro: Annotated[str | None, typer.Option("--micro", help="Micro-batches to consider (default: every "
                                                              "divisor of global/nproc).")] = None,
    max_micro: Annotated[int | None, typer.Option("--max-micro", help="Largest micro-batch.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="bf16, fp16 or fp32 (default: fp32 on "
                                                                      "cpu profiles, else bf16).")] = None,
    config: Annotated[str | None, typer.Option("--config", help="Base config (optimizer, buckets); its "
                                                                "tuned keys are overridden.")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Measured optimizer steps per trial.")] = 4,
    warmup: Annotated[int, typer.Option("--warmup", help="Warm-up steps per trial (not measured).")] = 1,
    trial_timeout: Annotated[float | None, typer.Option("--trial-timeout", help="Seconds before a trial "
                                                        "counts as hung (default: from the estimate).")] = None,
    stall_timeout: Annotated[float | None, typer.Option("--stall-timeout", help="Seconds without a new step "
                                                        "before a running trial counts as hung (default: "
                                                        "from the estimate, at least 15).")] = None,
    time_budget: Annotated[float | None, typer.Option("--time-budget", help="Seconds for the whole "
                                                                            "search.")] = None,
    max_trials: Annotated[int | None, typer.Option("--max-trials", help="Most trials in the journal "
                                                   "(confirmation repeats included).")] = None,
    min_trials: Annotated[int, typer.Option("--min-trials", help="Successful trials before the search may "
                                                                 "stop on convergence.")] = 3,
    exhaustive: Annotated[bool, typer.Option("--exhaustive", help="Measure every candidate that fits, with no "
                                             "convergence stop (--max-trials, --time-budget still apply): the "
                                             "whole grid's ground truth, to check a search against.")] = False,
    confirm: Annotated[int, typer.Option("--confirm", help="Confirmation: measure the search's leaders this many "
                                         "more times each, interleaved, and pick on the median of each one's "
                                         "samples (0: off; within --max-trials and --time-budget).")] = 2,
    confirm_top: Annotated[int, typer.Option("--confirm-top", help="Most leaders to confirm.")] = 3,
    confirm_margin: Annotated[float, typer.Option("--confirm-margin", help="Leaders: measured within this "
                                                  "fraction of the fastest trial.")] = 0.15,
    threshold: Annotated[float, typer.Option("--threshold", help="Stop when nothing is predicted to beat "
                                                                 "the best by more than this fraction.")] = 0.05,
    memory_margin: Annotated[float, typer.Option("--memory-margin", help="Safety margin on predicted "
                                                                         "memory.")] = 0.1,
    memory_cap: Annotated[str | None, typer.Option("--memory-cap", help="Memory cap per process "
                                                   "(RLIMIT_DATA), e.g. 2GiB; also lowers the limit.")] = None,
    script: Annotated[str | None, typer.Option("--script", help="Your training script (see "
                                                                "docs/autotune.md); args after --.")] = None,
    script_args: Annotated[list[str] | None, typer.Argument(help="Arguments for --script, after --.",
                                                            show_default=False)] = None,
    # str, not Path: typer turns "" into Path("."), and the results would land in the current folder.
    out: Annotated[str, typer.Option("--out", help="Directory for the journal, trials and results.")]
    = "ztune-autotune",
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over (the old journal is kept aside).")] = False,
    export: Annotated[str, typer.Option("--export", help="yaml, or deepspeed to also write DeepSpeed "
                                                         "JSON.")] = "yaml",
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write autotune.png.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    smoke: Annotated[bool, typer.Option("--smoke", help="CI smoke: tiny search of the demo model on 2 CPU "
                                                        "ranks; exit 0 only if the chosen config trained.")] = False,
    hostfile: Annotated[str | None, typer.Option("--hostfile", "-H", help="Run every trial on these hosts "
                                                 "through `ztune launch` (DeepSpeed-style hostfile; inside a "
                                                 "Slurm allocation of several nodes, its nodes).")] = None,
    include: Annotated[str | None, typer.Option(help="With -H: only these hosts/slots.")] = None,
    exclude: Annotated[str | None, typer.Option(help="With -H: drop these hosts/slots.")] = None,
    master_port: Annotated[int, typer.Option(help="With -H: rendezvous port of the first trial (trial i uses "
                                                  "port + i).")] = 29500,
    workdir: Annotated[str | None, typer.Option(help="With -H: working directory on every host.")] = None,
    python: Annotated[str | None, typer.Option(help="With -H: python on the hosts.")] = None,
    ssh_config: Annotated[str | None, typer.Option("--ssh-config", "-F", help="With -H: ssh config file.")]
    = None,
    ssh_option: Annotated[list[str] | None, typer.Option("--ssh-option", "-o",
                                                         help="With -H: extra ssh -o KEY=VALUE.")] = None,
    insecure_no_host_key_check: Annotated[bool, typer.Option(
        help="With -H: do not check ssh host keys. Only on networks you trust.")] = False,
) -> None:
    """Estimate, prune and rank configs, measure the leaders with short trials, calibrate, and write the
    fastest one that fits. Rerunning the same command resumes from the journal."""
    from ztune.config import load
    from ztune.console import console, err_console, warn
    from ztune.launch import check_text_flags
    from ztune.profiles import load_hardware, load_model
    from ztune.tune import rundir
    from ztune.tune.hosts import HostTrials, launch_flags
    from ztune.tune.journal import Journal
    from ztune.tune.rank import Workload, local_hardware
    from ztune.tune.space import Constraints, build_space, fingerprint
    from ztune.tune.tuner import Settings, Tuner, export_best

    for flag, value, what in (("--model", model, "a model profile name or YAML path"),
                              ("--hardware", hardware, "a hardware profile name or YAML path"),
                              ("--script", script, "a script path"), ("--out", out, "a folder for the results"),
                              ("--memory-cap", memory_cap, "a size such as 2GiB")):
        text_flag(flag, value, what=what)
    host_flags = HostTrials(hostfile=hostfile, include=include, exclude=exclude, ssh_config=ssh_config,
                            ssh_options=tuple(ssh_option or ()), insecure_no_host_key_check=insecure_no_host_key_check,
                            workdir=workdir, python=python, base_port=master_port)
    # The flags `ztune launch` has too (what -H passes on to it, and --config): the launcher's table and messages.
    check_text_flags([("--config", config), *launch_flags(host_flags)])
    out = Path(out)
    script = Path(script) if script is not None else None
    if export not in ("yaml", "deepspeed"):
        raise UserError(f"--export: got {export!r}; allowed: yaml, deepspeed")
    if script_args and script is None:
        raise UserError(f"unexpected arguments {' '.join(script_args)!r}: arguments after -- go to --script")
    if smoke:
        # --smoke fixes these; a value given with it would be dropped without a word.
        given = {"--model": model, "--hardware": hardware, "--nproc": nproc, "--global-batch": global_batch,
                 "--seq": seq, "--stages": stages, "--warmup": warmup, "--steps": steps, "--vary": vary}
        defaults = inspect.signature(autotune).parameters
        clash = [flag for flag, value in given.items()
                 if value != defaults[flag.lstrip("-").replace("-", "_")].default]
        if clash:
            raise UserError(f"--smoke sets {', '.join(clash)} itself; drop {'them' if len(clash) > 1 else 'it'} "
                            "or drop --smoke")
        model, hardware, nproc = _SMOKE["model"], _SMOKE["hardware"], _SMOKE["nproc"]
        global_batch, seq, stages = _SMOKE["global_batch"], _SMOKE["seq"], _SMOKE["stages"]
        warmup, steps, vary = _SMOKE["warmup"], _SMOKE["steps"], "stage,micro"
        max_trials = max_trials or _SMOKE["max_trials"]
        time_budget = time_budget or _SMOKE["time_budget"]
        fresh = True
    int_flag("--steps", steps, hi=MAX_STEPS)
    int_flag("--warmup", warmup, lo=0, hi=MAX_STEPS)
    int_flag("--global-batch", global_batch, hi=MAX_BATCH)
    int_flag("--seq", seq, hi=MAX_SEQ)
    int_flag("--max-micro", max_micro, hi=MAX_BATCH)
    int_flag("--max-trials", max_trials, lo=0, hi=MAX_STEPS)
    int_flag("--min-trials", min_trials, lo=0, hi=MAX_STEPS)
    int_flag("--confirm", confirm, lo=0, hi=MAX_STEPS)
    int_flag("--confirm-top", confirm_top, lo=2, hi=MAX_STEPS)
    for flag, value in (("--trial-timeout", trial_timeout), ("--stall-timeout", stall_timeout),
                        ("--time-budget", time_budget)):
        seconds_flag(flag, value)
    if not 0 <= threshold < 1 or not 0 <= memory_margin < 1 or not 0 <= confirm_margin < 1:
        raise UserError("--threshold, --memory-margin and --confirm-margin must be fractions in [0, 1)")
    if precision is not None and precision.lower() not in ("bf16", "fp16", "fp32"):
        raise UserError(f"--precision: got {precision!r}; allowed: bf16, fp16, fp32")
    if nproc is not None:  # 0 must not read as "not given" below
        int_flag("--nproc", nproc, hi=MAX_RANKS)
    spec = load_model(model)
    hw_profile = load_hardware(hardware)
    host_trials, per_host, num_nodes = _host_trials(host_flags, nproc=nproc, memory_cap=memory_cap)
    nproc = int_flag("--nproc", per_host or nproc or hw_profile.gpus_per_node, hi=MAX_RANKS)
    cpu_profile = hw_profile.name.lower().startswith("cpu")
    seq = seq or min(spec.max_seq_len, 128)
    if seq > spec.max_seq_len:
        raise UserError(f"--seq {seq} exceeds {spec.name}'s max_seq_len {spec.max_seq_len}")
    precision = (precision or ("fp32" if cpu_profile else "bf16")).lower()
    knobs = tuple(k.strip() for k in vary.split(",")) if vary is not None else (
        ("stage", "checkpointing", "micro") if cpu_profile else ("stage", "offload", "checkpointing", "micro"))
    constraints = Constraints(num_ranks=nproc * num_nodes, global_batch=global_batch, seq_len=seq, vary=knobs,
                              stages=_ints(stages, "--stages", hi=3) or (0,), precisions=(precision,),
                              micro=_ints(micro, "--micro", lo=1), max_micro=max_micro, num_nodes=num_nodes,
                              ranks_per_node=nproc)
    if "zeropp" in knobs and num_nodes < 2:
        warn("--vary zeropp: ZeRO++ saves traffic between hosts; with trials on one host no ZeRO++ candidate is "
             "tried (use -H)")
    candidates = build_space(constraints)
    if exhaustive:  # the convergence test never passes before every candidate has run (tuner._stop_reason)
        min_trials = len(candidates)
    base = load(config) if config is not None else load(None)
    hw = local_hardware(hw_profile, num_ranks=nproc)
    if script is not None:
        if script.is_dir():
            raise UserError(f"--script {str(script)!r} is a folder, not a file; give the training script (a .py "
                            "file) inside it")
        if not script.is_file():
            raise UserError(f"--script {str(script)!r} does not exist")
        run_script, run_args = str(script.resolve()), tuple(script_args or ())
        desc = {"script": str(script.resolve()), "args": list(run_args)}
    else:
        run_script = str(Path(__file__).resolve().parents[1] / "tune" / "worker.py")
        run_args = ("--model", model)
        desc = {"script": "built-in", "args": list(run_args)}
    desc |= {"warmup_steps": warmup, "measured_steps": steps}
    if smoke:
        desc[rundir.SMOKE_MARK] = True  # the folder is a smoke run's: a later --smoke may replace it
    if host_trials is not None:
        desc["hosts"] = {"nodes": num_nodes, "ranks_per_node": nproc, "hostfile": hostfile,
                         "include": include, "exclude": exclude}
    cap = parse_size(memory_cap) if memory_cap else None
    if cap is not None:
        desc["memory_cap_bytes"] = cap
    fp, describe = fingerprint(model=spec, hardware=hw, constraints=constraints, candidates=candidates,
                               base=base, workload=desc)
    if smoke:
        out = out / "smoke" if out == Path("ztune-autotune") else out
    rundir.check_out(out, smoke=smoke, fresh=fresh, describe=describe)  # earlier results are never lost
    try:  # a file (or a file above it) where the folder should be is one line, not a traceback from the journal
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {str(out)!r} cannot be used as the results folder ({exc.strerror or exc}); "
                        "give a folder path") from None
    kept = rundir.keep_previous_run(out) if fresh and not smoke else None
    journal = Journal(out / "journal.jsonl", fingerprint=fp, describe=describe, fresh=fresh)
    # Measured after every input check (a bad flag or journal is one line, nothing else printed first).
    if cpu_profile and host_trials is None:  # this machine's matmul rate says nothing about other hosts
        model_hw = _journalled_compute(hw, journal, err_console)
        if model_hw is None:
            micros = sorted({c.micro for c in candidates})
            codec = base.optimizer.type.value == "OneBitAdam" or any(
                c.compression not in ("none", "bf16") or c.zeropp for c in candidates)
            model_hw = _measured_cpu_compute(hw, err_console, model=spec, seq_len=seq, precision=precision,
                                             micro_batch=micros[len(micros) // 2] if micros else 1, codec=codec)
            fields = _COMPUTE_FIELDS + (_codec_fields() if codec else ())
            journal.append({"kind": "compute", "measured": {f: getattr(model_hw, f) for f in fields},
                            "at": time.time()})
    else:
        model_hw = hw
    workload = Workload(model=spec, hardware=model_hw, base=base, global_batch=global_batch, seq_len=seq,
                        num_nodes=num_nodes)
    if kept is not None:
        warn(f"--fresh: the previous run (journal, trials, exported config) was kept in {kept}")
    if smoke:
        shutil.rmtree(out / "trials", ignore_errors=True)
    settings = Settings(nproc=nproc, script=run_script, script_args=run_args, warmup_steps=warmup,
                        measured_steps=steps, threshold=threshold, memory_margin=memory_margin,
                        memory_cap_bytes=cap, trial_timeout_s=trial_timeout, stall_timeout_s=stall_timeout,
                        time_budget_s=time_budget, max_trials=max_trials, min_trials=min_trials,
                        hosts=host_trials, confirm_repeats=confirm, confirm_top=confirm_top,
                        confirm_margin=confirm_margin)
    limit = min(hw.gpu_memory_bytes, cap) if cap else hw.gpu_memory_bytes

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    t0 = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("steps"), TimeElapsedColumn(), console=err_console, transient=True) as progress:
        tuner = Tuner(workload=workload, candidates=candidates, settings=settings, journal=journal, out_dir=out,
                      memory_limit_bytes=limit, on_event=_event_handler(progress, {}))
        result = tuner.run()
    exported = export_best(result, out_dir=out, deepspeed=export == "deepspeed", note=recommendation(result, workload))
    result = dataclasses.replace(result, exported=exported, wall_s=time.monotonic() - t0)
    png = plot_trials(result, out / "autotune.png", global_batch=global_batch) if plot and result.trials else None
    if json_out:
        from ztune.console import emit_json

        payload = result_json(result)
        payload["plot"] = str(png) if png else None
        payload["recommendation"] = recommendation(result, workload)  # the pick, its median, samples, why
        emit_json(payload)
    else:
        console.print(_render(result))
        for r in result.trials:
            if r.reason:
                console.print(f"trial {r.index} ({r.candidate.key}) {r.status}: {r.reason}", soft_wrap=True)
        console.print(f"stopped: {result.stop_reason}")
        console.print(f"{len(result.trials)} trials ({result.new_trials} new) of {result.grid_size} candidates, "
                      f"{len(result.repeats)} confirmation repeat(s) ({result.new_repeats} new), "
                      f"in {result.wall_s:.0f} s; calibrated step-time error on measured trials: mean "
                      f"{result.fit.mean_abs_error:.1%}, max {result.fit.max_abs_error:.1%} in sample; "
                      + (f"mean {result.fit.out_of_sample_mean_abs_error:.1%}, max "
                         f"{result.fit.out_of_sample_max_abs_error:.1%} out of sample (each trial predicted by a "
                         "fit without it)" if result.fit.out_of_sample_errors else
                         "out of sample: needs 2 measured trials"), soft_wrap=True)
        console.print(f"confirmation: {result.confirm_note}", soft_wrap=True)
        for r in result.repeats:
            if r.status != "ok":
                console.print(f"trial {r.index} ({r.key}, confirmation round {r.round}) {r.status}: {r.reason}",
                              soft_wrap=True)
        if result.best is not None:
            console.print(f"best: {recommendation(result, workload)}; wrote {', '.join(exported)}"
                          + (f" and {png}" if png else ""), soft_wrap=True)
    if result.best is None:
        err_console.print("no configuration trained; see the reasons above and the logs in "
                          f"{out / 'trials'}")
        raise typer.Exit(1)
    if smoke and not result.trained:
        raise typer.Exit(1)
    sys.stdout.flush()
