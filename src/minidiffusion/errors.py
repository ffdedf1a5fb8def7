"""User-facing errors: one clear sentence naming the problem and the fix.

Anything raised as a `MinidiffusionError` is printed by the CLI as a single line
(no traceback) and turns into exit status 2.
"""

from __future__ import annotations

__all__ = ["MinidiffusionError", "DataError", "ConfigError", "CheckpointError", "TrainingError"]


class MinidiffusionError(Exception):
    """Base class for errors whose message is meant for the user as-is."""


class DataError(MinidiffusionError):
    """Data files are missing, truncated, corrupt or inconsistent."""


class ConfigError(MinidiffusionError):
    """A configuration value or key is invalid."""


class CheckpointError(MinidiffusionError):
    """A checkpoint is missing, unsafe (pickle) or does not match the model."""


class TrainingError(MinidiffusionError):
    """Training cannot go on (for example the loss became NaN)."""
