"""Small reference CNNs for 28x28 images (Fashion-MNIST), each in a standard and a separable twin.

The twins differ only in their 3x3 convolutions: ``conv="separable"`` uses :class:`SeparableConv2d`
wherever ``conv="standard"`` uses ``nn.Conv2d`` — except the stem, whose single input channel leaves
nothing to separate (as in MobileNet).

>>> import torch
>>> small_vgg("separable")(torch.rand(2, 1, 28, 28)).shape
torch.Size([2, 10])
>>> sum(p.numel() for p in small_resnet("standard").parameters()) > sum(
...     p.numel() for p in small_resnet("separable").parameters())
True
"""

from __future__ import annotations

from torch import Tensor, nn

from sepconv.layers import SeparableConv2d

__all__ = ["CONV_KINDS", "small_resnet", "small_vgg"]

CONV_KINDS = ("standard", "separable")


def conv3x3(in_channels: int, out_channels: int, conv: str, stride: int = 1) -> nn.Module:
    """A bias-free 3x3 conv (padding 1) of the requested kind."""
    if conv not in CONV_KINDS:
        raise ValueError(f"conv must be one of {', '.join(map(repr, CONV_KINDS))}; got {conv!r}")
    if conv == "separable":
        return SeparableConv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv_bn_relu(in_channels: int, out_channels: int, conv: str, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(conv3x3(in_channels, out_channels, conv, stride), nn.BatchNorm2d(out_channels), nn.ReLU())


def _stem(in_channels: int, width: int) -> nn.Sequential:
    return _conv_bn_relu(in_channels, width, "standard")


def small_vgg(conv: str = "standard", *, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Module:
    """VGG-style: stem, then (conv, conv, maxpool) at widths w, 2w, 4w, global pooling, linear."""
    w = width
    conv3x3(1, 1, conv)  # validates ``conv`` before building anything
    return nn.Sequential(
        _stem(in_channels, w),
        _conv_bn_relu(w, w, conv),
        nn.MaxPool2d(2),
        _conv_bn_relu(w, 2 * w, conv),
        _conv_bn_relu(2 * w, 2 * w, conv),
        nn.MaxPool2d(2),
        _conv_bn_relu(2 * w, 4 * w, conv),
        _conv_bn_relu(4 * w, 4 * w, conv),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm, identity or 1x1 projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, conv: str, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(in_channels, out_channels, conv, stride),
            conv3x3(out_channels, out_channels, conv),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def small_resnet(conv: str = "standard", *, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Module:
    """ResNet-style: stem, three stages of two basic blocks (w, 2w, 4w; stride 2 between), pooling, linear."""
    w = width
    conv3x3(1, 1, conv)
    return nn.Sequential(
        _stem(in_channels, w),
        BasicBlock(w, w, conv),
        BasicBlock(w, w, conv),
        BasicBlock(w, 2 * w, conv, stride=2),
        BasicBlock(2 * w, 2 * w, conv),
        BasicBlock(2 * w, 4 * w, conv, stride=2),
        BasicBlock(4 * w, 4 * w, conv),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )
