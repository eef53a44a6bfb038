"""`ztune launch [options] SCRIPT [-- SCRIPT ARGS]`: run SCRIPT with torchrun on every host, over SSH."""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from typing import Annotated

import typer

from ztune.console import console, err_console, table
from ztune.errors import UserError

# Everything after SCRIPT belongs to the script (like torchrun): no interspersed options, unknown ones kept.
COMMAND_SETTINGS = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True,
                                         "allow_interspersed_args": False}}


def launch(
    script: Annotated[str, typer.Argument(help="Training script, relative to the working directory.")],
    args: Annotated[list[str] | None, typer.Argument(help="Arguments for the script (after an optional --).")]
    = None,
    hostfile: Annotated[str | None, typer.Option("--hostfile", "-H",
                                                 help="DeepSpeed-style hostfile: 'hostname slots=N' lines.")] = None,
    include: Annotated[str | None, typer.Option(help="Only these hosts/slots, e.g. 'node1:0,1@node2'.")] = None,
    exclude: Annotated[str | None, typer.Option(help="Drop these hosts/slots, e.g. 'node3@node1:1'.")] = None,
    num_nodes: Annotated[int | None, typer.Option(help="Use the first N hosts.")] = None,
    nproc_per_node: Annotated[int | None, typer.Option(help="Ranks per host (default: its slots).")] = None,
    master_addr: Annotated[str | None, typer.Option(help="Head address for the rendezvous "
                                                    "(default: the first host's address).")] = None,
    master_port: Annotated[int, typer.Option(help="Rendezvous port on the head.")] = 29500,
    config: Annotated[str | None, typer.Option("--config", "-c", help="Training config (ztune YAML or "
                                               "DeepSpeed JSON), exported to the script as ZTUNE_CONFIG.")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for every rank "
                                                  "(repeatable).")] = None,
    workdir: Annotated[str | None, typer.Option(help="Working directory on every host (default: here).")] = None,
    python: Annotated[str | None, typer.Option(help="Python on the hosts (default: this one's).")] = None,
    ifname: Annotated[str | None, typer.Option(help="Network interface for gloo/NCCL on every host "
                                               "(default: the one routing to the head, per host).")] = None,
    ssh_config: Annotated[str | None, typer.Option("--ssh-config", "-F", help="ssh config file (ssh -F).")]
    = None,
    ssh_option: Annotated[list[str] | None, typer.Option("--ssh-option", "-o",
                                                         help="Extra ssh -o KEY=VALUE (repeatable).")] = None,
    insecure_no_host_key_check: Annotated[bool, typer.Option(
        help="Do not check ssh host keys (StrictHostKeyChecking=no). Only on networks you trust.")] = False,
    log_dir: Annotated[str | None, typer.Option(help="Also write each host's lines to DIR/<host>.log.")] = None,
    grace: Annotated[float, typer.Option("--grace", help="Seconds between SIGTERM and SIGKILL at teardown.")]
    = 5.0,
    preflight_timeout: Annotated[float, typer.Option(help="Seconds the preflight may take per host.")] = 8.0,
    run_root: Annotated[str, typer.Option(help="Directory on each host for the run's files.")]
    = "/tmp/ztune-runs",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print each host's command and exit.")] = False,
    preflight_cache: Annotated[str | None, typer.Option(help="Reuse the preflight result in FILE when it was "
                                                        "made for the same hosts, python, workdir and script; "
                                                        "else run the preflight and write it there (autotune "
                                                        "-H: one preflight for all trials).")] = None,
    max_restarts: Annotated[int, typer.Option("--max-restarts", help="Restart every host's ranks up to N times "
                                                                   "when one fails (torchrun elastic); the "
                                                                   "script resumes from its checkpoint.")] = 0,
) -> None:
    """Run a training script on every host of a hostfile (or Slurm allocation, or just here) with torchrun."""
    from ztune.console import warn
    from ztune.inputs import int_flag, seconds_flag, text_flag
    from ztune.launch import LaunchRequest, plan_launch
    from ztune.launch.command import left_behind_warning
    from ztune.launch.ssh import SshOptions

    script_args = list(args or [])
    if script_args[:1] == ["--"]:
        script_args = script_args[1:]
    text_flag("--log-dir", log_dir, what="a folder for the hosts' logs")
    text_flag("--preflight-cache", preflight_cache, what="a file name for the preflight result")
    seconds_flag("--grace", grace, allow_zero=True)
    seconds_flag("--preflight-timeout", preflight_timeout)
    int_flag("--max-restarts", max_restarts, lo=0, hi=1000)
    connect_s = max(1, int(preflight_timeout / 2))
    req = LaunchRequest(
        script=script, script_args=tuple(script_args), hostfile=hostfile, include=include, exclude=exclude,
        num_nodes=num_nodes, nproc_per_node=nproc_per_node, master_addr=master_addr, master_port=master_port,
        config=config, env=tuple(env or ()), workdir=workdir, python=python, ifname=ifname,
        ssh=SshOptions(config_file=ssh_config, options=tuple(ssh_option or ()), connect_timeout_s=connect_s,
                       insecure_no_host_key_check=insecure_no_host_key_check),
        run_root=run_root, grace_s=grace, preflight_timeout_s=preflight_timeout, max_restarts=max_restarts)
    plan = plan_launch(req)
    if (note := left_behind_warning(plan.env_left_behind)) is not None:
        warn(note)
    if log_dir is not None and os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise UserError(f"--log-dir {log_dir!r} is a file; give a folder (it is created if missing)")
    if dry_run:
        _print_dry_run(plan)
        return
    if log_dir is not None:
        _make_log_dir(log_dir)
    interfaces = _preflight(plan, cache=preflight_cache)
    raise typer.Exit(_supervise(plan, interfaces, log_dir=log_dir))


