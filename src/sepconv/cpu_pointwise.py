"""A pointwise (1x1) convolution as a matrix product: what the CPU strategy may run instead of PyTorch's conv.

A 1x1 conv of groups 1 maps each pixel's C channels to O by the same O x C matrix: on a contiguous (NCHW)
input it is one matrix product per sample, ``W @ X[n]`` with ``X[n]`` the sample's C x (H*W) matrix, a
view of the input, and its output is contiguous as the conv's would be; it runs on the BLAS, and often
beats PyTorch's CPU 1x1 conv. On a 2-core Xeon, fp32, (1, 960, 7, 7) -> 160: forward
0.20 -> 0.12 ms; a (32, 144, 56, 56) -> 24 training step 105 -> 37 ms; but not always faster (a (32, 960, 7, 7)
-> 160 training step 8.6 -> 10.4 ms), so :mod:`sepconv.cpu_strategy` times both per configuration.

On a channels_last input the same product reads each sample as the transpose of a contiguous (H*W) x C matrix,
which the BLAS takes as it is, and writes a contiguous output: a separable layer's channels_last intermediate
goes to its NCHW caller's layout with no conversion (the CPU strategy's ``CHANNELS_LAST_PRODUCT`` plan).
Channels_last inputs of a pointwise conv alone keep PyTorch's conv: the product (``F.linear`` over the pixels)
won when timed alone, 0.21 -> 0.16 ms for (1, 128, 28, 28) -> 128, yet ran slower between the depthwise convs
of a benchmark's mix of layers — that layer's separable forward 0.319 -> 0.347 ms, (1, 32, 112, 112) -> 16
training 3.63 -> 3.80 ms — so that a measured decision would pick it where it loses.

>>> import torch
>>> x = torch.rand(2, 6, 5, 5, dtype=torch.float64)
>>> w, b = torch.rand(4, 6, 1, 1, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
>>> bool(torch.allclose(pointwise_matmul(x, w, b), torch.nn.functional.conv2d(x, w, b)))
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sepconv.cpu_layout import CHANNELS_LAST_FORMATS

__all__ = ["pointwise_matmul", "pointwise_matmul_applies"]


def pointwise_matmul_applies(input: Tensor, weight: Tensor) -> bool:
    """Whether :func:`pointwise_matmul` can run this 1x1 conv (groups 1, stride 1, no padding: the caller's
    to check): a contiguous, non-empty, batched input of 1-3 spatial dimensions and a weight of
    ``in_channels`` inputs and a 1x1 kernel."""
    return (
        3 <= input.dim() <= 5
        and input.numel() > 0
        and weight.dim() == input.dim()
        and weight.shape[1] == input.shape[1]
        and weight.numel() == weight.shape[0] * weight.shape[1]  # a 1x1 kernel
        and input.is_contiguous()
    )


def pointwise_matmul(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
    """``F.convNd(input, weight, bias)`` of a 1x1 ``weight`` (O x C x 1...) as a matrix product per sample,
    the weight broadcast (not copied) over the batch: for the inputs :func:`pointwise_matmul_applies` takes, and
    for channels_last ones (read transposed), a view of them; others are copied into that layout first (correct,
    not fast). The output is contiguous, or ``out`` (outside autograd; contiguous or channels_last, of the
    output's shape), written in place and returned: the CPU strategy's batch chunks write each chunk's output
    straight into the batch's.

    >>> x = torch.rand(2, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    >>> w = torch.rand(4, 6, 1, 1, dtype=torch.float64)
    >>> y = pointwise_matmul(x, w)
    >>> y.is_contiguous(), bool(torch.allclose(y, torch.nn.functional.conv2d(x, w)))
    (True, True)
    """
    batch, channels, *spatial = input.shape
    weight = weight.reshape(weight.shape[0], channels)
    if out is not None:
        expected = (batch, weight.shape[0], *spatial)
        if out.shape != expected:
            raise ValueError(f"out must have the output's shape {expected}; got {tuple(out.shape)}")
        return _product_into(out, input.reshape(batch, channels, -1), weight, bias)
    if _channels_last(input) and torch.is_grad_enabled() and input.requires_grad:
        pixels = input.movedim(1, -1).reshape(batch, -1, channels)  # a view: each sample's (H*W) x C matrix
        return _ChannelsLastProduct.apply(pixels, weight, bias).view(batch, -1, *spatial)
    samples = input.reshape(batch, channels, -1)
    return _batched_product(weight.expand(batch, -1, -1), samples, bias, _PER_ROW).view(batch, -1, *spatial)


_PER_ROW, _PER_COLUMN = (1, -1, 1), (1, 1, -1)  # the bias's shape against (batch, O, pixels) and (batch, pixels, O)


def _batched_product(
    left: Tensor, right: Tensor, bias: Tensor | None, bias_shape: tuple[int, ...], out: Tensor | None = None
) -> Tensor:
    """``left @ right`` per sample, plus ``bias`` viewed as ``bias_shape``, into ``out`` if given."""
    if bias is None:
        return torch.bmm(left, right, out=out)
    return torch.baddbmm(bias.view(bias_shape), left, right, out=out)


def _product_into(out: Tensor, samples: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``W @ samples[n]`` (+ bias) written into ``out`` and returned: into a contiguous ``out`` as each sample's
    O x pixels matrix, into a channels_last one as its transpose, pixels x O."""
    batch, out_channels = samples.shape[0], out.shape[1]
    if out.is_contiguous():  # per sample (O x C) @ (C x pixels)
        left, right = weight.expand(batch, -1, -1), samples
        target, bias_shape = out.view(batch, out_channels, -1), _PER_ROW
    elif _channels_last(out):  # per sample (pixels x C) @ (C x O); the pixels' rows are contiguous in channels_last
        left, right = samples.transpose(1, 2), weight.t().expand(batch, -1, -1)
        target, bias_shape = out.movedim(1, -1).view(batch, -1, out_channels), _PER_COLUMN
    else:
        raise ValueError(f"out must be contiguous or channels_last; got strides {out.stride()}")
    _batched_product(left, right, bias, bias_shape, out=target)
    return out


def _channels_last(input: Tensor) -> bool:
    """Whether ``input`` is channels_last (2-d or 3-d) and not also contiguous."""
    memory_format = CHANNELS_LAST_FORMATS.get(input.dim())
    return memory_format is not None and not input.is_contiguous() and input.is_contiguous(memory_format=memory_format)


class _ChannelsLastProduct(torch.autograd.Function):
    """``W @ pixels[n]^T`` (+ bias) per sample, whose input gradient comes back in the input's own layout,
    pixel-major (channels_last). Autograd's own gradient of the transposed view is channels-major (NCHW), which
    the depthwise conv's channels_last backward then runs on or converts: a separable layer's (1, 128, 28, 28)
    15x15 training step under the CHANNELS_LAST_PRODUCT plan took 15.0 ms that way, 5.3 ms this way (31x31:
    48.0 vs 8.6 ms; 3x3 layers 3-7% faster). Its backward is made of differentiable ops: double backward works."""

    @staticmethod
    def forward(ctx: Any, pixels: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pixels, weight)
        ctx.has_bias = bias is not None
        return _batched_product(weight.expand(pixels.shape[0], -1, -1), pixels.transpose(1, 2), bias, _PER_ROW)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        pixels, weight = ctx.saved_tensors
        grad_pixels = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # (N, H*W, C): channels_last once viewed back
            grad_pixels = torch.bmm(grad.transpose(1, 2), weight.expand(pixels.shape[0], -1, -1))
        if ctx.needs_input_grad[1]:
            grad_weight = torch.bmm(grad, pixels).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2))
        return grad_pixels, grad_weight, grad_bias
