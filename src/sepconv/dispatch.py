"""Which implementation runs a layer's depthwise conv: PyTorch's or our Triton kernel (``backend=``).

- ``"torch"``: always PyTorch (``F.conv2d``; on CPU through :mod:`sepconv.cpu_strategy`).
- ``"triton"``: always our kernels; a call they cannot run raises an error that says why. CPU tensors need
  ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests). A separable layer runs the fused kernel
  (:func:`sepconv.kernels.separable_conv2d`, the intermediate stays on chip; it runs our depthwise kernel and
  a matrix product instead where :func:`sepconv.kernels.separable.fuses` says no) when :func:`fusable`: groups=1,
  and between the convs at most a BatchNorm2d (in eval mode folded into the depthwise weights on each call; in
  training mode folded with the batch's statistics, which a first pass over the input computes:
  :func:`sepconv.kernels.separable_conv2d_batch_norm`) and a ReLU/ReLU6/Hardswish/SiLU/GELU, and none of its parts
  has hooks. Otherwise (another norm or activation, grouped pointwise, a hook to call) its depthwise part runs
  :func:`sepconv.kernels.depthwise_conv2d` and the rest PyTorch.
- ``"auto"`` (default): our depthwise kernel only where it measured faster than PyTorch
  (``benchmarks/results/kernels.json``, H200): 2-d CUDA inputs, fp16/bf16/fp32, zero padding; in
  channels_last kernels of at least :data:`AUTO_MIN_KERNEL_AREA` taps (9x9 and up: there PyTorch's
  channels_last depthwise conv is 11-17x slower than ours) with enough work to pay our per-call host overhead
  (:data:`AUTO_MIN_MACS`, :data:`AUTO_MIN_MACS_WITH_GRAD`); in NCHW kernels up to
  :data:`AUTO_MAX_KERNEL_AREA_NCHW` taps with at least :data:`AUTO_MIN_MACS_NCHW`; outside tracing and export
  (``torch.jit.trace``, ``torch.export``, ONNX keep seeing ``nn.Conv2d``). ``auto`` never fuses: the fused
  separable kernel measured slower than PyTorch's two convs on almost every shape. PyTorch otherwise — CPU
  behaviour is unchanged.

>>> import torch, sepconv
>>> layer = sepconv.DepthwiseConv2d(8, 3, padding=1)
>>> triton_blocker(layer, torch.rand(1, 8, 5, 5), auto=True)  # why auto keeps PyTorch here
'the input is on cpu, not CUDA'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sepconv.folding import fold_batch_norm, foldable_norm
from sepconv.kernels import available as kernels_available

if TYPE_CHECKING:
    from sepconv.kernels.differentiable_excitation import ExcitationArgs

__all__ = [
    "AUTO_MAX_KERNEL_AREA_NCHW",
    "AUTO_MIN_KERNEL_AREA",
    "AUTO_MIN_MACS",
    "AUTO_MIN_MACS_NCHW",
    "AUTO_MIN_MACS_WITH_GRAD",
    "BACKENDS",
    "FUSED_ACTIVATIONS",
    "backend_arg",
    "batch_norm_separable_forward",
    "fusable",
    "fused_activation",
    "slower_than_pytorch",
    "triton_blocker",
    "triton_depthwise_forward",
    "triton_separable_forward",
    "use_triton",
]

BACKENDS = ("auto", "torch", "triton")
_AUTO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# mid activations the fused kernel applies (nn.GELU in its exact erf form only: see fused_activation)
FUSED_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu", nn.GELU: "gelu"}


def fused_activation(module: nn.Module) -> str | None:
    """The fused kernel's name (``mid_activation`` of :func:`sepconv.kernels.separable_conv2d`) for an
    activation module, or None where the kernel cannot apply it (a type not in :data:`FUSED_ACTIVATIONS`, or
    ``nn.GELU(approximate="tanh")``).

    >>> fused_activation(nn.ReLU6(inplace=True)), fused_activation(nn.GELU()), fused_activation(nn.GELU("tanh"))
    ('relu6', 'gelu', None)
    """
    name = FUSED_ACTIVATIONS.get(type(module))
    return None if name == "gelu" and module.approximate != "none" else name


# auto's measured rule (benchmarks/results/kernels.json, H200, bf16 and fp32). channels_last: PyTorch's
# depthwise conv is fast up to 7x7 (ours 1.1-1.6x slower there, more where the host decides) and 11-17x slower
# than ours from 9x9 to 31x31 (it falls off its fast path). NCHW: ours 1.6-2.6x faster forward and 1.1-1.9x
# forward+backward up to 9x9 with enough work (>= 170M MACs measured; 576x14 3x3 at 65M lost its
# forward+backward), slower from 13x13.
# Our calls carry a host overhead of ~0.1 ms (forward) and ~0.5-1 ms (forward+backward), measured by
# benchmarks/profile_overhead.py; the MAC thresholds keep auto on PyTorch where that overhead would eat the
# gain (break-even from the measured rates: PyTorch >= 0.22 TMAC/s forward+backward and 0.45 forward; ours
# 0.53 and 3.8 -> ~50M and ~400M MACs).
AUTO_MIN_KERNEL_AREA = 81  # 9x9, channels_last
AUTO_MIN_MACS = 50_000_000  # forward MACs, inference, channels_last
AUTO_MIN_MACS_WITH_GRAD = 400_000_000  # forward MACs, when gradients will be computed, channels_last
AUTO_MAX_KERNEL_AREA_NCHW = 81  # 9x9
AUTO_MIN_MACS_NCHW = 150_000_000  # forward MACs, NCHW, with or without gradients


def backend_arg(value: object, ndim: int) -> str:
    """Validate a layer's ``backend`` argument."""
    if value not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {value!r}")
    if value == "triton" and ndim != 2:
        raise ValueError(f"backend='triton' supports 2-d layers only (this one is {ndim}-d); use 'auto' or 'torch'")
    return value  # type: ignore[return-value]


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or (is_exporting is not None and is_exporting())
    )


