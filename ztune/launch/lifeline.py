"""Processes that end with their parent: PR_SET_PDEATHSIG, set before exec, with the start-up race closed.

Every process a ztune command starts must end when the command ends, however it ends (SIGKILL included,
which runs no cleanup code). Linux's `prctl(PR_SET_PDEATHSIG, sig)` makes the kernel send `sig` to a process
when the thread that forked it exits; it survives execve (of non-set-user-ID programs), so it can be set in
a small wrapper that then execs the real program in the same pid. Two uses:

- `die_with_parent(sig)`: a `preexec_fn` for subprocess.Popen (ssh clients, node wrappers);
- `python -m ztune.launch.lifeline_run SIG PROGRAM ARGS...`: the same as a program. It is the form torchrun can
  run: the tuner and the node wrapper start `lifeline TERM torchrun ...` (torchrun turns SIGTERM into its
  own teardown of the workers), and torchrun starts every worker as `-m ztune.launch.lifeline_run KILL python
  -u SCRIPT ...`, so a rank dies even when torchrun itself was SIGKILLed (torchrun starts each worker in a
  session of its own, which a process-group kill never reaches).

The race: a parent that dies between fork and prctl sends nothing. So after prctl the child checks that its
parent is still the one expected -- the pid captured before fork (preexec) or the pid in ZTUNE_LIFELINE_PARENT
(set by whoever started the wrapper; the wrapper sets it to its own pid for the program it execs, whose
children are then checked against it) -- and ends at once if not.

Not Linux (no prctl): nothing is set; the teardown paths (stdin EOF, reap by tag, stale-group cleanup) remain.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Sequence

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_ENV = "ZTUNE_LIFELINE_PARENT"
MODULE = "ztune.launch.lifeline_run"  # the program form (see lifeline_run.py)
EXIT_PARENT_GONE = 125  # the wrapper's own failure, as `env`/`timeout` use 125


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, or None where there is none (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _set_pdeathsig(sig: int, prctl: Callable[..., int] | None) -> bool:
    """Ask the kernel for `sig` when the parent (thread) exits; False where prctl does not exist."""
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn`: the child gets `sig` when this process (the caller of Popen) dies.

    Call it in the parent: it captures the parent's pid and resolves prctl there, so that the child, between
    fork and exec (where another thread of the parent may have held the dynamic loader's lock), loads nothing.
    """
    parent_pid = os.getpid()
    prctl = _prctl()

    def setup() -> None:
        if _set_pdeathsig(sig, prctl) and os.getppid() != parent_pid:
            os._exit(EXIT_PARENT_GONE)  # the parent died before prctl: nobody is left to end us
    return setup


def wrap(argv: Sequence[str], *, sig: str, python: str | None = None) -> list[str]:
    """`argv` run through the lifeline wrapper with signal `sig` ("TERM"/"KILL"), as an argv list."""
    return [python or sys.executable, "-m", MODULE, sig, *argv]


def torchrun_worker_args(*, sig: str = "KILL") -> list[str]:
    """The torchrun arguments, before the script, that start every worker through the lifeline:
    `--module ztune.launch.lifeline KILL python -u`, then the script and its arguments."""
    return ["-m", MODULE, sig, "__python__", "-u"]


def main(argv: Sequence[str] | None = None) -> int:
    """`lifeline SIG PROGRAM ARGS...`: set the death signal, check the parent, exec PROGRAM (same pid).

    PROGRAM `__python__` means this interpreter (sys.executable): torchrun runs `python -u -m lifeline ...`
    with its own interpreter, and the script must run with that one.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0].upper().removeprefix("SIG") not in ("TERM", "KILL", "INT", "HUP"):
        sys.stderr.write("usage: python -m ztune.launch.lifeline_run TERM|KILL PROGRAM [ARGS...]\n")
        return 2
    sig = signal.Signals["SIG" + args[0].upper().removeprefix("SIG")]
    program = [sys.executable if args[1] == "__python__" else args[1], *args[2:]]
    expected = os.environ.get(PARENT_ENV, "")
    if _set_pdeathsig(sig, _prctl()) and expected.isdigit() and os.getppid() != int(expected):
        return EXIT_PARENT_GONE  # the parent died before prctl ran
    os.environ[PARENT_ENV] = str(os.getpid())  # what PROGRAM's own lifeline-wrapped children check
    sys.stdout.flush()
    try:
        os.execvp(program[0], program)
    except OSError as exc:
        sys.stderr.write(f"ztune lifeline: cannot run {program[0]!r}: {exc.strerror}\n")
        return 127
    return 0  # pragma: no cover - execvp does not return

