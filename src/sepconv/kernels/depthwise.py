"""``depthwise_conv2d``: the 2-d depthwise convolution on our Triton kernels, differentiable.

Registered as the PyTorch custom ops ``sepconv::depthwise_conv2d`` (+ ``_grad_input``,
``_grad_weight``), so autograd, ``torch.compile`` (fake tensors, no graph break) and autocast (inputs
cast like ``F.conv2d``'s) work. CUDA tensors run compiled kernels; CPU tensors run them in Triton's
interpreter when ``TRITON_INTERPRET=1`` is set before ``sepconv.kernels`` is imported (slow: for tests).

>>> import torch
>>> import torch.nn.functional as F
>>> x, w = torch.randn(2, 4, 9, 9, dtype=torch.float64), torch.randn(8, 1, 3, 3, dtype=torch.float64)
>>> y = depthwise_conv2d(x, w, stride=2, padding=1)  # depth multiplier 2
>>> torch.allclose(y, F.conv2d(x, w, stride=2, padding=1, groups=4))
True
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from sepconv._args import int_tuple
from sepconv._dtypes import cast
from sepconv.cpu_backward import fft_grad_weight, flipped_conv_applies
from sepconv.kernels._depthwise_triton import (
    depthwise_forward_kernel,
    depthwise_forward_toeplitz_kernel,
    depthwise_grad_input_kernel,
    depthwise_grad_weight_kernel,
    depthwise_grad_weight_toeplitz_kernel,
)
from sepconv.kernels._sizes import cdiv, next_power_of_2
from sepconv.padding import same_padding

__all__ = [
    "SUPPORTED_DTYPES",
    "Tiles",
    "depthwise_conv2d",
    "interpreting",
    "output_size",
    "plain_eager",
    "prepare_call",
    "resolve_padding_sides",
    "run_kernel",
    "run_op",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACC = {torch.float64: tl.float64}  # everything else accumulates in fp32
_TILE = 1024  # outputs per program (NCHW)
_TILE_CHANNELS_LAST = 2048
# Tap loops unrolled at compile time (default tiles, `_tiles`): every tap up to a kernel area of 25 in
# channels_last (49 in NCHW), else each kernel row's taps up to 7 per row, else loops. Compiled for sm_90, the
# fully unrolled channels_last 7x7 forward spills ~3200 registers and measured 1.5x slower than row unrolling
# (NCHW's smaller per-thread tile does not: all taps 1.24x faster there); row unrolling of 13x13 and up was
# slower than loops (31x31: 1.87 vs 1.39 ms). benchmarks/KERNEL_NOTES.md has the numbers.
_MAX_FULL_UNROLL = {True: 25, False: 49}  # channels_last?
_MAX_ROW_UNROLL = 7
_MAX_SPLITS = 64  # programs sharing one grad-weight reduction
_MAX_GRID_YZ = 65535  # CUDA's cap on a launch grid's y and z dimensions (our grids put the batch on z)
_LOOP_TAPS_CHUNK_BLOCKS = 8  # grad-weight with loop_taps: pixel blocks per program

PaddingSpec = int | str | Sequence[int] | Sequence[Sequence[int]]
_PLAIN = (Tensor, torch.nn.Parameter)

# Experimental, not yet timed on a GPU (None: off): kernels of at least this many taps compute the weight
# gradient by FFT (`sepconv.cpu_backward.fft_grad_weight`; cuFFT on CUDA, in fp32 for fp16/bf16) instead of
# the Triton kernel. On a 2-core CPU that FFT beat PyTorch's 31x31 weight gradient 16x; on the GPU our Triton
# grad-weight is most of the 31x31 forward+backward (5.3 ms vs a 1.25 ms forward, H200). Read when a forward
# runs (the choice travels with the autograd graph); `benchmarks/kernels.py` times both.
FFT_GRAD_WEIGHT_MIN_TAPS: int | None = None
# Experimental likewise (None: off): stride-1, multiplier-1 kernels of at least this many taps compute the input
# gradient with our forward kernel (the output gradient convolved with the flipped kernel) instead of the
# grad-input kernel; the forward is our fastest kernel (31x31 channels_last bf16: 1.25 ms, H200).
FLIPPED_GRAD_INPUT_MIN_TAPS: int | None = None
# Experimental likewise (None: off): forwards of kernels with at least this many taps run the tensor-core
# Toeplitz kernel with `TOEPLITZ_TILES` where it applies (stride 1, dilation 1, not fp64), the flipped input
# gradient's forward included (the choice travels with the autograd graph). Static count (`kernel_sass.py`,
# sm_90, bf16): ~0.7 instructions per useful multiply-add per thread at 31x31 (the direct kernel: 4.4).
TOEPLITZ_FORWARD_MIN_TAPS: int | None = None
# Experimental likewise (None: off): weight gradients of kernels with at least this many taps run the
# tensor-core Toeplitz kernel with `TOEPLITZ_GRAD_WEIGHT_TILES` where it applies (stride 1, dilation 1, not
# fp64), before FFT_GRAD_WEIGHT_MIN_TAPS is considered. Read when the forward runs.
TOEPLITZ_GRAD_WEIGHT_MIN_TAPS: int | None = None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_padding_sides(
    padding: PaddingSpec, size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding from any accepted ``padding`` form.

    Forms: an int; ``(pad_h, pad_w)``; per side ``((top, bottom), (left, right))``; ``'valid'``;
    ``'same'`` (TensorFlow semantics, any stride: ``ceil(size / stride)`` outputs, odd pixel last).

    >>> resolve_padding_sides("same", (56, 56), (3, 3), (2, 2), (1, 1))
    (0, 1, 0, 1)
    >>> resolve_padding_sides(((1, 2), (0, 3)), (8, 8), (3, 3), (1, 1), (1, 1))
    (1, 2, 0, 3)
    """
    if isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0:  # the common case, first
        return (padding,) * 4
    message = (
        "padding must be an int >= 0, (pad_h, pad_w), ((top, bottom), (left, right)), 'same' or 'valid'; "
        f"got {padding!r}"
    )
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            (top, bottom), (left, right) = (
                same_padding(n, k, s, d) for n, k, s, d in zip(size, kernel, stride, dilation, strict=True)
            )
            return (top, bottom, left, right)
        raise ValueError(message)
    if isinstance(padding, (list, tuple)) and len(padding) == 2 and all(isinstance(p, (list, tuple)) for p in padding):
        sides = tuple(v for pair in padding for v in pair)
        if len(sides) != 4:
            raise ValueError(message)
    else:
        try:
            pad_h, pad_w = int_tuple("padding", padding, 2, minimum=0)
        except (TypeError, ValueError) as error:
            raise type(error)(message) from None
        sides = (pad_h, pad_h, pad_w, pad_w)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in sides):
        raise ValueError(message)
    return sides  # type: ignore[return-value]


