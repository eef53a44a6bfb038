"""`ztune launch`: the same job on every host over SSH (or torchrun on this host alone), one log stream.

The orchestrator: hosts (hostfile / Slurm / local) -> preflight -> per-host commands -> supervise. The pieces
it calls are pure (hostfile, command, netif) or small and separate (ssh, preflight, supervise).
"""

from __future__ import annotations

import os
import secrets
import shlex
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ztune.envvars import check_environment
from ztune.errors import UserError
from ztune.inputs import read_text
from ztune.launch.command import (
    ENV_FILE_NAME,
    LaunchError,
    NodeCommand,
    build_command,
    filter_env,
    left_behind,
    parse_env_assignment,
    parse_env_file,
    remote_shell_command,
)
from ztune.launch.hostfile import (
    Host,
    HostfileError,
    apply_filters,
    canonical_host,
    hosts_from_slurm,
    limit_hosts,
    parse_hostfile,
)

if TYPE_CHECKING:
    from ztune.launch.ssh import SshOptions

# Not imported here at module level: `python -m ztune.launch.ssh` (the node side) imports this package first.
__all__ = ["LaunchRequest", "LaunchPlan", "plan_launch", "LOCAL_HOST"]

LOCAL_HOST = "localhost"


@dataclass(frozen=True)
class LaunchRequest:
    """Everything `ztune launch` was asked to do (flags, already typed)."""

    script: str
    script_args: tuple[str, ...] = ()
    hostfile: str | None = None
    include: str | None = None
    exclude: str | None = None
    num_nodes: int | None = None
    nproc_per_node: int | None = None
    master_addr: str | None = None
    master_port: int = 29500
    config: str | None = None
    env: tuple[str, ...] = ()
    workdir: str | None = None
    python: str | None = None
    ifname: str | None = None
    ssh: SshOptions | None = None  # None: SshOptions()
    run_root: str = "/tmp/ztune-runs"
    grace_s: float = 5.0
    preflight_timeout_s: float = 8.0
    max_restarts: int = 0  # torchrun elastic restarts of the whole group when a rank fails


@dataclass(frozen=True)
class LaunchPlan:
    """Resolved hosts and settings, before the preflight fills in per-host interfaces."""

    request: LaunchRequest
    hosts: tuple[Host, ...]
    local: bool
    python: str
    workdir: str
    head_addr: str | None
    run_id: str
    env: dict[str, str]
    config_suffix: str | None
    config_text: str | None
    slot_filter: bool  # --include/--exclude named slots: pin CUDA_VISIBLE_DEVICES to them
    env_left_behind: tuple[str, ...] = ()  # notable variables set here that other hosts' ranks will not get


# The text flags of `ztune launch` that name a host, address, path or name: flag -> what to give. Blank ones are
# refused (inputs.text_flag): below, `if req.hostfile:` and `req.master_addr or ...` would read them as absent.
# `ztune autotune` checks the flags it shares (its --config, and those it passes on to `ztune launch` for -H,
# tune/hosts.py launch_flags) through this table too, so the two commands say the same thing about them.
TEXT_FLAGS = {"--hostfile": "a hostfile path",
              "--include": "hosts such as 'node1:0,1@node2'",
              "--exclude": "hosts such as 'node3@node1:1'",
              "--master-addr": "the head's address or hostname",
              "--config": "a config file path",
              "--workdir": "a folder path",
              "--python": "the python to run on the hosts",
              "--ifname": "a network interface name such as eth0",
              "--ssh-config": "an ssh config file path",
              "--ssh-option": "an ssh option such as KEY=VALUE"}
# LaunchRequest's fields given by those flags (the ssh ones are in req.ssh).
_TEXT_FIELDS = {"hostfile": "--hostfile", "include": "--include", "exclude": "--exclude",
                "master_addr": "--master-addr", "config": "--config", "workdir": "--workdir", "python": "--python",
                "ifname": "--ifname"}


def check_text_flags(flags: Sequence[tuple[str, str | None]]) -> None:
    """Refuse a blank value (and an ssh option ssh would misread) among (flag, value) pairs of TEXT_FLAGS, with
    one line naming the flag; a None value is a flag not given."""
    from ztune.inputs import text_flag
    from ztune.launch.ssh import check_ssh_option

    for flag, value in flags:
        text_flag(flag, value, what=TEXT_FLAGS[flag])
        if flag == "--ssh-option" and value is not None:
            check_ssh_option(value)


def check_request_text(req: LaunchRequest) -> None:
    """Refuse a blank text flag of `req` (and of its ssh options) with one line naming the flag."""
    flags = [(flag, getattr(req, name)) for name, flag in _TEXT_FIELDS.items()]
    if req.ssh is not None:
        flags += [("--ssh-config", req.ssh.config_file), *(("--ssh-option", opt) for opt in req.ssh.options)]
    check_text_flags(flags)


