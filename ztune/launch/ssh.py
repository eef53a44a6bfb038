"""ssh argv construction, and the node side of a launch (`python -m ztune.launch.ssh run|reap ...`).

The launcher runs OpenSSH's `ssh` as a subprocess, so ~/.ssh/config, agents and jump hosts keep working. On
each host the command is this module's `run`: it writes the config sent over stdin, starts torchrun in a new
session (setsid), records its pgid in `<run_dir>/pgid`, relays its output line by line, and kills everything
of the node when ssh's stdin closes -- which is what a dropped connection (or a dead launcher) looks like
from the remote side. `reap` is what the launcher's second ssh runs at teardown: SIGTERM to the pgid and to
every process carrying this node's tag, SIGKILL after the grace period, then a count of what is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ztune.inputs import describe_char, shown
from ztune.launch import lifeline
from ztune.launch.command import TAG_ENV, LaunchError

# Lines the node wrapper writes for the supervisor (never shown to the user) start with this marker.
CONTROL_PREFIX = "@@ztune-node@@ "
SSH_FAILURE_CODE = 255  # what ssh exits with when it cannot connect or loses the connection


@dataclass(frozen=True)
class SshOptions:
    """How to call ssh. `options` are `-o KEY=VALUE` strings the user passed; they win over ours."""

    config_file: str | None = None
    options: tuple[str, ...] = ()
    connect_timeout_s: int = 5
    keepalive_s: int = 5
    insecure_no_host_key_check: bool = False
    ssh_binary: str = "ssh"


# An ssh_config keyword (ssh -o KEYWORD=VALUE or "KEYWORD VALUE"): ConnectTimeout, ForwardX11, ...
_SSH_OPTION = re.compile(r"([A-Za-z][A-Za-z0-9]*)(?:[ \t]*=[ \t]*|[ \t]+)\S")


def check_ssh_option(option: str) -> None:
    """Refuse (LaunchError, one line) an `-o` option ssh would misread: its keyword is ASCII letters and digits,
    then '=' or spaces, then the value. ssh separates with ASCII spaces and tabs only, so another whitespace
    character (U+00A0 NO-BREAK SPACE, U+3000) ends up inside the keyword or the value (`User=bob\\xa0` logs in
    as 'bob\\xa0'), and a control character has no place in one; either is named. A value may otherwise hold
    any text (a path)."""
    bad = next((c for c in option if (c.isspace() or not c.isprintable()) and c not in " \t"), None)
    if bad is not None:
        raise LaunchError(f"--ssh-option {shown(option)} holds {describe_char(bad)}; remove it (KEY and VALUE are "
                          "separated by '=' or plain spaces, e.g. ConnectTimeout=5)")
    if _SSH_OPTION.match(option) is None:
        raise LaunchError(f"--ssh-option {shown(option)}: expected KEY=VALUE with an ssh_config keyword in ASCII "
                          "letters as KEY, e.g. ConnectTimeout=5")


def ssh_argv(*, host: str, remote_command: str, opts: SshOptions) -> list[str]:
    """`ssh ... -- host command`: BatchMode (never prompt), no tty, keepalives so a dead link is noticed."""
    argv = [opts.ssh_binary, "-T"]
    if opts.config_file:
        argv += ["-F", opts.config_file]
    for opt in opts.options:  # ssh keeps the first value it sees for an option: user options go first
        argv += ["-o", opt]
    if opts.insecure_no_host_key_check:
        argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={opts.connect_timeout_s}",
             "-o", f"ServerAliveInterval={opts.keepalive_s}", "-o", "ServerAliveCountMax=3",
             "-o", "LogLevel=ERROR", "--", host, remote_command]
    return argv


# ---------------------------------------------------------------------------------------------- node side


def _tagged(tag: str, *, exclude: set[int]) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter():
        if proc.pid in exclude:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(TAG_ENV) == tag:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def reap(*, tag: str, pgid: int | None, grace_s: float) -> int:
    """SIGTERM the process group and every process tagged `tag`; SIGKILL what is left after `grace_s`.

    Returns how many tagged processes are still alive afterwards (0 means the node is clean).
    """
    import psutil

    me = {os.getpid(), os.getppid()}
    if pgid is not None and pgid > 1:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    procs = _tagged(tag, exclude=me)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=grace_s)
    if pgid is not None and pgid > 1:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    alive = list({p.pid: p for p in alive + _tagged(tag, exclude=me)}.values())
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=2.0)
    deadline = time.monotonic() + 2.0
    left = _tagged(tag, exclude=me)
    while left and time.monotonic() < deadline:  # a killed process may stay listed until its parent reaps it
        time.sleep(0.05)
        left = _tagged(tag, exclude=me)
    return len(left)


class _Node:
    """State of one `run`: the child, the output lock, and why we stopped."""

    def __init__(self, *, tag: str, run_dir: str, grace_s: float) -> None:
        self.tag, self.run_dir, self.grace_s = tag, run_dir, grace_s
        self.out_lock = threading.Lock()
        self.stop = threading.Event()
        self.stop_reason = ""

    def emit(self, data: bytes) -> None:
        try:
            with self.out_lock:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
        except (BrokenPipeError, OSError, ValueError):
            self.halt("connection lost")

    def control(self, **event) -> None:
        self.emit((CONTROL_PREFIX + json.dumps(event) + "\n").encode())

    def halt(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()


def _pump(node: _Node, stream) -> None:
    for line in iter(stream.readline, b""):
        node.emit(line)


def _watch_stdin(node: _Node) -> None:
    # os.read, not sys.stdin: a daemon thread blocked in a buffered read aborts interpreter shutdown.
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    node.halt("ssh stdin closed")


def _count_ranks(node: _Node, pid: int) -> None:
    import psutil

    last = -1
    while not node.stop.wait(0.5):
        try:
            n = len(psutil.Process(pid).children())
        except psutil.Error:
            return
        if n != last:
            node.control(event="ranks", running=n)
            last = n


def _write_header_files(header: dict, run_dir: str) -> None:
    name = header.get("config_name")
    if name:
        if os.path.basename(name) != name:
            raise SystemExit(f"ztune node: bad config name {name!r}")
        path = os.path.join(run_dir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(header.get("config_text", ""))


def _header_env(header: dict) -> dict[str, str]:
    env = header.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise SystemExit("ztune node: bad env in the launcher's header")
    return env


def _read_line_fd0() -> bytes:
    """One line from fd 0, unbuffered, so nothing after it is swallowed by a buffer."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            return bytes(buf)
        buf += chunk
    return bytes(buf)


