"""Convolution geometry: output sizes and 'same' padding (TensorFlow semantics).

Every function works per spatial dimension on plain ints, so the cost model and the
layers share one definition of the arithmetic.

>>> conv_output_size(50, kernel_size=3)
48
>>> same_padding(56, kernel_size=3, stride=2)  # ceil(56 / 2) = 28 outputs; the odd pad goes last
(0, 1)
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["conv_output_size", "resolve_padding", "same_padding"]

Padding = int | tuple[int, ...] | str


def conv_output_size(
    size: int,
    kernel_size: int,
    stride: int = 1,
    padding: tuple[int, int] | int = 0,
    dilation: int = 1,
) -> int:
    """Output length of a convolution along one dimension.

    ``floor((size + pad_lo + pad_hi - dilation·(kernel_size - 1) - 1) / stride) + 1``

    >>> conv_output_size(56, kernel_size=3, stride=2, padding=1)
    28
    >>> conv_output_size(32, kernel_size=4, padding=(1, 2))
    32
    """
    lo, hi = (padding, padding) if isinstance(padding, int) else padding
    return (size + lo + hi - dilation * (kernel_size - 1) - 1) // stride + 1


def same_padding(size: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """``(pad_lo, pad_hi)`` giving ``ceil(size / stride)`` outputs, the odd pixel at the end (as TF does).

    For ``stride=1`` this equals PyTorch's ``padding='same'``.

    >>> same_padding(32, kernel_size=4)
    (1, 2)
    >>> same_padding(7, kernel_size=5, stride=2, dilation=2)
    (4, 4)
    """
    effective_kernel = dilation * (kernel_size - 1) + 1
    out = -(-size // stride)  # ceil without floats, so symbolic sizes (torch.compile) stay ints
    total = max((out - 1) * stride + effective_kernel - size, 0)
    return total // 2, total - total // 2


def resolve_padding(
    padding: Padding,
    spatial_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> list[tuple[int, int]]:
    """Explicit ``(lo, hi)`` padding per spatial dimension for a conv's ``padding`` argument.

    >>> resolve_padding("same", (56, 56), (3, 3), (2, 2), (1, 1))
    [(0, 1), (0, 1)]
    >>> resolve_padding((1, 2), (8, 8), (3, 5), (1, 1), (1, 1))
    [(1, 1), (2, 2)]
    """
    ndim = len(spatial_size)
    if padding == "valid":
        return [(0, 0)] * ndim
    if padding == "same":
        return [
            same_padding(n, k, s, d) for n, k, s, d in zip(spatial_size, kernel_size, stride, dilation, strict=True)
        ]
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid'; got {padding!r}")
    pads = (padding,) * ndim if isinstance(padding, int) else tuple(padding)
    return [(p, p) for p in pads]
