"""`ztune probe`: measure this host and write a hardware profile for `ztune estimate --hardware`.

Parsing, progress and rendering only; reading and measuring live in `ztune.probe`, which imports torch
inside its measuring functions, so `ztune --help` and `ztune estimate` never load torch through here.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from ztune.errors import UserError

COMMAND_SETTINGS = {"help": "Measure GPUs/CPU, memory and collective bandwidth; write a hardware profile."}
MIN_INTER_NODE_GBPS, MAX_INTER_NODE_GBPS = 0.01, 1e5


def _check_output(path: Path, *, force: bool) -> None:
    """Fail before minutes of measuring, not after."""
    if path.is_dir():
        raise UserError(f"--output {path} is a directory; give a file name such as {path / 'hardware.yaml'}")
    if path.exists() and not force:
        raise UserError(f"--output {path} exists; pass --force to overwrite it, or choose another --output")
    if not path.parent.is_dir():
        raise UserError(f"--output {path}: directory {path.parent} does not exist")
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"--output {path}: use a .yaml name, so that --hardware reads it as a file")


def write_atomically(path: Path, text: str, *, force: bool) -> None:
    """Write `text` to a temporary file beside `path`, check it loads as a profile, then move it into place:
    a reader never sees half a file. Without `force` the final step is a hard link, which refuses to replace a
    file that appeared meanwhile."""
    from ztune.profiles import load_hardware

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.yaml", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        load_hardware(tmp)  # never leave behind a profile that `--hardware` would reject
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise UserError(f"--output {path} appeared while probing; pass --force to overwrite it") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fmt(name: str, value: Any) -> str:
    from ztune.console import human_bytes

    if name.endswith("_bytes_per_s"):
        return f"{value / 1e9:,.2f} GB/s"
    if name.endswith("_bytes"):
        return human_bytes(value)
    if name.startswith("peak_flops"):
        return f"{value / 1e12:,.3f} TFLOP/s"
    if name.endswith("_elements_per_s"):
        return f"{value / 1e6:,.1f} M elements/s" if value else "0 (unknown)"
    if name.endswith("_latency_s"):
        return f"{value * 1e6:,.1f} us"
    return str(value)


def _summary(m: Any, hw: Any, notes: dict[str, str], output: Path) -> dict:
    c = m.collective
    return {
        "output": str(output),
        "profile": dataclasses.asdict(hw),
        "provenance": notes,
        "host": dataclasses.asdict(m.host),
        "gpus": {"status": m.gpus.status, "devices": [dataclasses.asdict(g) for g in m.gpus.gpus]},
        "measured": {
            "memory": dataclasses.asdict(m.memory),
            "matmul": dataclasses.asdict(m.flops),
            "collective": None if c is None else {
                "backend": c.backend, "transport": c.transport or c.backend,
                "world_size": c.world_size, "sizes_bytes": list(c.sizes_bytes),
                "times_s": list(c.times_s),
                "busbw_bytes_per_s": [c.busbw_bytes_per_s(i) for i in range(len(c.times_s))],
                "fit": dataclasses.asdict(c.fit)},
            "host_device": None if m.host_device is None else dataclasses.asdict(m.host_device),
            "workload": None if m.workload is None else dataclasses.asdict(m.workload),
            "codec": dict(m.codec),
            "inter_node": None if m.inter_node is None else {
                "transport": m.inter_node.transport, "sizes_bytes": list(m.inter_node.sizes_bytes),
                "times_s": list(m.inter_node.times_s), "fit": dataclasses.asdict(m.inter_node.fit)},
        },
    }


def _render(m: Any, hw: Any, notes: dict[str, str], output: Path) -> None:
    from ztune.console import console, human_bytes, table

    rows = []
    for field in dataclasses.fields(hw):
        if field.name in ("name", "source"):
            continue
        how, _, why = notes.get(field.name, "").partition(": ")
        style = {"measured": "green", "read": "cyan", "assumed": "yellow"}.get(how, "")
        rows.append([field.name, _fmt(field.name, getattr(hw, field.name)), f"[{style}]{how}[/]" if style else how,
                     why])
    console.print(table(f"{hw.name}: hardware profile", ["field", "value", "how", "from"], rows,
                        justify_right=["value"]))
    c = m.collective
    if c is not None:
        coll = [[human_bytes(s), f"{t * 1e6:,.1f}", f"{c.busbw_bytes_per_s(i) / 1e9:,.3f}"]
                for i, (s, t) in enumerate(zip(c.sizes_bytes, c.times_s, strict=True))]
        title = f"{c.transport or c.backend} all_reduce, {c.world_size} local ranks (busbw = 2(n-1)/n x bytes / time)"
        console.print(table(title,
                            ["size", "time us", "busbw GB/s"], coll, justify_right=["size", "time us", "busbw GB/s"]))
    console.print(f"memory: copy {m.memory.copy_bytes_per_s / 1e9:.2f} GB/s, triad "
                  f"{m.memory.triad_bytes_per_s / 1e9:.2f} GB/s (STREAM convention, {m.memory.threads} threads)")
    if m.workload is not None:
        w = m.workload
        console.print(f"{w.model} ({w.dtype}, micro {w.micro_batch} x seq {w.seq_len}) forward+backward with "
                      f"{w.ranks} ranks at once: {w.step_s * 1e3:,.0f} ms per step, {w.flops_per_s / 1e9:,.2f} "
                      f"GFLOP/s per rank -> train_flops_efficiency {hw.train_flops_efficiency:.3f}")
        if w.runtime_micro_cpu_s_per_param:
            ms = [(first + step) * w.params * 1e3 for first, step in
                  zip(w.runtime_micro_cpu_s_per_param, w.runtime_step_cpu_s_per_param, strict=True)]
            more = [later * w.params * 1e3 for later in w.runtime_accum_cpu_s_per_param]
            console.print("the runtime's own CPU per rank beyond forward + backward and the optimizer, stages 0-3: "
                          + ", ".join(f"{x:,.0f}" for x in ms) + " ms per optimizer step of one micro-step; "
                          + ", ".join(f"{x:,.0f}" for x in more) + " ms per further micro-step")
        elif w.runtime_skipped:
            console.print(f"[yellow]the runtime was not timed[/]: {w.runtime_skipped}")
    if m.inter_node is None:
        console.print("[yellow]this single-host probe measured no inter-host link[/]: its numbers are assumed "
                      "(see the table); pass --inter-node-gbps with the node's NIC line rate, or run "
                      "`ztune probe --inter-node-master HOST --node-rank 0|1` on two hosts to measure it.")
    else:
        link = m.inter_node.fit
        console.print(f"inter-host link (gloo, one process per host): {link.busbw_bytes_per_s * 8 / 1e9:.3f} "
                      f"Gbit/s, {link.latency_s * 1e6:,.1f} us per ring step")
    console.print(f"wrote {output}; use it with: ztune estimate --hardware {output} --model <model>")


def _workload(model: str | None, *, seq: int, micro_batch: int, precision: str) -> dict | None:
    """measure_all's `workload` from --model/--seq/--micro-batch/--precision; None without --model."""
    from ztune.inputs import MAX_BATCH, MAX_SEQ, int_flag
    from ztune.probe_workload import DTYPES

    if model is None:
        return None
    int_flag("--seq", seq, hi=MAX_SEQ)
    int_flag("--micro-batch", micro_batch, hi=MAX_BATCH)
    if precision not in DTYPES:
        raise UserError(f"--precision: got {precision!r}; allowed: {', '.join(DTYPES)}")
    from ztune.profiles import load_model

    return {"spec": load_model(model), "seq_len": seq, "micro_batch": micro_batch, "dtype": precision}


