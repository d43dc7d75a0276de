"""``separable_conv2d``: depthwise (+ an activation) + pointwise in one Triton kernel; the intermediate never
reaches memory.

Forward: each program computes a depthwise tile in registers, applies the optional mid activation and
feeds it to the pointwise product
(``tl.dot``: tensor cores for fp16/bf16, exact fp32 for fp32). A program covers at most 128 outputs, so wider
pointwise convs recompute the depthwise tile per block of outputs; where that repeats too much work
(:func:`fuses`), the call runs our depthwise kernel and a matrix product instead. Backward recomputes the intermediate
instead of saving it (training keeps x, not the C·m-channel intermediate), then runs the 1x1 products
with PyTorch and the depthwise backward on our kernels. Custom op ``sepconv::separable_conv2d``.

>>> import torch
>>> import torch.nn.functional as F
>>> x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
>>> dw, pw = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(16, 4, 1, 1, dtype=torch.float64)
>>> y = separable_conv2d(x, dw, pw, padding=1)
>>> torch.allclose(y, F.conv2d(F.conv2d(x, dw, padding=1, groups=4), pw))
True
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
import triton.language as tl
from torch import Tensor

from sepconv._dtypes import accumulation_dtype
from sepconv.cpu_pointwise import pointwise_matmul
from sepconv.kernels._depthwise_triton import finalize_moments_kernel, separable_forward_kernel
from sepconv.kernels._sizes import cdiv, next_power_of_2
from sepconv.kernels.depthwise import (
    _ACC,
    _GEOMETRY,
    _MAX_GRID_YZ,
    PaddingSpec,
    _batch_chunks,
    _DepthwiseConv2d,
    _geometry,
    _memory_format,
    _static_taps,
    depthwise_gradients,
    differentiable,
    interpreting,
    output_size,
    prepare_call,
    run_op,
)
from sepconv.kernels.depthwise import _forward as _depthwise_forward

if TYPE_CHECKING:
    from sepconv.kernels.differentiable_excitation import ExcitationArgs
    from sepconv.kernels.output_norm import BatchNormArgs

__all__ = ["MAX_REPEATED_TAPS", "MID_ACTIVATIONS", "Fold", "finalize_moments", "fuses", "separable_conv2d"]

MID_ACTIVATIONS = (None, "relu", "relu6", "hardswish", "silu", "gelu")  # the kernel's codes are the positions

_MIN_DOT = 16  # tl.dot needs every block dimension >= 16
_MAX_BLOCK_O = 128  # outputs per program (default launch)


def separable_conv2d(
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
    out_norm: BatchNormArgs | None = None,
    excitation: ExcitationArgs | Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``F.conv2d(act(F.conv2d(x, dw_weight, dw_bias, stride, padding, dilation, groups=C)), pw_weight, pw_bias)``.

    ``dw_weight``: (C·m, 1, KH, KW) (depth multiplier m); ``pw_weight``: (O, C·m, 1, 1); ``mid_activation``:
    None, ``"relu"``, ``"relu6"``, ``"hardswish"``, ``"silu"`` or ``"gelu"`` (the erf form, ``F.gelu``'s
    default; the kernel applies it in the accumulation dtype, then rounds). Padding forms, dtypes and layouts as
    :func:`sepconv.kernels.depthwise_conv2d`; the output keeps ``x``'s memory format.

    ``out_norm``: a BatchNorm after the 1x1 conv, ``F.batch_norm(y, *out_norm)`` (a
    :class:`~sepconv.kernels.BatchNormArgs`; ``x`` batched). In training mode its batch statistics come from the
    fused kernel's statistics epilogue (:mod:`sepconv.kernels.output_norm`); in eval mode it is folded into the
    1x1 conv.

    ``excitation``: squeeze-excitation between the activation and the 1x1 conv, ``pw(a * excitation(a.mean((2, 3),
    keepdim=True)))``: an :class:`~sepconv.kernels.ExcitationArgs` (the squeeze-excitation's convs and gate as
    tensors; differentiable, any ``out_norm``: :mod:`sepconv.kernels.differentiable_excitation`), or any callable
    on the (N, C·m, 1, 1) means for inference only (:mod:`sepconv.kernels.excitation`), with an eval-mode
    ``out_norm`` at most.
    """
    x, tensors, geometry, unbatched = prepare_call(
        x, (dw_weight, dw_bias, pw_weight, pw_bias), stride, padding, dilation
    )
    dw_weight, dw_bias, pw_weight, pw_bias = tensors
    _check_pointwise(dw_weight, pw_weight, pw_bias, x)
    if mid_activation not in MID_ACTIVATIONS:
        raise ValueError(f"mid_activation must be one of {MID_ACTIVATIONS}; got {mid_activation!r}")
    activation = MID_ACTIVATIONS.index(mid_activation)
    args = (x, dw_weight, dw_bias, pw_weight, pw_bias, *geometry, activation)
    if isinstance(excitation, tuple):  # ExcitationArgs: differentiable
        from sepconv.kernels.differentiable_excitation import as_excitation, separable_with_gate
        from sepconv.kernels.output_norm import as_output_norm

        gate = as_excitation(excitation, dw_weight.shape[0], x)
        out = None if out_norm is None else as_output_norm(out_norm, pw_weight.shape[0], x, unbatched)
        y = separable_with_gate(args, gate, out_norm=out)
        return y.squeeze(0) if unbatched else y
    if excitation is not None:
        from sepconv.kernels.excitation import separable_with_excitation
        from sepconv.kernels.output_norm import as_output_norm, fold_output_norm

        if out_norm is not None:
            norm = as_output_norm(out_norm, pw_weight.shape[0], x, unbatched)
            if norm.training:
                raise ValueError("out_norm must be in eval mode (training=False) with an excitation (inference only)")
            pw_weight, pw_bias = fold_output_norm(pw_weight, pw_bias, norm)
        y = separable_with_excitation((x, dw_weight, dw_bias, pw_weight, pw_bias, *geometry, activation), excitation)
        return y.squeeze(0) if unbatched else y
    if out_norm is not None:
        from sepconv.kernels.output_norm import as_output_norm, separable_with_output_norm

        return separable_with_output_norm(args, as_output_norm(out_norm, pw_weight.shape[0], x, unbatched))
    y = run_op(torch.ops.sepconv.separable_conv2d, _SeparableConv2d, args, (x, dw_weight, dw_bias, pw_weight, pw_bias))
    return y.squeeze(0) if unbatched else y


