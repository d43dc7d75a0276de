"""Argument checks shared by the layers: clear errors before PyTorch's cryptic ones."""

from __future__ import annotations

import numbers
from typing import Any

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PADDING_STRINGS = ("same", "valid")


def positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; TypeError for non-integers (bools included), ValueError below. Integers
    of other types (NumPy's, as ``nn.Conv2d`` takes them) come back as Python ints."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def int_tuple(name: str, value: Any, ndim: int, *, minimum: int = 1) -> tuple[int, ...]:
    """An int or an ``ndim``-tuple of ints, each >= ``minimum``, as a tuple."""
    if isinstance(value, (list, tuple)):
        if len(value) != ndim:
            raise ValueError(
                f"{name} must be an int or a tuple of {ndim} ints, got {len(value)} values: {tuple(value)!r}"
            )
        return tuple(positive_int(name, v, minimum=minimum) for v in value)
    return (positive_int(name, value, minimum=minimum),) * ndim


def padding_arg(value: Any, ndim: int) -> tuple[int, ...] | str:
    """``padding``: 'same', 'valid', an int >= 0 or an ``ndim``-tuple of ints >= 0."""
    if isinstance(value, str):
        if value not in PADDING_STRINGS:
            raise ValueError(f"padding must be an int, a tuple of {ndim} ints, 'same' or 'valid'; got {value!r}")
        return value
    return int_tuple("padding", value, ndim, minimum=0)


def padding_mode_arg(value: Any) -> str:
    if value not in PADDING_MODES:
        allowed = ", ".join(repr(m) for m in PADDING_MODES)
        raise ValueError(f"padding_mode must be one of {allowed}; got {value!r}")
    return value


def divisible(name: str, value: int, groups: int) -> None:
    if value % groups:
        raise ValueError(f"{name} ({value}) must be divisible by groups ({groups})")
