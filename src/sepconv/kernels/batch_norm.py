"""``separable_conv2d_batch_norm``: depthwise -> BatchNorm -> activation -> pointwise on the fused kernel, in
training mode too.

A BatchNorm between the convs is, for one batch, a per-channel affine map of the depthwise output: with the
batch's mean μ and variance σ² of ``z = dw(x) + b`` it is ``γ (z - μ) / sqrt(σ² + ε) + β``, which folds into
the depthwise weight and bias. So a training step runs two passes over ``x`` instead of writing ``z`` and the
normalized and activated copies of it: the statistics (custom op ``sepconv::depthwise_moments``: our
depthwise kernel, reduced per channel; its output is not kept), then the fused kernel
(:func:`~sepconv.kernels.separable_conv2d`) on the weights folded with them. Autograd differentiates through
the fold and the statistics, so the gradients are BatchNorm's own (the batch statistics' terms included),
and backward recomputes the depthwise output instead of storing it: training keeps ``x``, not three
intermediate-sized tensors. Running statistics are updated as ``F.batch_norm`` updates them (unbiased
variance); in eval mode they are folded instead.

>>> import torch
>>> import torch.nn.functional as F
>>> x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
>>> dw, pw = torch.randn(3, 1, 3, 3, dtype=torch.float64), torch.randn(5, 3, 1, 1, dtype=torch.float64)
>>> mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
>>> y = separable_conv2d_batch_norm(x, dw, pw, padding=1, running_mean=mean, running_var=var, training=True)
>>> z = F.conv2d(x, dw, padding=1, groups=3)
>>> torch.allclose(y, F.conv2d(F.batch_norm(z, None, None, training=True), pw))
True
>>> torch.allclose(mean, 0.1 * z.mean((0, 2, 3)))  # running statistics updated with momentum 0.1
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from sepconv.kernels.depthwise import (
    _GEOMETRY,
    PaddingSpec,
    _grad_input,
    _grad_weight,
    output_size,
    prepare_call,
    run_kernel,
    run_op,
)
from sepconv.kernels.depthwise import _forward as _depthwise_forward
from sepconv.kernels.separable import MID_ACTIVATIONS, _check_pointwise, _SeparableConv2d

__all__ = ["separable_conv2d_batch_norm"]


def separable_conv2d_batch_norm(
    x: Tensor,
    dw_weight: Tensor,
    pw_weight: Tensor,
    pw_bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: PaddingSpec = 0,
    dilation: int | Sequence[int] = 1,
    dw_bias: Tensor | None = None,
    mid_activation: str | None = None,
    *,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.conv2d(act(F.batch_norm(F.conv2d(x, dw_weight, dw_bias, stride, padding, dilation, groups=C),
    running_mean, running_var, norm_weight, norm_bias, training, momentum, eps)), pw_weight, pw_bias)``.

    The conv arguments are :func:`~sepconv.kernels.separable_conv2d`'s, the norm's ``F.batch_norm``'s:
    ``training=True`` normalizes with the batch's statistics and, where ``running_mean``/``running_var`` are
    given, updates them in place; ``training=False`` folds the running statistics. ``x`` must be batched
    (N, C, H, W), as for ``nn.BatchNorm2d``. Under autocast the convs run in the autocast dtype and the
    statistics and the fold in float32, as PyTorch's BatchNorm computes them.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (N, C, H, W) for a batch norm between the convs, got {shape}")
    weight, bias = dw_weight, dw_bias  # as given: the fold is computed from these, in float32 or wider
    x, tensors, geometry, _ = prepare_call(x, (dw_weight, dw_bias, pw_weight, pw_bias), stride, padding, dilation)
    dw_weight, dw_bias, pw_weight, pw_bias = tensors
    _check_pointwise(dw_weight, pw_weight, pw_bias, x)
    if mid_activation not in MID_ACTIVATIONS:
        raise ValueError(f"mid_activation must be one of {MID_ACTIVATIONS}; got {mid_activation!r}")
    _check_norm(dw_weight.shape[0], x, running_mean, running_var, norm_weight, norm_bias, training)
    if training:
        out_h, out_w = output_size(x.shape[-2:], dw_weight.shape[-2:], *geometry)
        count = x.shape[0] * out_h * out_w
        if count < 2:
            raise ValueError(
                f"training needs more than 1 value per channel to normalize; got N·H_out·W_out = {count} "
                f"(x {tuple(x.shape)}, output {out_h}x{out_w})"
            )
        moments_args, inputs = (x, dw_weight, dw_bias, *geometry), (x, dw_weight, dw_bias)
        mean, var = run_op(torch.ops.sepconv.depthwise_moments, _DepthwiseMoments, moments_args, inputs)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():  # as F.batch_norm: the running variance is the unbiased one
                running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
                running_var.lerp_(var.detach().mul(count).div(count - 1).to(running_var.dtype), momentum)
    else:
        mean, var = running_mean, running_var
    folded_weight, folded_bias = _fold(weight, bias, mean, var, norm_weight, norm_bias, eps, x.dtype)
    args = (x, folded_weight, folded_bias, pw_weight, pw_bias, *geometry, MID_ACTIVATIONS.index(mid_activation))
    inputs = (x, folded_weight, folded_bias, pw_weight, pw_bias)
    return run_op(torch.ops.sepconv.separable_conv2d, _SeparableConv2d, args, inputs)


def _check_norm(
    channels: int,
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    training: bool,
) -> None:
    named = (("running_mean", running_mean), ("running_var", running_var))
    named += (("norm_weight", norm_weight), ("norm_bias", norm_bias))
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != (channels,):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape ({channels},) (the depthwise conv's outputs), got {shape}")
        if not t.is_floating_point() or t.device != x.device:
            raise TypeError(f"{name} must be a floating-point tensor on {x.device}; got {t.dtype} on {t.device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("training=False normalizes with running_mean and running_var: give them, or training=True")


def _fold(weight, bias, mean, var, norm_weight, norm_bias, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Depthwise weight and bias of ``batch_norm(conv(x))`` for the statistics ``mean``, ``var``: differentiable
    in all of them, computed in at least float32, returned in ``dtype``."""
    compute = torch.promote_types(torch.promote_types(weight.dtype, dtype), torch.float32)
    scale = (var.to(compute) + eps).rsqrt()
    if norm_weight is not None:
        scale = scale * norm_weight.to(compute)
    shift = -mean.to(compute) if bias is None else bias.to(compute) - mean.to(compute)
    shift = shift * scale
    if norm_bias is not None:
        shift = shift + norm_bias.to(compute)
    return (weight.to(compute) * scale.view(-1, 1, 1, 1)).to(dtype), shift.to(dtype)


