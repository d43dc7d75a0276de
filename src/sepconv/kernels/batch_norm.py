"""``separable_conv2d_batch_norm``: depthwise -> BatchNorm -> activation -> pointwise on the fused kernel, in
training mode too.

A BatchNorm between the convs is, for one batch, a per-channel affine map of the depthwise output: with the
batch's mean μ and variance σ² of ``z = dw(x) + b`` it is ``γ (z - μ) / sqrt(σ² + ε) + β``, which folds into
the depthwise weight and bias. A training step's forward (custom op ``sepconv::separable_conv2d_batch_norm``)
runs two passes over ``x``: the statistics (our depthwise kernel with its tiles reduced per channel instead of
stored: ``z`` is never written), then the fused kernel (:func:`~sepconv.kernels.separable_conv2d`) on the
weights folded with them. Only
``x`` and per-channel tensors are kept for backward, not ``z`` and its normalized and activated copies. Backward
recomputes ``z`` once, then the 1x1 conv's gradients and the activation's with PyTorch's ops, BatchNorm's
gradient (batch statistics' terms included) with PyTorch's own ``native_batch_norm_backward``, and the depthwise
conv's with our kernels. Running statistics are updated as ``F.batch_norm`` updates them (unbiased variance):
on plain eager calls inside the launch that combines the batch statistics
(:func:`~sepconv.kernels.separable.finalize_moments`; buffers in the statistics' dtype, contiguous), else by
PyTorch's operators after the op (a custom op with autograd cannot declare the mutation); in eval mode they are
folded instead (:func:`~sepconv.kernels.separable_conv2d`'s op).

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
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sepconv._dtypes import accumulation_dtype, cast
from sepconv.folding import fold_statistics
from sepconv.kernels._depthwise_triton import depthwise_moments_kernel
from sepconv.kernels._sizes import cdiv
from sepconv.kernels.depthwise import (
    _GEOMETRY,
    PaddingSpec,
    _batch_chunks,
    _DepthwiseConv2d,
    _geometry,
    _tiles,
    depthwise_gradients,
    differentiable,
    direct_launch_options,
    output_size,
    prepare_call,
    run_op,
)
from sepconv.kernels.output_norm import (
    BatchNormArgs,
    as_output_norm,
    check_norm,
    check_values,
    fold_output_norm,
    norm_dtype,
    normalize,
    running_update,
    separable_with_output_norm,
    update_running_statistics,
)
from sepconv.kernels.separable import (
    MID_ACTIVATIONS,
    RELU_FAMILY,
    Finalization,
    Fold,
    RunningUpdate,
    _activate,
    _activation_backward,
    _check_pointwise,
    _SeparableConv2d,
    finalization,
    finalize_moments,
    finalized,
    finalizes_in_launch,
    in_launch,
    pointwise_backward,
)
from sepconv.kernels.separable import _forward as _separable_forward

if TYPE_CHECKING:
    from sepconv.kernels.differentiable_excitation import ExcitationArgs

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
    out_norm: BatchNormArgs | None = None,
    excitation: ExcitationArgs | None = None,
) -> Tensor:
    """``F.conv2d(act(F.batch_norm(F.conv2d(x, dw_weight, dw_bias, stride, padding, dilation, groups=C),
    running_mean, running_var, norm_weight, norm_bias, training, momentum, eps)), pw_weight, pw_bias)``.

    The conv arguments are :func:`~sepconv.kernels.separable_conv2d`'s, the norm's ``F.batch_norm``'s:
    ``training=True`` normalizes with the batch's statistics and, where ``running_mean``/``running_var`` are
    given, updates them in place; ``training=False`` folds the running statistics. ``x`` must be batched
    (N, C, H, W), as for ``nn.BatchNorm2d``. Under autocast the convs run in the autocast dtype and the
    statistics and the fold in float32, as PyTorch's BatchNorm computes them. ``out_norm``: a second BatchNorm,
    after the 1x1 conv, as :func:`~sepconv.kernels.separable_conv2d` takes it (MobileNetV2's block in training:
    both norms with batch statistics, the second's from the fused kernel's statistics epilogue). ``excitation``: a
    squeeze-excitation between the activation and the 1x1 conv (an :class:`~sepconv.kernels.ExcitationArgs`;
    EfficientNet's and MobileNetV3's blocks; :mod:`sepconv.kernels.differentiable_excitation`).
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
    mid_norm = BatchNormArgs(running_mean, running_var, norm_weight, norm_bias, training, momentum, eps)
    check_norm("", "the depthwise conv's outputs", dw_weight.shape[0], x, mid_norm)
    out = None if out_norm is None else as_output_norm(out_norm, pw_weight.shape[0], x)
    activation = MID_ACTIVATIONS.index(mid_activation)
    if not training:
        statistics = (running_mean, running_var, norm_weight, norm_bias, eps)
        folded_weight, folded_bias = fold_statistics(weight, bias, *statistics, x.dtype)
    if excitation is not None:
        from sepconv.kernels.differentiable_excitation import as_excitation, separable_with_gate

        gate = as_excitation(excitation, dw_weight.shape[0], x)
        weights = (dw_weight, dw_bias) if training else (folded_weight, folded_bias)
        args = (x, *weights, pw_weight, pw_bias, *geometry, activation)
        return separable_with_gate(args, gate, mid_norm if training else None, out)
    if not training:
        args = (x, folded_weight, folded_bias, pw_weight, pw_bias, *geometry, activation)
        if out is not None:
            return separable_with_output_norm(args, out)
        inputs = (x, folded_weight, folded_bias, pw_weight, pw_bias)
        return run_op(torch.ops.sepconv.separable_conv2d, _SeparableConv2d, args, inputs)
    out_h, out_w = output_size(x.shape[-2:], dw_weight.shape[-2:], *geometry)
    count = x.shape[0] * out_h * out_w
    check_values(count, x, out_h, out_w)
    if out is not None and not out.training:
        pw_weight, pw_bias = fold_output_norm(pw_weight, pw_bias, out)
    out_statistics = out is not None and out.training
    args = (x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, pw_bias, *geometry, activation, eps)
    inputs = (x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, pw_bias)
    op = torch.ops.sepconv.separable_conv2d_batch_norm
    running = RunningUpdates(running_update(mid_norm, x), running_update(out, x) if out_statistics else None)
    y, mean, var, out_mean, out_var = run_op(op, _SeparableBatchNorm, (*args, out_statistics), inputs, running)
    update_running_statistics(mid_norm, mean, var, count, running.mid)
    return normalize(y, out_mean, out_var, out, running.out) if out_statistics else y


