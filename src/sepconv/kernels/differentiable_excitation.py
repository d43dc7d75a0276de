"""Squeeze-excitation inside the fused separable block with gradients: EfficientNet's and MobileNetV3's blocks in
training, ``dw -> (BatchNorm) -> act -> squeeze-excitation -> 1x1 -> (BatchNorm)``.

The gate is given as tensors (:class:`ExcitationArgs`: the squeeze-excitation's two 1x1 convs, its activation and
its gate function, as torchvision's ``SqueezeExcitation`` and timm's ``SqueezeExcite`` compute it), so that one
custom op (``sepconv::separable_conv2d_excitation``) owns the whole block and its backward. Forward, as the
inference path (:mod:`sepconv.kernels.excitation`): the mid norm's batch statistics if it normalizes with them
(a statistics pass over ``x``), the activation's per-image channel means (a second pass), the gate on them in
PyTorch, then the fused kernel with each activated tile scaled (a third pass; with a training-mode norm after the
1x1 conv, its statistics epilogue). Only ``x`` and per-channel tensors are kept. Backward recomputes the
depthwise output once and runs the depthwise backward once: the gate's gradient reaches the activation through
the means (``∂mean/∂a = 1/(H·W)``), so both paths into the activation are summed before the norm's and the
depthwise conv's backward (two custom ops, one for the means and one for the scaled product, would each run the
depthwise backward).

>>> import torch
>>> import torch.nn.functional as F
>>> from sepconv.kernels import separable_conv2d
>>> x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
>>> dw, pw = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(8, 4, 1, 1, dtype=torch.float64)
>>> gate = ExcitationArgs(torch.randn(2, 4, 1, 1, dtype=torch.float64), None,
...                       torch.randn(4, 2, 1, 1, dtype=torch.float64), None, "relu", "sigmoid")
>>> y = separable_conv2d(x, dw, pw, padding=1, mid_activation="silu", excitation=gate)
>>> a = F.silu(F.conv2d(x, dw, padding=1, groups=4))
>>> want = F.conv2d(a * gate(a.mean((2, 3), keepdim=True)), pw)
>>> torch.allclose(y, want)
True
>>> g = torch.randn_like(y)
>>> torch.allclose(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(want, x, g)[0])
True
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sepconv._dtypes import accumulation_dtype, cast
from sepconv.kernels.batch_norm import NO_RUNNING_UPDATES, RunningUpdates, _moments
from sepconv.kernels.depthwise import (
    _GEOMETRY,
    _DepthwiseConv2d,
    _memory_format,
    depthwise_gradients,
    differentiable,
    output_size,
    run_op,
)
from sepconv.kernels.excitation import _depthwise_mean
from sepconv.kernels.output_norm import (
    BatchNormArgs,
    check_values,
    fold_output_norm,
    norm_dtype,
    normalize,
    running_update,
    update_running_statistics,
)
from sepconv.kernels.separable import MID_ACTIVATIONS, Fold, _activate, _activation_backward, pointwise_backward
from sepconv.kernels.separable import _forward as _separable_forward

__all__ = ["GATES", "ExcitationArgs", "separable_with_gate"]

GATES = ("sigmoid", "hardsigmoid")  # the gate functions, by code


class ExcitationArgs(NamedTuple):
    """A squeeze-excitation's gate on the (N, C, 1, 1) channel means of its input, as tensors:
    ``gate(F.conv2d(activation(F.conv2d(means, reduce_weight, reduce_bias)), expand_weight, expand_bias))``;
    ``reduce_weight`` (S, C, 1, 1), ``expand_weight`` (C, S, 1, 1); ``activation`` one of
    :data:`~sepconv.kernels.separable.MID_ACTIVATIONS`, ``gate`` one of :data:`GATES`. Calling it computes the
    gate (the scale the input is multiplied by).

    >>> import torch
    >>> gate = ExcitationArgs(torch.ones(1, 2, 1, 1), None, torch.ones(2, 1, 1, 1), torch.zeros(2))
    >>> gate(torch.tensor([1.0, -3.0]).view(1, 2, 1, 1)).flatten()  # relu(1 - 3) = 0; sigmoid(0) = 0.5
    tensor([0.5000, 0.5000])
    """

    reduce_weight: Tensor
    reduce_bias: Tensor | None
    expand_weight: Tensor
    expand_bias: Tensor | None
    activation: str | None = "relu"
    gate: str = "sigmoid"

    def __call__(self, means: Tensor) -> Tensor:
        hidden = _activate(
            F.conv2d(means, self.reduce_weight, self.reduce_bias), MID_ACTIVATIONS.index(self.activation)
        )
        return _gate(F.conv2d(hidden, self.expand_weight, self.expand_bias), GATES.index(self.gate))


def _gate(pre: Tensor, code: int) -> Tensor:
    return torch.sigmoid(pre) if code == 0 else F.hardsigmoid(pre)


def as_excitation(excitation: ExcitationArgs, channels: int, x: Tensor) -> ExcitationArgs:
    """``excitation`` checked against ``channels`` (the depthwise conv's outputs) and ``x``; under autocast its
    tensors cast to ``x``'s (autocast) dtype, as the squeeze-excitation's convs would run."""
    if not isinstance(excitation, tuple) or not 4 <= len(excitation) <= len(ExcitationArgs._fields):
        raise TypeError(
            f"excitation must be a sepconv.kernels.ExcitationArgs, got {type(excitation).__name__} (a callable gate "
            "runs for inference only: separable_conv2d(excitation=...), any norm between the convs folded)"
        )
    excitation = ExcitationArgs(*excitation)
    if excitation.activation not in MID_ACTIVATIONS:
        raise ValueError(f"excitation.activation must be one of {MID_ACTIVATIONS}; got {excitation.activation!r}")
    if excitation.gate not in GATES:
        raise ValueError(f"excitation.gate must be one of {GATES}; got {excitation.gate!r}")
    reduce_weight = excitation.reduce_weight
    if not isinstance(reduce_weight, Tensor) or reduce_weight.dim() != 4 or reduce_weight.shape[1:] != (channels, 1, 1):
        shape = tuple(reduce_weight.shape) if isinstance(reduce_weight, Tensor) else type(reduce_weight).__name__
        raise ValueError(f"excitation.reduce_weight must have shape (S, {channels}, 1, 1), got {shape}")
    squeezed = reduce_weight.shape[0]
    expected = {
        "reduce_bias": (squeezed,),
        "expand_weight": (channels, squeezed, 1, 1),
        "expand_bias": (channels,),
    }
    for name, shape in expected.items():
        t = getattr(excitation, name)
        optional = name.endswith("bias")
        if (t is None and not optional) or (t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shape)):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"excitation.{name} must have shape {shape}{' or be None' if optional else ''}, got {got}")
    autocast = torch.is_autocast_enabled(x.device.type)
    tensors = []
    for name in ("reduce_weight", "reduce_bias", "expand_weight", "expand_bias"):
        t = getattr(excitation, name)
        if t is not None and autocast:
            t = t.to(x.dtype)
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"excitation.{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; "
                            "they must match")  # fmt: skip
        tensors.append(t)
    return ExcitationArgs(*tensors, excitation.activation, excitation.gate)


def separable_with_gate(
    args: tuple,
    excitation: ExcitationArgs,
    mid_norm: BatchNormArgs | None = None,
    out_norm: BatchNormArgs | None = None,
) -> Tensor:
    """``out_norm(pw(a * excitation(a.mean((2, 3), keepdim=True))))`` with ``a = act(mid_norm(dw(x) + b))``:
    ``args`` as ``sepconv::separable_conv2d``'s, ``excitation`` checked (:func:`as_excitation`); ``mid_norm`` a
    training-mode norm between the convs (an eval-mode one is folded into the weights by the caller), ``out_norm``
    any norm after the 1x1 conv (eval mode: folded here)."""
    x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation = args
    out_h, out_w = output_size(x.shape[-2:], dw_weight.shape[-2:], stride, padding, dilation)
    if mid_norm is not None or (out_norm is not None and out_norm.training):
        check_values(x.shape[0] * out_h * out_w, x, out_h, out_w)
    if out_norm is not None and not out_norm.training:
        pw_weight, pw_bias = fold_output_norm(pw_weight, pw_bias, out_norm)
        out_norm = None
    norm_weight, norm_bias, eps = (None, None, 0.0) if mid_norm is None else (*mid_norm[2:4], mid_norm.eps)
    gate_tensors = excitation[:4]
    codes = (activation, MID_ACTIVATIONS.index(excitation.activation), GATES.index(excitation.gate))
    inputs = (x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, pw_bias, *gate_tensors)
    op_args = (*inputs, stride, padding, dilation, *codes, eps, mid_norm is not None, out_norm is not None)
    running = RunningUpdates(running_update(mid_norm, x), running_update(out_norm, x))
    op = torch.ops.sepconv.separable_conv2d_excitation
    y, mean, var, out_mean, out_var, *_ = run_op(op, _SeparableExcitation, op_args, inputs, running)
    if mid_norm is not None:
        update_running_statistics(mid_norm, mean, var, x.shape[0] * out_h * out_w, running.mid)
    return y if out_norm is None else normalize(y, out_mean, out_var, out_norm, running.out)


# ---- custom op sepconv::separable_conv2d_excitation ------------------------------------------------------------


def _squeeze(means: Tensor, reduce_weight, reduce_bias, expand_weight, expand_bias, activation: int, gate: int):
    """``(scale, hidden_pre, hidden, expand_pre)`` of the gate on the (N, C) ``means``, as (N, ·) matrices: the
    squeeze-excitation's 1x1 convs on (N, C, 1, 1) are these matrix products."""
    hidden_pre = F.linear(means, reduce_weight.flatten(1), reduce_bias)
    hidden = _activate(hidden_pre, activation)
    expand_pre = F.linear(hidden, expand_weight.flatten(1), expand_bias)
    return _gate(expand_pre, gate), hidden_pre, hidden, expand_pre


def _excitation_forward(x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, pw_bias, reduce_weight,
                        reduce_bias, expand_weight, expand_bias, stride, padding, dilation, activation,
                        excitation_activation, gate, eps, batch_statistics, out_statistics,
                        running: RunningUpdates = NO_RUNNING_UPDATES):  # fmt: skip
    """``(y, mean, var, out_mean, out_var, means, scale, hidden_pre, hidden, expand_pre)``: the output, the mid norm's
    batch statistics (with ``batch_statistics``, else empty), the output's (with ``out_statistics``, else empty),
    the activation's per-image channel means (N, C·m) the gate was computed from (float32, float64 for float64),
    and the gate's values the backward reads (:func:`_squeeze`'s, in x's dtype, ``hidden`` empty without an
    activation: kept rather than recomputed, six operators on the host path); ``running`` updated where the
    launches computing those statistics can."""
    geometry = (stride, padding, dilation)
    compute = accumulation_dtype(x.dtype)
    weight, bias = dw_weight, dw_bias
    if batch_statistics:
        fold = Fold(dw_weight, dw_bias, norm_weight, norm_bias, eps, x.dtype)
        mean, var, weight, bias = _moments(x, dw_weight, dw_bias, *geometry, fold, running.mid)
    else:  # empty placeholders, distinct (outputs must not alias)
        mean, var = x.new_empty(0, dtype=compute), x.new_empty(0, dtype=compute)
    means = _depthwise_mean(x, weight, bias, *geometry, activation)
    gate_tensors = (reduce_weight, reduce_bias, expand_weight, expand_bias)
    scale, hidden_pre, hidden, expand_pre = _squeeze(cast(means, x.dtype), *gate_tensors, excitation_activation, gate)
    hidden = hidden if excitation_activation else hidden_pre.new_empty(0)  # no activation: hidden_pre itself
    y = _separable_forward(x, weight, bias, pw_weight, pw_bias, *geometry, activation, statistics=out_statistics,
                           scale=scale, running=running.out)  # fmt: skip
    if out_statistics:
        y, out_mean, out_var = y
    else:
        out_mean, out_var = x.new_empty(0, dtype=compute), x.new_empty(0, dtype=compute)
    return y, mean, var, out_mean, out_var, means, scale, hidden_pre, hidden, expand_pre


_SCHEMA = (
    "(Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor? norm_weight, Tensor? norm_bias, Tensor pw_weight, "
    "Tensor? pw_bias, Tensor reduce_weight, Tensor? reduce_bias, Tensor expand_weight, Tensor? expand_bias, "
    f"{_GEOMETRY}, int activation, int excitation_activation, int gate, float eps, bool batch_statistics, "
    "bool out_statistics) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("sepconv::separable_conv2d_excitation", mutates_args=(), schema=_SCHEMA)
def _excitation_op(*args):
    return _excitation_forward(*args)


@_excitation_op.register_fake
def _(x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, pw_bias, reduce_weight, reduce_bias, expand_weight,
      expand_bias, stride, padding, dilation, activation, excitation_activation, gate, eps, batch_statistics,
      out_statistics):  # fmt: skip
    out_h, out_w = output_size(x.shape[-2:], dw_weight.shape[-2:], stride, padding, dilation)
    shape = (x.shape[0], pw_weight.shape[0], out_h, out_w)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    compute = torch.promote_types(x.dtype, torch.float32)
    mid = dw_weight.shape[0] if batch_statistics else 0
    out = pw_weight.shape[0] if out_statistics else 0
    images, channels = x.shape[0], dw_weight.shape[0]
    sizes = ((mid,), (mid,), (out,), (out,), (images, channels))
    squeezed = (images, reduce_weight.shape[0])
    hidden = squeezed if excitation_activation else (0,)
    gate_sizes = ((images, channels), squeezed, hidden, (images, channels))  # in x's dtype
    return y, *(x.new_empty(size, dtype=compute) for size in sizes), *(x.new_empty(size) for size in gate_sizes)


def _setup_context(ctx, inputs, output):
    x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, pw_bias, *gate_tensors = inputs[:11]
    stride, padding, dilation, activation, excitation_activation, gate, eps, batch_statistics, _ = inputs[11:]
    _, mean, var, out_mean, out_var, means, *gate_values = output
    ctx.save_for_backward(x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, *gate_tensors, mean, var, means,
                          *gate_values)  # fmt: skip
    ctx.has_pw_bias = pw_bias is not None
    ctx.geometry, ctx.eps, ctx.batch_statistics = (stride, padding, dilation), eps, batch_statistics
    ctx.codes = (activation, excitation_activation, gate)
    # the statistics are for the running ones and output_norm.normalize (whose backward carries their terms); the
    # means' gradient is in the backward below
    ctx.mark_non_differentiable(mean, var, out_mean, out_var, means, *gate_values)
    ctx.set_materialize_grads(False)  # no zero gradients made for them (operators on the host path); see backward


def _squeeze_backward(grad_scale: Tensor, means: Tensor, squeezed: tuple, gate_tensors: tuple, codes: tuple):
    """Gradients of the gate for ``grad_scale`` (N, C·m): ``(grad_means, grad_reduce_weight, grad_reduce_bias,
    grad_expand_weight, grad_expand_bias)``, computed in ``grad_scale``'s dtype, the weights' in their shapes;
    ``means`` and ``squeezed`` (:func:`_squeeze`'s results) as the forward computed them."""
    work = grad_scale.dtype
    scale, hidden_pre, hidden, expand_pre = (cast(t, work) for t in squeezed)
    reduce_weight, expand_weight = cast(gate_tensors[0], work).flatten(1), cast(gate_tensors[2], work).flatten(1)
    if codes[1] == 0:
        grad_pre = torch.ops.aten.sigmoid_backward(grad_scale, scale)
    else:
        grad_pre = torch.ops.aten.hardsigmoid_backward(grad_scale, expand_pre)
    grad_expand_weight = grad_pre.T @ hidden
    grad_hidden = grad_pre @ expand_weight
    if codes[0]:
        grad_hidden = _activation_backward(grad_hidden, hidden_pre, codes[0], out=grad_hidden)
    grad_reduce_weight = grad_hidden.T @ cast(means, work)
    grad_means = grad_hidden @ reduce_weight
    shapes = (gate_tensors[0].shape, gate_tensors[2].shape)
    return (grad_means, grad_reduce_weight.view(shapes[0]), grad_hidden.sum(0), grad_expand_weight.view(shapes[1]),
            grad_pre.sum(0))  # fmt: skip


def _scale_and_weight_gradients(
    grad: Tensor, mid: Tensor, scale: Tensor, pw_weight: Tensor, needs_weight: bool, compute: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """``(grad_scale, grad_pw_weight)`` for the 1x1 conv's output gradient ``grad`` (N, O, H, W), its input
    ``mid * scale`` (``mid`` (N, C, H, W), ``scale`` (N, C)): both from one batched product of the two as laid out
    (per image ``P = grad @ midᵀ``, (O, C): NCHW and channels_last are row- or column-major matrices, no copy),
    ``grad_pw[o, c] = Σ_n P[n, o, c]·scale[n, c]`` and ``grad_scale[n, c] = Σ_o P[n, o, c]·pw[o, c]``, instead of the
    scaled input and the product ``(pwᵀ grad)·mid``, two intermediate-sized temporaries. ``grad_scale`` in
    ``compute``; the weight's gradient (None unless ``needs_weight``) in its dtype."""
    products = torch.bmm(grad.flatten(2), mid.flatten(2).transpose(1, 2))  # (N, O, C), promoted in the products
    grad_weight = None
    if needs_weight:
        grad_weight = cast((products * cast(scale, compute)[:, None, :]).sum(0), pw_weight.dtype)
        grad_weight = grad_weight.view(pw_weight.shape)
    grad_scale = (products * cast(pw_weight, compute).flatten(1)).sum(1)
    return grad_scale, grad_weight


def _excitation_backward(ctx, grad, *_statistics_grads):
    """Recompute the depthwise output ``z`` once; at most three intermediate-sized tensors alive at once (``z``, the
    activation and the 1x1 conv's input gradient: :func:`_scale_and_weight_gradients`) where an image has at least as
    many pixels as the block outputs, else four (a product of the last two), as PyTorch's block keeps the conv's,
    the norm's, the activation's and the scaled outputs for its backward."""
    (x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, reduce_weight, reduce_bias, expand_weight,
     expand_bias, mean, var, means, scale, hidden_pre, hidden, expand_pre) = ctx.saved_tensors  # fmt: skip
    gate_tensors = (reduce_weight, reduce_bias, expand_weight, expand_bias)
    needs = ctx.needs_input_grad
    grads: list[Tensor | None] = [None] * 20
    if grad is None:  # gradients are not materialized: y did not reach the loss
        return tuple(grads)
    activation = ctx.codes[0]
    if ctx.has_pw_bias and needs[6]:
        grads[6] = grad.sum((0, 2, 3))
    depthwise_args = (x, dw_weight, dw_bias, *ctx.geometry)
    z = run_op(torch.ops.sepconv.depthwise_conv2d, _DepthwiseConv2d, depthwise_args, (x, dw_weight, dw_bias))
    work = norm_dtype(z) if ctx.batch_statistics else z.dtype
    z = cast(z, work)
    gamma, beta = cast(norm_weight, mean.dtype), cast(norm_bias, mean.dtype)  # as the statistics

    def pre_activation(z: Tensor) -> Tensor:  # the mid norm's output (PyTorch's eval-mode batch norm, the batch's)
        return torch.batch_norm(z, gamma, beta, mean, var, False, 0.0, ctx.eps, False) if ctx.batch_statistics else z

    compute = means.dtype
    hidden = hidden if ctx.codes[1] else hidden_pre
    squeezed = (scale, hidden_pre, hidden, expand_pre)  # the forward's, in x's dtype
    scale = scale.view(*scale.shape, 1, 1)  # (N, C·m, 1, 1)
    mid = cast(_activate(pre_activation(z), activation), x.dtype)  # the activation as stored
    needs_scaled = any(needs[:5]) or any(needs[7:11])  # the 1x1 conv's input gradient
    grad_scaled = None
    pixels = grad.shape[2] * grad.shape[3]
    if pixels >= grad.shape[1]:  # per-image products no larger than an intermediate: no intermediate-sized temporary
        grad_scale, grads[5] = _scale_and_weight_gradients(grad, mid, squeezed[0], pw_weight, needs[5], compute)
        del mid
        if not needs_scaled:
            return tuple(grads)
    else:  # few pixels, many outputs (late stages): the products would outgrow an intermediate
        if needs[5]:  # the 1x1 weight's gradient, on the scaled activation, and its input's in the same call
            grad_scaled, grads[5] = pointwise_backward(grad, mid * scale, pw_weight, needs_scaled)
        if not needs_scaled:
            return tuple(grads)
        if grad_scaled is None:
            grad_scaled = F.conv2d(grad, pw_weight.transpose(0, 1))
        grad_scale = (grad_scaled * mid).sum((2, 3), dtype=compute)
        del mid
    grad_means, *gate_grads = _squeeze_backward(grad_scale, cast(means, x.dtype), squeezed, gate_tensors, ctx.codes[1:])
    for i, (t, g) in enumerate(zip(gate_tensors, gate_grads, strict=True), start=7):
        grads[i] = cast(g, t.dtype) if t is not None and needs[i] else None
    if not any(needs[:5]):
        return tuple(grads)
    if grad_scaled is None:
        grad_scaled = F.conv2d(grad, pw_weight.transpose(0, 1))  # the 1x1 conv's input gradient
    grad_mid = cast(grad_scaled, work).mul_(cast(scale, work))  # through the scale, and through the means: each
    grad_mid.add_(cast(grad_means, work).view(scale.shape), alpha=1 / pixels)  # pixel's share of its channel's mean
    del grad_scaled
    if activation:
        grad_mid = _activation_backward(grad_mid, pre_activation(z), activation, out=grad_mid)
    if ctx.batch_statistics:
        mask = [True, norm_weight is not None and needs[3], norm_bias is not None and needs[4]]
        grad_z, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_mid, z, gamma, None, None, mean, (var + ctx.eps).rsqrt(), True, ctx.eps, mask
        )
        grads[3] = cast(grad_gamma, norm_weight.dtype) if mask[1] else None
        grads[4] = cast(grad_beta, norm_bias.dtype) if mask[2] else None
    else:
        grad_z = grad_mid
    del grad_mid, z
    grads[:3] = depthwise_gradients(cast(grad_z, x.dtype), x, dw_weight, dw_bias is not None, ctx.geometry, needs)
    return tuple(grads)


_SeparableExcitation = differentiable(
    _excitation_op, "_SeparableExcitation", _excitation_forward, _setup_context, _excitation_backward
)
