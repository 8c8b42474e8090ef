"""Exception types shared by the core and its plugins.

Each carries the process exit code the CLIs use, so that every command maps a
failure to "1: the operation failed" or "2: bad usage or bad config" the same way.
"""

from __future__ import annotations


class StellarError(Exception):
    """An operation failed; the message is meant for the user as it is."""

    exit_code = 1


class UsageError(StellarError):
    """The command line or its arguments were wrong."""

    exit_code = 2


class ConfigError(UsageError):
    """The host config is unusable; the message names file, key and reason."""

    def __init__(self, reason: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.reason = file, key, reason
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {reason}" if where else reason)


class PluginError(UsageError):
    """A plugin is missing, failed to import, or breaks its contract."""
