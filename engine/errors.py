"""Exceptions raised at Lumen's API boundaries.

Errors about values subclass ValueError and errors about types subclass TypeError, so callers
can catch either the Python builtin or the Lumen-specific class.
"""


class LumenError(Exception):
    """Base class of every error Lumen raises on purpose."""


class InvalidInputError(LumenError, ValueError):
    """A value passed to Lumen is out of range, of the wrong shape, or not finite."""


class InvalidTypeError(LumenError, TypeError):
    """A value passed to Lumen has the wrong type."""


class BackendUnavailableError(LumenError, RuntimeError):
    """The requested inference backend cannot run here; the message names the fallback."""


class NonFiniteOutputError(LumenError, FloatingPointError):
    """A run produced NaN or inf; the message names the stage (final latents or decoded image),
    the dtype it ran in, and what to try instead."""