def resolve_hosts(req: LaunchRequest, environ: Mapping[str, str]) -> tuple[list[Host], bool]:
    """Hosts from --hostfile, else from a Slurm allocation, else this host alone (local mode)."""
    check_request_text(req)
    if req.hostfile:
        text = read_text(req.hostfile, error=HostfileError, what="hostfile")
        hosts, local = parse_hostfile(text, source=req.hostfile), False
    elif (slurm := hosts_from_slurm(dict(environ))) is not None:
        hosts, local = slurm, False
    else:
        hosts, local = [Host(name=LOCAL_HOST, slots=(0,))], True
    hosts = apply_filters(hosts, include=req.include, exclude=req.exclude)
    if (req.include or req.exclude) and req.nproc_per_node is not None:
        # Slots named by a filter are device ids (CUDA_VISIBLE_DEVICES); more ranks than that would replace the
        # selection with 0..K-1. (DeepSpeed refuses --num_gpus with --include/--exclude altogether.)
        short = next((h for h in hosts if h.num_slots < req.nproc_per_node), None)
        if short is not None:
            flag = "--include" if req.include else "--exclude"
            raise HostfileError(f"--nproc-per-node {req.nproc_per_node} is more than the {short.num_slots} slot(s) "
                                f"{flag} leaves on {short.name} {list(short.slots)}; select more slots or lower "
                                "--nproc-per-node")
    hosts = limit_hosts(hosts, num_nodes=req.num_nodes, nproc_per_node=req.nproc_per_node)
    return hosts, local


def merged_env(req: LaunchRequest, environ: Mapping[str, str], *, workdir: str) -> dict[str, str]:
    """Propagated prefixes < ~/.ztune_env < <workdir>/.ztune_env < --env (later wins)."""
    env = filter_env(environ)
    for path in (Path.home() / ENV_FILE_NAME, Path(workdir) / ENV_FILE_NAME):
        if path.is_file():
            env.update(parse_env_file(read_text(path, error=LaunchError, what="env file"), source=str(path)))
    for item in req.env:
        key, value = parse_env_assignment(item)
        env[key] = value
    return env


def _ssh_hostname(host: str, opts: SshOptions) -> str:
    """The address ssh would connect to for `host` (after ~/.ssh/config's HostName), or `host`."""
    argv = [opts.ssh_binary, "-G"] + (["-F", opts.config_file] if opts.config_file else []) + ["--", host]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return host
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        if key == "hostname" and value:
            return value.strip()
    return host


def resolve_head_addr(host: str, *, opts: SshOptions, num_hosts: int) -> str | None:
    """The head's IP as the other hosts should reach it; None if it cannot be resolved here."""
    name = _ssh_hostname(host.rpartition("@")[2], opts)
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return None
    addrs = [i[4][0] for i in infos]
    addr = next((a for a in addrs if ":" not in a), addrs[0])
    if num_hosts > 1 and (addr.startswith("127.") or addr == "::1"):
        raise UserError(f"head host {host!r} resolves to {addr} on this machine, which the other hosts cannot "
                        f"reach; pass --master-addr with the head's network address")
    return addr


