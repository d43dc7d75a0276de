"""The module :func:`sepconv.accelerate` puts in place of a separable chain: :class:`FusedSeparableConv2d`.

>>> import torch
>>> from torch import nn
>>> dw, pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1)
>>> fused = FusedSeparableConv2d(8, dw.weight, dw.bias, pw.weight, pw.bias, (1, 1), (1, 1), (1, 1), "relu")
>>> x = torch.randn(2, 8, 10, 10)
>>> torch.allclose(fused(x), pw(torch.relu(dw(x))), atol=1e-6)
True
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepconv.dispatch import backend_arg, batch_norm_separable_forward, use_triton
from sepconv.layers import _unhooked, pad_same
from sepconv.squeeze_excitation import excitation_gate, excitation_scale

__all__ = ["FusedSeparableConv2d"]


_ACTIVATIONS = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish, "silu": F.silu}
_ACTIVATIONS["gelu"] = F.gelu
# relu and relu6 in place on the depthwise conv's fresh output, as torchvision's ReLU6(inplace=True) (the conv's
# backward does not need its output; theirs needs only theirs): one activation-sized allocation less per block.
# The others' backward needs their input, which autograd would clone before an in-place call: out of place.
_ACTIVATIONS_IN_PLACE = _ACTIVATIONS | {"relu": F.relu_, "relu6": lambda t: F.relu6(t, inplace=True)}


class FusedSeparableConv2d(nn.Module):
    """depthwise conv (+ bias) -> (training-mode BatchNorm) -> relu | relu6 | hardswish | silu | gelu | nothing
    -> (squeeze-excitation) -> 1x1 conv (+ bias) -> (training-mode BatchNorm), as one module.

    ``backend="triton"``: one fused Triton kernel; ``"auto"``: PyTorch's two convs, the depthwise one on our
    kernel where :mod:`sepconv.dispatch` measured it faster; ``"torch"``: PyTorch's two convs. Built by
    :func:`sepconv.accelerate`; parameters ``dw_weight``, ``dw_bias``, ``pw_weight``, ``pw_bias``, and ``mid_norm``: a
    BatchNorm2d between the convs that could not be folded (training mode), run by
    :func:`sepconv.dispatch.batch_norm_separable_forward` on the fused kernel (batch statistics folded per call);
    ``out_norm``: one after the 1x1 conv (training mode: its batch statistics from the fused kernel's epilogue);
    ``excitation``: a squeeze-excitation module between the activation and the 1x1 conv (torchvision's
    ``SqueezeExcitation``, timm's ``SqueezeExcite``), computed by the fused kernel's op with its gradients
    (:mod:`sepconv.kernels.differentiable_excitation`) where its activation and gate are ones the op knows
    (:func:`~sepconv.squeeze_excitation.excitation_gate`), else by the inference path
    (:mod:`sepconv.kernels.excitation`) when no gradient is needed and no norm uses batch statistics, else by the
    module itself.
    """

    _ndim = 2
    padding_mode = "zeros"

    def __init__(
        self,
        in_channels: int,
        dw_weight: Tensor,
        dw_bias: Tensor | None,
        pw_weight: Tensor,
        pw_bias: Tensor | None,
        stride: Sequence[int],
        padding: str | Sequence[int],
        dilation: Sequence[int],
        mid_activation: str | None = None,
        backend: str = "auto",
        mid_norm: nn.BatchNorm2d | None = None,
        out_norm: nn.BatchNorm2d | None = None,
        excitation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        # each parameter as trainable as the tensor given (a frozen model's stays frozen)
        self.dw_weight = _parameter(dw_weight)
        self.dw_bias = None if dw_bias is None else _parameter(dw_bias)
        self.pw_weight = _parameter(pw_weight)
        self.pw_bias = None if pw_bias is None else _parameter(pw_bias)
        self.stride, self.padding, self.dilation = tuple(stride), padding, tuple(dilation)
        self.mid_activation = mid_activation
        self.backend = backend_arg(backend, 2)
        self.mid_norm = mid_norm
        self.out_norm = out_norm
        self.excitation = excitation

    @property
    def depth_multiplier(self) -> int:
        return self.dw_weight.shape[0] // self.in_channels

    def forward(self, input: Tensor) -> Tensor:
        on_triton = use_triton(self, input)  # auto: only where our depthwise kernel measured faster
        # auto never fuses: the fused kernel measured slower
        fused, excitation = self._kernel_excitation(input) if on_triton and self.backend == "triton" else (False, None)
        if fused:
            weights = (self.dw_weight, self.dw_bias, self.pw_weight, self.pw_bias)
            geometry = (self.stride, self.padding, self.dilation)
            norms = (self.mid_norm, self.mid_activation, self.out_norm)
            return batch_norm_separable_forward(input, *weights, *geometry, *norms, excitation)
        if on_triton:
            from sepconv.kernels.depthwise import depthwise_conv2d

            mid = depthwise_conv2d(input, self.dw_weight, self.dw_bias, self.stride, self.padding, self.dilation)
            activations = _ACTIVATIONS  # not in place on our kernel's output (a custom op's)
        else:
            geometry = (self.stride, self.padding, self.dilation, self.in_channels)
            mid = _depthwise_torch(input, self.dw_weight, self.dw_bias, *geometry)
            activations = _ACTIVATIONS_IN_PLACE
        if self.mid_norm is not None:  # BatchNorm2d's forward only: timm's BatchNormAct2d's activation is ours
            mid, activations = nn.BatchNorm2d.forward(self.mid_norm, mid), _ACTIVATIONS_IN_PLACE  # a fresh output
        mid = activations[self.mid_activation](mid)
        if self.excitation is not None:
            mid = self.excitation(mid)
        out = F.conv2d(mid, self.pw_weight, self.pw_bias)
        return out if self.out_norm is None else nn.BatchNorm2d.forward(self.out_norm, out)

    def _kernel_excitation(self, input: Tensor) -> tuple[bool, object]:
        """Whether the fused kernel computes this call, and its squeeze-excitation (if any) as the kernel takes it:
        its gate as tensors (differentiable) where its activation and gate are ones the kernel's backward knows
        (:func:`~sepconv.squeeze_excitation.excitation_gate`), else a callable on the channel means, for inference
        only (no gradient needed) with no norm normalizing with batch statistics; not where a hook on it or its
        parts would miss its call. Where the kernel does not compute it, PyTorch's modules run the chain."""
        if self.excitation is None:
            return True, None
        if not _unhooked(*self.excitation.modules()):  # a hook on it or its parts must see their calls
            return False, None
        fields = excitation_gate(self.excitation)
        if fields is not None:
            from sepconv.kernels.differentiable_excitation import ExcitationArgs

            return True, ExcitationArgs(*fields)
        tensors = (input, *self.parameters())
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return False, None
        inference = all(norm is None or not norm.training for norm in (self.mid_norm, self.out_norm))
        return inference, functools.partial(excitation_scale, self.excitation) if inference else None

    def extra_repr(self) -> str:
        mid, out = self.dw_weight.shape[0], self.pw_weight.shape[0]
        return (
            f"{self.in_channels} -> {mid} -> {out}, kernel_size={tuple(self.dw_weight.shape[-2:])}, "
            f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, "
            f"mid_activation={self.mid_activation!r}, backend={self.backend!r}"
        )


def _parameter(tensor: Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad)


def _depthwise_torch(x: Tensor, weight, bias, stride, padding, dilation, groups: int) -> Tensor:
    if isinstance(padding, str) and padding == "same" and any(s > 1 for s in stride):  # TF 'same', as our layers
        x, padding = pad_same(x, tuple(weight.shape[-2:]), stride, dilation), 0
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
