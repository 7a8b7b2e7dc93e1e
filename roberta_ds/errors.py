"""Errors a user can act on. The CLI prints their message and exits non-zero, without a traceback.

Every message names the file, field or flag at fault and, where there is one, the fix.
Checks raise these instead of using `assert` so they hold under `python -O`.
"""


class UserError(Exception):
    """Bad input, bad configuration or a bad file: the message says which and how to fix it."""


class ConfigError(UserError):
    """An invalid configuration value; the message names the field or flag."""


class ShardFormatError(UserError):
    """A shard file (.bin/.idx) or manifest that does not satisfy the format spec in shards.py (manifest: shard_set.py)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt or does not match the run."""
