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
