"""Faster CPU backward for depthwise convolutions: weight gradient by FFT, input gradient by a forward conv.

PyTorch's CPU depthwise convolution computes its forward quickly (oneDNN, near the FMA peak in
channels_last) but its weight gradient slowly for large kernels: 15x15 on (32, 128, 28, 28) takes
~60x the forward, 31x31 ~60x. The weight gradient is a per-channel cross-correlation of the input with
the output gradient, summed over the batch; in the frequency domain it costs two real FFTs per image
and channel, whatever the kernel size. The input gradient of a stride-1 depthwise conv is itself a
depthwise conv (of the output gradient with the flipped kernel), which runs on PyTorch's fast forward.

:func:`depthwise_conv` is ``F.convNd(..., groups=C)`` whose backward uses the algorithms it is given;
the CPU strategy (:mod:`sepconv.cpu_strategy`) times them against PyTorch's per configuration and
picks the faster. Results equal PyTorch's up to float rounding; double backward works (the backward
is made of differentiable ops).

>>> import torch
>>> x = torch.rand(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
>>> w = torch.rand(6, 1, 9, 9, dtype=torch.float64, requires_grad=True)  # depth multiplier 2
>>> y = depthwise_conv(x, w, padding=4, grad_input="conv", grad_weight="fft")
>>> gx, gw = torch.autograd.grad(y.square().sum(), [x, w])
>>> rx, rw = torch.autograd.grad(torch.nn.functional.conv2d(x, w, padding=4, groups=3).square().sum(), [x, w])
>>> bool(torch.allclose(gx, rx) and torch.allclose(gw, rw))
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GRAD_INPUT_ALGORITHMS",
    "GRAD_WEIGHT_ALGORITHMS",
    "depthwise_conv",
    "fast_fft_size",
    "fft_grad_weight",
    "flipped_conv_applies",
    "flipped_grad_input",
]

GRAD_INPUT_ALGORITHMS = ("torch", "conv")
GRAD_WEIGHT_ALGORITHMS = ("torch", "fft")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def depthwise_conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    *,
    grad_input: str = "torch",
    grad_weight: str = "torch",
) -> Tensor:
    """``F.convNd(input, weight, bias, stride, padding, dilation, groups=C)`` with the chosen backward.

    ``grad_input``: ``"torch"`` or ``"conv"`` (a forward conv with the flipped kernel; stride 1 and
    ``padding <= dilation·(kernel - 1)`` only). ``grad_weight``: ``"torch"`` or ``"fft"``.
    ``weight`` is ``(C·m, 1, *kernel)``; ``padding`` is symmetric (pad the input first otherwise).
    """
    n = input.dim() - 2
    if n not in _CONV or weight.dim() != n + 2 or weight.shape[1] != 1 or weight.shape[0] % input.shape[1]:
        raise ValueError(
            f"depthwise_conv expects input (N, C, *spatial) with 1-3 spatial dims and weight (C·m, 1, *kernel);"
            f" got input {tuple(input.shape)} and weight {tuple(weight.shape)}"
        )
    if grad_input not in GRAD_INPUT_ALGORITHMS:
        raise ValueError(f"grad_input must be one of {GRAD_INPUT_ALGORITHMS}; got {grad_input!r}")
    if grad_weight not in GRAD_WEIGHT_ALGORITHMS:
        raise ValueError(f"grad_weight must be one of {GRAD_WEIGHT_ALGORITHMS}; got {grad_weight!r}")
    stride, padding, dilation = (
        _tuple(name, v, n) for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation))
    )
    if grad_input == "conv" and not flipped_conv_applies(weight.shape[2:], stride, padding, dilation):
        raise ValueError(
            "grad_input='conv' needs stride 1 and padding <= dilation·(kernel_size - 1) in every dimension"
        )
    if grad_input == grad_weight == "torch":
        return _CONV[n](input, weight, bias, stride, padding, dilation, input.shape[1])
    return _DepthwiseConv.apply(input, weight, bias, stride, padding, dilation, grad_input, grad_weight)


def flipped_conv_applies(
    kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> bool:
    """Whether :func:`flipped_grad_input` can compute this configuration's input gradient."""
    return all(s == 1 and p <= d * (k - 1) for k, s, p, d in zip(kernel_size, stride, padding, dilation, strict=True))


def flipped_grad_input(
    grad_output: Tensor, weight: Tensor, channels: int, padding: Sequence[int], dilation: Sequence[int]
) -> Tensor:
    """Input gradient of a stride-1 depthwise conv: the output gradient convolved with the flipped kernel.

    >>> import torch
    >>> x, w = torch.rand(1, 2, 8, 8, dtype=torch.float64), torch.rand(2, 1, 3, 3, dtype=torch.float64)
    >>> gy = torch.rand(1, 2, 8, 8, dtype=torch.float64)
    >>> gx = torch.ops.aten.convolution_backward(gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 2,
    ...                                          [True, False, False])[0]
    >>> bool(torch.allclose(flipped_grad_input(gy, w, 2, (1, 1), (1, 1)), gx))
    True
    """
    n = grad_output.dim() - 2
    kernel = weight.shape[2:]
    flipped = weight.reshape(channels, -1, *kernel).flip(tuple(range(2, 2 + n)))  # (C, m, *k): groups of m -> 1
    pads = [d * (k - 1) - p for k, p, d in zip(kernel, padding, dilation, strict=True)]
    return _CONV[n](grad_output, flipped, None, 1, pads, tuple(dilation), channels)