def _check_pointwise(dw_weight: Tensor, pw_weight: Tensor, pw_bias: Tensor | None, x: Tensor) -> None:
    mid = dw_weight.shape[0]
    if not isinstance(pw_weight, Tensor) or pw_weight.dim() != 4 or tuple(pw_weight.shape[1:]) != (mid, 1, 1):
        shape = tuple(pw_weight.shape) if isinstance(pw_weight, Tensor) else type(pw_weight).__name__
        raise ValueError(
            f"pw_weight must have shape (O, {mid}, 1, 1) for a depthwise conv with {mid} outputs, got {shape}"
        )
    if pw_bias is not None and tuple(pw_bias.shape) != (pw_weight.shape[0],):
        raise ValueError(f"pw_bias must have shape ({pw_weight.shape[0]},) or be None, got {tuple(pw_bias.shape)}")
    for name, t in (("pw_weight", pw_weight), ("pw_bias", pw_bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; they must match")


class SeparableTiles(NamedTuple):
    """Launch configuration: BLOCK_P pixels x BLOCK_O output channels per program, mid channels in steps of
    BLOCK_C, warps, pipelining stages, and whether the depthwise tap loops are unrolled at compile time."""

    block_p: int
    block_c: int
    block_o: int
    num_warps: int = 4
    num_stages: int = 3
    static_taps: bool = False


def _block(size: int, cap: int) -> int:
    return min(max(next_power_of_2(size), _MIN_DOT), cap)


def _tiles(pixels: int, c_mid: int, c_out: int) -> SeparableTiles:
    return SeparableTiles(_block(pixels, 64), _block(c_mid, 32), _block(c_out, _MAX_BLOCK_O))


# A fused call computes each depthwise tile once per block of BLOCK_O (<= 128) outputs: R = ceil(O / BLOCK_O)
# times. Where the repeats add more than this many multiply-adds per intermediate element, (R - 1)·KH·KW, the
# call is not fused. Measured (H200, bf16, `benchmarks/results/kernels.json`, 2026-11-26): fused 384->1536 7x7
# (R = 12: 539) 4.9 ms channels_last / 8.3 ms NCHW against PyTorch's two convs 0.26 / 0.96 ms and our depthwise
# kernel alone 0.18 / 0.33 ms; 256->256 31x31 (R = 2: 961) 6.9 / 8.5 ms against our depthwise 1.25 / 2.8 ms.
# The cheapest repeats measured, 960->160 3x3 (R = 2: 9), stay fused: one launch where the call is host-bound.
MAX_REPEATED_TAPS = 48


def fuses(c_out: int, kernel_size: Sequence[int]) -> bool:
    """Whether :func:`separable_conv2d` runs its fused kernel (default launch) for ``c_out`` outputs and a
    depthwise ``kernel_size`` (KH, KW): unless repeating the depthwise tile per block of outputs costs more than
    :data:`MAX_REPEATED_TAPS` multiply-adds per intermediate element.

    >>> fuses(160, (3, 3)), fuses(1536, (7, 7)), fuses(256, (31, 31)), fuses(128, (31, 31))
    (True, False, False, True)
    """
    repeats = cdiv(c_out, _block(c_out, _MAX_BLOCK_O))
    return (repeats - 1) * kernel_size[0] * kernel_size[1] <= MAX_REPEATED_TAPS


def _forward_unfused(
    x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation, scale=None
) -> Tensor:
    """The separable conv as our depthwise kernel, the activation (times ``scale``, (N, C·m)), then the 1x1 conv
    as a matrix product (full fp32 products under PyTorch's default matmul precision); the output in ``x``'s
    memory format."""
    mid = _activate(_depthwise_forward(x, dw_weight, dw_bias, stride, padding, dilation), activation)
    if scale is not None:
        mid = mid * scale[:, :, None, None]
    if _memory_format(mid) == torch.channels_last:  # (N, H, W, C) rows times the weight, read as a view
        return F.linear(mid.permute(0, 2, 3, 1), pw_weight.flatten(1), pw_bias).permute(0, 3, 1, 2)
    return pointwise_matmul(mid, pw_weight, pw_bias)


def _forward(
    x,
    dw_weight,
    dw_bias,
    pw_weight,
    pw_bias,
    stride,
    padding,
    dilation,
    activation,
    tiles: SeparableTiles | None = None,
    statistics: bool = False,
    scale: Tensor | None = None,
    running: RunningUpdate | None = None,
):
    """The separable conv's output; with ``statistics``, ``(y, mean, var)``: also the per-channel mean and biased
    variance of ``y`` as stored (float32, float64 for float64), from the fused kernel's statistics epilogue (for
    a BatchNorm after the 1x1 conv: ``y`` is not read again for them). ``scale``: (N, C·m) in x's dtype, applied
    to the activated intermediate (squeeze-excitation). ``running``: with ``statistics``, the running statistics of
    the norm they are for, updated where the statistics epilogue computed them (:func:`finalize_moments`)."""
    out_h, out_w = output_size(x.shape[-2:], dw_weight.shape[-2:], stride, padding, dilation)
    c_mid, c_out = dw_weight.shape[0], pw_weight.shape[0]
    if tiles is None and not fuses(c_out, dw_weight.shape[2:]):
        geometry = (stride, padding, dilation)
        y = _forward_unfused(x, dw_weight, dw_bias, pw_weight, pw_bias, *geometry, activation, scale)
        return (y, *output_moments(y)) if statistics else y
    y = torch.empty((x.shape[0], c_out, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    if y.numel() == 0:
        return (y, *output_moments(y)) if statistics else y
    dw_weight, pw_weight = dw_weight.contiguous(), pw_weight.contiguous()
    tiles = tiles or _tiles(out_h * out_w, c_mid, c_out)
    programs = cdiv(out_h * out_w, tiles.block_p)
    compute = accumulation_dtype(x.dtype)
    parts = (torch.empty(x.shape[0], programs, c_out, dtype=compute, device=x.device) for _ in range(2))
    sums, squares = parts if statistics else (y, y)  # y: an unused pointer
    scales = y if scale is None else scale.contiguous()  # y: an unused pointer
    done, finalize = None, {}
    if statistics and finalizes_in_launch(x):  # combined by the epilogue's last program per output block
        done = finalization(sums, squares, (out_h, out_w), tiles.block_p, running=running)
        finalize = in_launch(done, _SEPARABLE_FINALIZES, c_out, tiles.block_o)
    for xs, ys, sums_part, squares_part, scales_part in _batch_chunks(x, y, sums, squares, scales):
        grid = (programs, cdiv(c_out, tiles.block_o), ys.shape[0])
        separable_forward_kernel[grid](
            xs,
            dw_weight,
            dw_weight if dw_bias is None else dw_bias.contiguous(),
            pw_weight,
            pw_weight if pw_bias is None else pw_bias.contiguous(),
            ys,
            sums_part,
            squares_part,
            scales_part,
            x.shape[2],
            x.shape[3],
            c_mid,
            c_out,
            out_h,
            out_w,
            *xs.stride(),
            *ys.stride(),
            dw_weight.shape[2],
            dw_weight.shape[3],
            *_geometry(stride, padding, dilation),
            c_mid // x.shape[1],
            HAS_DW_BIAS=dw_bias is not None,
            HAS_PW_BIAS=pw_bias is not None,
            MID_ACT=activation,
            ACC=_ACC.get(x.dtype, tl.float32),
            PRECISION="ieee" if x.dtype in (torch.float32, torch.float64) else "tf32",
            DOT_IN_FP32=x.dtype == torch.bfloat16
            and interpreting(),  # interpreter: bf16 tl.dot, triton-lang/triton#11584
            BLOCK_P=tiles.block_p,
            BLOCK_C=tiles.block_c,
            BLOCK_O=tiles.block_o,
            STATS=statistics,
            HAS_SCALE=scale is not None,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
            **_static_taps(tiles, dw_weight.shape[2:]),
            **finalize,
        )
    if not statistics:
        return y
    if done is not None:
        return (y, *finalized(done))
    return (y, *finalize_moments(sums, squares, (out_h, out_w), tiles.block_p, running=running))


# what the fused kernel's epilogue takes to finalize its statistics (no fold: the norm after the 1x1 conv)
_SEPARABLE_FINALIZES = ("mean_ptr", "var_ptr", "rm_ptr", "rv_ptr", "momentum_hi", "momentum_lo", "BLOCK_Q", "RUNNING")


def output_moments(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``y`` (float32, float64 for float64) read back from memory: the
    statistics where the fused kernel does not run."""
    var, mean = torch.var_mean(y.to(torch.promote_types(y.dtype, torch.float32)), dim=(0, 2, 3), correction=0)
    return mean, var


class Fold(NamedTuple):
    """A BatchNorm to fold into the depthwise conv with the statistics :func:`finalize_moments` computes:
    the conv's ``weight`` (C, 1, KH, KW) and ``bias``, the norm's ``gamma``, ``beta`` and ``eps``, the folded
    tensors' ``dtype``."""

    weight: Tensor
    bias: Tensor | None
    gamma: Tensor | None
    beta: Tensor | None
    eps: float
    dtype: torch.dtype


class RunningUpdate:
    """A training-mode BatchNorm's running statistics for :func:`finalize_moments` to move towards the batch's in
    its launch (in place, as ``F.batch_norm`` does: momentum, unbiased variance) instead of three PyTorch operators
    after it: ``mean`` and ``var`` contiguous, in the statistics' dtype. ``done`` says whether a launch did it
    (the callers update them in PyTorch otherwise: through the dispatcher, or where no launch computed the
    statistics). Made by :func:`sepconv.kernels.output_norm.running_update`."""

    __slots__ = ("done", "mean", "momentum", "var")

    def __init__(self, mean: Tensor, var: Tensor, momentum: float) -> None:
        self.mean, self.var, self.momentum, self.done = mean, var, momentum, False


class Finalization(NamedTuple):
    """A combination of per-tile statistics made ready (:func:`finalization`): ``finalize_moments_kernel``'s
    ``arguments`` by name, the tensors it writes, and what :func:`finalized` does after it."""

    arguments: dict[str, object]
    mean: Tensor
    var: Tensor
    folded_weight: Tensor
    folded_bias: Tensor
    fold: Fold | None
    running: RunningUpdate | None


def finalization(
    sums: Tensor, squares: Tensor, out_size: tuple[int, int], part_pixels: int, *, tile_w: int = 0,
    fold: Fold | None = None, running: RunningUpdate | None = None,
) -> Finalization:  # fmt: skip
    """The outputs and launch arguments of :func:`finalize_moments` (same parameters), for its own launch or for
    a statistics launch that finalizes in its last program (:func:`in_launch`)."""
    images, parts, channels = sums.shape
    mean, var = (sums.new_empty(channels) for _ in range(2))
    weight = bias = folded_weight = folded_bias = gamma = beta = mean  # mean: unused pointers
    if fold is not None:
        weight = fold.weight.contiguous()  # folded in the statistics' dtype, stored rounded to fold.dtype
        folded_weight = weight.new_empty(weight.shape, dtype=fold.dtype)
        folded_bias = mean.new_empty(channels, dtype=fold.dtype)
        bias, gamma, beta = (mean if t is None else t.contiguous() for t in (fold.bias, fold.gamma, fold.beta))
    taps = weight.numel() // channels if fold is not None else 1
    running_mean, running_var = (mean, var) if running is None else (running.mean, running.var)
    momentum = 0.0 if running is None else running.momentum
    momentum_hi = struct.unpack("f", struct.pack("f", momentum))[0]  # as the fp32 argument holds it; the rest next
    arguments = {
        "sum_ptr": sums, "m2_ptr": squares, "mean_ptr": mean, "var_ptr": var, "w_ptr": weight, "b_ptr": bias,
        "gamma_ptr": gamma, "beta_ptr": beta, "fw_ptr": folded_weight, "fb_ptr": folded_bias,
        "rm_ptr": running_mean, "rv_ptr": running_var, "PARTS": images * parts, "P": parts, "C": channels,
        "PIXELS": out_size[0] * out_size[1], "COLS": out_size[1], "TAPS": taps,
        "eps": 0.0 if fold is None else fold.eps, "momentum_hi": momentum_hi, "momentum_lo": momentum - momentum_hi,
        "ACC": _ACC.get(sums.dtype, tl.float32), "BLOCK_Q": _block(images * parts, 64),
        "BLOCK_C": _block(channels, 64), "BLOCK_T": _block(taps, 64),
        "PART_PIXELS": part_pixels, "TILE_W": tile_w, "FOLD": fold is not None,
        "HAS_BIAS": fold is not None and fold.bias is not None,
        "HAS_GAMMA": fold is not None and fold.gamma is not None,
        "HAS_BETA": fold is not None and fold.beta is not None, "RUNNING": running is not None,
    }  # fmt: skip
    return Finalization(arguments, mean, var, folded_weight, folded_bias, fold, running)


def finalized(done: Finalization) -> tuple[Tensor, ...]:
    """:func:`finalize_moments`'s result once ``done``'s launch has run: ``(mean, var)``, with a fold also the
    folded weight and bias (in the fold's dtype); marks the running statistics updated."""
    if done.running is not None:
        done.running.done = True
    if done.fold is None:
        return done.mean, done.var
    return done.mean, done.var, done.folded_weight, done.folded_bias


def finalize_moments(
    sums: Tensor, squares: Tensor, out_size: tuple[int, int], part_pixels: int, *, tile_w: int = 0,
    fold: Fold | None = None, running: RunningUpdate | None = None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """Mean and biased variance per channel from (N, P, C) per-tile ``sums`` and ``squares`` (deviations from
    each tile's own mean, squared and summed) of ``out_size`` (H, W) images: tile p covers the p-th run of
    ``part_pixels`` pixels in row-major order, or with ``tile_w`` the p-th rectangle of part_pixels / tile_w rows x
    tile_w columns (row-major order of the rectangles), each cut by the image's edges. With ``fold``, also the
    depthwise weight and bias with the BatchNorm of those statistics folded in, in the fold's dtype (rounded to
    nearest): ``(mean, var, weight, bias)``.
    ``running``: a BatchNorm's running statistics, updated in the same launch (``running.done`` set).
    One launch (``finalize_moments_kernel``; Chan et al.'s combination in a fixed order) where the same in
    PyTorch's operators took a dozen or two (host time, KERNEL_NOTES item 16).

    >>> a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([8.0, 16.0])  # a 1x5 image in tiles of 3 (one channel)
    >>> sums = torch.stack([a.sum(), b.sum()]).view(1, 2, 1)
    >>> squares = torch.stack([(a - a.mean()).square().sum(), (b - b.mean()).square().sum()]).view(1, 2, 1)
    >>> mean, var = finalize_moments(sums, squares, (1, 5), 3)
    >>> values = torch.cat([a, b])
    >>> torch.allclose(mean, values.mean()), torch.allclose(var, values.var(correction=0))
    (True, True)
    """
    done = finalization(sums, squares, out_size, part_pixels, tile_w=tile_w, fold=fold, running=running)
    finalize_moments_kernel[(cdiv(sums.shape[2], done.arguments["BLOCK_C"]),)](**done.arguments)
    return finalized(done)


# Experimental, off by default until timed on a GPU (KERNEL_NOTES item 18): the statistics launches (the depthwise
# statistics pass, the fused kernel's epilogue) combine the statistics in the last program of each channel block
# to finish (an atomic counter) instead of a second launch of finalize_moments_kernel, when one launch covers the
# batch. Set SEPCONV_FINALIZE_IN_LAUNCH=1, or this attribute, to use it.
FINALIZE_IN_LAUNCH = os.environ.get("SEPCONV_FINALIZE_IN_LAUNCH", "") == "1"


def finalizes_in_launch(x: Tensor) -> bool:
    """Whether the statistics launches for input ``x`` finalize in their last programs: :data:`FINALIZE_IN_LAUNCH`
    set and one launch covering the batch (the counters count one launch's programs)."""
    return FINALIZE_IN_LAUNCH and x.shape[0] <= _MAX_GRID_YZ


# parts per step of an in-launch combination: at most this many values per part tile (BLOCK_Q x the launch's
# channel block), 8 per thread of 4 warps; else the combination's tiles set the launch's register count (sm_90,
# kernel_sass, bf16 NHWC batch 64: the statistics pass at 960x7 72 registers, 191 with 64 parts per step, 61 now)
_IN_LAUNCH_PART_VALUES = 1024


def in_launch(done: Finalization, names: Sequence[str], channels: int, block_c: int) -> dict[str, object]:
    """A statistics launch's arguments for finalizing ``done`` in its last program per block of ``block_c`` of
    its ``channels`` (``FINALIZE``): ``done``'s arguments of those ``names``, a zeroed counter per block, and
    fewer parts per step (``BLOCK_Q``) where the launch's blocks are wide."""
    counter = torch.zeros(cdiv(channels, block_c), dtype=torch.int32, device=done.mean.device)
    arguments = {name: done.arguments[name] for name in names} | {"FINALIZE": True, "counter_ptr": counter}
    arguments["BLOCK_Q"] = max(4, min(done.arguments["BLOCK_Q"], _IN_LAUNCH_PART_VALUES // block_c))
    return arguments


@torch.library.custom_op(
    "sepconv::separable_conv2d",
    mutates_args=(),
    schema="(Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor pw_weight, Tensor? pw_bias, "
    f"{_GEOMETRY}, int activation) -> Tensor",
)
def _separable_conv2d_op(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation):
    return _forward(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation)


@_separable_conv2d_op.register_fake
def _(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation):
    out_h, out_w = output_size(x.shape[-2:], dw_weight.shape[-2:], stride, padding, dilation)
    shape = (x.shape[0], pw_weight.shape[0], out_h, out_w)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


def _setup_context(ctx, inputs, output):
    x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation = inputs
    ctx.save_for_backward(x, dw_weight, dw_bias, pw_weight)  # not the intermediate: backward recomputes it
    ctx.has_pw_bias = pw_bias is not None
    ctx.geometry = (stride, padding, dilation)
    ctx.activation = activation


def _backward(ctx, grad):
    """Gradients with at most two intermediate-sized tensors alive at once, as PyTorch's two-conv block at its
    peak. Without an activation or with relu/relu6 (whose backward can read their output): the recomputed
    intermediate activated in place, then both 1x1 gradients from one call (it and the 1x1 conv's input gradient
    alive), then that gradient and the input's. Otherwise the intermediate and the activated one (for the 1x1
    weight's gradient), then the intermediate and its gradient (the activation's backward writes into the
    intermediate), then that gradient and the input's."""
    x, dw_weight, dw_bias, pw_weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    needs_depthwise = needs[0] or needs[1] or needs[2]
    grad_pw = grad_pw_bias = grad_x = grad_dw = grad_dw_bias = grad_mid = None
    pre = None
    if needs[3] or (ctx.activation and needs_depthwise):
        depthwise_args = (x, dw_weight, dw_bias, *ctx.geometry)
        pre = run_op(torch.ops.sepconv.depthwise_conv2d, _DepthwiseConv2d, depthwise_args, (x, dw_weight, dw_bias))
    if needs[3] and ctx.activation in _OUTPUT_DECIDES:  # pre is ours alone: activated in place
        mid = _ACTIVATIONS_IN_PLACE[ctx.activation](pre)
        grad_mid, grad_pw = pointwise_backward(grad, mid, pw_weight, needs_depthwise)
        if grad_mid is not None and ctx.activation:
            grad_mid = _activation_backward(grad_mid, mid, ctx.activation, out=grad_mid)
        pre = mid = None
    elif needs[3]:  # the 1x1 weight's gradient alone (its input's after mid is freed: two alive, not three)
        grad_pw = pointwise_backward(grad, _activate(pre, ctx.activation), pw_weight, needs_input=False)[1]
    if ctx.has_pw_bias and needs[4]:
        grad_pw_bias = grad.sum((0, 2, 3))
    if needs_depthwise:
        if grad_mid is None:
            grad_mid = F.conv2d(grad, pw_weight.transpose(0, 1))  # the 1x1 conv's input gradient
            if ctx.activation:
                grad_mid = _activation_backward(grad_mid, pre, ctx.activation, out=pre)
        pre = None
        grad_x, grad_dw, grad_dw_bias = depthwise_gradients(
            grad_mid, x, dw_weight, dw_bias is not None, ctx.geometry, needs
        )
    return grad_x, grad_dw, grad_dw_bias, grad_pw, grad_pw_bias, None, None, None, None


# relu and relu6 pass a gradient where their output lies strictly inside their range, as where their input does:
# their backward may read the output instead of the input. With no activation, so does the plain block's backward,
# which activates its recomputed intermediate in place
RELU_FAMILY = (MID_ACTIVATIONS.index("relu"), MID_ACTIVATIONS.index("relu6"))
_OUTPUT_DECIDES = (0, *RELU_FAMILY)
_ACTIVATIONS_IN_PLACE = (lambda t: t, torch.relu_, lambda t: F.hardtanh_(t, 0.0, 6.0))  # by code, as _OUTPUT_DECIDES


def pointwise_backward(grad: Tensor, mid: Tensor, pw_weight: Tensor, needs_input: bool) -> tuple[Tensor | None, Tensor]:
    """``(grad_mid, grad_weight)`` of the 1x1 conv for its output gradient ``grad`` and input ``mid``, as PyTorch's
    conv computes them (both read in their layouts): one ``convolution_backward``, the input's gradient too where
    ``needs_input`` (else None) — two host operators fewer than a transposed conv for it."""
    mask = [needs_input, True, False]
    grad_mid, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, mid, pw_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask
    )
    return grad_mid, grad_weight


_ACTIVATIONS = (lambda t: t, F.relu, F.relu6, F.hardswish, F.silu, F.gelu)  # by code, as MID_ACTIVATIONS


def _activate(pre: Tensor, activation: int) -> Tensor:
    return _ACTIVATIONS[activation](pre)


def _activation_backward(grad: Tensor, pre: Tensor, activation: int, out: Tensor) -> Tensor:
    """``grad`` through the activation at ``pre``, by PyTorch's own backward op for it (0 at relu's kinks),
    written into ``out`` (may be ``pre``: elementwise)."""
    aten = torch.ops.aten
    if activation == 1:
        return aten.threshold_backward.grad_input(grad, pre, 0, grad_input=out)
    if activation == 2:
        return aten.hardtanh_backward.grad_input(grad, pre, 0, 6, grad_input=out)
    if activation == 3:
        return aten.hardswish_backward.out(grad, pre, out=out)
    if activation == 4:
        return aten.silu_backward.grad_input(grad, pre, grad_input=out)
    return aten.gelu_backward.grad_input(grad, pre, approximate="none", grad_input=out)


_SeparableConv2d = differentiable(_separable_conv2d_op, "_SeparableConv2d", _forward, _setup_context, _backward)
