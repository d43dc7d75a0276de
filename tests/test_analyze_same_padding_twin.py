"""The what-if twin of a conv that pads for TensorFlow's 'same' in its forward (timm's Conv2dSame) keeps that
padding: its output size is ceil(size / stride), and its MACs are counted on that output."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sepconv
from sepconv.analyze import analyze, separable_twin


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame as it computes: padding 0 in its attributes, TF 'same' padding in its forward."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, dilation: Any = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation)

    def forward(self, x: Tensor) -> Tensor:
        pads = []  # F.pad's order: the last dimension first, the odd pixel at the end
        for dim in (1, 0):
            size, k, s, d = x.shape[2 + dim], self.kernel_size[dim], self.stride[dim], self.dilation[dim]
            total = max((math.ceil(size / s) - 1) * s + d * (k - 1) + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation)


# recognised by qualified class name, as sepconv recognises timm's class without importing timm
Conv2dSame.__module__, Conv2dSame.__qualname__ = "timm.layers.conv2d_same", "Conv2dSame"


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation"), [(33, 3, 2, 1), (32, 3, 2, 1), (15, 4, 3, 1), (20, 5, 1, 2), (9, 2, 2, 1)]
)
def test_twin_of_a_same_padded_conv_keeps_its_output_size(size: int, kernel: int, stride: int, dilation: int) -> None:
    conv = Conv2dSame(16, 32, kernel, stride, dilation)
    x = torch.rand(1, 16, size, size)
    out = math.ceil(size / stride)  # TF 'same'
    assert conv(x).shape == (1, 32, out, out)  # the stand-in computes what timm's class does
    twin = separable_twin(nn.Sequential(conv))[0]
    assert isinstance(twin, sepconv.SeparableConv2d)
    assert twin(x).shape == (1, 32, out, out)
    (w,) = analyze(conv, (1, 16, size, size), what_if=True).what_if  # type: ignore[misc]
    assert w.macs == out * out * 32 * 16 * kernel * kernel
    assert w.separable_macs == out * out * (16 * kernel * kernel + 16 * 32)
    assert w.separable_params == 16 * kernel * kernel + 16 * 32 + 32  # the 1x1 conv keeps the bias


def test_rectangular_kernel_stride_and_input() -> None:
    conv = Conv2dSame(6, 10, (4, 3), stride=(2, 3), dilation=(1, 2))
    x = torch.rand(2, 6, 15, 20)
    out_h, out_w = math.ceil(15 / 2), math.ceil(20 / 3)
    assert conv(x).shape == separable_twin(nn.Sequential(conv))[0](x).shape == (2, 10, out_h, out_w)
    (w,) = analyze(conv, tuple(x.shape), what_if=True).what_if  # type: ignore[misc]
    assert w.separable_macs == 2 * out_h * out_w * (6 * 12 + 6 * 10)


def test_seed_case_and_what_if_totals_match_the_built_twin() -> None:
    net = nn.Sequential(Conv2dSame(16, 32, 3, stride=2), nn.ReLU(), Conv2dSame(32, 8, 3, stride=2))
    report = analyze(net, (1, 16, 33, 33), what_if=True)
    by_name = {w.name: w for w in report.what_if}  # type: ignore[union-attr]
    assert by_name["0"].separable_macs == 17 * 17 * (16 * 9 + 16 * 32) == 189_584
    assert by_name["2"].separable_macs == 9 * 9 * (32 * 9 + 32 * 8)
    twin = analyze(separable_twin(net), (1, 16, 33, 33))
    totals = report.what_if_totals()
    assert (twin.total.macs, twin.total.params) == (totals["macs_after"], totals["params_after"])


def test_an_ordinary_subclass_keeps_its_padding_attribute() -> None:
    # same code, another name: not a known same-padded conv, so its twin takes .padding as it is (0)
    class Plain(nn.Conv2d):
        pass

    twin = separable_twin(nn.Sequential(Plain(4, 8, 3, stride=2)))[0]
    assert twin(torch.rand(1, 4, 9, 9)).shape == (1, 8, 4, 4)  # (9 - 3) // 2 + 1


def test_timm_same_padded_convs_when_installed() -> None:
    layers = pytest.importorskip("timm.layers")
    from timm.layers.conv2d_same import Conv2dSameExport

    x = torch.rand(1, 16, 33, 33)
    for conv in (
        layers.Conv2dSame(16, 32, 3, stride=2),
        Conv2dSameExport(16, 32, 4, stride=2),
        layers.StdConv2dSame(16, 32, 3, stride=2),  # its same_pad flag set: pads at run time
        layers.StdConv2dSame(16, 32, 3, stride=1),  # static 'same': its padding attribute says it
    ):
        expected = conv(x).shape
        assert separable_twin(nn.Sequential(conv))[0](x).shape == expected
        (w,) = analyze(conv, tuple(x.shape), what_if=True).what_if  # type: ignore[misc]
        k = math.prod(conv.kernel_size)
        assert w.separable_macs == expected[-1] * expected[-2] * (16 * k + 16 * 32)