def run_node(*, tag: str, run_dir: str, grace_s: float, argv: Sequence[str]) -> int:
    """Run `argv` (torchrun) in its own session until it exits or the launcher goes away; returns its code."""
    header_line = _read_line_fd0()
    if not header_line:
        return 1  # the launcher went away before sending anything
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    header = json.loads(header_line)
    _write_header_files(header, run_dir)
    node = _Node(tag=tag, run_dir=run_dir, grace_s=grace_s)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: node.halt(f"signal {signal.Signals(signum).name}"))
    env = dict(os.environ)
    env.update(_header_env(header))  # credentials: sent over stdin so that no command line shows them
    env[TAG_ENV] = tag
    # torchrun gets SIGTERM (its own orderly teardown) if this wrapper dies, even of SIGKILL; its workers
    # are wrapped by the lifeline too (command.py), so they end with it.
    env[lifeline.PARENT_ENV] = str(os.getpid())
    child = subprocess.Popen(lifeline.wrap(argv, sig="TERM"), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    with open(os.path.join(run_dir, "pgid"), "w") as f:
        f.write(f"{child.pid}\n")
    node.control(event="started", pid=child.pid, pgid=child.pid)
    pump = threading.Thread(target=_pump, args=(node, child.stdout), daemon=True)
    pump.start()
    threading.Thread(target=_watch_stdin, args=(node,), daemon=True).start()
    threading.Thread(target=_count_ranks, args=(node, child.pid), daemon=True).start()
    while child.poll() is None and not node.stop.wait(0.1):
        pass
    if child.poll() is None:  # told to stop: the launcher closed stdin, or a signal
        left = reap(tag=tag, pgid=child.pid, grace_s=grace_s)
        child.wait()
        code = 128 + signal.SIGTERM
    else:
        code = child.returncode if child.returncode >= 0 else 128 - child.returncode
        # torchrun waits for its workers; this sweep catches any that escaped it.
        left = reap(tag=tag, pgid=child.pid, grace_s=1.0)
    pump.join(timeout=2.0)
    node.stop.set()
    node.control(event="exit", code=code, left=left, reason=node.stop_reason)
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # the per-run parent, once the last node on this filesystem is done
        os.rmdir(os.path.dirname(run_dir))
    return code


def reap_node(*, tag: str, run_dir: str, grace_s: float) -> int:
    pgid = None
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(run_dir, "pgid")) as f:
            pgid = int(f.read().strip())
    left = reap(tag=tag, pgid=pgid, grace_s=grace_s)
    print(CONTROL_PREFIX + json.dumps({"event": "reaped", "left": left}), flush=True)
    return 0 if left == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztune.launch.ssh")
    parser.add_argument("action", choices=["run", "reap"])
    parser.add_argument("--tag", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--grace-s", type=float, default=5.0)
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if args.action == "reap":
        return reap_node(tag=args.tag, run_dir=args.run_dir, grace_s=args.grace_s)
    if not command:
        parser.error("run needs a command after --")
    return run_node(tag=args.tag, run_dir=args.run_dir, grace_s=args.grace_s, argv=command)


if __name__ == "__main__":
    sys.exit(main())