def probe(
    # str, not Path: typer turns "" into Path("."), which would then be reported as a directory.
    output: Annotated[str | None, typer.Option("--output", "-o", help="Profile to write (default: "
                                               "hardware-<hostname>.yaml).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --output if it exists.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes, a few seconds; rougher numbers.")] = False,
    ranks: Annotated[int | None, typer.Option("--ranks", help="Local ranks for the all_reduce test (default: "
                                              "GPU count, or 2 on a CPU host).")] = None,
    inter_node_gbps: Annotated[float | None, typer.Option("--inter-node-gbps", help="NIC line rate per node "
                                                          "in Gbit/s (not measurable on one host; default 10).")
                               ] = None,
    inter_node_master: Annotated[str | None, typer.Option(
        "--inter-node-master", help="HOST[:PORT] of node 0: measure the link between this host and another "
        "that runs the same command with the other --node-rank.")] = None,
    node_rank: Annotated[int | None, typer.Option("--node-rank", help="0 on HOST of --inter-node-master, 1 on "
                                                  "the other host.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="CPU hosts: also measure this model's training "
                                              "rate (profile, YAML or HF config.json) on all local ranks at once; "
                                              "it becomes train_flops_efficiency.")] = None,
    seq: Annotated[int, typer.Option("--seq", help="With --model: sequence length.")] = 128,
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="With --model: micro-batch per rank.")] = 1,
    precision: Annotated[str, typer.Option("--precision", help="With --model: bf16, fp16 or fp32.")] = "bf16",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Measure this host (GPUs, memory, matmul FLOP/s, collectives, host<->device copies) and write a
    hardware profile usable as `ztune estimate --hardware FILE`."""
    from ztune import probe as lib
    from ztune.console import emit_json, err_console, error
    from ztune.inputs import text_flag

    text_flag("--output", output, what="a .yaml file name for the profile")
    text_flag("--inter-node-master", inter_node_master, what="HOST or HOST:PORT of node 0")
    text_flag("--model", model, what="a model profile name, YAML or config.json path")

    if ranks is not None and ranks < 1:
        raise UserError(f"--ranks must be >= 1, got {ranks}")
    # From 10 Mbit/s (slower is no training link) to 100 Tbit/s (15x a node's NICs today, 8 x 800 Gbit/s): a
    # value in bit/s or Mbit/s, or 'inf', would otherwise be refused only after minutes of measuring, when the
    # written profile is checked against its rate bounds.
    if inter_node_gbps is not None and not MIN_INTER_NODE_GBPS <= inter_node_gbps <= MAX_INTER_NODE_GBPS:
        raise UserError(f"--inter-node-gbps is a NIC line rate in Gbit/s, from {MIN_INTER_NODE_GBPS:g} to "
                        f"{MAX_INTER_NODE_GBPS:g}, got {inter_node_gbps:g}; e.g. 100 for 100 GbE")
    master = None
    if inter_node_master is not None or node_rank is not None:
        from ztune.probe_link import check_resolves, parse_master

        if inter_node_master is None or node_rank is None:
            raise UserError("--inter-node-master and --node-rank go together: give both, on both hosts")
        if inter_node_gbps is not None:
            raise UserError("--inter-node-gbps assumes the link that --inter-node-master measures; give one of them")
        if node_rank not in (0, 1):
            raise UserError(f"--node-rank {node_rank}: the inter-node probe joins two hosts, 0 and 1")
        master = parse_master(inter_node_master)
        check_resolves(*master)
    workload = _workload(model, seq=seq, micro_batch=micro_batch, precision=precision)
    output = Path(output) if output is not None else Path(f"hardware-{lib._sanitize(socket.gethostname())}.yaml")
    _check_output(output, force=force)
    if ranks is not None:
        lib.check_ranks(ranks)  # before the progress display: a bad --ranks is one line

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    # Progress goes to stderr so that --json keeps stdout machine-readable.
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  transient=True) as progress:
        task = progress.add_task("probing", total=None)
        try:
            m = lib.measure_all(quick=quick, ranks=ranks, inter_node_master=master, node_rank=node_rank or 0,
                                workload=workload, on_step=lambda label: progress.update(task, description=label))
        except lib.ProbeFailed as exc:
            error(str(exc))
            raise typer.Exit(1) from None
    hw = lib.build_profile(m, inter_node_gbps=inter_node_gbps)
    notes = lib.field_notes(m, inter_node_gbps=inter_node_gbps)
    write_atomically(output, lib.to_yaml(hw, notes), force=force)
    if json_out:
        emit_json(_summary(m, hw, notes, output))
    else:
        _render(m, hw, notes, output)
