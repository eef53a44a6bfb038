"""Run the per-host commands, merge their output into one stream, and tear everything down on any failure.

One reader thread per host turns its ssh stdout into lines on a queue; the main thread prints them
(`[host:rank] ...`), watches exit codes and signals, and keeps a status line. Teardown, on the first non-zero
exit, a dropped connection, or SIGINT/SIGTERM: a second ssh per host runs `ztune.launch.ssh reap` (SIGTERM
to the node's process group and tagged processes, SIGKILL after the grace period, count what is left), and
the first ssh's stdin is closed, which makes the node wrapper do the same on its own.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ztune.launch.command import RANK_PREFIX_RE, NodeCommand
from ztune.launch.lifeline import die_with_parent
from ztune.launch.ssh import CONTROL_PREFIX, SSH_FAILURE_CODE


@dataclass(frozen=True)
class NodeLaunch:
    """One host's start command (argv run locally: ssh ... or the node wrapper itself) and its reap command."""

    command: NodeCommand
    start_argv: tuple[str, ...]
    reap_argv: tuple[str, ...]
    num_ranks: int
    header: bytes  # first stdin line for the node wrapper (the config file's text)
    cwd: str | None = None  # local mode: the working directory of the wrapper


@dataclass
class _HostState:
    launch: NodeLaunch
    proc: subprocess.Popen | None = None
    up: bool = False
    ranks_running: int = 0
    exit_code: int | None = None
    eof: bool = False
    left: int | None = None
    log: object | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.launch.command.host


@dataclass(frozen=True)
class Outcome:
    """How the run ended. `code` is the first failure's exit code (0 if none); times in seconds."""

    code: int
    reason: str
    teardown_s: float | None
    leftovers: dict[str, int]


