"""Errors the library raises for bad input or bad state.

Contract: every failure a user can cause (a missing file, an unknown family, a corrupt image, a
budget too small) is an `EdgeMoEError` whose message is one line that says what is wrong and, where
it helps, what to do. The CLI turns these into a message and an exit code in one place; anything
else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgeMoEError(Exception):
    """Base class: a one-line, user-facing message."""

    exit_code = 2


class ConfigError(EdgeMoEError):
    """config.json is missing, malformed, or names an unsupported family or tower."""


class CheckpointError(EdgeMoEError):
    """A checkpoint's weights are missing, mis-shaped, or unreadable."""


class TokenizerError(EdgeMoEError):
    """Tokenizer files are missing or malformed."""


class ImageError(EdgeMoEError):
    """An input image cannot be read (not an image, truncated, too large)."""
