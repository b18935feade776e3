"""The errors the package raises on purpose, and what each means for the user (a leaf: it
imports nothing). ``tools/exit_codes.py`` maps them to exit codes."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot be run; the message names the field and how to fix it. Exit code 2."""


class InputError(ConfigError):
    """A file the run reads or writes (data, activation cache, checkpoint, export, the disk) is
    missing, damaged or does not match the config; the message names the path and what to do.
    Like a ``ConfigError`` it ends the run with exit code 2 and no traceback."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and the cause.
    Exit code 3."""


class HubError(RuntimeError):
    """A Hub operation could not be done; the message says what to do."""