# ---- the statistics: custom op sepconv::depthwise_moments -------------------------------------------------


def _moments(x, weight, bias, stride, padding, dilation) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of the depthwise conv's output (float32, float64 for float64): our
    depthwise kernel, then one reduction; the output is freed before returning."""
    z = _depthwise_forward(x, weight, bias, stride, padding, dilation)
    compute = torch.promote_types(z.dtype, torch.float32)
    var, mean = torch.var_mean(z.to(compute), dim=(0, 2, 3), correction=0)
    return mean, var


@torch.library.custom_op(
    "sepconv::depthwise_moments",
    mutates_args=(),
    schema=f"(Tensor x, Tensor weight, Tensor? bias, {_GEOMETRY}) -> (Tensor, Tensor)",
)
def _moments_op(x, weight, bias, stride, padding, dilation):
    return _moments(x, weight, bias, stride, padding, dilation)


@_moments_op.register_fake
def _(x, weight, bias, stride, padding, dilation):
    compute = torch.promote_types(x.dtype, torch.float32)
    return x.new_empty(weight.shape[0], dtype=compute), x.new_empty(weight.shape[0], dtype=compute)


def _moments_setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight, bias, output[0])
    ctx.geometry = (stride, padding, dilation)


def _moments_backward(ctx, grad_mean, grad_var):
    """Through ``mean = Σz / M`` and ``var = Σ(z - mean)² / M``: ``dL/dz = grad_mean / M + grad_var · 2(z - mean)
    / M`` (the mean's own term in the variance sums to zero), on the recomputed ``z``, then back through the
    depthwise conv by our kernels."""
    x, weight, bias, mean = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if not (needs[0] or needs[1] or needs[2]):
        return None, None, None, None, None, None
    depthwise_args = (x, weight, bias, *ctx.geometry)
    from sepconv.kernels.depthwise import _DepthwiseConv2d

    z = run_op(torch.ops.sepconv.depthwise_conv2d, _DepthwiseConv2d, depthwise_args, (x, weight, bias))
    count = z.shape[0] * z.shape[2] * z.shape[3]
    per_channel = (-1, 1, 1)  # tensors divided by the count, not a Python float of it: symbolic under compile
    grad_z = z.to(mean.dtype)  # in place from here: one intermediate-sized tensor (z itself where fp32/fp64)
    del z
    grad_z.sub_(mean.view(per_channel))
    if grad_var is None:
        grad_z.zero_()
    else:
        grad_z.mul_(grad_var.mul(2).div(count).view(per_channel))
    if grad_mean is not None:
        grad_z.add_(grad_mean.div(count).view(per_channel))
    grad_z = grad_z.to(x.dtype)
    grad_x = grad_weight = grad_bias = None
    args, tensors = (grad_z, x, weight, *ctx.geometry), (grad_z, x, weight)
    if needs[0]:
        grad_x = run_kernel(torch.ops.sepconv.depthwise_conv2d_grad_input, _grad_input, args, tensors)
    if needs[1] or (bias is not None and needs[2]):
        grad_weight, grad_bias = run_kernel(torch.ops.sepconv.depthwise_conv2d_grad_weight, _grad_weight, args, tensors)
        grad_weight = grad_weight if needs[1] else None
        grad_bias = grad_bias if bias is not None and needs[2] else None
    return grad_x, grad_weight, grad_bias, None, None, None


# once_differentiable: the backward kernels have no backward of their own (a double backward raises)
_moments_op.register_autograd(once_differentiable(_moments_backward), setup_context=_moments_setup_context)


class _DepthwiseMoments(torch.autograd.Function):
    """The moments op's autograd without the dispatcher, for plain-eager calls
    (:func:`~sepconv.kernels.depthwise.run_op`)."""

    @staticmethod
    def compute(*inputs):
        return _moments(*inputs)

    @staticmethod
    def forward(ctx, *inputs):
        output = _moments(*inputs)
        _moments_setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(once_differentiable(_moments_backward))
