"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""
from __future__ import annotations


class ArboothError(Exception):
    """Base class: a problem with the user's input (a path, a config value, a checkpoint, an image)."""


class ConfigError(ArboothError, ValueError):
    """A config file or override is invalid: unknown key, wrong type, value out of range."""


class CheckpointError(ArboothError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model it is loaded into."""


class ImageReadError(ArboothError, OSError):
    """An image file cannot be read (corrupt, truncated, not an image, too large)."""


class OutputError(ArboothError, OSError):
    """An output cannot be written: its location is not a writable folder, the disk is full, or it
    would overwrite one of the command's own inputs or another output of the same run."""