def fft_grad_weight(
    input: Tensor,
    grad_output: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    *,
    padding_end: Sequence[int] | None = None,
) -> Tensor:
    """Weight gradient ``(C·m, 1, *kernel)`` of a depthwise conv, as cross-correlations in the frequency domain.

    ``padding`` pads each spatial dimension's start and, unless ``padding_end`` is given, its end. Any
    device (cuFFT on CUDA); compute in float32 or float64.

    ``gw[c·m+j, a] = Σ_{n,i} grad_output[n, c·m+j, i] · input[n, c, i·stride + a·dilation - padding]``:
    with the output gradient spread onto the stride-1 grid and both signals zero-extended to an FFT size
    ``F >= size + max(padding, padding_end)`` per dimension, the circular correlation equals the linear one at
    every lag the kernel needs, so nothing wraps around.

    >>> import torch
    >>> x, gy = torch.rand(2, 3, 10, dtype=torch.float64), torch.rand(2, 3, 10, dtype=torch.float64)
    >>> w = torch.zeros(3, 1, 5, dtype=torch.float64)
    >>> ref = torch.ops.aten.convolution_backward(gy, x, w, None, [1], [2], [1], False, [0], 3,
    ...                                           [False, True, False])[1]
    >>> bool(torch.allclose(fft_grad_weight(x, gy, (5,), (1,), (2,), (1,)), ref))
    True
    """
    n = input.dim() - 2
    batch, channels = input.shape[:2]
    out_channels = grad_output.shape[1]
    spatial = tuple(range(2, 2 + n))
    spread = [(o - 1) * s + 1 for o, s in zip(grad_output.shape[2:], stride, strict=True)]  # on the stride-1 grid
    ends = padding if padding_end is None else padding_end
    sizes = [
        fast_fft_size(max(size + max(p, e), (k - 1) * d + 1, g))
        for size, k, p, e, d, g in zip(input.shape[2:], kernel_size, padding, ends, dilation, spread, strict=True)
    ]
    x_hat = torch.fft.rfftn(_zero_extended(input, sizes, (1,) * n), dim=spatial)
    g_hat = torch.fft.rfftn(_zero_extended(grad_output, sizes, stride), dim=spatial)
    g_hat = g_hat.reshape(batch, channels, out_channels // channels, *g_hat.shape[2:])
    letters = "xyz"[:n]
    spectrum = torch.einsum(f"nc{letters},ncm{letters}->cm{letters}", x_hat, g_hat.conj())  # summed over the batch
    lags = torch.fft.irfftn(spectrum, s=sizes, dim=spatial)  # (C, m, *sizes): lags[t] = Σ g[u]·x[u + t]
    for dim, (k, p, d, size) in enumerate(zip(kernel_size, padding, dilation, sizes, strict=True), start=2):
        wanted = torch.arange(k, device=lags.device) * d - p
        lags = lags.index_select(dim, wanted.remainder(size))
    return lags.reshape(out_channels, 1, *kernel_size)


def _zero_extended(signal: Tensor, sizes: Sequence[int], stride: Sequence[int]) -> Tensor:
    """``signal`` at every ``stride``-th position of a zero, contiguous ``(N, C, *sizes)`` tensor.

    One fill and one copy (a channels_last signal is transposed on the way): the FFT of padded, contiguous
    planes measured 1.1-1.6x faster than letting ``rfftn(s=...)`` pad a channels_last tensor.
    """
    out = signal.new_zeros(*signal.shape[:2], *sizes)
    out[
        (
            slice(None),
            slice(None),
            *(slice(None, (o - 1) * s + 1, s) for o, s in zip(signal.shape[2:], stride, strict=True)),
        )
    ] = signal
    return out


def fast_fft_size(n: int) -> int:
    """The smallest even size >= ``n`` with no prime factor above 11.

    Measured with PyTorch's CPU FFT (MKL) on 4096 planes: odd sizes and sizes just above a power of two
    cost up to 2.5x more per element than the even ones next to them (43: 6.6 ns, 44: 1.2 ns, 45: 3.1 ns).

    >>> fast_fft_size(43), fast_fft_size(58), fast_fft_size(64), fast_fft_size(1)
    (44, 60, 64, 2)
    """
    size = max(n, 2) + max(n, 2) % 2
    while True:
        rest = size
        for prime in (2, 3, 5, 7, 11):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return size
        size += 2


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input, weight, bias, stride, padding, dilation, grad_input, grad_weight):  # type: ignore[override]
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        ctx.config = (stride, padding, dilation, grad_input, grad_weight)
        return _CONV[input.dim() - 2](input, weight, bias, stride, padding, dilation, input.shape[1])

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):  # type: ignore[override]
        input, weight = ctx.saved_tensors
        stride, padding, dilation, grad_input_algorithm, grad_weight_algorithm = ctx.config
        n = input.dim() - 2
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        torch_mask = [
            need_input and grad_input_algorithm == "torch",
            need_weight and grad_weight_algorithm == "torch",
            False,
        ]
        if any(torch_mask):
            grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad_output, input, weight, None, stride, padding, dilation, False, [0] * n, input.shape[1], torch_mask
            )
        if need_input and grad_input_algorithm == "conv":
            grad_input = flipped_grad_input(grad_output, weight, input.shape[1], padding, dilation)
        if need_weight and grad_weight_algorithm == "fft":
            grad_weight = fft_grad_weight(input, grad_output, weight.shape[2:], stride, padding, dilation)
        if need_bias and ctx.has_bias:
            grad_bias = grad_output.sum((0, *range(2, 2 + n)))
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _tuple(name: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n or not all(isinstance(v, int) and v >= 0 for v in values):
        raise ValueError(f"{name} must be a non-negative int or a tuple of {n}; got {value!r}")
    return values
