"""User-facing error types. The CLI turns every `UserError` into one line on stderr and exit code 2.

Also how their messages show what the user wrote: `describe` a value (a setting's), `shown_json` a value read from
JSON as JSON spells it, `shown_key` a key name, `kind_of` a whole document (whose text would be too long to show).
"""

import json
from typing import Any

# The most characters of a value a message shows: a 10 kB string in a config stays one readable line.
_SHOWN_CHARS = 60


class UserError(ValueError):
    """Bad input from the user (config, profile, hostfile, flag): the message says what and how to fix it.

    The message is kept to one line: control characters from user input (a key like "a\\nb") are escaped.
    """

    def __init__(self, message: str) -> None:
        text = str(message)
        if not text.isprintable():
            text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
        super().__init__(text)


class ConfigError(UserError):
    """A training config that cannot be loaded or honoured."""


class ProfileError(UserError):
    """A model or hardware profile that cannot be found or parsed."""


class EnvVarError(ConfigError):
    """A ZTUNE_* environment variable with a value of the wrong form (ztune/envvars.py)."""


def _cut(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 3] + "..."


def describe(value: Any) -> str:
    """`value` as a message shows it: its repr, cut to _SHOWN_CHARS characters with "..." where longer."""
    return _cut(repr(value))


def shown_json(value: Any) -> str:
    """A value read from a JSON file (a config.json, a journal line) as the file spells it (true, null, "4"),
    non-ASCII escaped, cut to _SHOWN_CHARS characters with "..." where longer."""
    return _cut(json.dumps(value, ensure_ascii=True, default=str))


def shown_key(key: Any) -> str:
    """A key as the user wrote it, for a message: control characters escaped (a message stays one line), cut to
    _SHOWN_CHARS characters with "..." where longer (a 10 kB key is not a 10 kB line)."""
    return _cut(repr(str(key))[1:-1])


def kind_of(value: Any) -> str:
    """What kind of value a parsed document is ("a list", "a string", ...), for a document that should have been
    a mapping: its kind, not its text, which may be a whole file."""
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
             type(None): "null"}
    return next((name for tp, name in kinds.items() if isinstance(value, tp)), type(value).__name__)