def triton_blocker(layer: nn.Module, input: Tensor, *, auto: bool) -> str | None:
    """Why the Triton kernel cannot (or, for ``auto``, should not) run this call; None when it can."""
    if getattr(layer, "_ndim", 2) != 2:
        return f"the layer is {layer._ndim}-d; the kernel is 2-d"
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r}; the kernel pads with zeros only"
    if not kernels_available():
        return "Triton is not installed"
    if auto:
        if _exporting():
            return "tracing or exporting: the graph keeps PyTorch's conv"
        if input.device.type != "cuda":
            return f"the input is on {input.device.type}, not CUDA"
        if input.dtype not in _AUTO_DTYPES:
            return f"dtype {input.dtype}; auto uses the kernel for fp16, bf16 and fp32"
        weight = layer.weight if hasattr(layer, "weight") else layer.dw_weight
        needs_grad = torch.is_grad_enabled() and (
            input.requires_grad or any(p.requires_grad for p in layer.parameters())
        )
        return slower_than_pytorch(input, tuple(weight.shape[-2:]), weight.shape[0], layer.stride, needs_grad)
    return None


def slower_than_pytorch(
    input: Tensor, kernel_size: tuple[int, int], out_channels: int, stride: tuple[int, int], needs_grad: bool
) -> str | None:
    """Why PyTorch is expected to be faster than our depthwise kernel for such a call (auto's measured rule,
    see :data:`AUTO_MIN_KERNEL_AREA`); None when ours is.

    >>> x = torch.rand(8, 256, 28, 28).contiguous(memory_format=torch.channels_last)
    >>> slower_than_pytorch(x, (31, 31), 256, (1, 1), needs_grad=False) is None
    True
    >>> slower_than_pytorch(x, (3, 3), 256, (1, 1), needs_grad=False)
    'kernel 3x3: 9 taps < AUTO_MIN_KERNEL_AREA = 81; PyTorch measured faster'
    >>> slower_than_pytorch(x[:1], (9, 9), 256, (1, 1), needs_grad=True)
    '16,257,024 MACs < AUTO_MIN_MACS_WITH_GRAD = 400,000,000: our per-call overhead would outweigh the gain'
    """
    taps = kernel_size[0] * kernel_size[1]
    n, _, h, w = input.shape
    macs = n * out_channels * -(-h // stride[0]) * -(-w // stride[1]) * taps
    if input.dim() == 4 and input.is_contiguous():
        if taps > AUTO_MAX_KERNEL_AREA_NCHW:
            return (
                f"NCHW input, kernel {kernel_size[0]}x{kernel_size[1]}: {taps} taps > AUTO_MAX_KERNEL_AREA_NCHW = "
                f"{AUTO_MAX_KERNEL_AREA_NCHW}; PyTorch measured faster"
            )
        if macs < AUTO_MIN_MACS_NCHW:
            return f"NCHW input, {macs:,} MACs < AUTO_MIN_MACS_NCHW = {AUTO_MIN_MACS_NCHW:,}: PyTorch measured faster"
        return None
    if not (input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last)):
        return "the input is neither NCHW- nor channels_last-contiguous: PyTorch's path"
    if taps < AUTO_MIN_KERNEL_AREA:
        return (
            f"kernel {kernel_size[0]}x{kernel_size[1]}: {taps} taps < AUTO_MIN_KERNEL_AREA = {AUTO_MIN_KERNEL_AREA}; "
            "PyTorch measured faster"
        )
    name, floor = (
        ("AUTO_MIN_MACS_WITH_GRAD", AUTO_MIN_MACS_WITH_GRAD) if needs_grad else ("AUTO_MIN_MACS", AUTO_MIN_MACS)
    )
    if macs < floor:
        return f"{macs:,} MACs < {name} = {floor:,}: our per-call overhead would outweigh the gain"
    return None


