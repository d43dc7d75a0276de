"""Squeeze-excitation between the activation and the 1x1 conv (MobileNetV3's and EfficientNet's blocks), for
inference.

``y = pw(a * excitation(a.mean((2, 3), keepdim=True)))`` with ``a = act(dw(x) + b)``: the scale depends on the
whole image's intermediate, so the fused kernel cannot compute it tile by tile. Here the forward takes two passes
over ``x`` and never writes ``a``: the per-image channel means of ``a`` (``sepconv::depthwise_mean``: our
depthwise kernel with each tile activated, rounded to x's dtype as it would be stored, and summed instead of
stored; the tiles' sums added in a fixed order), ``excitation`` on those means (the squeeze-excitation's small
convs, in PyTorch), then the fused kernel with the scale applied to each activated tile before the pointwise product
(``sepconv::separable_conv2d_scaled``). PyTorch's block writes ``a``, reads it for the means, reads it again and
writes the scaled copy, and reads that for the 1x1 conv. No backward for a callable gate: calls that need a gradient
are refused (:class:`~sepconv.kernels.ExcitationArgs` gives the gate as tensors, with gradients:
:mod:`sepconv.kernels.differentiable_excitation`).

>>> import torch
>>> import torch.nn.functional as F
>>> from sepconv.kernels import separable_conv2d
>>> x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
>>> dw, pw = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(8, 4, 1, 1, dtype=torch.float64)
>>> y = separable_conv2d(x, dw, pw, padding=1, mid_activation="relu", excitation=torch.sigmoid)
>>> a = F.relu(F.conv2d(x, dw, padding=1, groups=4))
>>> torch.allclose(y, F.conv2d(a * torch.sigmoid(a.mean((2, 3), keepdim=True)), pw))
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sepconv.kernels.batch_norm import moment_parts
from sepconv.kernels.depthwise import _GEOMETRY, _memory_format, output_size, run_kernel
from sepconv.kernels.separable import _forward

__all__ = ["separable_with_excitation"]


def separable_with_excitation(args: tuple, excitation: Callable[[Tensor], Tensor]) -> Tensor:
    """``pw(a * excitation(a.mean((2, 3), keepdim=True)))``: ``args`` as ``sepconv::separable_conv2d``'s."""
    x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation = args
    tensors = (x, dw_weight, dw_bias, pw_weight, pw_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(
            "excitation runs for inference only as a callable: call under torch.no_grad() or "
            "torch.inference_mode(), or give the squeeze-excitation as a sepconv.kernels.ExcitationArgs (its convs "
            "and gate as tensors: differentiable)"
        )
    mean_args = (x, dw_weight, dw_bias, stride, padding, dilation, activation)
    means = run_kernel(torch.ops.sepconv.depthwise_mean, _depthwise_mean, mean_args, tensors[:3])
    channels = dw_weight.shape[0]
    scale = excitation(means.to(x.dtype).view(x.shape[0], channels, 1, 1))
    if not isinstance(scale, Tensor) or scale.numel() != x.shape[0] * channels:
        shape = tuple(scale.shape) if isinstance(scale, Tensor) else type(scale).__name__
        raise ValueError(
            f"excitation must map the (N, C·m, 1, 1) = {(x.shape[0], channels, 1, 1)} means to a scale of that "
            f"shape, got {shape}"
        )
    scale = scale.to(x.dtype).reshape(x.shape[0], channels)
    return run_kernel(torch.ops.sepconv.separable_conv2d_scaled, _scaled, (*args[:5], scale, *args[5:]),
                      (*tensors, scale))  # fmt: skip


def _depthwise_mean(x, weight, bias, stride, padding, dilation, activation) -> Tensor:
    """(N, C·m): each image's channel means of the activated depthwise output as stored (rounded to x's dtype),
    in float32 (float64 for float64)."""
    sums, _ = moment_parts(x, weight, bias, stride, padding, dilation, activation, rounded=True, sums_only=True)
    out_h, out_w = output_size(x.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    return sums.sum(1).div_(out_h * out_w)


def _scaled(x, dw_weight, dw_bias, pw_weight, pw_bias, scale, stride, padding, dilation, activation) -> Tensor:
    return _forward(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation, scale=scale)


@torch.library.custom_op(
    "sepconv::depthwise_mean",
    mutates_args=(),
    schema=f"(Tensor x, Tensor weight, Tensor? bias, {_GEOMETRY}, int activation) -> Tensor",
)
def _depthwise_mean_op(x, weight, bias, stride, padding, dilation, activation):
    return _depthwise_mean(x, weight, bias, stride, padding, dilation, activation)


@_depthwise_mean_op.register_fake
def _(x, weight, bias, stride, padding, dilation, activation):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))


@torch.library.custom_op(
    "sepconv::separable_conv2d_scaled",
    mutates_args=(),
    schema="(Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor pw_weight, Tensor? pw_bias, Tensor scale, "
    f"{_GEOMETRY}, int activation) -> Tensor",
)
def _scaled_op(x, dw_weight, dw_bias, pw_weight, pw_bias, scale, stride, padding, dilation, activation):
    return _scaled(x, dw_weight, dw_bias, pw_weight, pw_bias, scale, stride, padding, dilation, activation)


@_scaled_op.register_fake
def _(x, dw_weight, dw_bias, pw_weight, pw_bias, scale, stride, padding, dilation, activation):
    out_h, out_w = output_size(x.shape[-2:], dw_weight.shape[-2:], stride, padding, dilation)
    shape = (x.shape[0], pw_weight.shape[0], out_h, out_w)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
