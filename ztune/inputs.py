"""The parse boundary every reader of user files shares: bytes to text, text to plain data, and the checks no
reader should have to repeat (non-finite or absurd numbers, nesting too deep to walk).

Each function takes the error class of its reader (`ConfigError`, `ProfileError`, `HostfileError`, ...), so
a bad input ends as that reader's one-line `UserError`, and names the key where the fault is.

Python's JSON reader accepts `NaN`, `Infinity` and `-Infinity` (not JSON, but it reads them) and turns
`1e999` into infinity; YAML has `.nan` and `.inf`. None of these is a sane training setting, so they are
refused where the file is read, with the key named, before any conversion can fail on them
(`int(float('nan'))` raises ValueError, `int(float('inf'))` OverflowError).
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

import yaml

from ztune.errors import UserError

# The largest magnitude any number in a ztune input may have: 1e18 bytes is an exabyte, 1e18 FLOP/s a
# thousand B200s; a training config, profile or flag beyond it is a typo (or an attack on a later int()).
MAX_ABS_NUMBER = 1e18
# Nesting deeper than this is not a config: refused before recursive code can hit Python's recursion limit.
MAX_DEPTH = 64
# Files ztune reads are small; this keeps a wrong path (a dataset, /dev/zero) from filling memory.
MAX_FILE_BYTES = 16 << 20

_BASE_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class StrictYamlLoader(_BASE_YAML_LOADER):  # type: ignore[misc, valid-type]
    """The safe loader, refusing a key written twice in one mapping (PyYAML keeps the last one silently, so
    `zero: {stage: 3}` followed later by `zero: {stage: 1}` would train at stage 1). Merge keys (`<<: *base`)
    may still be overridden by explicit keys, as YAML intends."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    line = first_line.get(key)
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                if line is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first at line {line}); keep one",
                        key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_YAML_LOADER = StrictYamlLoader


class DuplicateKeyError(ValueError):
    """A JSON object that names a key twice (raised by `_unique_pairs` while parsing)."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    # JSON keeps the last of duplicate keys; DeepSpeed refuses them (runtime/config_utils.py,
    # dict_raise_error_on_duplicate_keys), and a silent choice between two settings is worse than an error.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


class _NonFinite:
    """Stands in for a NaN/Infinity token of a JSON text until its key is known."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __repr__(self) -> str:
        return self.token