def plan_launch(req: LaunchRequest, *, environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """Check the request and resolve hosts, head address, environment and config (no remote contact)."""
    environ = dict(os.environ if environ is None else environ)
    if req.script.startswith("-"):
        # Unknown options reach here as the script (everything from the script on is the script's): say which
        # option is unknown before looking for a file of that name.
        raise LaunchError(f"no such option {req.script.split('=')[0]!r} for ztune launch (see 'ztune launch "
                          "--help'); your script's own options go after the script")
    hosts, local = resolve_hosts(req, environ)
    workdir = os.path.abspath(req.workdir or os.getcwd())
    if local and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise LaunchError(f"--workdir {workdir!r} is a file, not a folder; give the folder the script runs in")
    if local and not os.path.isdir(workdir):
        raise LaunchError(f"working directory {workdir!r} does not exist")
    script_path = os.path.join(workdir, req.script)
    if os.path.isdir(script_path):
        raise LaunchError(f"script {req.script!r} is a folder in {workdir}, not a file; give the training script "
                          "(a .py file) inside it")
    if os.path.isdir(workdir) and not os.path.isfile(script_path):
        raise LaunchError(f"script {req.script!r} not found in {workdir}; check the path")
    if not req.run_root.rstrip("/").strip():  # "" or "/": each run's files would land in the filesystem root
        raise LaunchError(f"--run-root {req.run_root!r}: give a directory for the run's files, such as "
                          "/tmp/ztune-runs")
    if not 1 <= req.master_port <= 65535:
        raise LaunchError(f"--master-port {req.master_port} is not a TCP port (1-65535)")
    env = merged_env(req, environ, workdir=workdir)
    # What the ranks will see (local ranks inherit `environ` too): a bad ZTUNE_* value, here or in --env, is
    # one line now rather than a failure on every host.
    check_environment({**environ, **env})
    # Local mode: the ranks inherit this environment whole; only other hosts see just `env`.
    env_left_behind = () if local else tuple(left_behind(environ, env))
    config_suffix = config_text = None
    if req.config:
        from ztune.config import AutoContext, load_detailed

        # Fail here, with the loader's message, not on every host. "auto" values that need the model (DeepSpeed
        # fp16/bf16 enabled, reduce_bucket_size) are resolved by ztune.initialize on the ranks, which has it.
        loaded = load_detailed(req.config, context=AutoContext(model_later=True))
        check_config_for_hosts(loaded, hosts, environ={**environ, **env}, config=req.config)
        config_text = Path(req.config).read_text()
        config_suffix = ".json" if req.config.endswith(".json") else ".yaml"
    master_addr = canonical_host(req.master_addr, where="--master-addr") if req.master_addr else None
    if local:
        head_addr = master_addr or "127.0.0.1"
    else:
        head_addr = master_addr or resolve_head_addr(hosts[0].name, opts=ssh_options(req), num_hosts=len(hosts))
    run_id = f"ztune-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    import sys

    return LaunchPlan(request=req, hosts=tuple(hosts), local=local, python=req.python or sys.executable,
                      workdir=workdir, head_addr=head_addr, run_id=run_id, env=env,
                      config_suffix=config_suffix, config_text=config_text,
                      slot_filter=bool(req.include or req.exclude), env_left_behind=env_left_behind)


def check_config_for_hosts(loaded, hosts: Sequence, *, environ: Mapping[str, str], config: str) -> None:
    """The config's checks that need the job's shape, on the launcher: the batch sizes against the world size
    (the hosts' slots; skipped when no batch size is given, e.g. all "auto") and ZeRO++'s layout (the slots per
    host; skipped when ZTUNE_LOCAL_WORLD_SIZE redraws the hosts). LaunchError naming the file otherwise."""
    from ztune.config import resolve_batch
    from ztune.config.validate import check_zeropp_layout
    from ztune.errors import ConfigError

    slots = [h.num_slots for h in hosts]
    world = sum(slots)
    cfg = loaded.config
    try:
        if cfg.batch.global_ is not None or cfg.batch.micro is not None:
            resolve_batch(cfg.batch, world, keys=loaded.batch_keys)
        if "ZTUNE_LOCAL_WORLD_SIZE" not in environ:
            per_node = slots[0] if len(set(slots)) == 1 else 0
            check_zeropp_layout(cfg, world_size=world, ranks_per_node=per_node)
    except ConfigError as exc:
        raise LaunchError(f"{config}: on {len(slots)} host(s) x {'/'.join(map(str, sorted(set(slots))))} "
                          f"rank(s) ({world} in all): {exc}") from None


def node_commands(plan: LaunchPlan, *, interfaces: Sequence[tuple[str | None, str | None]]) -> list[NodeCommand]:
    """Per-host commands; `interfaces[i]` is (ifname, local address) for host i."""
    req = plan.request
    out = []
    for rank, (host, (ifname, addr)) in enumerate(zip(plan.hosts, interfaces, strict=True)):
        out.append(build_command(
            python=plan.python, host=host.name, node_rank=rank, num_nodes=len(plan.hosts),
            nproc_per_node=host.num_slots, master_addr=plan.head_addr or plan.hosts[0].name,
            master_port=req.master_port, run_id=plan.run_id, workdir=plan.workdir, run_root=req.run_root,
            script=req.script, script_args=req.script_args, env=plan.env, ifname=req.ifname or ifname,
            local_addr=addr, visible_devices=host.slots if plan.slot_filter else None,
            config_suffix=plan.config_suffix, grace_s=req.grace_s, max_restarts=req.max_restarts))
    return out


def start_argv(plan: LaunchPlan, cmd: NodeCommand) -> list[str]:
    """What this machine runs to start `cmd`: ssh to the host, or (local mode) the node wrapper itself."""
    from ztune.launch.ssh import ssh_argv

    if plan.local:
        return list(cmd.argv)
    return ssh_argv(host=cmd.host, remote_command=remote_shell_command(workdir=cmd.workdir, argv=cmd.argv),
                    opts=ssh_options(plan.request))


def reap_argv(plan: LaunchPlan, cmd: NodeCommand) -> list[str]:
    argv = [plan.python, "-m", "ztune.launch.ssh", "reap", "--tag", f"{plan.run_id}:{cmd.node_rank}",
            "--run-dir", cmd.run_dir, "--grace-s", f"{plan.request.grace_s:g}"]
    from ztune.launch.ssh import ssh_argv

    if plan.local:
        return argv
    return ssh_argv(host=cmd.host, remote_command=shlex.join(argv), opts=ssh_options(plan.request))


def ssh_options(req: LaunchRequest) -> SshOptions:
    from ztune.launch.ssh import SshOptions

    return req.ssh or SshOptions()


def secret_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of `env` sent over stdin instead of argv (command.is_secret_name)."""
    from ztune.launch.command import is_secret_name

    return {k: v for k, v in env.items() if is_secret_name(k)}


def header_line(plan: LaunchPlan) -> bytes:
    """The first stdin line for every node wrapper: the config file's name and text, and the variables whose
    names mark them as credentials (`secret_env`), which stay off every command line."""
    import json

    doc = {}
    if plan.config_text is not None:
        doc = {"config_name": f"config{plan.config_suffix}", "config_text": plan.config_text}
    credentials = secret_env(plan.env)
    if credentials:
        doc["env"] = credentials
    return (json.dumps(doc) + "\n").encode()