# ---- training mode: custom op sepconv::separable_conv2d_batch_norm -----------------------------------------


class RunningUpdates(NamedTuple):
    """The running statistics a block's launches update (:class:`~sepconv.kernels.separable.RunningUpdate`): the
    norm between the convs' and the one after the 1x1 conv's (None: updated by the caller)."""

    mid: RunningUpdate | None = None
    out: RunningUpdate | None = None


NO_RUNNING_UPDATES = RunningUpdates()  # the custom ops' calls: the callers update the running statistics


def _moments(
    x, weight, bias, stride, padding, dilation, fold: Fold | None = None, running: RunningUpdate | None = None
) -> tuple[Tensor, ...]:
    """Per-channel mean and biased variance of the depthwise conv's output (float32, float64 for float64),
    without writing that output: each program of ``depthwise_moments_kernel`` reduces its tile to a sum and a
    sum of squared deviations, combined afterwards in a fixed order (:func:`finalize_moments`, which with
    ``fold`` also returns the depthwise weight and bias with the norm of those statistics folded in, and updates
    ``running``), or by the statistics launch's last programs (:func:`finalizes_in_launch`)."""
    parts = _moment_launch(x, weight, bias, stride, padding, dilation, combine=Combine(fold, running))
    if parts.done is not None:
        return finalized(parts.done)
    tiling = (parts.out_size, parts.block_p)
    return finalize_moments(parts.sums, parts.squares, *tiling, tile_w=parts.tile_w, fold=fold, running=running)


def moment_parts(
    x, weight, bias, stride, padding, dilation, activation: int = 0, rounded: bool = False, sums_only: bool = False
):
    """``(sums, squares)``: the depthwise output's per-tile reductions (``depthwise_moments_kernel``), the
    (N, P, C·m) sums and squared deviations; of the output activated (``activation``, a ``MID_ACTIVATIONS`` code)
    and, with ``rounded``, rounded to x's dtype as it would be stored. With ``sums_only``, ``(sums, None)``: the
    sums alone (for means; a buffer and the squares' work fewer)."""
    parts = _moment_launch(x, weight, bias, stride, padding, dilation, activation, rounded, sums_only)
    return parts.sums, None if sums_only else parts.squares


