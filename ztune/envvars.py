"""The ZTUNE_* environment variables that ztune parses: each declared once here (type, allowed values, default)
and read through `read`, so that a bad value is one line naming the variable, the value given and the form
expected, wherever it is read: the CLI (exit 2, `check_environment` before any rank starts), a rank or a user's
training script (an `EnvVarError`, a `ConfigError`).

An empty or unset variable means the default. Booleans take 1/0, true/false, yes/no, on/off (any case); any
other word is an error rather than silently "on" (`ZTUNE_DISABLE_CPP_ADAM=false` used to disable the kernel).
Variables that hold a path or a name (ZTUNE_CONFIG, ZTUNE_TRIAL_REPORT, ZTUNE_EXT_DIR, ZTUNE_NVCC) are not
parsed and are not listed here.

No torch, no I/O: the runtime, the CLI and the launcher all import this module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ztune.errors import EnvVarError
from ztune.inputs import ascii_int, ascii_number, ascii_signed_int

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_BOOL_FORM = "1 or 0 (also true/false, yes/no, on/off)"
# Far above any sane setting (a step count, a byte threshold, seconds), low enough that nothing downstream is
# asked to do the impossible with it (as ztune.inputs.MAX_ABS_NUMBER for files and flags).
_MAX_NUMBER = 10**18
_UNSET = object()

# torch's own switch (c10/core/alloc_cpu.cpp): CPU allocations of 2 MiB and more are aligned to 2 MiB and
# madvise(MADV_HUGEPAGE)d, so a fresh buffer faults in 2 MiB pages rather than 4 KiB ones. It is read once, at
# the process's first allocation, so it must be in a rank's environment when the rank starts. ZeRO-2/3 on CPU
# allocate and free a bucket (or a gathered unit) per use: writing a fresh 100 MB buffer took 83-94 ms
# against 12 ms for a reused one, 18 ms with this set (2-core AVX2 EPYC, THP "madvise", 2026-12-07). Numerics
# are unchanged; set THP_MEM_ALLOC_ENABLE=0 to opt out. ztune launch, autotune's trials and the probe's
# workload give their ranks this default unless the variable is set.
CPU_ALLOCATOR_DEFAULTS = {"THP_MEM_ALLOC_ENABLE": "1"}


@dataclass(frozen=True)
class EnvVar:
    """One variable: `kind` is "int", "float", "bool" or "choice"; `minimum` (inclusive, exclusive when
    `above`) bounds numbers; `noun` names what the number counts ("a byte count"); `default` is what unset
    means (None: the reader decides, e.g. ZTUNE_LOCAL_WORLD_SIZE falls back to torchrun's LOCAL_WORLD_SIZE)."""

    name: str
    kind: str
    default: Any
    help: str
    minimum: float | None = None
    above: bool = False
    choices: tuple[str, ...] = ()
    noun: str = ""

    def expected(self) -> str:
        """The form a value must have, in words: "an integer >= 1", "1 or 0 (...)", "torch or ztune"."""
        if self.kind == "bool":
            return _BOOL_FORM
        if self.kind == "choice":
            return " or ".join(self.choices) if len(self.choices) == 2 else "one of " + ", ".join(self.choices)
        noun = self.noun or ("an integer" if self.kind == "int" else "a number")
        if self.minimum is None:
            return noun
        bound = self.minimum if self.kind == "float" else int(self.minimum)
        return f"{noun} {'>' if self.above else '>='} {bound:g}"

    def parse(self, text: str) -> Any:
        """The value of `text` (already stripped, not empty), or None when it does not have the expected form."""
        if self.kind == "bool":
            low = text.lower()
            return True if low in _TRUE else False if low in _FALSE else None
        if self.kind == "choice":
            return text if text in self.choices else None
        # ASCII forms only: int() and float() also take other scripts' digits ('\uff12'), '_' and 'inf'.
        value = ascii_signed_int(text) if self.kind == "int" else ascii_number(text)
        if value is None or not math.isfinite(value) or abs(value) > _MAX_NUMBER:
            return None
        if self.minimum is not None and (value <= self.minimum if self.above else value < self.minimum):
            return None
        return value


VARS: dict[str, EnvVar] = {v.name: v for v in (
    EnvVar("ZTUNE_TRIAL_WARMUP", "int", 1, "autotune trial: optimizer steps run before measuring",
           minimum=0, noun="a step count"),
    EnvVar("ZTUNE_TRIAL_STEPS", "int", 3, "autotune trial: optimizer steps measured", minimum=1,
           noun="a step count"),
    EnvVar("ZTUNE_TRIAL_EXIT", "bool", True, "autotune trial: end the process once the measured steps are done"),
    EnvVar("ZTUNE_GATHER_TIMEOUT_S", "float", 60.0, "seconds a stage-3 gather waits for its partners",
           minimum=0, above=True, noun="seconds"),
    EnvVar("ZTUNE_SHM", "bool", True, "collectives of ranks on one host through shared memory (0: gloo only)"),
    EnvVar("ZTUNE_SHM_MIN_BYTES", "int", None, "smallest collective sent through shared memory", minimum=0,
           noun="a byte count"),
    EnvVar("ZTUNE_LOCAL_WORLD_SIZE", "int", None, "ranks per host (tests: 4 local ranks as 2 hosts x 2)",
           minimum=1, noun="a rank count"),
    EnvVar("ZTUNE_CUDA_ADAM", "choice", "torch", "Adam kernel for CUDA shards", choices=("torch", "ztune")),
    EnvVar("ZTUNE_DISABLE_CPP_ADAM", "bool", False, "use torch's Adam instead of the C++ CPU kernel"),
    EnvVar("ZTUNE_DISABLE_CUDA_ADAM", "bool", False, "use torch's Adam instead of the ztune CUDA kernel"),
    EnvVar("ZTUNE_DISABLE_CPP_CODEC", "bool", False,
           "use torch ops instead of the C++ CPU kernel for the int4/int8/1-bit codecs"),
    EnvVar("ZTUNE_DISABLE_CPP_ONEBIT_ADAM", "bool", False,
           "use torch ops instead of the C++ CPU kernel for 1-bit Adam's compression-stage update"),
)}


def read(name: str, *, default: Any = _UNSET, environ: Mapping[str, str] | None = None) -> Any:
    """The value of the variable `name` (declared in VARS) in `environ` (os.environ when None): its declared
    default (or `default`, when given) if unset or empty, else the parsed value.

    Raises EnvVarError (one line: the variable, the value given, the form expected, how to fix it).
    """
    var = VARS[name]
    env = os.environ if environ is None else environ
    fallback = var.default if default is _UNSET else default
    raw = env.get(name)
    if raw is None or not raw.strip():
        return fallback
    value = var.parse(raw.strip())
    if value is None:
        shown = raw if len(raw) <= 40 else raw[:37] + "..."
        default_is = f" (default: {_show(fallback)})" if fallback is not None else ""
        raise EnvVarError(f"{name}={shown!r}: expected {var.expected()}; fix it or unset it{default_is}")
    return value


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Raise EnvVarError for the first variable in VARS that `environ` (os.environ when None) sets badly: what
    a command that starts ranks runs first, so that a bad value fails once, here, not in every rank."""
    for name in VARS:
        read(name, environ=environ)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return f"{value:g}" if isinstance(value, float) else str(value)


def omp_num_threads(environ: Mapping[str, str] | None = None) -> int:
    """Threads per rank for autotune's timing and trials: OMP_NUM_THREADS when it is a positive integer, else 1.

    Not an error otherwise: OMP_NUM_THREADS belongs to OpenMP, whose own forms (a nesting list such as "4,2")
    the user's scripts may rely on; ztune only needs one count, and 1 is what its trials run with by default.
    """
    raw = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").strip()
    count = ascii_int(raw)  # str.isdigit() also takes '\u00b2', which int() then refuses
    return count if count is not None and 0 < count <= 1 << 16 else 1


def markdown_table() -> str:
    """docs/environment.md's table of VARS (a test keeps the page in step with this module)."""
    rows = ["| variable | value | default | what it sets |", "|---|---|---|---|"]
    for var in VARS.values():
        default = "(see text)" if var.default is None else _show(var.default)
        rows.append(f"| `{var.name}` | {var.expected()} | {default} | {var.help} |")
    return "\n".join(rows) + "\n"
