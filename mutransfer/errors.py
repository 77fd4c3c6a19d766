"""The errors a user sees as one line and exit code 2 (`UserError`): a bad config value, unusable data, bad
command-line use.

A leaf module: every package may import it, it imports nothing of ours.
"""

from __future__ import annotations


class UserError(Exception):
    """Input a user can fix (a config value, data, a command-line argument): `mutransfer.cli` prints it as one
    line and exits 2. Every other exception is a bug or an outage and keeps its traceback."""


class ConfigError(UserError, ValueError):
    """A config problem, with the dotted key it is about (`optim.lr`, `data.batch_size`, `study.steps`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message

    def within(self, prefix: str) -> ConfigError:
        """The same problem, keyed from the enclosing section (`batch_size` in `data` -> `data.batch_size`)."""
        key = f"{prefix}.{self.key}" if prefix and self.key else prefix or self.key
        return ConfigError(key, self.message)


class DataError(UserError, ValueError):
    """Shards, or their index, cannot give a run what it needs. The message names the folder, file or shard;
    the command line prints it as one line and exits 2."""


class UsageError(UserError, ValueError):
    """Bad input on the command line or to a command's function (a ValueError, so that library callers that
    catch those keep working): printed as one line, exit code 2."""