# what depthwise_moments_kernel takes to finalize its statistics in its last programs (besides its own w, b, ACC)
_MOMENTS_FINALIZES = (
    *("mean_ptr", "var_ptr", "gamma_ptr", "beta_ptr", "fw_ptr", "fb_ptr", "rm_ptr", "rv_ptr", "eps", "momentum_hi"),
    *("momentum_lo", "BLOCK_Q", "BLOCK_T", "FOLD", "HAS_GAMMA", "HAS_BETA", "RUNNING"),
)


class Combine(NamedTuple):
    """What the statistics pass's launch may combine its parts for (:func:`finalizes_in_launch`): a fold of the
    pass's own weight and bias, running statistics to update."""

    fold: Fold | None = None
    running: RunningUpdate | None = None


class MomentParts(NamedTuple):
    """The statistics pass's (N, P, C) per-tile ``sums`` and ``squares`` of ``out_size`` (H, W) outputs in tiles
    of ``block_p`` pixels (rectangles ``tile_w`` wide, or runs: 0), and ``done``: the finalization the launch ran
    itself, or None."""

    sums: Tensor
    squares: Tensor
    out_size: tuple[int, int]
    block_p: int
    tile_w: int
    done: Finalization | None


def _moment_launch(
    x, weight, bias, stride, padding, dilation, activation: int = 0, rounded: bool = False, sums_only: bool = False,
    combine: Combine | None = None,
) -> MomentParts:  # fmt: skip
    """:func:`moment_parts`' launch; with ``combine`` and :func:`finalizes_in_launch`, the launch also combines
    the parts (:func:`finalization`; ``done`` set)."""
    out_h, out_w = output_size(x.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    channels, weight = weight.shape[0], weight.contiguous()
    tiles = _tiles(x, out_h * out_w, channels, weight.shape[2:])
    programs = tiles.pixel_programs(out_h, out_w)
    compute = accumulation_dtype(x.dtype)
    sums = torch.empty(x.shape[0], programs, channels, dtype=compute, device=x.device)
    squares = sums if sums_only else torch.empty_like(sums)  # sums: an unused pointer
    done, finalize = None, {}
    if combine is not None and not sums_only and finalizes_in_launch(x):
        done = finalization(sums, squares, (out_h, out_w), tiles.block_p, tile_w=tiles.tile_w, **combine._asdict())
        finalize = in_launch(done, _MOMENTS_FINALIZES, channels, tiles.block_c)
    for xs, sums_part, squares_part in _batch_chunks(x, sums, squares):
        grid = (programs, cdiv(channels, tiles.block_c), xs.shape[0])
        depthwise_moments_kernel[grid](
            xs,
            weight,
            weight if bias is None else bias.contiguous(),
            sums_part,
            squares_part,
            x.shape[2],
            x.shape[3],
            channels,
            out_h,
            out_w,
            *xs.stride(),
            weight.shape[2],
            weight.shape[3],
            *_geometry(stride, padding, dilation),
            channels // x.shape[1],
            MID_ACT=activation,
            ROUND=rounded,
            SUMS_ONLY=sums_only,
            **direct_launch_options(x, weight, bias, tiles),
            **finalize,
        )
    return MomentParts(sums, squares, (out_h, out_w), tiles.block_p, tiles.tile_w, done)


def _train_forward(x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, pw_bias, stride, padding, dilation,
                   activation, eps, out_statistics, running: RunningUpdates = NO_RUNNING_UPDATES):  # fmt: skip
    """``(y, mean, var, out_mean, out_var)``: the output, the mid norm's batch statistics and, with
    ``out_statistics``, the output's (from the fused kernel's epilogue; else empty); ``running`` updated where
    the launches computing those statistics can (plain-eager calls: :func:`~sepconv.kernels.depthwise.run_op`)."""
    fold = Fold(dw_weight, dw_bias, norm_weight, norm_bias, eps, x.dtype)
    mean, var, weight, bias = _moments(x, dw_weight, dw_bias, stride, padding, dilation, fold, running.mid)
    geometry = (stride, padding, dilation)
    if out_statistics:
        y, out_mean, out_var = _separable_forward(x, weight, bias, pw_weight, pw_bias, *geometry, activation,
                                                  statistics=True, running=running.out)  # fmt: skip
        return y, mean, var, out_mean, out_var
    y = _separable_forward(x, weight, bias, pw_weight, pw_bias, *geometry, activation)
    return y, mean, var, mean.new_empty(0), mean.new_empty(0)


_TRAIN_SCHEMA = (
    "(Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor? norm_weight, Tensor? norm_bias, Tensor pw_weight, "
    f"Tensor? pw_bias, {_GEOMETRY}, int activation, float eps, bool out_statistics) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("sepconv::separable_conv2d_batch_norm", mutates_args=(), schema=_TRAIN_SCHEMA)
def _train_op(x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, pw_bias, stride, padding, dilation,
              activation, eps, out_statistics):  # fmt: skip
    return _train_forward(x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, pw_bias, stride, padding,
                          dilation, activation, eps, out_statistics)  # fmt: skip


@_train_op.register_fake
def _(x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, pw_bias, stride, padding, dilation, activation, eps,
      out_statistics):  # fmt: skip
    y = torch.ops.sepconv.separable_conv2d(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, 0)
    compute = torch.promote_types(x.dtype, torch.float32)
    mid, out = dw_weight.shape[0], pw_weight.shape[0] if out_statistics else 0
    return y, *(x.new_empty(size, dtype=compute) for size in (mid, mid, out, out))


def _train_setup_context(ctx, inputs, output):
    x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, pw_bias, stride, padding, dilation, activation, eps, _ = (
        inputs
    )
    _, mean, var, out_mean, out_var = output
    ctx.save_for_backward(x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, mean, var)
    ctx.has_pw_bias = pw_bias is not None
    ctx.geometry, ctx.activation, ctx.eps = (stride, padding, dilation), activation, eps
    # the mid norm's statistics are for the running ones (updated without autograd); the output's for
    # output_norm.normalize, whose backward carries their terms
    ctx.mark_non_differentiable(mean, var, out_mean, out_var)
    ctx.set_materialize_grads(False)  # no zero gradients made for them (operators on the host path); see backward


def _train_backward(ctx, grad, *_statistics_grads):
    """Recompute ``z`` once; at most three intermediate-sized tensors alive at once (``z``, the 1x1 conv's
    input gradient, the activation's input), as PyTorch's BatchNorm backward holds its input, output gradient
    and input gradient."""
    x, dw_weight, dw_bias, norm_weight, norm_bias, pw_weight, mean, var = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads: list[Tensor | None] = [None] * 13
    if grad is None:  # gradients are not materialized: y did not reach the loss
        return tuple(grads)
    if ctx.has_pw_bias and needs[6]:
        grads[6] = grad.sum((0, 2, 3))
    depthwise_args = (x, dw_weight, dw_bias, *ctx.geometry)
    z = run_op(torch.ops.sepconv.depthwise_conv2d, _DepthwiseConv2d, depthwise_args, (x, dw_weight, dw_bias))
    work = norm_dtype(z)
    z = cast(z, work)
    gamma, beta = cast(norm_weight, mean.dtype), cast(norm_bias, mean.dtype)  # as the statistics

    def normalized(z: Tensor) -> Tensor:  # the norm's output from z (PyTorch's eval-mode batch norm)
        return torch.batch_norm(z, gamma, beta, mean, var, False, 0.0, ctx.eps, False)

    # relu and relu6's backward can read their output (RELU_FAMILY): the activated output kept from the 1x1
    # weight's gradient, instead of a second normalization of z (same peak: z, that output, the input gradient)
    activated = grad_mid = None
    if needs[5]:  # the 1x1 weight's gradient, on the activated norm output, and its input's in the same call
        activated = _activate(normalized(z), ctx.activation)
        grad_mid, grads[5] = pointwise_backward(grad, cast(activated, x.dtype), pw_weight, any(needs[:5]))
        activated = activated if ctx.activation in RELU_FAMILY else None
    if not any(needs[:5]):
        return tuple(grads)
    if grad_mid is None:
        grad_mid = F.conv2d(grad, pw_weight.transpose(0, 1))  # the 1x1 conv's input gradient
    grad_mid = cast(grad_mid, work)
    if ctx.activation:
        at = normalized(z) if activated is None else activated
        grad_mid = _activation_backward(grad_mid, at, ctx.activation, out=grad_mid)
        del at, activated
    invstd = (var + ctx.eps).rsqrt()
    mask = [True, norm_weight is not None and needs[3], norm_bias is not None and needs[4]]
    grad_z, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
        grad_mid, z, gamma, None, None, mean, invstd, True, ctx.eps, mask
    )
    del grad_mid, z
    grads[3] = cast(grad_gamma, norm_weight.dtype) if mask[1] else None
    grads[4] = cast(grad_beta, norm_bias.dtype) if mask[2] else None
    grads[:3] = depthwise_gradients(cast(grad_z, x.dtype), x, dw_weight, dw_bias is not None, ctx.geometry, needs)
    return tuple(grads)


_SeparableBatchNorm = differentiable(
    _train_op, "_SeparableBatchNorm", _train_forward, _train_setup_context, _train_backward
)