def output_size(
    size: Sequence[Any], kernel: Sequence[int], stride: Sequence[int], sides: Sequence[int], dilation: Sequence[int]
) -> tuple[Any, Any]:
    """``(OH, OW)``: ``floor((n + lo + hi - d·(k - 1) - 1) / s) + 1`` per dimension (symbolic sizes allowed)."""
    return tuple(  # type: ignore[return-value]
        (n + lo + hi - d * (k - 1) - 1) // s + 1
        for n, k, s, lo, hi, d in zip(size, kernel, stride, sides[0::2], sides[1::2], dilation, strict=True)
    )


def depthwise_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: PaddingSpec = 0,
    dilation: int | Sequence[int] = 1,
) -> Tensor:
    """Depthwise conv, ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` on Triton kernels.

    ``x``: (N, C, H, W) or (C, H, W), any memory format (the output keeps it); ``weight``: (C·m, 1, KH, KW)
    for depth multiplier m; ``bias``: (C·m,) or None. fp16/bf16/fp32 accumulate in fp32, fp64 in fp64.
    ``padding``: zeros; int, (pad_h, pad_w), ((top, bottom), (left, right)), 'same' (any stride) or 'valid'.
    """
    x, (weight, bias), geometry, unbatched = prepare_call(x, (weight, bias), stride, padding, dilation)
    y = run_op(torch.ops.sepconv.depthwise_conv2d, _DepthwiseConv2d, (x, weight, bias, *geometry), (x, weight, bias))
    return y.squeeze(0) if unbatched else y


def plain_eager(tensors: Sequence[Tensor | None]) -> bool:
    """True for an eager call on plain tensors: not inside torch.compile/export tracing, no fake tensors or
    other subclasses, no dispatch or function modes, no functorch transforms. Such calls may skip the custom
    op's dispatcher round trip (tens of microseconds of Python per call); everything else goes through it."""
    if torch.compiler.is_compiling() or any(t is not None and type(t) not in _PLAIN for t in tensors):
        return False
    try:
        return not (
            torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
        )
    except AttributeError:  # a PyTorch without these internals: always the custom op
        return False


def run_op(
    op: Any, function: type[torch.autograd.Function], args: tuple, tensors: Sequence[Tensor | None], extra: Any = None
) -> Any:
    """``op(*args)`` (a custom op), or the same computation without the dispatcher for :func:`plain_eager`
    calls: ``function.apply`` (same forward, context and backward as the op's autograd) when a gradient is
    needed, else ``function.compute`` (the op without autograd). ``extra`` (unless None): a last argument of
    ``compute`` outside the op's schema, passed on plain-eager calls only (in-place work a functional op cannot
    declare: running statistics updated inside a launch)."""
    if not plain_eager(tensors):
        return op(*args)
    args = args if extra is None else (*args, extra)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return function.apply(*args)
    return function.compute(*args)


