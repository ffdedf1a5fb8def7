"""User-facing errors: one clear sentence naming the problem and the fix.

Anything raised as a `MinidiffusionError` is printed by the CLI as a single line
(`minidiffusion: error: ...`, no traceback) and turns into exit status 2. Library functions
raise the same classes with the same sentences, so scripts and the web page see what the
command line shows. `ConfigError` is also a `ValueError`: a bad value is a bad value.
"""

from __future__ import annotations

__all__ = ["MinidiffusionError", "DataError", "ConfigError", "CheckpointError", "TrainingError", "OutputError"]


class MinidiffusionError(Exception):
    """Base class for errors whose message is meant for the user as-is."""


class DataError(MinidiffusionError):
    """Data files are missing, truncated, corrupt or inconsistent."""


class ConfigError(MinidiffusionError, ValueError):
    """A configuration value, option or key is invalid (its sentence names it and the allowed range)."""


class CheckpointError(MinidiffusionError):
    """Weights or a checkpoint are missing, damaged, unsafe (pickle) or do not match their config."""


class TrainingError(MinidiffusionError):
    """Training cannot go on (for example the loss became NaN)."""


class OutputError(MinidiffusionError):
    """An output file cannot be written (a folder in the way, no permission, disk full)."""
