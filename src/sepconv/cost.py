"""Exact analytic cost of one layer: parameters, MACs, FLOPs, bias adds, activation bytes.

Conventions (stated, because counting tools disagree):

- one MAC is one multiply-add of the layer's weights with its input; ``flops = 2 * macs``;
- bias additions are **not** in ``macs``/``flops``; they are counted on their own in ``bias_adds``;
- counts cover the whole batch of ``input_shape`` (an unbatched shape counts one sample);
- ``activation_bytes`` is the size of every tensor the layer writes in its forward pass
  (a separable layer's intermediate included), at ``dtype`` (default: the layer's parameter dtype),
  except a padded copy of the input, which depends on how the conv runs (a kernel that pads as it reads
  writes none). :func:`sepconv.analyze` counts the ops PyTorch's own path runs, so it adds that copy, at
  the input's batch and channels: with a ``padding_mode`` other than ``'zeros'``, the input padded on
  both sides (even with padding 0); with ``'same'`` at stride 1 and an odd total padding in a dimension
  (even kernel, odd dilation), the input one element longer in each such dimension (PyTorch pads the odd
  element into a copy, the rest in the conv); with ``'same'`` at a stride > 1 (sepconv's layers), the
  input padded for TensorFlow's 'same' (even where that padding is 0);
- norms and activations inside a separable layer add their parameters and activation bytes, no MACs.

>>> from torch import nn
>>> c = cost(nn.Conv2d(10, 32, 3), (5, 10, 50, 50))
>>> c.macs, c.flops, c.bias_adds, c.output_shape
(33177600, 66355200, 368640, (5, 32, 48, 48))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sepconv.layers import SeparableConv1d, SeparableConv2d, SeparableConv3d, _SeparableConv
from sepconv.padding import conv_output_size, resolve_padding

__all__ = ["Comparison", "Cost", "compare", "cost"]

_SEPARABLE = {1: SeparableConv1d, 2: SeparableConv2d, 3: SeparableConv3d}
_STANDARD = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass(frozen=True)
class Cost:
    """What one layer costs on one input shape; ``flops`` is derived as ``2 * macs``."""

    params: int
    macs: int
    flops: int = field(init=False)
    bias_adds: int
    output_shape: tuple[int, ...]
    activation_bytes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "flops", 2 * self.macs)


@dataclass(frozen=True)
class Comparison:
    """A standard conv and its separable twin side by side (ratios are separable / standard)."""

    standard: Cost
    separable: Cost
    params_ratio: float
    macs_ratio: float
    closed_form: float  # depth_multiplier·(groups/O + 1/K^d); 1/O + 1/K^d in the textbook case


def cost(module: nn.Module, input_shape: Sequence[int], *, dtype: torch.dtype | None = None) -> Cost:
    """Exact cost of ``module`` on an input of ``input_shape`` (see the module docstring).

    Supports ``nn.Conv1d/2d/3d`` (any groups, stride, dilation, padding incl. 'same'),
    ``nn.ConvTranspose1d/2d/3d``, ``nn.Linear``, sepconv's layers, and ``nn.Sequential``
    chains of those.

    >>> from sepconv import SeparableConv2d
    >>> cost(SeparableConv2d(10, 32, 3), (5, 10, 50, 50)).macs  # 5·48·48·10·(9 + 32)
    4723200
    """
    shape = tuple(int(s) for s in input_shape)
    if dtype is None:
        dtype = next((p.dtype for p in module.parameters()), torch.get_default_dtype())
    itemsize = dtype.itemsize
    if isinstance(module, _SeparableConv):
        return _separable_cost(module, shape, itemsize)
    if isinstance(module, nn.Sequential):
        return _chain(module, shape, dtype)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return _transposed_conv_cost(module, shape, itemsize)
    if isinstance(module, nn.modules.conv._ConvNd):
        return _conv_cost(module, shape, itemsize)
    if isinstance(module, nn.Linear):
        return _linear_cost(module, shape, itemsize)
    raise TypeError(
        f"cost() supports convolutions, nn.Linear, sepconv layers and nn.Sequential chains of them; "
        f"got {type(module).__name__}"
    )


def compare(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, ...],
    input_shape: Sequence[int],
    **conv_kwargs: object,
) -> Comparison:
    """Cost of ``nn.ConvNd(in_channels, out_channels, kernel_size, **conv_kwargs)`` vs its separable twin.

    ``input_shape`` is batched, ``(N, C, *spatial)``; its length picks 1-d, 2-d or 3-d.
    ``depth_multiplier`` and ``depthwise_bias`` in ``conv_kwargs`` go to the separable layer only.

    >>> c = compare(10, 32, 3, (5, 10, 50, 50))
    >>> c.standard.params, c.separable.params, round(c.closed_form, 4)
    (2912, 442, 0.1424)
    """
    ndim = len(input_shape) - 2
    if ndim not in _SEPARABLE:
        raise ValueError(f"input_shape must be (N, C, *spatial) with 1 to 3 spatial dims, got {tuple(input_shape)}")
    separable = _SEPARABLE[ndim](in_channels, out_channels, kernel_size, device="meta", **conv_kwargs)  # type: ignore[arg-type]
    standard_kwargs = {k: v for k, v in conv_kwargs.items() if k not in ("depth_multiplier", "depthwise_bias")}
    strided_same = separable.padding == "same" and any(s > 1 for s in separable.stride)
    if strided_same:  # nn.ConvNd rejects strided 'same'; cost() reads .padding, so state it afterwards
        standard_kwargs["padding"] = 0
    standard = _STANDARD[ndim](in_channels, out_channels, kernel_size, device="meta", **standard_kwargs)  # type: ignore[arg-type]
    if strided_same:
        standard.padding = "same"
    std, sep = cost(standard, input_shape), cost(separable, input_shape)
    m, g, k = separable.depth_multiplier, separable.groups, math.prod(separable.kernel_size)
    return Comparison(
        standard=std,
        separable=sep,
        params_ratio=sep.params / std.params,
        macs_ratio=sep.macs / std.macs,
        closed_form=m * (g / out_channels + 1 / k),
    )


def _split_input(layer: nn.Module, shape: tuple[int, ...], ndim: int, channels: int) -> tuple[int, bool]:
    """(batch, batched) for a conv input shape, or a ValueError naming expected and actual shape."""
    if len(shape) not in (ndim + 1, ndim + 2) or shape[-ndim - 1] != channels or min(shape) < 1:
        raise ValueError(
            f"{type(layer).__name__} expects input_shape (N, {channels}, *{ndim} spatial) or "
            f"({channels}, *{ndim} spatial) with positive sizes, got {shape}"
        )
    batched = len(shape) == ndim + 2
    return (shape[0] if batched else 1), batched


def _conv_cost(conv: nn.modules.conv._ConvNd, shape: tuple[int, ...], itemsize: int) -> Cost:
    ndim = len(conv.kernel_size)
    batch, batched = _split_input(conv, shape, ndim, conv.in_channels)
    spatial = shape[-ndim:]
    pads = resolve_padding(conv.padding, spatial, conv.kernel_size, conv.stride, conv.dilation)  # type: ignore[arg-type]
    out_spatial = tuple(
        conv_output_size(*args)
        for args in zip(spatial, conv.kernel_size, conv.stride, pads, conv.dilation, strict=True)
    )
    if min(out_spatial) < 1:
        raise ValueError(f"input_shape {shape} is too small for {conv}: output size would be {out_spatial}")
    weights_per_output = (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
    outputs = batch * conv.out_channels * math.prod(out_spatial)
    has_bias = conv.bias is not None
    output_shape = ((batch,) if batched else ()) + (conv.out_channels, *out_spatial)
    return Cost(
        params=conv.out_channels * weights_per_output + (conv.out_channels if has_bias else 0),
        macs=outputs * weights_per_output,
        bias_adds=outputs if has_bias else 0,
        output_shape=output_shape,
        activation_bytes=outputs * itemsize,
    )


def _transposed_conv_cost(conv: nn.modules.conv._ConvTransposeNd, shape: tuple[int, ...], itemsize: int) -> Cost:
    ndim = len(conv.kernel_size)
    batch, batched = _split_input(conv, shape, ndim, conv.in_channels)
    spatial = shape[-ndim:]
    out_spatial = tuple(
        (n - 1) * s - 2 * p + d * (k - 1) + op + 1
        for n, k, s, p, d, op in zip(
            spatial,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.output_padding,  # type: ignore[arg-type]
            strict=True,
        )
    )
    if min(out_spatial) < 1:
        raise ValueError(f"input_shape {shape} is too small for {conv}: output size would be {out_spatial}")
    # Each input element meets (out_channels / groups)·K^d weights.
    weights_per_input = (conv.out_channels // conv.groups) * math.prod(conv.kernel_size)
    outputs = batch * conv.out_channels * math.prod(out_spatial)
    has_bias = conv.bias is not None
    return Cost(
        params=conv.in_channels * weights_per_input + (conv.out_channels if has_bias else 0),
        macs=batch * conv.in_channels * math.prod(spatial) * weights_per_input,
        bias_adds=outputs if has_bias else 0,
        output_shape=((batch,) if batched else ()) + (conv.out_channels, *out_spatial),
        activation_bytes=outputs * itemsize,
    )


def _linear_cost(linear: nn.Linear, shape: tuple[int, ...], itemsize: int) -> Cost:
    if not shape or shape[-1] != linear.in_features:
        raise ValueError(f"Linear expects input_shape (..., {linear.in_features}), got {shape}")
    rows = math.prod(shape[:-1])
    has_bias = linear.bias is not None
    return Cost(
        params=linear.in_features * linear.out_features + (linear.out_features if has_bias else 0),
        macs=rows * linear.in_features * linear.out_features,
        bias_adds=rows * linear.out_features if has_bias else 0,
        output_shape=(*shape[:-1], linear.out_features),
        activation_bytes=rows * linear.out_features * itemsize,
    )


def _separable_cost(layer: _SeparableConv, shape: tuple[int, ...], itemsize: int) -> Cost:
    _split_input(layer, shape, layer._ndim, layer.in_channels)  # errors name the separable layer
    depthwise = _conv_cost(layer.depthwise, shape, itemsize)  # type: ignore[arg-type]
    pointwise = _conv_cost(layer.pointwise, depthwise.output_shape, itemsize)  # type: ignore[arg-type]
    mid_params, mid_bytes = 0, 0
    for mid in (layer.mid_norm, layer.mid_activation):
        if mid is not None:
            mid_params += sum(p.numel() for p in mid.parameters())
            if not getattr(mid, "inplace", False):
                mid_bytes += depthwise.activation_bytes
    return Cost(
        params=depthwise.params + mid_params + pointwise.params,
        macs=depthwise.macs + pointwise.macs,
        bias_adds=depthwise.bias_adds + pointwise.bias_adds,
        output_shape=pointwise.output_shape,
        activation_bytes=depthwise.activation_bytes + mid_bytes + pointwise.activation_bytes,
    )


def _chain(chain: nn.Sequential, shape: tuple[int, ...], dtype: torch.dtype) -> Cost:
    """Sum of the children's costs, each on the previous child's output shape."""
    if len(chain) == 0:
        raise ValueError("cost() needs a non-empty nn.Sequential")
    parts = []
    for child in chain:
        parts.append(cost(child, shape, dtype=dtype))
        shape = parts[-1].output_shape
    return Cost(
        params=sum(c.params for c in parts),
        macs=sum(c.macs for c in parts),
        bias_adds=sum(c.bias_adds for c in parts),
        output_shape=shape,
        activation_bytes=sum(c.activation_bytes for c in parts),
    )