def run_kernel(op: Any, kernel: Any, args: tuple, tensors: Sequence[Tensor | None]) -> Any:
    """``op(*args)``, or ``kernel(*args)`` directly for :func:`plain_eager` calls (backward helpers)."""
    return kernel(*args) if plain_eager(tensors) else op(*args)


def differentiable(
    op: Any, name: str, compute: Callable, setup_context: Callable, backward: Callable
) -> type[torch.autograd.Function]:
    """Register ``backward`` as custom op ``op``'s autograd (with ``setup_context``), and return the same
    computation as an ``autograd.Function`` named ``name`` for :func:`run_op`'s plain-eager calls: ``compute`` is
    the op without autograd; its ``forward`` takes ``ctx`` (no separate ``setup_context``: ``apply`` then skips
    binding the arguments to the forward's signature, ~23 of the ~50 us of Python a call with gradients costs on a
    CPU). Both use ``once_differentiable(backward)``: our backward kernels have no backward of their own, so a
    double backward (e.g. a gradient penalty) raises instead of treating the first gradients as constants."""
    backward = once_differentiable(backward)
    op.register_autograd(backward, setup_context=setup_context)
    arity = len(op._opoverload._schema.arguments)

    def forward(ctx, *inputs):  # the op's arguments, then perhaps run_op's extra one
        output = compute(*inputs)
        setup_context(ctx, inputs[:arity], output)
        return output

    def function_backward(ctx, *grads):  # a None for the extra argument (Nones past the inputs are dropped)
        return (*backward(ctx, *grads), None)

    body = {
        "__doc__": "A custom op's autograd without the dispatcher (``run_op``); ``compute``: the op without autograd.",
        "__module__": compute.__module__,
        "compute": staticmethod(compute),
        "forward": staticmethod(forward),
        "backward": staticmethod(function_backward),
    }
    return types.new_class(name, (torch.autograd.Function,), exec_body=lambda namespace: namespace.update(body))


def prepare_call(
    x: Tensor,
    tensors: tuple[Tensor | None, ...],
    stride: int | Sequence[int],
    padding: PaddingSpec,
    dilation: int | Sequence[int],
) -> tuple[Tensor, tuple[Tensor | None, ...], tuple[list[int], list[int], list[int]], bool]:
    """Validate a call and bring it to the custom ops' form.

    ``tensors`` starts with the depthwise weight and its bias (checked here against ``x``); all are cast
    as autocast would cast them. Returns batched ``x``, ``tensors``, the geometry
    ``([sh, sw], [top, bottom, left, right], [dh, dw])`` and whether ``x`` was unbatched."""
    stride = int_tuple("stride", stride, 2)
    dilation = int_tuple("dilation", dilation, 2)
    weight, bias = tensors[0], tensors[1]
    _check_tensors(x, weight, bias)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    kernel = tuple(weight.shape[-2:])
    sides = resolve_padding_sides(padding, x.shape[-2:], kernel, stride, dilation)
    out_h, out_w = output_size(x.shape[-2:], kernel, stride, sides, dilation)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"the output would be {out_h}x{out_w} for input {tuple(x.shape[-2:])}, kernel {kernel}, "
            f"stride {stride}, padding (top, bottom, left, right) {sides}, dilation {dilation}; it must be at least 1x1"
        )
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # as F.conv2d: compute in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        tensors = tuple(None if t is None else t.to(dtype) for t in tensors)
    return x, tensors, (list(stride), list(sides), list(dilation)), unbatched


