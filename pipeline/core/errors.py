"""Errors a user can fix. The CLI prints them as one line, with no traceback, and exits 2."""


class UserError(Exception):
    """Bad input: the message names the value, what was expected, and the fix."""


class ConfigError(UserError):
    """A config key, type or value that does not fit the schema."""