def _make_log_dir(log_dir: str) -> None:
    """Create --log-dir before anything starts: a folder that cannot be made or written is one line (exit 2),
    not a traceback once the hosts are being started."""
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--log-dir {log_dir!r} cannot be created ({exc.strerror or exc}); give a folder path "
                        "you can write") from None
    if not os.access(log_dir, os.W_OK | os.X_OK):
        raise UserError(f"--log-dir {log_dir!r} is not writable; give a folder you can write")


def _print_dry_run(plan) -> None:
    from ztune.launch import node_commands, secret_env, start_argv
    from ztune.launch.command import redact_argv
    from ztune.launch.hostfile import format_endpoint

    interfaces = [(None, None)] * len(plan.hosts)
    mode = "local" if plan.local else f"{len(plan.hosts)} host(s) over ssh"
    head = format_endpoint(plan.head_addr or plan.hosts[0].name, plan.request.master_port)
    console.print(f"# ztune launch dry run: {mode}, rendezvous {head}, "
                  f"run id {plan.run_id}", markup=False, soft_wrap=True)
    if not plan.request.ifname and not plan.local:
        console.print("# GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME and --local-addr are detected per host by the "
                      "preflight (or set with --ifname)", markup=False, soft_wrap=True)
    if plan.config_text is not None:
        console.print(f"# stdin of each command carries the config ({len(plan.config_text)} chars) written "
                      f"to $ZTUNE_CONFIG", markup=False, soft_wrap=True)
    credentials = secret_env(plan.env)
    if credentials:
        console.print(f"# stdin of each command also carries {', '.join(sorted(credentials))} (named like "
                      "credentials: kept off command lines)", markup=False, soft_wrap=True)
    for cmd in node_commands(plan, interfaces=interfaces):
        console.print(f"# node {cmd.node_rank}: {cmd.host}", markup=False, soft_wrap=True)
        shown = dataclasses.replace(cmd, argv=tuple(redact_argv(cmd.argv)))  # credentials never printed
        console.print(shlex.join(start_argv(plan, shown)), markup=False, soft_wrap=True, highlight=False)


def _preflight_key(plan) -> dict:
    return {"hosts": [h.name for h in plan.hosts], "local": plan.local, "python": plan.python,
            "workdir": plan.workdir, "script": plan.request.script, "ifname": plan.request.ifname}


