"""Which implementation runs a layer's depthwise conv: PyTorch's or our Triton kernel (``backend=``).

- ``"torch"``: always PyTorch (``F.conv2d``; on CPU through :mod:`sepconv.cpu_strategy`).
- ``"triton"``: always our kernels; a call they cannot run raises an error that says why. CPU tensors need
  ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests). A separable layer runs the fused kernel
  (:func:`sepconv.kernels.separable_conv2d`, the intermediate stays on chip) when :func:`fusable`: groups=1,
  and between the convs at most an eval-mode BatchNorm (folded into the depthwise weights on each call) and
  a ReLU/ReLU6. Otherwise — e.g. a BatchNorm in training mode, which needs the intermediate's batch
  statistics — its depthwise part runs :func:`sepconv.kernels.depthwise_conv2d` and the rest PyTorch.
- ``"auto"`` (default): the kernel for 2-d CUDA inputs with zero padding in fp16/bf16/fp32, outside
  tracing and export (``torch.jit.trace``, ``torch.export``, ONNX keep seeing ``nn.Conv2d``); PyTorch
  otherwise — CPU behaviour is unchanged.

>>> import torch, sepconv
>>> layer = sepconv.DepthwiseConv2d(8, 3, padding=1)
>>> triton_blocker(layer, torch.rand(1, 8, 5, 5), auto=True)  # why auto keeps PyTorch here
'the input is on cpu, not CUDA'
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sepconv.folding import fold_batch_norm, foldable_norm
from sepconv.kernels import available as kernels_available

__all__ = [
    "BACKENDS",
    "FUSED_ACTIVATIONS",
    "backend_arg",
    "fusable",
    "triton_blocker",
    "triton_depthwise_forward",
    "triton_separable_forward",
    "use_triton",
]

BACKENDS = ("auto", "torch", "triton")
_AUTO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FUSED_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6"}  # mid activations the fused kernel applies


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
    return None


def use_triton(layer: nn.Module, input: Tensor) -> bool:
    """Whether ``layer`` runs this call on Triton, by its ``backend``; raises when ``"triton"`` cannot.

    Meta tensors (shape analysis, e.g. :func:`sepconv.analyze`) always take PyTorch's path, which computes
    the same thing with ops the analysis can count.
    """
    backend, device = layer.backend, input.device.type
    if backend == "torch" or device == "meta" or (backend == "auto" and device != "cuda"):  # the per-call fast path
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
    """A separable layer the fused kernel computes whole: ungrouped pointwise, and between the convs at most an
    eval-mode BatchNorm (folded per call) and a ReLU or ReLU6 (fused). A training-mode norm is not fusable."""
    norm, activation = layer.mid_norm, layer.mid_activation
    return (
        layer.pointwise.groups == 1
        and (norm is None or foldable_norm(norm, layer.depthwise.out_channels))
        and (activation is None or type(activation) in FUSED_ACTIVATIONS)
    )


def triton_separable_forward(layer: nn.Module, input: Tensor) -> Tensor:
    """A :func:`fusable` separable ``layer`` on the fused Triton kernel."""
    from sepconv.kernels.separable import separable_conv2d

    dw, pw = layer.depthwise, layer.pointwise
    weight, bias = dw.weight, dw.bias
    if layer.mid_norm is not None:
        weight, bias = fold_batch_norm(weight, bias, layer.mid_norm)
    activation = None if layer.mid_activation is None else FUSED_ACTIVATIONS[type(layer.mid_activation)]
    return separable_conv2d(
        input, weight, pw.weight, pw.bias, dw.stride, dw.padding, dw.dilation, bias, mid_activation=activation
    )
