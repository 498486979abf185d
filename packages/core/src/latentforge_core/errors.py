"""One error hierarchy: everything latentforge raises on purpose is a :class:`LatentforgeError`.

The CLI catches this one base and prints the message (and its cause's first line) without a
traceback.  Each class also derives from the builtin a caller would expect (``ValueError`` for a bad
value, ``TypeError`` for a wrong type, …), so ``except ValueError`` keeps working.  A message names
what was wrong (the key, file or argument) and what was expected.
"""

from __future__ import annotations


class LatentforgeError(Exception):
    """Base of every error latentforge raises on purpose."""


class InputError(LatentforgeError, ValueError):
    """A value out of range or of the wrong form: an argument, a tensor's shape, a setting."""


class InputTypeError(LatentforgeError, TypeError):
    """An argument of the wrong type."""


class StateError(LatentforgeError, RuntimeError):
    """A call made before what it needs exists (no centroids fitted, no statistics set, …)."""


class MissingFileError(LatentforgeError, FileNotFoundError):
    """A file or folder the user named that does not exist."""


class NumericalError(LatentforgeError, FloatingPointError):
    """A loss or tensor that became NaN or infinite."""


class RunInterrupted(LatentforgeError):
    """A run stopped by SIGINT/SIGTERM after writing a checkpoint; rerunning the command resumes it.
    ``exit_code`` is what the CLI exits with (130 for SIGINT, 143 for SIGTERM, as a shell reports)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(err: BaseException) -> str:
    """``Type: message`` of an error, its message cut at the first line."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
