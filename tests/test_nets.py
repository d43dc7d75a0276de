"""Reference CNN twins: same shapes, and exactly the parameter saving the replaced convs predict."""

import pytest
import torch
from torch import nn

from sepconv import SeparableConv2d
from sepconv.nets import small_resnet, small_vgg


def replaced_3x3(model: nn.Module) -> list[tuple[int, int]]:
    return [
        (m.in_channels, m.out_channels)
        for m in model.modules()
        if isinstance(m, SeparableConv2d) or (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.in_channels > 1)
    ]


@pytest.mark.parametrize("build", [small_vgg, small_resnet])
def test_twins_differ_only_in_their_3x3_convs(build) -> None:
    standard, separable = build("standard"), build("separable")
    pairs = replaced_3x3(standard)
    assert pairs == replaced_3x3(separable) and len(pairs) == (5 if build is small_vgg else 12)
    saving = sum(c * o * 9 - (c * 9 + c * o) for c, o in pairs)  # bias-free both sides
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(standard) - count(separable) == saving
    x = torch.randn(3, 1, 28, 28)
    assert standard(x).shape == separable(x).shape == (3, 10)


def test_bad_conv_kind() -> None:
    with pytest.raises(ValueError, match="conv must be one of 'standard', 'separable'; got 'dw'"):
        small_vgg("dw")
