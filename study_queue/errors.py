"""Errors of the composition root, each printed by the CLI as one line."""


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


class ConfigError(UsageError):
    """A bad setting: the message names the key and the rule it breaks."""
