"""New modules with an eval-mode BatchNorm folded into a conv's weights, for :func:`sepconv.accelerate`: a conv of
the same kind, a MixNet ``MixedConv2d``, or our ``DepthwiseConvNd``. The input modules keep their weights.

>>> import torch
>>> from torch import nn
>>> conv, norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval()
>>> x = torch.randn(1, 3, 8, 8)
>>> torch.allclose(folded_conv(conv, norm)(x), norm(conv(x)), atol=1e-6)
True
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import Tensor, nn

from sepconv._module_kinds import CONVS, DEPTHWISE, conv_dims, conv_padding, pads_same
from sepconv.folding import fold_batch_norm


@torch.no_grad()
def folded_weights(weight: Tensor, bias: Tensor | None, norm: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor | None]:
    """Weights and bias of ``norm(conv(x))`` as one conv, computed in float64, stored in ``weight``'s dtype, each
    requiring grad where a tensor it is made of does (``weight`` and ``bias`` as given, evaluated outside no_grad)."""
    if norm is None:
        return weight, bias
    folded, shift = fold_batch_norm(weight.double(), None if bias is None else bias.double(), norm)
    # trainable if any source is: the folded weight is the conv's weight times the norm's scale, the folded bias is
    # made of the conv's bias and both affine parameters (the running statistics are buffers); a model frozen
    # whole stays frozen, and a conv trained under a frozen norm stays trainable
    scale = _trainable(norm.weight)
    folded, shift = folded.to(weight.dtype), shift.to(weight.dtype)
    folded.requires_grad_(_trainable(weight) or scale)
    shift.requires_grad_(_trainable(bias) or scale or _trainable(norm.bias))
    return folded, shift


def _trainable(tensor: Tensor | None) -> bool:
    return tensor is not None and tensor.requires_grad


def folded_conv(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """``norm(conv(x))`` as one ``nn.Conv2d`` (a new module: a conv shared elsewhere keeps its weights; a
    parametrized weight is taken as computed), for an eval-mode norm after the conv. A conv of
    :data:`SAME_PADDED_CONVS` stays of its class (it pads at run time, which ``nn.Conv2d`` cannot for stride > 1);
    so does one of our depthwise convs (a padding mode other than zeros, with 'same' padding at any stride).
    Parameters require grad as :func:`folded_weights` says."""
    if isinstance(conv, DEPTHWISE):
        return depthwise_replacement(conv, norm, conv.backend)
    weight, bias = folded_weights(conv.weight, conv.bias, norm)
    geometry = {"stride": conv.stride, "dilation": conv.dilation, "groups": conv.groups, "bias": True}
    factory = {"device": weight.device, "dtype": weight.dtype}
    if pads_same(conv):  # timm's constructor: nn.Conv2d's arguments without padding_mode
        folded = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, padding=0, **geometry, **factory)
    else:
        folded = CONVS[conv_dims(conv) - 1](
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            padding=conv.padding,
            padding_mode=conv.padding_mode,
            **geometry,
            **factory,
        )
    with torch.no_grad():
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    folded.weight.requires_grad_(weight.requires_grad)
    folded.bias.requires_grad_(bias.requires_grad)
    folded.training = conv.training
    return folded


def folded_mixed_conv(mixed: nn.Module, norm: nn.BatchNorm2d) -> nn.Module:
    """A :func:`mixed_conv` with the eval-mode ``norm`` after it folded into its convs, each with its channels' slice
    of the norm (a copy: the input's convs keep their weights)."""
    folded = copy.copy(mixed)  # its own __dict__ and module table, sharing nothing it keeps
    folded._modules = OrderedDict()
    start = 0
    for name, conv in mixed.named_children():
        folded.add_module(name, folded_conv(conv, _norm_slice(norm, start, start + conv.out_channels)))
        start += conv.out_channels
    return folded


def _norm_slice(norm: nn.BatchNorm2d, start: int, stop: int) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm2d of ``norm``'s channels ``start:stop`` (running statistics, affine parameters, eps)."""
    part = nn.BatchNorm2d(stop - start, eps=norm.eps, affine=norm.affine, device=norm.running_mean.device)
    part = part.to(norm.running_mean.dtype).eval()
    with torch.no_grad():
        part.running_mean.copy_(norm.running_mean[start:stop])
        part.running_var.copy_(norm.running_var[start:stop])
        if norm.affine:
            part.weight.copy_(norm.weight[start:stop])
            part.bias.copy_(norm.bias[start:stop])
    if norm.affine:  # a frozen norm's slice frozen too: the folded convs' parameters take its flags
        part.weight.requires_grad_(norm.weight.requires_grad)
        part.bias.requires_grad_(norm.bias.requires_grad)
    return part


def depthwise_replacement(conv: nn.Conv2d, norm: nn.BatchNorm2d | None, backend: str) -> nn.Module:
    """Our ``DepthwiseConv1d/2d/3d`` for a depthwise conv (its padding mode kept), ``norm`` (eval mode) folded in,
    parameters requiring grad as :func:`folded_weights` says; ``backend`` in 2-d (our kernels are 2-d: 1-d and 3-d
    layers take "auto" for "triton", the CPU strategy on CPU)."""
    weight, bias = folded_weights(conv.weight, conv.bias, norm)
    dims = conv_dims(conv)
    backend = backend if dims == 2 or backend != "triton" else "auto"
    layer = DEPTHWISE[dims - 1](
        conv.in_channels,
        conv.kernel_size,
        conv.stride,
        conv_padding(conv),
        conv.dilation,
        depth_multiplier=conv.out_channels // conv.in_channels,
        bias=bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
        backend=backend,
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        layer.bias.requires_grad_(bias.requires_grad)
    layer.training = conv.training
    return layer
