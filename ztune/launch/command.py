"""The command each host runs, as argv lists; and which environment variables travel with it.

Pure functions: no ssh, no subprocess, no filesystem. Every value (hostname, argument, environment value) stays
one argv element; the only place argv becomes a shell string is `remote_shell_command`, with `shlex.quote`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ztune.envvars import CPU_ALLOCATOR_DEFAULTS
from ztune.errors import UserError
from ztune.inputs import ascii_lines, describe_char
from ztune.launch import lifeline
from ztune.launch.hostfile import format_endpoint

# Prefixes of variables copied from the launcher's environment to every rank (as DeepSpeed's runner does),
# plus torch's own (TORCH_DISTRIBUTED_DEBUG, TORCH_NCCL_*, TORCH_CPP_LOG_LEVEL, ...).
ENV_PREFIXES = ("NCCL_", "GLOO_", "CUDA_", "PYTHON", "ZTUNE_", "TORCH_")
# What every rank gets unless the environment sent says otherwise: line-by-line output, one thread per rank,
# and torch's CPU allocator on transparent huge pages (ztune.envvars.CPU_ALLOCATOR_DEFAULTS).
NODE_DEFAULTS = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **CPU_ALLOCATOR_DEFAULTS}
# Variables that commonly matter to a training job but are host-specific or secret, so they do not travel
# by themselves: when set here and not sent, the launcher names them once (never their values).
NOTABLE_NAMES = frozenset({"LD_LIBRARY_PATH", "LD_PRELOAD", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                           "TOKENIZERS_PARALLELISM", "TRANSFORMERS_CACHE", "TRANSFORMERS_OFFLINE",
                           "HUGGING_FACE_HUB_TOKEN", "CUBLAS_WORKSPACE_CONFIG"})
NOTABLE_PREFIXES = ("HF_", "WANDB_", "MLFLOW_", "NEPTUNE_", "COMET_", "AWS_", "OPENAI_")
ENV_FILE_NAME = ".ztune_env"
# torchrun substitutes ${rank} (the global rank) into this prefix for every line a worker writes; the
# supervisor turns "[ztune-rank=N]" into "[host:N]".
RANK_PREFIX_TEMPLATE = "[ztune-rank=${rank}] "
RANK_PREFIX_RE = re.compile(r"^\[ztune-rank=(\d+)\] ?")
# Identifies every process of one node of one run, even those that leave the process group (torchrun starts
# each worker in its own session): teardown finds them by this variable in /proc/<pid>/environ.
TAG_ENV = "ZTUNE_LAUNCH_TAG"

# Process bookkeeping of this machine: never copied to other hosts' ranks.
_LOCAL_ONLY = frozenset({TAG_ENV, lifeline.PARENT_ENV})

_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LaunchError(UserError):
    """Bad launch input: an --env assignment, an env file line, a script path."""


def filter_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `environ` whose names start with one of ENV_PREFIXES, and the allocator switches of
    CPU_ALLOCATOR_DEFAULTS (so that THP_MEM_ALLOC_ENABLE=0 here opts the ranks out of the default)."""
    return {k: v for k, v in environ.items()
            if (k.startswith(ENV_PREFIXES) or k in CPU_ALLOCATOR_DEFAULTS) and k not in _LOCAL_ONLY}


def left_behind(environ: Mapping[str, str], sent: Mapping[str, str]) -> list[str]:
    """Names (sorted) of notable variables set in `environ` that the ranks will not get as set here: not
    sent at all, or sent with another value. Values are never part of the result."""
    sent = {**NODE_DEFAULTS, **sent}
    return sorted(k for k, v in environ.items()
                  if (k in NOTABLE_NAMES or k.startswith(NOTABLE_PREFIXES)) and sent.get(k) != v)


def left_behind_warning(names: Sequence[str]) -> str | None:
    """The one warning line for `left_behind` names (None when there are none)."""
    if not names:
        return None
    return (f"set here but not sent to the other hosts: {', '.join(names)}; to send them, add KEY=VALUE lines "
            f"to {ENV_FILE_NAME} (in the working directory or your home) or pass --env KEY=VALUE "
            f"(e.g. --env {names[0]}=...)")


# Names whose values are credentials: printed commands (`ztune launch --dry-run`) show them as REDACTED.
_SECRET_NAME_RE = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH",
                             re.IGNORECASE)
