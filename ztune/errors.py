"""User-facing error types. The CLI turns every `UserError` into one line on stderr and exit code 2."""


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
