"""A BatchNorm after the separable conv's 1x1 conv (``out_norm``), in training mode without reading ``y`` twice.

PyTorch's training-mode BatchNorm reads its input twice (the batch statistics, then the normalization) and writes
its output. Here the fused kernel's statistics epilogue reduces each output tile to per-channel sums and squared
deviations as it stores it (custom op ``sepconv::separable_conv2d_statistics``: ``y`` and its batch mean and
biased variance), and the normalization is one elementwise pass with those statistics (custom op
``sepconv::batch_norm_with_statistics``, whose backward is PyTorch's own training-mode
``native_batch_norm_backward``: the batch statistics' terms included). Running statistics are updated as
``F.batch_norm`` updates them (on plain eager calls inside the launch that combines the statistics, as for the norm
between the convs: :mod:`sepconv.kernels.batch_norm`). In eval mode the norm is folded into the 1x1 conv's weight
and bias instead.

>>> import torch
>>> import torch.nn.functional as F
>>> from sepconv.kernels import separable_conv2d
>>> x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
>>> dw, pw = torch.randn(3, 1, 3, 3, dtype=torch.float64), torch.randn(5, 3, 1, 1, dtype=torch.float64)
>>> mean, var = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
>>> y = separable_conv2d(x, dw, pw, padding=1, out_norm=BatchNormArgs(mean, var, training=True))
>>> conv = F.conv2d(F.conv2d(x, dw, padding=1, groups=3), pw)
>>> torch.allclose(y, F.batch_norm(conv, None, None, training=True))
True
>>> torch.allclose(mean, 0.1 * conv.mean((0, 2, 3)))  # running statistics updated with momentum 0.1
True
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from sepconv._dtypes import accumulation_dtype, cast
from sepconv.folding import fold_statistics
from sepconv.kernels.depthwise import _GEOMETRY, _memory_format, differentiable, output_size, run_op
from sepconv.kernels.separable import RunningUpdate, _backward, _forward, _SeparableConv2d, _setup_context

__all__ = ["BatchNormArgs"]


class BatchNormArgs(NamedTuple):
    """``F.batch_norm``'s arguments after the input, in its order: ``F.batch_norm(y, *args)`` is the norm.

    >>> BatchNormArgs(None, None, training=True)
    BatchNormArgs(running_mean=None, running_var=None, weight=None, bias=None, training=True, momentum=0.1, eps=1e-05)
    """

    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None = None
    bias: Tensor | None = None
    training: bool = False
    momentum: float = 0.1
    eps: float = 1e-5


def check_norm(prefix: str, what: str, channels: int, x: Tensor, norm: BatchNormArgs) -> None:
    """Shapes, dtypes and devices of a norm's tensors over ``channels`` (``what``: whose outputs), named as the
    caller knows them (``prefix``: ``"out_norm."`` or ``""`` for keyword arguments)."""
    named = (("running_mean", norm.running_mean), ("running_var", norm.running_var))
    named += (("weight" if prefix else "norm_weight", norm.weight), ("bias" if prefix else "norm_bias", norm.bias))
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != (channels,):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{prefix}{name} must have shape ({channels},) ({what}), got {shape}")
        if not t.is_floating_point() or t.device != x.device:
            raise TypeError(
                f"{prefix}{name} must be a floating-point tensor on {x.device}; got {t.dtype} on {t.device}"
            )
    if isinstance(norm.momentum, bool) or not isinstance(norm.momentum, numbers.Real):
        raise TypeError(
            f"{prefix}momentum must be a number, as F.batch_norm's (nn.BatchNorm2d(momentum=None) passes "
            f"1 / num_batches_tracked), got {type(norm.momentum).__name__}"
        )
    if (norm.running_mean is None) != (norm.running_var is None):
        raise ValueError(f"{prefix}running_mean and {prefix}running_var must both be given or both be None")
    if not norm.training and norm.running_mean is None:
        raise ValueError(
            f"{prefix}training=False normalizes with {prefix}running_mean and {prefix}running_var: give them, or "
            f"{prefix}training=True"
        )


def check_values(count: int, x: Tensor, out_h: int, out_w: int) -> None:
    """A training-mode norm needs more than one value per channel (N·H_out·W_out), as ``F.batch_norm`` says."""
    if count < 2:
        raise ValueError(
            f"training needs more than 1 value per channel to normalize; got N·H_out·W_out = {count} "
            f"(x {tuple(x.shape)}, output {out_h}x{out_w})"
        )


def as_output_norm(out_norm: object, channels: int, x: Tensor, unbatched: bool = False) -> BatchNormArgs:
    """``out_norm`` checked: a :class:`BatchNormArgs` (or a tuple of its fields) over ``channels`` outputs;
    ``x`` batched (``unbatched``: it came without the batch dimension)."""
    if not isinstance(out_norm, tuple) or not 2 <= len(out_norm) <= len(BatchNormArgs._fields):
        raise TypeError(f"out_norm must be a sepconv.kernels.BatchNormArgs or None, got {type(out_norm).__name__}")
    norm = BatchNormArgs(*out_norm)
    if unbatched or x.dim() != 4:
        shape = tuple(x.shape[1:]) if unbatched else tuple(x.shape)
        raise ValueError(f"x must have shape (N, C, H, W) for a batch norm after the convs, got {shape}")
    check_norm("out_norm.", "the 1x1 conv's outputs", channels, x, norm)
    return norm


def fold_output_norm(pw_weight: Tensor, pw_bias: Tensor | None, norm: BatchNormArgs) -> tuple[Tensor, Tensor]:
    """An eval-mode ``norm`` folded into the 1x1 conv (float32 or wider, stored in the weight's dtype):
    differentiable in the weights and the norm's affine parameters, as eval-mode ``F.batch_norm`` is."""
    statistics = (norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)
    return fold_statistics(pw_weight, pw_bias, *statistics, pw_weight.dtype)


def running_update(norm: BatchNormArgs | None, x: Tensor) -> RunningUpdate | None:
    """The update of a training-mode ``norm``'s running statistics by the launch computing its statistics for input
    ``x`` (:class:`~sepconv.kernels.separable.RunningUpdate`), or None where a launch cannot write them (none
    given, another dtype than the statistics', not contiguous)."""
    if norm is None or not norm.training or norm.running_mean is None or norm.running_var is None:
        return None
    dtype = accumulation_dtype(x.dtype)  # the statistics': a launch writes the buffers in it, contiguous
    if not all(t.dtype == dtype and t.is_contiguous() for t in (norm.running_mean, norm.running_var)):
        return None
    return RunningUpdate(norm.running_mean, norm.running_var, norm.momentum)


def update_running_statistics(
    norm: BatchNormArgs, mean: Tensor, var: Tensor, count: int, running: RunningUpdate | None = None
) -> None:
    """``norm``'s running statistics moved towards a batch's, as ``F.batch_norm`` does (unbiased variance),
    unless a launch did (``running.done``)."""
    if norm.running_mean is None or norm.running_var is None or (running is not None and running.done):
        return
    with torch.no_grad():
        norm.running_mean.lerp_(cast(mean, norm.running_mean.dtype), norm.momentum)
        norm.running_var.lerp_(cast(var * (count / (count - 1)), norm.running_var.dtype), norm.momentum)


def norm_dtype(t: Tensor) -> torch.dtype:
    """The dtype a BatchNorm's own ops run in for ``t``: ``t``'s with float32 statistics and parameters, as
    PyTorch's BatchNorm on CUDA; on a CPU (no such mixed fp16/bf16 kernels there) float32, as CPU autocast runs
    BatchNorm."""
    return t.dtype if t.is_cuda or t.dtype in (torch.float32, torch.float64) else torch.float32


def separable_with_output_norm(args: tuple, norm: BatchNormArgs) -> Tensor:
    """``F.batch_norm(separable(*args), *norm)``: ``args`` as ``sepconv::separable_conv2d``'s."""
    x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, _ = args
    if not norm.training:
        pw_weight, pw_bias = fold_output_norm(pw_weight, pw_bias, norm)
        folded = (x, dw_weight, dw_bias, pw_weight, pw_bias)
        return run_op(torch.ops.sepconv.separable_conv2d, _SeparableConv2d, (*folded, *args[5:]), folded)
    out_h, out_w = output_size(x.shape[-2:], dw_weight.shape[-2:], stride, padding, dilation)
    check_values(x.shape[0] * out_h * out_w, x, out_h, out_w)
    tensors = (x, dw_weight, dw_bias, pw_weight, pw_bias)
    running = running_update(norm, x)
    op = torch.ops.sepconv.separable_conv2d_statistics
    y, mean, var = run_op(op, _SeparableStatistics, args, tensors, running)
    return normalize(y, mean, var, norm, running)


def normalize(
    y: Tensor, mean: Tensor, var: Tensor, norm: BatchNormArgs, running: RunningUpdate | None = None
) -> Tensor:
    """A training-mode ``norm`` of ``y`` given ``y``'s batch statistics ``mean`` and biased ``var``: running
    statistics updated (unless ``running.done``: by the launch that computed the statistics), ``y`` normalized
    (its gradient includes the statistics' terms)."""
    update_running_statistics(norm, mean, var, y.shape[0] * y.shape[2] * y.shape[3], running)
    args = (y, mean, var, norm.weight, norm.bias, norm.eps)
    return run_op(torch.ops.sepconv.batch_norm_with_statistics, _NormalizeWithStatistics, args, (y, *args[3:5]))


# ---- custom op sepconv::separable_conv2d_statistics: the separable conv and its output's batch statistics ----


@torch.library.custom_op(
    "sepconv::separable_conv2d_statistics",
    mutates_args=(),
    schema="(Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor pw_weight, Tensor? pw_bias, "
    f"{_GEOMETRY}, int activation) -> (Tensor, Tensor, Tensor)",
)
def _statistics_op(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation):
    return _statistics_forward(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation)


@_statistics_op.register_fake
def _(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation):
    out_h, out_w = output_size(x.shape[-2:], dw_weight.shape[-2:], stride, padding, dilation)
    c_out = pw_weight.shape[0]
    y = torch.empty((x.shape[0], c_out, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    compute = torch.promote_types(x.dtype, torch.float32)
    return y, x.new_empty(c_out, dtype=compute), x.new_empty(c_out, dtype=compute)


def _statistics_setup_context(ctx, inputs, output):
    _setup_context(ctx, inputs, output[0])
    ctx.mark_non_differentiable(output[1], output[2])  # normalize's backward carries the statistics' terms
    ctx.set_materialize_grads(False)  # no zero gradients made for them (operators on the host path)


def _statistics_backward(ctx, grad, _grad_mean=None, _grad_var=None):
    return (None,) * 9 if grad is None else _backward(ctx, grad)


def _statistics_forward(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation,
                        running: RunningUpdate | None = None):  # fmt: skip
    geometry = (stride, padding, dilation)
    return _forward(x, dw_weight, dw_bias, pw_weight, pw_bias, *geometry, activation, statistics=True, running=running)


_SeparableStatistics = differentiable(
    _statistics_op, "_SeparableStatistics", _statistics_forward, _statistics_setup_context, _statistics_backward
)


# ---- custom op sepconv::batch_norm_with_statistics: training-mode BatchNorm given the batch's statistics ----


def _normalize(y, mean, var, weight, bias, eps):
    weight, bias = cast(weight, mean.dtype), cast(bias, mean.dtype)
    out = torch.batch_norm(
        cast(y, norm_dtype(y)), weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled
    )
    return cast(out, y.dtype)


@torch.library.custom_op(
    "sepconv::batch_norm_with_statistics",
    mutates_args=(),
    schema="(Tensor y, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> Tensor",
)
def _normalize_op(y, mean, var, weight, bias, eps):
    return _normalize(y, mean, var, weight, bias, eps)


@_normalize_op.register_fake
def _(y, mean, var, weight, bias, eps):
    return torch.empty_like(y)


def _normalize_setup_context(ctx, inputs, output):
    y, mean, var, weight, bias, eps = inputs
    ctx.save_for_backward(y, mean, var, weight)
    ctx.eps, ctx.bias_dtype = eps, None if bias is None else bias.dtype


def _normalize_backward(ctx, grad):
    """PyTorch's training-mode BatchNorm backward with the forward's batch statistics (``mean`` and ``var`` are
    ``y``'s, so their gradients are in ``y``'s)."""
    y, mean, var, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], weight is not None and needs[3], ctx.bias_dtype is not None and needs[4]]
    if not any(mask):
        return None, None, None, None, None, None
    work = norm_dtype(y)
    grad_y, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        cast(grad, work), cast(y, work), cast(weight, mean.dtype), None, None, mean, (var + ctx.eps).rsqrt(), True,
        ctx.eps, mask,
    )  # fmt: skip
    grad_y = cast(grad_y, y.dtype) if mask[0] else None
    grad_weight = cast(grad_weight, weight.dtype) if mask[1] else None
    grad_bias = cast(grad_bias, ctx.bias_dtype) if mask[2] else None
    return grad_y, None, None, grad_weight, grad_bias, None


_NormalizeWithStatistics = differentiable(
    _normalize_op, "_NormalizeWithStatistics", _normalize, _normalize_setup_context, _normalize_backward
)
