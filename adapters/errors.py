"""User-facing errors.

Everything a user can get wrong (a path, a key, a field of a config) raises a subclass of `UserError`
with a one-line message naming the field or file. Entry points catch `UserError`, print the message
and exit with status 2, without a traceback.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class ConfigError(UserError, ValueError):
    """A configuration field has an invalid value."""


class FeatureFileError(UserError, ValueError):
    """A feature file is missing, malformed, or does not fit the requested use."""