def use_triton(layer: nn.Module, input: Tensor) -> bool:
    """Whether ``layer`` runs this call on Triton, by its ``backend``; raises when ``"triton"`` cannot.

    Meta tensors (shape analysis, e.g. :func:`sepconv.analyze`) always take PyTorch's path, which computes
    the same thing with ops the analysis can count.
    """
    backend = layer.backend
    if backend == "torch" or (backend == "auto" and not input.is_cuda) or input.is_meta:  # the per-call fast path
        return False
    blocker = triton_blocker(layer, input, auto=backend == "auto")
    if blocker is not None and backend == "triton":
        raise RuntimeError(f"backend='triton' cannot run this layer: {blocker}; use backend='auto' or 'torch'")
    return blocker is None


def triton_depthwise_forward(layer: nn.Module, input: Tensor) -> Tensor:
    """``layer``'s depthwise conv on the Triton kernel (padding, stride and dilation from the layer)."""
    from sepconv.kernels.depthwise import depthwise_conv2d

    return depthwise_conv2d(input, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)


def fusable(layer: nn.Module) -> bool:
    """A separable layer the fused kernel computes whole: ungrouped pointwise, and between the convs at most a
    plain ``nn.BatchNorm2d`` (:func:`batch_norm_2d`, either mode) and an activation :func:`fused_activation`
    names."""
    norm, activation = layer.mid_norm, layer.mid_activation
    return (
        layer.pointwise.groups == 1
        and (norm is None or batch_norm_2d(norm, layer.depthwise.out_channels))
        and (activation is None or fused_activation(activation) is not None)
    )


def batch_norm_2d(module: nn.Module, channels: int) -> bool:
    """An ``nn.BatchNorm2d`` over ``channels`` with nn.BatchNorm2d's own forward (not SyncBatchNorm, not timm's
    ``BatchNormAct2d``), in either mode: :func:`batch_norm_separable_forward` computes it."""
    return (
        isinstance(module, nn.BatchNorm2d)
        and type(module).forward is nn.BatchNorm2d.forward
        and module.num_features == channels
    )


