"""One error hierarchy: everything latentforge raises on purpose is a :class:`LatentforgeError`.

The CLI catches this one base and prints the message (and its cause's first line) without a
traceback.  Each class also derives from the builtin a caller would expect (``ValueError`` for a bad
value, ``TypeError`` for a wrong type, …), so ``except ValueError`` keeps working.  A message names
what was wrong (the key, file or argument) and what was expected.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from collections.abc import Iterable, Iterator


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


class UnsupportedError(LatentforgeError, NotImplementedError):
    """An operation this component does not offer (K-Means tokens have no pixel decoder, …)."""


class MissingDependencyError(LatentforgeError, ImportError):
    """An optional package that a chosen option needs is not installed; the message says what to install."""


class RunInterrupted(LatentforgeError):
    """A run stopped by a signal or its time budget after writing a checkpoint; rerunning the command
    resumes it.  ``exit_code`` is what the CLI exits with: 130 for SIGINT, 143 for SIGTERM (as a shell
    reports), 75 (EX_TEMPFAIL: requeue) for SIGUSR1 or a spent ``training.max_minutes``."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


# ------------------------------------------------------------------------------------------------
# The value-reading input checks (NaN/inf, label and token ranges, pixel ranges) look at a tensor's
# contents: on a GPU each is a host sync, and under fake tensors (``FakeTensorMode``), the meta
# device or ``torch.compile`` tracing there are no contents to read.  They all ask
# :func:`checking_values` first; :func:`value_checks` turns them off for a block.  Shape, dtype and
# argument checks never read values and stay on.
# ------------------------------------------------------------------------------------------------
_CHECK_VALUES: contextvars.ContextVar[bool] = contextvars.ContextVar("latentforge_check_values", default=True)


def checking_values() -> bool:
    """Whether the checks that read tensor values (isfinite, min/max ranges, ``.item()``) run here:
    True unless inside ``value_checks(False)`` (in this thread / async context)."""
    return _CHECK_VALUES.get()


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the value-reading input checks on or off inside a ``with`` block (per thread and async
    context; nestable; restored on exit).  ``with value_checks(False):`` lets a model run on fake or
    meta tensors, or under tracing, without reading data; shape and dtype checks still run."""
    if not isinstance(enabled, bool):
        raise InputTypeError(f"value_checks: enabled must be true or false, got {_show(enabled)}")
    token = _CHECK_VALUES.set(enabled)
    try:
        yield
    finally:
        _CHECK_VALUES.reset(token)


def first_line(err: BaseException) -> str:
    """``Type: message`` of an error, its message cut at the first line."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# ------------------------------------------------------------------------------------------------
# Argument checks: one spelling for "an integer ≥ 1", "a number in [0, 1)", "divisible by", so a
# constructor given ``input_size="32"`` says so instead of failing deep inside with a torch error
# ------------------------------------------------------------------------------------------------
def _show(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def check_int(value: object, name: str, *, minimum: int | None = 1, owner: str | None = None) -> int:
    """``value`` as an int (not a bool, not a string) that is ≥ ``minimum``; else InputTypeError or
    InputError naming ``name`` (and ``owner``, the class or function it is an argument of)."""
    floor = f" ≥ {minimum}" if minimum is not None else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{_prefix(owner)}{name} must be an integer{floor}, got {_show(value)}")
    if minimum is not None and value < minimum:
        raise InputError(f"{_prefix(owner)}{name} must be an integer{floor}, got {value!r}")
    return int(value)


def check_ints(owner: str | None, *, minimum: int | None = 1, **values: object) -> None:
    """:func:`check_int` on every keyword: ``check_ints("DiT", depth=depth, num_heads=num_heads)``."""
    for name, value in values.items():
        check_int(value, name, minimum=minimum, owner=owner)


def check_number(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    owner: str | None = None,
) -> float:
    """``value`` as a float (an int or a float, not a bool or a string) within ``[low, high]``, an end
    excluded when its ``*_open`` flag is set; NaN is refused."""
    lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
    hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
    if low is not None and high is not None:
        expected = f"a number in {lo}, {hi}"
    elif low is not None:
        expected = f"a number {'>' if low_open else '≥'} {low:g}"
    elif high is not None:
        expected = f"a number {'<' if high_open else '≤'} {high:g}"
    else:
        expected = "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{_prefix(owner)}{name} must be {expected}, got {_show(value)}")
    v = float(value)
    bad = (
        v != v
        or (low is not None and (v <= low if low_open else v < low))
        or (high is not None and (v >= high if high_open else v > high))
    )
    if bad:
        raise InputError(f"{_prefix(owner)}{name} must be {expected}, got {value!r}")
    return v


def check_choice(value: object, name: str, choices: Iterable[object], *, owner: str | None = None) -> object:
    """``value`` is one of ``choices`` (compared with ``==``)."""
    options = list(choices)
    if value not in options:
        raise InputError(
            f"{_prefix(owner)}{name} must be one of {', '.join(map(repr, options))}, got {value!r}"
        )
    return value


def check_divisible(
    value: int, name: str, divisor: int, divisor_name: str, *, owner: str | None = None
) -> None:
    """``value`` is a multiple of ``divisor`` (both already checked as positive ints)."""
    if value % divisor:
        raise InputError(
            f"{_prefix(owner)}{name} {value} must be divisible by {divisor_name} {divisor} "
            f"(e.g. {max(1, value // divisor) * divisor})"
        )


def check_bool(value: object, name: str, *, owner: str | None = None) -> bool:
    """``value`` is True or False (not a string such as ``"false"``, which would be true)."""
    if not isinstance(value, bool):
        raise InputTypeError(f"{_prefix(owner)}{name} must be true or false, got {_show(value)}")
    return value


def check_int_sequence(
    value: object, name: str, *, minimum: int | None = 1, owner: str | None = None, empty: bool = False
) -> tuple[int, ...]:
    """A list or tuple of ints, each ≥ ``minimum`` (non-empty unless ``empty``)."""
    if not isinstance(value, (list, tuple)) or (not value and not empty):
        what = "a list" if empty else "a non-empty list"
        raise InputTypeError(f"{_prefix(owner)}{name} must be {what} of integers, got {_show(value)}")
    return tuple(check_int(v, f"{name}[{i}]", minimum=minimum, owner=owner) for i, v in enumerate(value))
