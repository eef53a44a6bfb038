"""User-facing error types. The CLI turns every `UserError` into one line on stderr and exit code 2."""


class UserError(ValueError):
    """Bad input from the user (config, profile, hostfile, flag): the message says what and how to fix it."""


class ConfigError(UserError):
    """A training config that cannot be loaded or honoured."""


class ProfileError(UserError):
    """A model or hardware profile that cannot be found or parsed."""