def _preflight(plan, *, cache: str | None = None) -> list[tuple[str | None, str | None]]:
    """Interfaces (name, address) per host from the preflight, or from `cache` when it matches this plan."""
    import json
    from pathlib import Path

    if cache is not None:
        saved = _read_preflight_cache(cache)
        if saved is not None and saved.get("key") == _preflight_key(plan):
            err_console.print(f"preflight: reusing {cache}", markup=False, soft_wrap=True)
            return [tuple(i) for i in saved["interfaces"]]
    interfaces = _run_preflight(plan)
    if cache is not None:
        tmp = Path(f"{cache}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"key": _preflight_key(plan), "interfaces": interfaces}), encoding="utf-8")
            os.replace(tmp, cache)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(f"--preflight-cache {cache!r} cannot be written ({exc.strerror or exc}); give a file "
                            "path you can write") from None
    return interfaces


def _read_preflight_cache(cache: str) -> dict | None:
    """The saved preflight in `cache`; None when there is none yet. A path that is a folder, whose folder does
    not exist, or a file that is not a preflight cache (a hostfile given by mistake: it would be replaced) is
    a UserError, before the preflight runs."""
    import json

    path = os.path.abspath(cache)
    if os.path.isdir(path):
        raise UserError(f"--preflight-cache {cache!r} is a folder; give a file name such as "
                        f"{os.path.join(cache, 'preflight.json')!r}")
    if not os.path.isdir(os.path.dirname(path)):
        raise UserError(f"--preflight-cache {cache!r}: folder {os.path.dirname(path)!r} does not exist")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.loads(f.read(1 << 20))
    except (OSError, ValueError, UnicodeDecodeError):
        saved = None
    if not (isinstance(saved, dict) and isinstance(saved.get("key"), dict)
            and isinstance(saved.get("interfaces"), list)):
        raise UserError(f"--preflight-cache {cache!r} exists and is not a ztune preflight cache (it would be "
                        "replaced); give a new file name, or remove that file")
    return saved


def _run_preflight(plan) -> list[tuple[str | None, str | None]]:
    from ztune.launch import ssh_options
    from ztune.launch.preflight import find_failures, local_versions, run_preflight

    req = plan.request
    t0 = time.monotonic()
    reports = run_preflight(hosts=[h.name for h in plan.hosts], local=plan.local, python=plan.python,
                            workdir=plan.workdir, script=req.script, port=req.master_port,
                            head_addr=plan.head_addr, ssh=ssh_options(req), timeout_s=req.preflight_timeout_s)
    elapsed_s = time.monotonic() - t0
    failures = find_failures(reports, expected=local_versions(), workdir=plan.workdir, script=req.script,
                             port=req.master_port, python=plan.python,
                             need_interface=not plan.local and not req.ifname and len(plan.hosts) > 1)
    if failures:
        err_console.print(table(f"preflight failed ({elapsed_s:.1f} s): nothing was started",
                                ["host", "check", "problem"], [(f.host, f.check, f.detail) for f in failures]))
        raise typer.Exit(1)
    interfaces = [((r.interface.name, r.interface.addr) if r.interface else (None, None)) for r in reports]
    detail = ", ".join(f"{h.name}={i[0] or '-'}" for h, i in zip(plan.hosts, interfaces, strict=True))
    err_console.print(f"preflight ok: {len(reports)} host(s) in {elapsed_s:.1f} s; interfaces {detail}",
                      markup=False, soft_wrap=True)
    return interfaces


def _supervise(plan, interfaces, *, log_dir: str | None) -> int:
    from rich.live import Live
    from rich.text import Text

    from ztune.launch import header_line, node_commands, reap_argv, start_argv
    from ztune.launch.hostfile import format_endpoint
    from ztune.launch.supervise import NodeLaunch, Supervisor, plain_printer

    header = header_line(plan)
    nodes = []
    for cmd, host in zip(node_commands(plan, interfaces=interfaces), plan.hosts, strict=True):
        nodes.append(NodeLaunch(command=cmd, start_argv=tuple(start_argv(plan, cmd)),
                                reap_argv=tuple(reap_argv(plan, cmd)), num_ranks=host.num_slots,
                                header=header, cwd=plan.workdir if plan.local else None))
    err_console.print(f"run {plan.run_id}: {sum(n.num_ranks for n in nodes)} rank(s) on {len(nodes)} host(s), "
                      f"rendezvous {format_endpoint(plan.head_addr or plan.hosts[0].name, plan.request.master_port)}",
                      markup=False, soft_wrap=True)
    if console.is_terminal:
        with Live(Text(""), console=console, transient=True, refresh_per_second=4) as live:
            sup = Supervisor(nodes, grace_s=plan.request.grace_s, log_dir=log_dir,
                             print_line=lambda s: live.console.print(Text(s), soft_wrap=True),
                             set_status=lambda s: live.update(Text(s, style="bold cyan")))
            outcome = sup.run()
    else:
        sup = Supervisor(nodes, grace_s=plan.request.grace_s, log_dir=log_dir, print_line=plain_printer)
        outcome = sup.run()
    if outcome.code:
        err_console.print(f"[bold red]ztune launch failed:[/] {outcome.reason} (exit {outcome.code})",
                          soft_wrap=True)
    return outcome.code