def triton_separable_forward(layer: nn.Module, input: Tensor) -> Tensor:
    """A :func:`fusable` separable ``layer`` on the fused Triton kernel."""
    dw, pw, norm = layer.depthwise, layer.pointwise, layer.mid_norm
    activation = None if layer.mid_activation is None else fused_activation(layer.mid_activation)
    geometry = (dw.stride, dw.padding, dw.dilation)
    return batch_norm_separable_forward(input, dw.weight, dw.bias, pw.weight, pw.bias, *geometry, norm, activation)


def batch_norm_separable_forward(
    input: Tensor,
    dw_weight: Tensor,
    dw_bias: Tensor | None,
    pw_weight: Tensor,
    pw_bias: Tensor | None,
    stride,
    padding,
    dilation,
    norm: nn.BatchNorm2d | None,
    activation: str | None,
    out_norm: nn.BatchNorm2d | None = None,
    excitation: ExcitationArgs | Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``out_norm(pointwise(activation(norm(depthwise(input)))))`` on the fused kernel: an eval-mode ``norm`` with
    running statistics folded into the depthwise weights, any other (:func:`batch_norm_2d`) normalizing with the
    batch's statistics and updating its running ones as ``nn.BatchNorm2d.forward`` does (``num_batches_tracked``,
    ``momentum=None`` as a cumulative average); ``out_norm`` (a :func:`batch_norm_2d` after the 1x1 conv) in eval
    mode folded into the 1x1 conv, in training mode with its batch statistics from the fused kernel's epilogue
    (:mod:`sepconv.kernels.output_norm`); ``excitation``: a squeeze-excitation's gate on the activation's channel
    means, a :class:`sepconv.kernels.ExcitationArgs` (differentiable, any norms:
    :mod:`sepconv.kernels.differentiable_excitation`) or a callable (inference, ``norm`` then in eval mode:
    :mod:`sepconv.kernels.excitation`)."""
    from sepconv.kernels.separable import separable_conv2d

    out = None if out_norm is None else batch_norm_args(out_norm)
    if norm is None or foldable_norm(norm, dw_weight.shape[0]):
        if norm is not None:
            dw_weight, dw_bias = fold_batch_norm(dw_weight, dw_bias, norm)
        geometry = (stride, padding, dilation)
        options = {"mid_activation": activation, "out_norm": out, "excitation": excitation}
        return separable_conv2d(input, dw_weight, pw_weight, pw_bias, *geometry, dw_bias, **options)
    from sepconv.kernels.batch_norm import separable_conv2d_batch_norm

    mid = batch_norm_args(norm)
    return separable_conv2d_batch_norm(
        input,
        dw_weight,
        pw_weight,
        pw_bias,
        stride,
        padding,
        dilation,
        dw_bias,
        activation,
        running_mean=mid.running_mean,
        running_var=mid.running_var,
        norm_weight=mid.weight,
        norm_bias=mid.bias,
        training=mid.training,
        momentum=mid.momentum,
        eps=mid.eps,
        out_norm=out,
        excitation=excitation,
    )


def batch_norm_args(norm: nn.BatchNorm2d):
    """The :class:`sepconv.kernels.BatchNormArgs` ``nn.BatchNorm2d.forward(norm, y)`` passes to ``F.batch_norm``,
    after its preamble, which this runs: in training mode with running statistics it counts the batch in
    ``num_batches_tracked`` (``momentum=None``: a cumulative average, factor 1 / batches)."""
    from sepconv.kernels.output_norm import BatchNormArgs

    factor = 0.0 if norm.momentum is None else norm.momentum  # nn.BatchNorm2d.forward's preamble, as written there
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
    keep_running = not norm.training or norm.track_running_stats
    running = (norm.running_mean, norm.running_var) if keep_running else (None, None)
    return BatchNormArgs(*running, norm.weight, norm.bias, batch_stats, factor, norm.eps)