def read_text(path: str | os.PathLike, *, error: type[UserError], what: str) -> str:
    """The UTF-8 text of `path` (without a leading byte order mark); a missing, unreadable, oversized or
    non-UTF-8 file is one `error` line."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise error(f"{what} {str(path)!r} does not exist; check the path") from None
    except IsADirectoryError:
        raise error(f"{what} {str(path)!r} is a directory; give a file") from None
    except OSError as exc:
        raise error(f"{what} {str(path)!r} cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    if len(data) > MAX_FILE_BYTES:
        raise error(f"{what} {str(path)!r} is larger than {MAX_FILE_BYTES >> 20} MiB; is it the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(f"{what} {str(path)!r} is not UTF-8 text (byte {exc.start}, line {line}); save it as "
                    "UTF-8") from None
    # A byte order mark at the start (Windows editors' "UTF-8 with BOM") is no text: Python's utf-8-sig codec drops
    # it, as DeepSpeed's hjson reader does and YAML does; a U+FEFF anywhere else stays, and the line checks name it.
    return text.removeprefix("\ufeff")


def _key_path(prefix: str, key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def check_plain(doc: Any, *, error: type[UserError], where: str) -> Any:
    """Walk parsed data (dicts, lists, scalars) and refuse non-finite numbers, numbers beyond MAX_ABS_NUMBER
    and nesting beyond MAX_DEPTH, naming the key. Shared subtrees (YAML anchors) are walked once, so an alias
    bomb costs linear time. Returns `doc` unchanged."""
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(doc, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        key = path or "the top level"
        if isinstance(value, _NonFinite):
            raise error(f"{where}: {key}: {value.token} is not a number; give a finite value")
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{where}: {key}: {value} is not a finite number; give a finite value")
        if isinstance(value, (int, float)):
            if abs(value) > MAX_ABS_NUMBER:
                shown = str(value) if len(str(value)) <= 24 else f"a {len(str(abs(value)))}-digit number"
                raise error(f"{where}: {key}: {shown} is out of range (magnitude at most {MAX_ABS_NUMBER:g})")
            continue
        if isinstance(value, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise error(f"{where}: {key}: nested more than {MAX_DEPTH} levels deep")
            if id(value) in seen:
                continue
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if isinstance(value, dict) and not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise error(f"{where}: {key}: keys must be plain strings, got {type(k).__name__}")
                stack.append((v, _key_path(path, k), depth + 1))
    return doc


def parse_json(text: str, *, error: type[UserError], where: str) -> Any:
    """JSON text -> plain data, refusing NaN/Infinity (by key) and the checks of `check_plain`."""
    def constant(token: str) -> _NonFinite:
        return _NonFinite(token)

    def number(token: str) -> float | _NonFinite:
        value = float(token)
        return value if math.isfinite(value) else _NonFinite(token)

    try:
        doc = json.loads(text, parse_constant=constant, parse_float=number, object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except DuplicateKeyError as exc:
        raise error(f"{where}: key {exc.args[0]!r} is given twice in one object; keep one") from None
    except (RecursionError, ValueError) as exc:  # ValueError: an integer literal of > 4300 digits
        what = "nested too deeply" if isinstance(exc, RecursionError) else "holds an absurdly long number"
        raise error(f"{where} is not usable JSON: {what}") from None
    return check_plain(doc, error=error, where=where)


def parse_yaml(text: str, *, error: type[UserError], where: str) -> Any:
    """YAML text -> plain data (safe loader), refusing .nan/.inf (by key) and the checks of `check_plain`."""
    try:
        doc = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{where} is not valid YAML{at}: {problem}") from None
    except (RecursionError, ValueError, OverflowError, TypeError) as exc:
        # The safe loader's constructors: a date such as 2024-02-30 (ValueError), nesting (RecursionError).
        detail = str(exc).splitlines()[0][:120] if str(exc).strip() else exc.__class__.__name__
        raise error(f"{where} is not usable YAML: {detail}") from None
    return check_plain(doc, error=error, where=where)


# ------------------------------------------------------------------------------------------ numbers in text
# Python's int() and float() take any Unicode decimal digit ('２' is 2, '٣' is 3), '_' between digits and
# surrounding whitespace. In a hostfile, profile or flag those are a paste from a word processor or a typo, not
# a number to guess at: numbers read from user text are written in ASCII only.
_ASCII_INT = re.compile(r"[0-9]+")
# A decimal number; in YAML 1.1 digits may be grouped with '_' (11_811_160_064), and PyYAML leaves `989e12` and
# `2.5e12` (exponent without a sign) as strings, which profile readers then convert.
_ASCII_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_ASCII_NUMBER_GROUPED = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?")
# Python refuses int() of more digits than 4300 (sys.int_info.default_max_str_digits); callers bound the value.
_MAX_DIGITS = 4000


def ascii_int(text: str) -> int | None:
    """`text` as a non-negative integer when it is only ASCII digits 0-9 (no sign, space or '_'), else None."""
    if len(text) > _MAX_DIGITS or _ASCII_INT.fullmatch(text) is None:
        return None
    return int(text)


def ascii_signed_int(text: str) -> int | None:
    """`text` as an integer when it is ASCII digits 0-9 with at most one leading sign, else None (ascii_int)."""
    sign, digits = (text[0], text[1:]) if text[:1] in ("-", "+") else ("", text)
    number = ascii_int(digits)
    return None if number is None else -number if sign == "-" else number


def ascii_number(text: str, *, yaml_grouping: bool = False) -> float | None:
    """`text` as a float when it is a decimal number in ASCII, else None; with `yaml_grouping` (text from a YAML
    file) digits may be grouped with '_' as YAML 1.1 allows."""
    pattern = _ASCII_NUMBER_GROUPED if yaml_grouping else _ASCII_NUMBER
    if len(text) > _MAX_DIGITS or pattern.fullmatch(text) is None:
        return None
    return float(text.replace("_", ""))


# ------------------------------------------------------------------------------------------- lines of text
# A line-oriented input (hostfile, env file, host filter, ssh option) is ASCII where it has structure: str.split()
# and str.strip() also take U+00A0 NO-BREAK SPACE, U+2003 EM SPACE or U+3000 IDEOGRAPHIC SPACE as a separator,
# and str.splitlines() ends a line at U+2028, U+0085 or a form feed, so a paste from a word processor split a
# line, or a comment into a line, where the text shows none.
_LINE_END = re.compile(r"\r\n|\r|\n")


def ascii_lines(text: str) -> list[str]:
    """`text` split at ASCII line ends only (\\n, \\r\\n, \\r); other characters stay in their line."""
    return _LINE_END.split(text)


def first_unprintable(text: str, *, allow: str = "") -> str | None:
    """The first character of `text` that is neither printable ASCII (space to '~') nor in `allow`, or None."""
    return next((c for c in text if not (" " <= c <= "~" or c in allow)), None)


def describe_char(c: str) -> str:
    """A character as a message shows it: escaped, with its code point and name ('\\xa0' (U+00A0 NO-BREAK
    SPACE)), so the reader sees what the text does not."""
    name = unicodedata.name(c, "")
    what = f" {name}" if name else ", a control character" if unicodedata.category(c) == "Cc" else ", unnamed"
    return f"{ascii(c)} (U+{ord(c):04X}{what})"


def shown(text: str) -> str:
    """`text` quoted for a message, non-ASCII characters escaped ('slots=\\uff12'), so the reader sees why a
    value that looks like a number is not one."""
    return ascii(text[:40] + ("..." if len(text) > 40 else ""))


# ------------------------------------------------------------------------------------------------ CLI flags
# Bounds on integer flags: far above any real job, low enough that nothing downstream (a divisor loop, a
# tuple of slots, an int -> float conversion) is asked to do the impossible.
MAX_RANKS = 1 << 20
# Ranks on one host: a node has 8-16 GPUs, a CPU host one rank per core and a few hundred cores. Hostfile slots,
# --nproc-per-node and a hardware profile's gpus_per_node share it, so a profile the hostfile can describe loads.
MAX_RANKS_PER_HOST = 4096
MAX_BATCH = 1 << 24  # samples per step
MAX_STEPS = 10**7
MAX_SEQ = 1 << 24  # tokens per sample


def text_flag(flag: str, value: str | None, *, what: str, required: bool = False) -> str | None:
    """`value` (None passes) unless it is empty or only whitespace. A flag that names a host, address, path or
    name is otherwise read as "not given" wherever a caller tests `if value:` (--master-addr "" fell back to
    the first host, --hostfile "" to this host alone), or as the current folder once it is a Path ("" is
    "."). One-line UserError naming the flag and `what` to give."""
    if value is not None and not str(value).strip():
        raise UserError(f"{flag} {value!r} is blank; give {what}" + ("" if required else ", or leave the flag out"))
    return value


def int_flag(flag: str, value: int | None, *, lo: int = 1, hi: int) -> int | None:
    """`value` if it lies in [lo, hi] (None passes), else a one-line UserError naming the flag."""
    if value is not None and not lo <= value <= hi:
        shown = str(value) if len(str(value)) <= 24 else f"a {len(str(abs(value)))}-digit number"
        raise UserError(f"{flag} must be between {lo} and {hi}, got {shown}")
    return value


def seconds_flag(flag: str, value: float | None, *, allow_zero: bool = False) -> float | None:
    """A duration flag: finite and > 0 (>= 0 with allow_zero); None passes."""
    if value is None:
        return None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero) or value > MAX_ABS_NUMBER:
        bound = ">= 0" if allow_zero else "> 0"
        raise UserError(f"{flag} must be a finite number of seconds {bound}, got {value}")
    return value