def _check_tensors(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must have shape (N, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    channels = x.shape[-3]
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] % channels or weight.shape[0] == 0:
        raise ValueError(
            f"weight must have shape (C·m, 1, KH, KW) with C = {channels} input channels and m >= 1, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) or be None, got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
            raise TypeError(f"{name} must have dtype {allowed}; got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share one device")
    if not torch.is_autocast_enabled(x.device.type):
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != x.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match (or use autocast)")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"sepconv.kernels runs on CUDA tensors; x is on {x.device}. For CPU tensors set TRITON_INTERPRET=1 "
            "before importing sepconv.kernels (Triton's interpreter, for testing), or use the PyTorch path."
        )


# ---- launches ---------------------------------------------------------------------------------------------


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out so (as PyTorch's convs decide), else contiguous."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _batch_chunks(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """``tensors`` (equal batch sizes, batch first) in runs of at most 65535 samples, one launch each: the launch
    grids put the batch on their z dimension, which CUDA caps there. The tensors themselves below the cap."""
    n = tensors[0].shape[0]
    if n <= _MAX_GRID_YZ:
        yield tensors
        return
    for start in range(0, n, _MAX_GRID_YZ):
        yield tuple(t[start : start + _MAX_GRID_YZ] for t in tensors)


class Tiles(NamedTuple):
    """Launch configuration: a program's tile (BLOCK_P pixels x BLOCK_C channels), its warps, whether the
    forward unrolls the tap loops at compile time (``static_taps``), and the pixels' shape: a run of the
    row-major order (``tile_w`` = 0) or a (block_p / tile_w) x tile_w rectangle (forward and grad-input),
    whether grad-weight's programs loop over the taps (``loop_taps``) instead of taking one tap each, and
    whether the forward runs the experimental tensor-core kernel (``toeplitz``: block_p output rows x 16 columns
    x block_c channels per program; only where :func:`_toeplitz_applies`, else the direct kernel)."""

    block_p: int
    block_c: int
    num_warps: int = 4
    static_taps: bool | str = False  # "all" (or True), "rows" or False: see _static_taps
    tile_w: int = 0
    loop_taps: bool = False  # grad-weight: a program walks every tap over a chunk of 8 pixel blocks
    toeplitz: bool = False  # forward, experimental: tensor cores on Toeplitz blocks (see _forward_toeplitz)

    def pixel_programs(self, rows: int, cols: int) -> int:
        """Programs along the pixel axis for a rows x cols plane."""
        if self.tile_w == 0:
            return cdiv(rows * cols, self.block_p)
        return cdiv(rows, self.block_p // self.tile_w) * cdiv(cols, self.tile_w)


def _tiles(t: Tensor, pixels: int, channels: int, kernel: Sequence[int] = (0, 0), grad_input: bool = False) -> Tiles:
    """Default tiles for a launch over ``t`` (see :func:`_default_tiles`)."""
    return _default_tiles(t.stride(1) <= t.stride(3), pixels, channels, tuple(kernel), grad_input)


@functools.lru_cache(maxsize=4096)  # a pure function of a few ints, on every call's path
def _default_tiles(channels_last: bool, pixels: int, channels: int, kernel: tuple[int, ...], grad_input: bool) -> Tiles:
    """Default tiles: the long side along the unit-stride dimension, for coalesced access. channels_last:
    64 x 32 below 256 channels (grad-input: in 8 x 8 rectangles), 16 x 128 in 4 x 4 rectangles from 256. Tap
    unrolling for ``kernel`` as ``_MAX_FULL_UNROLL``/``_MAX_ROW_UNROLL`` say (grad-input: rows at most). The
    fastest or near it in ``benchmarks/results/tune_kernels.json`` (H200, bf16)."""
    np2 = next_power_of_2
    kh, kw = kernel
    if kh * kw <= _MAX_FULL_UNROLL[channels_last] and not grad_input:
        unroll: bool | str = "all"
    else:
        unroll = "rows" if kw <= _MAX_ROW_UNROLL else False
    if channels_last:
        block_c = min(max(np2(channels), 4), 128 if channels >= 256 else 32)
        block_p = min(max(np2(pixels), 4), _TILE_CHANNELS_LAST // block_c)
        square = 4 if (block_p, block_c) == (16, 128) else 8 if grad_input and (block_p, block_c) == (64, 32) else 0
        return Tiles(block_p, block_c, 4, unroll, square)
    block_p = min(max(np2(pixels), 16), 128)
    return Tiles(block_p, min(max(np2(channels), 1), _TILE // block_p), 4, unroll)


def _static_taps(tiles: Any, kernel: Sequence[int]) -> dict[str, int]:
    """The STATIC_KH/STATIC_KW launch arguments (``tiles``: any launch configuration with ``static_taps``):
    "all" or True: both kernel sizes (every tap unrolled); "rows": STATIC_KW alone (each kernel row's taps);
    False: 0 (loops)."""
    mode = tiles.static_taps
    if not mode:
        return {"STATIC_KH": 0, "STATIC_KW": 0}
    return {"STATIC_KH": 0 if mode == "rows" else kernel[0], "STATIC_KW": kernel[1]}


def _geometry(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    return (stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1])


def _empty_output(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    out_h, out_w = output_size(x.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    shape = (x.shape[0], weight.shape[0], out_h, out_w)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


def _forward_arguments(x: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor) -> tuple:
    """The forward kernels' common leading arguments: tensors, sizes, strides, kernel size."""
    bias_or_weight = weight if bias is None else bias.contiguous()  # a valid pointer either way
    sizes = (x.shape[2], x.shape[3], y.shape[1], y.shape[2], y.shape[3])
    return (x, weight, bias_or_weight, y, *sizes, *x.stride(), *y.stride(), weight.shape[2], weight.shape[3])


def _forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, tiles: Tiles | None = None
) -> Tensor:
    y = _empty_output(x, weight, stride, padding, dilation)
    if y.numel() == 0:
        return y
    _, c_out, out_h, out_w = y.shape
    weight = weight.contiguous()
    kernel = weight.shape[2:]
    tiles = (
        tiles
        or _opted_in(x, kernel, stride, dilation, TOEPLITZ_FORWARD_MIN_TAPS, TOEPLITZ_TILES)
        or _tiles(x, out_h * out_w, c_out, kernel)
    )
    if tiles.toeplitz and _toeplitz_applies(x, stride, dilation):
        return _forward_toeplitz(x, weight, bias, padding, tiles, y)
    for xs, ys in _batch_chunks(x, y):
        grid = (tiles.pixel_programs(out_h, out_w), cdiv(c_out, tiles.block_c), ys.shape[0])
        depthwise_forward_kernel[grid](
            *_forward_arguments(xs, weight, bias, ys),
            *_geometry(stride, padding, dilation),
            c_out // x.shape[1],
            **direct_launch_options(x, weight, bias, tiles),
        )
    return y


def direct_launch_options(x: Tensor, weight: Tensor, bias: Tensor | None, tiles: Tiles) -> dict[str, Any]:
    """The keyword arguments of a launch of the direct forward kernel, or of a kernel built on its tile
    (``depthwise_moments_kernel``): bias, accumulator, tile, warps, tap unrolling."""
    return {
        "HAS_BIAS": bias is not None,
        "ACC": _ACC.get(x.dtype, tl.float32),
        "BLOCK_P": tiles.block_p,
        "BLOCK_C": tiles.block_c,
        "num_warps": tiles.num_warps,
        "TILE_W": tiles.tile_w,
        "EVEN_C": weight.shape[0] % tiles.block_c == 0,
        **_static_taps(tiles, weight.shape[2:]),
    }


# The Toeplitz forward's launch when TOEPLITZ_FORWARD_MIN_TAPS opts a kernel in: 64 output rows x 16 columns x 8
# channels per program, 8 warps (sm_90, bf16: no spills in either layout; 32 x 16 channels spills in NCHW).
TOEPLITZ_TILES = Tiles(64, 8, 8, False, 0, False, True)


def _opted_in(x: Tensor, kernel: Sequence[int], stride, dilation, minimum: int | None, tiles: Tiles) -> Tiles | None:
    """``tiles`` (a Toeplitz launch) where ``minimum`` (a ``TOEPLITZ_*_MIN_TAPS`` setting) opts this kernel size
    in and the Toeplitz kernels apply to the call, else None."""
    if minimum is None or kernel[0] * kernel[1] < minimum or not _toeplitz_applies(x, stride, dilation):
        return None
    return tiles


_TOEPLITZ_COLUMNS = 16  # output columns per product (the products' N)
_TOEPLITZ_INPUT_COLUMNS = 32  # input columns per product (K): a product covers 32 - 16 + 1 = 17 taps of a row


def _toeplitz_applies(x: Tensor, stride: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether the experimental Toeplitz kernels (forward, weight gradient) can run this call: stride 1,
    dilation 1, fp16/bf16/fp32 (fp32 multiplies in full precision, without tensor cores); any kernel size."""
    return tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) and x.dtype != torch.float64


def _forward_toeplitz(x: Tensor, weight: Tensor, bias: Tensor | None, padding, tiles: Tiles, y: Tensor) -> Tensor:
    _, c_out, out_h, out_w = y.shape
    rows = max(tiles.block_p, 16)  # the products' M: at least 16
    pixel_programs = cdiv(out_h, rows) * cdiv(out_w, _TOEPLITZ_COLUMNS)
    for xs, ys in _batch_chunks(x, y):
        depthwise_forward_toeplitz_kernel[(pixel_programs, cdiv(c_out, tiles.block_c), ys.shape[0])](
            *_forward_arguments(xs, weight, bias, ys),
            padding[0],
            padding[2],
            c_out // x.shape[1],
            HAS_BIAS=bias is not None,
            DOT_IN_FP32=x.dtype != torch.float32 and interpreting(),  # interpreter: bf16 dot, triton-lang/triton#11584
            BLOCK_C=tiles.block_c,
            BLOCK_R=rows,
            BLOCK_I=_TOEPLITZ_INPUT_COLUMNS,
            BLOCK_J=_TOEPLITZ_COLUMNS,
            num_warps=tiles.num_warps,
        )
    return y


def _grad_input(
    grad: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation, tiles: Tiles | None = None
) -> Tensor:
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    if grad_x.numel() == 0:
        return grad_x
    _, c_in, h, w = x.shape
    weight = weight.contiguous()
    tiles = tiles or _tiles(grad_x, h * w, c_in, weight.shape[2:], grad_input=True)
    for grads, grad_xs in _batch_chunks(grad, grad_x):
        grid = (tiles.pixel_programs(h, w), cdiv(c_in, tiles.block_c), grads.shape[0])
        depthwise_grad_input_kernel[grid](
            grads,
            weight,
            grad_xs,
            c_in,
            h,
            w,
            grad.shape[2],
            grad.shape[3],
            *grads.stride(),
            *grad_xs.stride(),
            weight.shape[2],
            weight.shape[3],
            *_geometry(stride, padding, dilation),
            weight.shape[0] // c_in,
            ACC=_ACC.get(x.dtype, tl.float32),
            BLOCK_P=tiles.block_p,
            BLOCK_C=tiles.block_c,
            num_warps=tiles.num_warps,
            TILE_W=tiles.tile_w,
            STATIC_KW=_static_taps(tiles, weight.shape[2:])["STATIC_KW"],
            EVEN_C=c_in % tiles.block_c == 0,
        )
    return grad_x


def _grad_weight(
    grad: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation, tiles: Tiles | None = None, bias: bool = True
) -> tuple[Tensor, Tensor | None]:
    """``(grad_weight, grad_bias)``; without ``bias`` (no bias gradient wanted: plain-eager calls) ``grad_bias``
    may be None, and the direct kernel then reduces the taps only (two host operators after the launch, not six)."""
    kernel = weight.shape[2:]
    tiles = tiles or _opted_in(x, kernel, stride, dilation, TOEPLITZ_GRAD_WEIGHT_MIN_TAPS, TOEPLITZ_GRAD_WEIGHT_TILES)
    if tiles is not None and tiles.toeplitz and _toeplitz_applies(x, stride, dilation):
        return _grad_weight_toeplitz(grad, x, weight, padding, tiles)
    c_out, _, kh, kw = weight.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, _, out_h, out_w = grad.shape
    pixels = n * out_h * out_w
    tiles = tiles or _tiles(x, pixels, c_out)
    block_p, block_c = tiles.block_p, tiles.block_c
    # a program walks (image, block of output rows) groups, block_w columns at a time
    block_w = min(next_power_of_2(max(out_w, 1)), block_p)
    row_blocks = cdiv(out_h, block_p // block_w)
    groups = n * row_blocks
    if tiles.loop_taps:  # small chunks: each program's grad-output stays in cache while it walks the taps
        splits = max(1, cdiv(pixels, _LOOP_TAPS_CHUNK_BLOCKS * block_p))
    else:
        splits = max(1, min(_MAX_SPLITS, cdiv(pixels, 16 * block_p)))
    per_split = cdiv(groups, splits) if groups else 1
    splits = cdiv(groups, per_split) if groups else 1
    # every (split, channel, tap) partial is written by the kernel: no fill launch unless nothing runs
    taps = kh * kw + bias
    partial = (torch.empty if pixels else torch.zeros)((splits, c_out, taps), dtype=acc, device=x.device)
    if pixels:
        grid = (cdiv(c_out, block_c), 1 if tiles.loop_taps else taps, splits)
        depthwise_grad_weight_kernel[grid](
            x,
            grad,
            partial,
            n,
            x.shape[2],
            x.shape[3],
            c_out,
            out_h,
            out_w,
            row_blocks,
            per_split,
            *x.stride(),
            *grad.stride(),
            kh,
            kw,
            *_geometry(stride, padding, dilation),
            c_out // x.shape[1],
            ACC=_ACC.get(x.dtype, tl.float32),
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            BLOCK_W=block_w,
            LOOP_TAPS=tiles.loop_taps,
            HAS_BIAS=bias,
            num_warps=tiles.num_warps,
        )
    total = partial.sum(0)  # fixed order: deterministic
    if not bias:  # total is the weight's alone: a view of it, cast where the weight's dtype differs
        return cast(total, weight.dtype).view(c_out, 1, kh, kw), None
    grad_weight = total[:, : kh * kw].to(weight.dtype, copy=True).reshape(c_out, 1, kh, kw)
    return grad_weight, total[:, kh * kw].to(weight.dtype, copy=True)  # copies: outputs must not alias


# The Toeplitz weight gradient's launch when TOEPLITZ_GRAD_WEIGHT_MIN_TAPS opts a kernel in: 32 of the N·OH
# output rows x 4 channels x a block of up to 32 x 32 taps per program, 8 warps (sm_90, bf16, 31x31: 0.8-1.0
# instructions per useful multiply-add per thread, no spills in either layout; on 4 warps ~40 spill
# instructions, 8 channels on 4 warps ~4600).
TOEPLITZ_GRAD_WEIGHT_TILES = Tiles(32, 4, 8, False, 0, False, True)


def _grad_weight_toeplitz(grad: Tensor, x: Tensor, weight: Tensor, padding, tiles: Tiles) -> tuple[Tensor, Tensor]:
    """Weight and bias gradients, the weight's on tensor cores (stride 1, dilation 1): a program takes
    ``tiles.block_c`` channels, a block of up to 32 x 32 taps and ``tiles.block_p`` of the N·OH output rows;
    the host adds the programs' partial sums in a fixed order (deterministic). The bias gradient is
    grad-output summed by PyTorch."""
    c_out, _, kh, kw = weight.shape
    n, _, out_h, out_w = grad.shape
    rows = n * out_h
    acc = torch.float32
    block_kh, block_kw = (max(16, min(32, next_power_of_2(k))) for k in (kh, kw))
    per_split = max(1, tiles.block_p, cdiv(rows, _MAX_GRID_YZ))  # splits on the grid's z: at most 65535
    splits = max(1, cdiv(rows, per_split))
    partial = (torch.empty if rows else torch.zeros)((splits, c_out, kh * kw), dtype=acc, device=x.device)
    if rows:
        grid = (cdiv(c_out, tiles.block_c), cdiv(kh, block_kh) * cdiv(kw, block_kw), splits)
        depthwise_grad_weight_toeplitz_kernel[grid](
            x,
            grad,
            partial,
            x.shape[2],
            x.shape[3],
            c_out,
            out_h,
            out_w,
            rows,
            per_split,
            *x.stride(),
            *grad.stride(),
            kh,
            kw,
            padding[0],
            padding[2],
            c_out // x.shape[1],
            DOT_IN_FP32=x.dtype != torch.float32 and interpreting(),
            BLOCK_C=tiles.block_c,
            BLOCK_KH=block_kh,
            BLOCK_KW=block_kw,
            BLOCK_I=2 * block_kw,  # BLOCK_J + (up to BLOCK_KW) - 1 input columns
            BLOCK_J=block_kw,
            num_warps=tiles.num_warps,
        )
    grad_weight = partial.sum(0).to(weight.dtype).reshape(c_out, 1, kh, kw)  # fixed order: deterministic
    return grad_weight, grad.sum((0, 2, 3), dtype=acc).to(weight.dtype)


def _fft_grad_weight(grad: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[Tensor, Tensor]:
    """Weight and bias gradients with the weight's by FFT (:data:`FFT_GRAD_WEIGHT_MIN_TAPS`), in fp32 (fp64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    top, bottom, left, right = padding
    grad_weight = fft_grad_weight(
        x.to(acc), grad.to(acc), weight.shape[2:], stride, (top, left), dilation, padding_end=(bottom, right)
    )
    return grad_weight.to(weight.dtype), grad.sum((0, 2, 3), dtype=acc).to(weight.dtype)


def _flipped_grad_input_applies(x: Tensor, weight: Tensor, stride, padding, dilation) -> bool:
    """Depth multiplier 1, and what :func:`sepconv.cpu_backward.flipped_conv_applies` needs on every side."""
    top, bottom, left, right = padding
    sides = (max(top, bottom), max(left, right))
    return weight.shape[0] == x.shape[1] and flipped_conv_applies(weight.shape[2:], stride, sides, dilation)


def _flipped_grad_input(
    grad: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation, tiles: Tiles | None = None
) -> Tensor:
    """Input gradient as our forward of the output gradient with the flipped kernel (FLIPPED_GRAD_INPUT_MIN_TAPS),
    on ``tiles`` (None: the forward's choice when it runs) for plain eager calls."""
    (kh, kw), (dh, dw) = weight.shape[2:], dilation
    top, bottom, left, right = padding
    sides = [dh * (kh - 1) - top, dh * (kh - 1) - bottom, dw * (kw - 1) - left, dw * (kw - 1) - right]
    args = (grad, weight.flip((2, 3)), None, [1, 1], sides, list(dilation))
    forward = functools.partial(_forward, tiles=tiles) if tiles is not None else _forward
    return run_kernel(torch.ops.sepconv.depthwise_conv2d, forward, args, (grad, weight))


# ---- custom ops -------------------------------------------------------------------------------------------

_GEOMETRY = "int[] stride, int[] padding, int[] dilation"


@torch.library.custom_op(
    "sepconv::depthwise_conv2d",
    mutates_args=(),
    schema=f"(Tensor x, Tensor weight, Tensor? bias, {_GEOMETRY}) -> Tensor",
)
def _depthwise_conv2d_op(x, weight, bias, stride, padding, dilation):
    return _forward(x, weight, bias, stride, padding, dilation)


@_depthwise_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation):
    return _empty_output(x, weight, stride, padding, dilation)


@torch.library.custom_op(
    "sepconv::depthwise_conv2d_grad_input",
    mutates_args=(),
    schema=f"(Tensor grad, Tensor x, Tensor weight, {_GEOMETRY}) -> Tensor",
)
def _grad_input_op(grad, x, weight, stride, padding, dilation):
    return _grad_input(grad, x, weight, stride, padding, dilation)


@_grad_input_op.register_fake
def _(grad, x, weight, stride, padding, dilation):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


@torch.library.custom_op(
    "sepconv::depthwise_conv2d_grad_weight",
    mutates_args=(),
    schema=f"(Tensor grad, Tensor x, Tensor weight, {_GEOMETRY}) -> (Tensor, Tensor)",
)
def _grad_weight_op(grad, x, weight, stride, padding, dilation):
    return _grad_weight(grad, x, weight, stride, padding, dilation)


@_grad_weight_op.register_fake
def _(grad, x, weight, stride, padding, dilation):
    return torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.geometry = (stride, padding, dilation)
    taps = weight.shape[2] * weight.shape[3]
    ctx.fft_grad_weight = FFT_GRAD_WEIGHT_MIN_TAPS is not None and taps >= FFT_GRAD_WEIGHT_MIN_TAPS
    ctx.flipped_grad_input = (
        FLIPPED_GRAD_INPUT_MIN_TAPS is not None
        and taps >= FLIPPED_GRAD_INPUT_MIN_TAPS
        and _flipped_grad_input_applies(x, weight, stride, padding, dilation)
    )
    kernel = weight.shape[2:]  # the experimental Toeplitz kernels, opted in when the forward runs:
    ctx.forward_tiles = _opted_in(x, kernel, (1, 1), dilation, TOEPLITZ_FORWARD_MIN_TAPS, TOEPLITZ_TILES)  # flipped
    ctx.grad_weight_tiles = _opted_in(
        x, kernel, stride, dilation, TOEPLITZ_GRAD_WEIGHT_MIN_TAPS, TOEPLITZ_GRAD_WEIGHT_TILES
    )


def depthwise_gradients(
    grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool, geometry: tuple, needs: Sequence[bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_x, grad_weight, grad_bias)`` of the depthwise conv for its output gradient ``grad`` on our kernels
    (default tiles), each where ``needs`` (x, weight, bias) asks: the depthwise part of a fused op's backward."""
    grad_x = grad_weight = grad_bias = None
    args, tensors = (grad, x, weight, *geometry), (grad, x, weight)
    if needs[0]:
        grad_x = run_kernel(torch.ops.sepconv.depthwise_conv2d_grad_input, _grad_input, args, tensors)
    if needs[1] or (has_bias and needs[2]):
        kernel = functools.partial(_grad_weight, bias=has_bias and needs[2])
        grad_weight, grad_bias = run_kernel(torch.ops.sepconv.depthwise_conv2d_grad_weight, kernel, args, tensors)
        grad_weight = grad_weight if needs[1] else None
        grad_bias = grad_bias if has_bias and needs[2] else None
    return grad_x, grad_weight, grad_bias


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_x = grad_weight = grad_bias = None
    args, tensors = (grad, x, weight, *ctx.geometry), (grad, x, weight)
    if needs_x and ctx.flipped_grad_input:
        grad_x = _flipped_grad_input(*args, tiles=ctx.forward_tiles)
    elif needs_x:
        grad_x = run_kernel(torch.ops.sepconv.depthwise_conv2d_grad_input, _grad_input, args, tensors)
    if needs_weight or (ctx.has_bias and needs_bias):
        if ctx.fft_grad_weight and ctx.grad_weight_tiles is None:
            grad_weight, grad_bias = _fft_grad_weight(*args)
        else:
            tiles, bias = ctx.grad_weight_tiles, ctx.has_bias and needs_bias
            kernel = functools.partial(_grad_weight, tiles=tiles, bias=bias)
            grad_weight, grad_bias = run_kernel(torch.ops.sepconv.depthwise_conv2d_grad_weight, kernel, args, tensors)
        grad_weight = grad_weight if needs_weight else None
        grad_bias = grad_bias if ctx.has_bias and needs_bias else None
    return grad_x, grad_weight, grad_bias, None, None, None


_DepthwiseConv2d = differentiable(_depthwise_conv2d_op, "_DepthwiseConv2d", _forward, _setup_context, _backward)
