"""Type checks for DeepSpeed config values, by the kinds of deepspeed_keys.py (BOOL, INT, ...).

Two readings:
- strict, for values ztune reads (a neutral key's value is compared with its no-effect value): the JSON type
  itself (an integral float counts as an integer), as ztune reads every key it honours, so "false" or 1 never
  passes for a boolean by a guess;
- lax, for values ztune ignores: what DeepSpeed's pydantic models (runtime/config_utils.py DeepSpeedConfigModel,
  pydantic's default lax mode) accept, so a config DeepSpeed runs loads here too, and one it refuses ("garbage"
  for a boolean) is refused here, naming the key. Lax adds pydantic's documented coercions: a boolean from
  0 / 1 or the strings true/false, yes/no, on/off, t/f, y/n, 1/0 (any case); a number from a numeric string
  ("8", " 8 ", "8.0" for an integer; "1e3" for a float, but no "nan" or "inf"); an integer from a boolean.
tests/unit/test_deepspeed_kinds.py compares the lax reading with pydantic itself where pydantic is installed.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ztune.config.deepspeed_keys import BOOL, COUNT, DTYPE, FRACTION, INT, LIST, MAPPING, NUMBER, STRING, STRINGS
from ztune.config.validate import _convert
from ztune.errors import ConfigError, describe

_BOOL_WORDS = {"0": False, "off": False, "f": False, "false": False, "n": False, "no": False,
               "1": True, "on": True, "t": True, "true": True, "y": True, "yes": True}
_INT_TEXT = re.compile(r"\s*[+-]?[0-9]+(\.0*)?\s*")  # pydantic's str -> int: no exponent, a zero fraction only
DTYPES = ("fp16", "bf16", "fp32")  # runtime/config.py get_communication_data_type, any case


def _lax_bool(value: Any, key: str) -> bool:
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.lower()]
    return _convert(bool, value, key)  # the strict reading's error (or a bool)


def _lax_number(value: Any, key: str, *, integer: bool) -> float:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        try:
            number = float(value) if not integer or _INT_TEXT.fullmatch(value) else math.nan
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
    return _convert(int if integer else float, value, key)


def check_kind(kind: str, value: Any, key: str, *, lax: bool = False, choices: tuple[str, ...] = ()) -> None:
    """ConfigError naming `key` (as the user wrote it) unless `value` is of DeepSpeed's kind `kind`
    (deepspeed_keys.KINDS). `lax`: read as DeepSpeed's pydantic models read it (module docstring). `choices`
    (a string kind): the values DeepSpeed takes, compared after upper-casing, as DeepSpeed compares them."""
    base, _, null = kind.partition(" or ")
    if value is None and null:
        return
    try:
        _check_base(base, value, key, lax=lax, choices=choices)
    except ConfigError as exc:
        if not null:
            raise
        text = str(exc)  # the kind allows null too: say so ("expected a string or null, got 5")
        if ": expected true or false, got " in text:
            text = text.replace(": expected true or false, got ", ": expected true, false or null, got ", 1)
        elif ": expected " in text:
            text = text.replace(", got ", " or null, got ", 1)
        else:  # "got 'rust'; allowed: MOCK, PYTHON, FAST (any case, as in DeepSpeed)"
            text = f"{text}, or null"
        raise ConfigError(text) from None


def _check_base(base: str, value: Any, key: str, *, lax: bool, choices: tuple[str, ...]) -> None:
    """check_kind for a kind without its "or null"."""
    if base == BOOL:
        _lax_bool(value, key) if lax else _convert(bool, value, key)
    elif base in (INT, COUNT):
        number = _lax_number(value, key, integer=True) if lax else _convert(int, value, key)
        if number < 0 and base == COUNT:
            raise ConfigError(f"{key}: got {describe(value)}; must be >= 0")
    elif base in (NUMBER, FRACTION):
        number = _lax_number(value, key, integer=False) if lax else _convert(float, value, key)
        if base == FRACTION and not 0.0 <= number <= 1.0:
            raise ConfigError(f"{key}: got {describe(value)}; must be in [0, 1]")
    elif base == STRING:
        _convert(str, value, key)
        if choices and value.upper() not in choices:
            raise ConfigError(f"{key}: got {describe(value)}; allowed: {', '.join(choices)} (any case, as in "
                              "DeepSpeed)")
    elif base == LIST:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {describe(value)}")
    elif base == STRINGS:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
            raise ConfigError(f"{key}: expected a list of strings (or one string), got {describe(value)}")
    elif base == MAPPING:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {describe(value)}")
    elif base == DTYPE:
        if not isinstance(value, str) or value.lower() not in DTYPES:
            raise ConfigError(f"{key}: got {describe(value)}; allowed: {', '.join(DTYPES)} (as in DeepSpeed)")
    else:  # a kind this function does not know: a bug in the table, not in the config
        raise ConfigError(f"{key}: unknown kind {base!r} in ztune's key table")  # pragma: no cover
