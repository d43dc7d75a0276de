"""Launch-size arithmetic on the host, in plain Python: since Triton 3.4 ``triton.cdiv`` and
``triton.next_power_of_2`` are constexpr functions, whose call wrapper costs the host ~1 us per call (a MobileNetV2
training block makes about 28 such calls per step); these compute the same values.

>>> cdiv(10, 4), next_power_of_2(10)
(3, 16)
"""

from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2"]


def cdiv(x: int, y: int) -> int:
    """``triton.cdiv``: ``x / y`` rounded up (``y`` > 0).

    >>> cdiv(8, 4), cdiv(9, 4), cdiv(0, 4)
    (2, 3, 0)
    """
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2``: the smallest power of 2 at least ``n`` (0 for 0).

    >>> [next_power_of_2(n) for n in (0, 1, 2, 3, 64, 65)]
    [0, 1, 2, 4, 64, 128]
    """
    return 1 << (n - 1).bit_length() if n > 0 else 0