REDACTED = "<redacted>"


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name says its value is a credential (HF_TOKEN, WANDB_API_KEY, ...)."""
    return bool(_SECRET_NAME_RE.search(name))


def redact_argv(argv: Sequence[str]) -> list[str]:
    """`argv` for display: each KEY=VALUE element whose KEY names a credential has its value replaced."""
    out = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        out.append(f"{key}={REDACTED}" if sep and _ENV_KEY_RE.match(key) and is_secret_name(key) else arg)
    return out


def parse_env_assignment(text: str, *, where: str = "--env") -> tuple[str, str]:
    """`KEY=VALUE` -> (KEY, VALUE). The value is kept byte for byte (it may hold '=', quotes, `;`)."""
    key, sep, value = text.partition("=")
    if not sep or not _ENV_KEY_RE.fullmatch(key):
        raise LaunchError(f"{where} {text!r}: expected KEY=VALUE with KEY made of letters, digits and '_'")
    if "\0" in value:  # no environment can hold it: exec would fail on every host
        raise LaunchError(f"{where} {key}: the value holds a NUL character; remove it")
    return key, value


def parse_env_file(text: str, *, source: str = ENV_FILE_NAME) -> dict[str, str]:
    """Lines of KEY=VALUE; '#' comments and blank lines skipped; no quoting or expansion (values are literal).

    Lines end at ASCII line ends, so a value may hold any other character (U+2028 ended a line, and the rest
    of the value was read as a line of its own). Spaces and tabs around a line are dropped; any other
    whitespace there (U+00A0, U+3000, a form feed) is an error naming it, not a character silently dropped or
    kept in the value."""
    out: dict[str, str] = {}
    for lineno, raw in enumerate(ascii_lines(text), start=1):
        line = raw.strip(" \t")
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {lineno}:"
        for edge, c in (("starts", line[0]), ("ends", line[-1])):
            if c.isspace() or not c.isprintable():
                raise LaunchError(f"{where} the line {edge} with {describe_char(c)}, which the file does not "
                                  "show; remove it (spaces and tabs around a line are dropped)")
        key, value = parse_env_assignment(line, where=where)
        out[key] = value
    return out


@dataclass(frozen=True)
class NodeCommand:
    """What one host runs: `cd workdir` then `argv`. `config_text` is written to `config_path` first."""

    host: str
    node_rank: int
    workdir: str
    argv: tuple[str, ...]
    run_dir: str
    config_path: str | None


def build_torchrun_argv(*, python: str, num_nodes: int, node_rank: int, nproc_per_node: int,
                        master_addr: str, master_port: int, run_id: str, local_addr: str | None,
                        log_dir: str, script: str, script_args: Sequence[str], max_restarts: int = 0) -> list[str]:
    """`python -m torch.distributed.run ...` for one node: c10d rendezvous on the head. `max_restarts`: how
    often torchrun restarts every node's workers when one fails (elastic restart; the script resumes from its
    checkpoint, docs/checkpoints.md).

    `is_host` is explicit so that the head hosts the store even when its hostname resolves to loopback.
    """
    argv = [
        python, "-m", "torch.distributed.run",
        f"--nnodes={num_nodes}",
        f"--node-rank={node_rank}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={format_endpoint(master_addr, master_port)}",
        f"--rdzv-id={run_id}",
        f"--rdzv-conf=is_host={1 if node_rank == 0 else 0}",
        f"--max-restarts={max_restarts}",
        "--tee=3",
        f"--log-dir={log_dir}",
    ]
    if local_addr:
        argv.append(f"--local-addr={local_addr}")
    # Every worker runs through the lifeline wrapper: it dies with torchrun, even a SIGKILLed one.
    # "--" would be taken as the script by torchrun; a script name starting with '-' cannot be a path anyway.
    return [*argv, *lifeline.torchrun_worker_args(sig="KILL"), script, *script_args]


def build_command(*, python: str, host: str, node_rank: int, num_nodes: int, nproc_per_node: int,
                  master_addr: str, master_port: int, run_id: str, workdir: str, run_root: str,
                  script: str, script_args: Sequence[str], env: Mapping[str, str],
                  ifname: str | None = None, local_addr: str | None = None,
                  visible_devices: Sequence[int] | None = None, config_suffix: str | None = None,
                  grace_s: float = 5.0, max_restarts: int = 0) -> NodeCommand:
    """The full command for one host: the ztune node wrapper, which runs torchrun in its own session.

    `env` is the environment common to all hosts (already filtered and merged); this adds the per-host
    interface, visible devices and config path. `config_suffix` (".json"/".yaml") means a config file is
    sent over stdin and its path exported as ZTUNE_CONFIG.
    """
    run_dir = f"{run_root.rstrip('/')}/{run_id}/node{node_rank}"
    node_env = {**NODE_DEFAULTS, **env}
    node_env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = RANK_PREFIX_TEMPLATE
    if ifname:
        node_env["GLOO_SOCKET_IFNAME"] = ifname
        node_env["NCCL_SOCKET_IFNAME"] = ifname
    if visible_devices is not None:
        node_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in visible_devices)
    config_path = None
    if config_suffix is not None:
        from ztune.config.io import CONFIG_ENV

        config_path = f"{run_dir}/config{config_suffix}"
        node_env[CONFIG_ENV] = config_path
    torchrun = build_torchrun_argv(
        python=python, num_nodes=num_nodes, node_rank=node_rank, nproc_per_node=nproc_per_node,
        master_addr=master_addr, master_port=master_port, run_id=run_id, local_addr=local_addr,
        log_dir=f"{run_dir}/torchrun", script=script, script_args=script_args, max_restarts=max_restarts)
    # Credentials travel in the node wrapper's stdin header (header_line), never in argv: argv is readable by
    # every user of a host (ps, /proc/<pid>/cmdline).
    assignments = [f"{k}={v}" for k, v in sorted(node_env.items()) if not is_secret_name(k)]
    argv = [python, "-m", "ztune.launch.ssh", "run", "--tag", f"{run_id}:{node_rank}", "--run-dir", run_dir,
            "--grace-s", f"{grace_s:g}", "--", "env", *assignments, *torchrun]
    return NodeCommand(host=host, node_rank=node_rank, workdir=workdir, argv=tuple(argv), run_dir=run_dir,
                       config_path=config_path)


def remote_shell_command(*, workdir: str, argv: Sequence[str]) -> str:
    """The one string ssh hands to the remote login shell (POSIX sh syntax): every word quoted."""
    return f"cd {shlex.quote(workdir)} && exec {shlex.join(argv)}"