def _safe_filename(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", host) or "host"


class Supervisor:
    """Start every node, relay output, stop all of them when one fails. `print_line` gets finished lines."""

    def __init__(self, nodes: Sequence[NodeLaunch], *, grace_s: float, log_dir: str | None,
                 print_line: Callable[[str], None], set_status: Callable[[str], None] | None = None) -> None:
        self.hosts = [_HostState(launch=n) for n in nodes]
        self.grace_s = grace_s
        self.log_dir = log_dir
        self.print_line = print_line
        self.set_status = set_status or (lambda _s: None)
        self.lines: queue.Queue = queue.Queue()
        self.signal_code: int | None = None
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------ output
    def _reader(self, idx: int, stream) -> None:
        for raw in iter(stream.readline, b""):
            self.lines.put((idx, raw))
        self.lines.put((idx, None))

    def _handle(self, idx: int, raw: bytes | None) -> None:
        st = self.hosts[idx]
        if raw is None:
            st.eof = True
            return
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if text.startswith(CONTROL_PREFIX):
            try:
                event = json.loads(text[len(CONTROL_PREFIX):])
            except json.JSONDecodeError:
                event = {}
            kind = event.get("event")
            if kind == "started":
                st.up = True
            elif kind == "ranks":
                st.ranks_running = int(event.get("running", 0))
            elif kind == "exit":
                st.up, st.ranks_running = False, 0
                st.left = event.get("left")
            return
        m = RANK_PREFIX_RE.match(text)
        line = f"[{st.host}:{m.group(1)}] {text[m.end():]}" if m else f"[{st.host}] {text}"
        self.print_line(line)
        if st.log is not None:
            st.log.write(line + "\n")
            st.log.flush()

    def _drain(self, timeout_s: float) -> None:
        try:
            idx, raw = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            return
        self._handle(idx, raw)
        while True:
            try:
                idx, raw = self.lines.get_nowait()
            except queue.Empty:
                return
            self._handle(idx, raw)

    def status_text(self) -> str:
        up = sum(s.up for s in self.hosts)
        running = sum(s.ranks_running for s in self.hosts)
        total = sum(s.launch.num_ranks for s in self.hosts)
        return (f"hosts up {up}/{len(self.hosts)}  ranks running {running}/{total}  "
                f"{time.monotonic() - self.t0:.0f} s")

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
        for idx, st in enumerate(self.hosts):
            if self.log_dir:
                st.log = open(os.path.join(self.log_dir, f"{_safe_filename(st.host)}.log"), "a")  # noqa: SIM115
            # A new session: a Ctrl-C in the terminal reaches only the launcher, which then tears down in order.
            # SIGTERM if the launcher dies: ssh then drops the connection (the node wrapper reaps on EOF), a
            # local node wrapper reaps at once.
            st.proc = subprocess.Popen(list(st.launch.start_argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, start_new_session=True, cwd=st.launch.cwd,
                                       preexec_fn=die_with_parent(signal.SIGTERM))
            try:
                st.proc.stdin.write(st.launch.header)
                st.proc.stdin.flush()
            except OSError:
                pass  # the node died at once; its exit code says why
            threading.Thread(target=self._reader, args=(idx, st.proc.stdout), daemon=True).start()

    def _on_signal(self, signum, _frame) -> None:
        if self.signal_code is None:
            self.signal_code = 128 + signum

    def run(self) -> Outcome:
        """Run to the end. Installs SIGINT/SIGTERM handlers for the duration (main thread only)."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._start()
            return self._loop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for st in self.hosts:
                if st.log is not None:
                    st.log.close()

    def _loop(self) -> Outcome:
        failure: tuple[int, str] | None = None
        while True:
            self._drain(0.1)
            self.set_status(self.status_text())
            for st in self.hosts:
                if st.exit_code is None and st.proc.poll() is not None and st.eof:
                    rc = st.proc.returncode
                    st.exit_code = rc if rc >= 0 else 128 - rc  # killed by signal N: 128 + N, as a shell says
                    if st.exit_code != 0 and failure is None:
                        if rc < 0:
                            why = f"its ssh client was killed by {signal.Signals(-rc).name}: connection lost"
                        elif rc == SSH_FAILURE_CODE:
                            why = "ssh connection lost or refused"
                        else:
                            why = "a rank failed"
                        failure = (st.exit_code, f"{st.host} exited with code {st.exit_code} ({why})")
            if failure is None and self.signal_code is not None:
                name = signal.Signals(self.signal_code - 128).name
                failure = (self.signal_code, f"launcher received {name}")
            if failure is not None:
                return self._teardown(*failure)
            if all(st.exit_code is not None for st in self.hosts):
                return Outcome(code=0, reason="all hosts finished", teardown_s=None, leftovers={})

    def _teardown(self, code: int, reason: str) -> Outcome:
        t0 = time.monotonic()
        self.print_line(f"[ztune] {reason}; stopping every host (SIGTERM, SIGKILL after {self.grace_s:g} s)")
        reaps: dict[int, tuple[int | None, str]] = {}

        def reap(idx: int) -> None:
            st = self.hosts[idx]
            try:
                proc = subprocess.run(list(st.launch.reap_argv), capture_output=True, text=True,
                                      stdin=subprocess.DEVNULL, timeout=self.grace_s + 15.0,
                                      start_new_session=True)
            except subprocess.TimeoutExpired:
                reaps[idx] = (None, "reap timed out")
                return
            left = None
            for line in proc.stdout.splitlines():
                if line.startswith(CONTROL_PREFIX):
                    left = json.loads(line[len(CONTROL_PREFIX):]).get("left")
            reaps[idx] = (left, proc.stderr.strip()[-200:])

        threads = [threading.Thread(target=reap, args=(i,), daemon=True) for i in range(len(self.hosts))]
        for t in threads:
            t.start()
        for st in self.hosts:  # the node wrapper treats EOF on stdin as "stop now"
            try:
                st.proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + self.grace_s + 20.0
        while time.monotonic() < deadline and (
                any(t.is_alive() for t in threads) or any(st.proc.poll() is None for st in self.hosts)):
            self._drain(0.05)
        for st in self.hosts:
            if st.proc.poll() is None:  # our own ssh client, stuck: it has to go too
                st.proc.kill()
                st.proc.wait()
        self._drain(0.0)
        leftovers: dict[str, int] = {}
        for idx, st in enumerate(self.hosts):
            left, err = reaps.get(idx, (None, "reap did not finish"))
            # The reap over a second ssh is the authority; the wrapper's own sweep counts when ssh is gone.
            n = left if left is not None else st.left
            if n is None:
                st.notes.append(err or "could not confirm")
                self.print_line(f"[ztune] {st.host}: could not confirm teardown ({err or 'no answer'})")
                leftovers[st.host] = -1
            elif n:
                leftovers[st.host] = n
                self.print_line(f"[ztune] {st.host}: {n} process(es) still alive after SIGKILL")
        teardown_s = time.monotonic() - t0
        if not leftovers:
            self.print_line(f"[ztune] all hosts stopped, nothing left running ({teardown_s:.1f} s)")
        return Outcome(code=code, reason=reason, teardown_s=teardown_s, leftovers=leftovers)


def plain_printer(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
