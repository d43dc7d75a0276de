"""The squeeze-excitation modules :func:`sepconv.accelerate` recognizes between a depthwise conv's activation and
the 1x1 conv, and their gate computed from the channel means (what the fused kernel needs).

torchvision's ``SqueezeExcitation`` (MobileNetV3, EfficientNet) and timm's efficientnet-family ``SqueezeExcite``
are recognized by qualified class name (neither library is imported; a subclass, with a forward of its own, is
not recognized). Both compute ``x * gate(x.mean((2, 3), keepdim=True))``.

>>> import torch
>>> from torchvision.ops import SqueezeExcitation
>>> se = SqueezeExcitation(8, 2)
>>> x = torch.randn(2, 8, 5, 5)
>>> is_excitation(se, 8), is_excitation(se, 16)
(True, False)
>>> torch.allclose(x * excitation_scale(se, x.mean((2, 3), keepdim=True)), se(x))
True
>>> excitation_gate(se)[4:]  # the gate as tensors for the fused kernel's backward: activation and gate function
('relu', 'sigmoid')
"""

from __future__ import annotations

from torch import Tensor, nn

from sepconv.dispatch import fused_activation

__all__ = ["excitation_gate", "excitation_scale", "is_excitation"]

_GATES = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}  # sepconv.kernels.differentiable_excitation.GATES

_TORCHVISION = "torchvision.ops.misc.SqueezeExcitation"
_TIMM = "timm.models._efficientnet_blocks.SqueezeExcite"


def _qualified_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _one_by_one(conv: object, in_channels: int | None = None, out_channels: int | None = None) -> bool:
    """A plain ungrouped 1x1 ``nn.Conv2d`` (stride 1, no padding) with these channel counts where given."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.groups == 1
        and (in_channels is None or conv.in_channels == in_channels)
        and (out_channels is None or conv.out_channels == out_channels)
    )


def is_excitation(module: nn.Module, channels: int) -> bool:
    """A recognized squeeze-excitation over ``channels`` channels whose gate :func:`excitation_scale` computes."""
    name = _qualified_name(module)
    if name == _TORCHVISION:
        pool = getattr(module, "avgpool", None)
        return (
            isinstance(pool, nn.AdaptiveAvgPool2d)
            and pool.output_size in (1, (1, 1))
            and _one_by_one(getattr(module, "fc1", None), in_channels=channels)
            and _one_by_one(getattr(module, "fc2", None), out_channels=channels)
        )
    if name == _TIMM:
        return _one_by_one(getattr(module, "conv_reduce", None), in_channels=channels) and _one_by_one(
            getattr(module, "conv_expand", None), out_channels=channels
        )
    return False


def excitation_scale(module: nn.Module, means: Tensor) -> Tensor:
    """The per-image, per-channel scale a recognized squeeze-excitation ``module`` multiplies its input by, from the
    input's channel means ``means`` (N, C, 1, 1), with the module's own layers."""
    if _qualified_name(module) == _TORCHVISION:
        return module.scale_activation(module.fc2(module.activation(module.fc1(means))))
    return module.gate(module.conv_expand(module.act1(module.conv_reduce(means))))


def excitation_gate(
    module: nn.Module,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, str | None, str] | None:
    """A recognized squeeze-excitation's gate as :class:`sepconv.kernels.ExcitationArgs`' fields (its two 1x1
    convs' weights and biases, its activation's and gate function's names), so that the fused kernel computes it
    with gradients; None where its activation or gate is another module (:func:`excitation_scale` still
    computes it, for inference)."""
    if _qualified_name(module) == _TORCHVISION:
        reduce, activation, expand, gate = module.fc1, module.activation, module.fc2, module.scale_activation
    else:
        reduce, activation, expand, gate = module.conv_reduce, module.act1, module.conv_expand, module.gate
    name = None if type(activation) is nn.Identity else fused_activation(activation)
    gate_name = _GATES.get(type(gate))
    if (name is None and type(activation) is not nn.Identity) or gate_name is None:
        return None
    return reduce.weight, reduce.bias, expand.weight, expand.bias, name, gate_name
