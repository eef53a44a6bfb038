"""Start Python scripts as real processes without paying `import torch` in each: a zygote process imports torch
once and forks a child per script; the child runs the script as `__main__` and exits as a script does, through
the interpreter's normal shutdown (unlike a multiprocessing child, which leaves with os._exit). For tests
about how a process ends or is killed (tests/dist/test_exit.py, test_checkpoint_kill.py): ~3.5 CPU-s of imports
saved per process on the 2-core CI machine (torch ~1.8 and torch._dynamo, which the first torch optimizer
imports, ~1.9), where test_exit.py starts 72 processes.

    with Zygote() as z:
        procs = [z.start([script, "arg"], env=env, cwd=repo, output=path) for _ in range(4)]
        codes = [p.wait(timeout_s=120) for p in procs]

The zygote is `python tests/helpers/zygote.py`: one JSON request per line on stdin ({"argv", "env", "cwd",
"output", "append"}), answered with the child's pid, and "exit PID CODE" when a child ends (CODE as subprocess
returncode: negative for a signal). The child takes the request's environment, working directory and argv,
sends stdout and stderr to `output`, and runs argv[0] in a fresh `__main__` module (sys.path[0] its folder, as
`python SCRIPT` sets them; sys.path otherwise the zygote's: the repository first). ZTUNE_TEST_START_METHOD=spawn
makes start() run `python SCRIPT` instead.
"""

from __future__ import annotations

import builtins
import json
import os
import select
import subprocess
import sys
import time
import types
from pathlib import Path


class ZygoteChild:
    """A process started by Zygote.start (or, with ZTUNE_TEST_START_METHOD=spawn, by subprocess)."""

    def __init__(self, zygote: Zygote | None, pid: int, popen: subprocess.Popen | None = None) -> None:
        self._zygote, self.pid, self._popen = zygote, pid, popen

    def poll(self) -> int | None:
        if self._popen is not None:
            return self._popen.poll()
        self._zygote._read_exits(0.0)
        return self._zygote._codes.get(self.pid)

    def wait(self, timeout_s: float) -> int:
        """The exit code; subprocess.TimeoutExpired after `timeout_s`."""
        if self._popen is not None:
            return self._popen.wait(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.pid not in self._zygote._codes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(f"zygote child {self.pid}", timeout_s)
            self._zygote._read_exits(min(left, 0.5))
        return self._zygote._codes[self.pid]

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass


class Zygote:
    def __init__(self) -> None:
        self._spawn = os.environ.get("ZTUNE_TEST_START_METHOD") == "spawn"
        self._proc: subprocess.Popen | None = None
        self._codes: dict[int, int] = {}
        self._buffer = b""

    def __enter__(self) -> Zygote:
        if not self._spawn:
            self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          env={**os.environ, "PYTHONPATH": _repo_path()})
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.stdin.close()  # the zygote exits once its children have
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc.stdout.close()

    def start(self, argv: list[str], *, env: dict[str, str], cwd: str | Path, output: str | Path,
              append: bool = False) -> ZygoteChild:
        """Start `python argv...` with `env` in `cwd`, stdout and stderr to the file `output` (on its end with
        `append`, else replacing it)."""
        if self._spawn:
            with open(output, "ab" if append else "wb") as out:
                popen = subprocess.Popen([sys.executable, *argv], env=env, cwd=cwd, stdout=out,
                                         stderr=subprocess.STDOUT)
            return ZygoteChild(None, popen.pid, popen)
        request = {"argv": [str(a) for a in argv], "env": env, "cwd": str(cwd), "output": str(output),
                   "append": append}
        self._proc.stdin.write(json.dumps(request).encode() + b"\n")
        self._proc.stdin.flush()
        while True:
            line = self._line(timeout_s=None)
            if line.startswith("exit "):
                self._record_exit(line)
                continue
            return ZygoteChild(self, int(line))

    def _line(self, timeout_s: float | None) -> str | None:
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
            if not ready:
                return None
            chunk = os.read(self._proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the zygote exited (code {self._proc.wait()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def _record_exit(self, line: str) -> None:
        _, pid, code = line.split()
        self._codes[int(pid)] = int(code)

    def _read_exits(self, timeout_s: float) -> None:
        line = self._line(timeout_s)
        while line is not None:
            self._record_exit(line)
            line = self._line(0.0)


def _repo_path() -> str:
    repo = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))


def _serve() -> dict | None:
    """The zygote's loop: fork a child per request; return the request in the child, None when stdin ends and
    every child has exited."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    children: set[int] = set()
    pending = b""
    stdin_open = True
    while stdin_open or children:
        ready, _, _ = select.select([0] if stdin_open else [], [], [], 0.05)
        if ready:
            chunk = os.read(0, 65536)
            stdin_open = bool(chunk)
            pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            pid = os.fork()
            if pid == 0:
                out.close()
                return json.loads(line)
            children.add(pid)
            out.write(f"{pid}\n")
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                out.write(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n")
    return None


def _become(request: dict) -> types.ModuleType:
    """In the child: take the request's environment, folder, output and argv; return a fresh `__main__`."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    mode = os.O_APPEND if request.get("append") else os.O_TRUNC
    fd = os.open(request["output"], os.O_WRONLY | os.O_CREAT | mode, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 -- the process's own stdout/stderr
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    script = os.path.abspath(request["argv"][0])
    sys.argv = [script, *request["argv"][1:]]
    sys.path[0] = os.path.dirname(script)
    main = types.ModuleType("__main__")
    main.__file__ = script
    main.__builtins__ = builtins
    sys.modules["__main__"] = main  # for good: the interpreter's shutdown clears it as a script's __main__
    return main


if __name__ == "__main__":
    import torch  # noqa: F401 -- what every child would otherwise import itself
    import torch._dynamo  # noqa: F401 -- imported by a process's first torch optimizer (tests/helpers/spawn.py PRELOAD)
    import torch.distributed  # noqa: F401
    import torch.optim  # noqa: F401

    _request = _serve()
    if _request is None:
        sys.exit(0)
    _main = _become(_request)
    with open(_main.__file__, "rb") as _f:
        _code = compile(_f.read(), _main.__file__, "exec")
    del _f, _request
    exec(_code, _main.__dict__)
