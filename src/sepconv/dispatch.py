"""Which implementation runs a layer's depthwise conv: PyTorch's or our Triton kernel (``backend=``).

- ``"torch"``: always PyTorch (``F.conv2d``; on CPU through :mod:`sepconv.cpu_strategy`).
- ``"triton"``: always our kernel (:func:`sepconv.kernels.depthwise_conv2d`); a call it cannot run raises
  an error that says why. CPU tensors need ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).
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

__all__ = ["BACKENDS", "backend_arg", "triton_blocker", "triton_depthwise_forward"]

BACKENDS = ("auto", "torch", "triton")
_AUTO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    from sepconv import kernels

    if getattr(layer, "_ndim", 2) != 2:
        return f"the layer is {layer._ndim}-d; the kernel is 2-d"
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r}; the kernel pads with zeros only"
    if not kernels.available():
        return "Triton is not installed"
    if auto:
        if _exporting():
            return "tracing or exporting: the graph keeps PyTorch's conv"
        if input.device.type != "cuda":
            return f"the input is on {input.device.type}, not CUDA"
        if input.dtype not in _AUTO_DTYPES:
            return f"dtype {input.dtype}; auto uses the kernel for fp16, bf16 and fp32"
    return None


def triton_depthwise_forward(layer: nn.Module, input: Tensor) -> Tensor:
    """``layer``'s depthwise conv on the Triton kernel (padding, stride and dilation from the layer)."""
    from sepconv.kernels.depthwise import depthwise_conv2d

    return depthwise_conv2d(input, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
