"""cost() and compare() against hand-computed truths, nn.ConvNd on the meta device and FlopCounterMode."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.strategies import ConvConfig, conv_configs
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sepconv
from sepconv import SeparableConv2d, compare, cost

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SEPARABLE = {1: sepconv.SeparableConv1d, 2: sepconv.SeparableConv2d, 3: sepconv.SeparableConv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def counted_flops(module: nn.Module, shape: tuple[int, ...]) -> int:
    with FlopCounterMode(display=False) as counter:
        module(torch.empty(shape, device="meta"))
    return counter.get_total_flops()


def test_seed_standard_conv() -> None:
    c = cost(nn.Conv2d(10, 32, 3), (5, 10, 50, 50))
    assert c.macs == 5 * 48 * 48 * 32 * 10 * 9 == 33_177_600
    assert c.flops == 2 * 33_177_600
    assert c.bias_adds == 5 * 32 * 48 * 48 == 368_640
    assert c.params == 2912 and c.output_shape == (5, 32, 48, 48)
    assert c.activation_bytes == 5 * 32 * 48 * 48 * 4


def test_seed_separable_twin_and_seed_block() -> None:
    ours = cost(SeparableConv2d(10, 32, 3), (5, 10, 50, 50))
    assert ours.macs == 5 * 48 * 48 * 10 * 9 + 5 * 48 * 48 * 10 * 32 == 4_723_200
    assert ours.params == 442
    seed = cost(nn.Sequential(nn.Conv2d(10, 10, 3, groups=10), nn.Conv2d(10, 32, 1)), (5, 10, 50, 50))
    assert (seed.params, seed.macs) == (452, 4_723_200)
    assert seed.bias_adds == 5 * 48 * 48 * (10 + 32)
    # the intermediate (5, 10, 48, 48) is written too
    assert ours.activation_bytes == seed.activation_bytes == 5 * 48 * 48 * (10 + 32) * 4


@pytest.mark.parametrize(
    ("module", "shape", "macs"),
    [
        (nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=64), (1, 64, 56, 56), 451_584),
        (nn.Conv2d(32, 64, 5, padding=4, dilation=2, groups=32), (1, 32, 40, 40), 2_560_000),
        (nn.Conv2d(16, 16, 4, padding="same", groups=16, bias=False), (1, 16, 32, 32), 262_144),  # fvcore says 0
        (sepconv.DepthwiseConv2d(16, 4, padding="same"), (1, 16, 32, 32), 262_144),
    ],
)
def test_published_truths(module: nn.Module, shape: tuple[int, ...], macs: int) -> None:
    assert cost(module, shape).macs == macs


@settings(max_examples=100)
@given(conv_configs())
def test_standard_conv_matches_meta_shapes_numel_and_flop_counter(cfg: ConvConfig) -> None:
    if cfg.strided_same:
        return  # nn.ConvNd has no strided 'same'; the separable test below covers it
    conv = CONV[cfg.ndim](cfg.in_channels, cfg.out_channels, cfg.kernel_size, **cfg.conv_kwargs, device="meta")
    c = cost(conv, cfg.input_shape)
    out = conv(torch.empty(cfg.input_shape, device="meta"))
    assert c.output_shape == tuple(out.shape)
    assert c.params == sum(p.numel() for p in conv.parameters())
    assert c.flops == counted_flops(conv, cfg.input_shape)
    assert c.bias_adds == out.numel()
    assert c.activation_bytes == out.numel() * 4


@settings(max_examples=100)
@given(conv_configs())
def test_separable_layer_matches_meta_shapes_numel_and_flop_counter(cfg: ConvConfig) -> None:
    layer = SEPARABLE[cfg.ndim](
        cfg.in_channels,
        cfg.out_channels,
        cfg.kernel_size,
        **cfg.conv_kwargs,
        depth_multiplier=cfg.depth_multiplier,
        device="meta",
        dtype=torch.float16,
    )
    c = cost(layer, cfg.input_shape)
    mid = layer.depthwise(torch.empty(cfg.input_shape, device="meta", dtype=torch.float16))
    out = layer(torch.empty(cfg.input_shape, device="meta", dtype=torch.float16))
    assert c.output_shape == tuple(out.shape)
    assert c.params == sum(p.numel() for p in layer.parameters())
    assert c.flops == counted_flops(layer.float(), cfg.input_shape)
    assert c.activation_bytes == (mid.numel() + out.numel()) * 2  # fp16
    m, pixels = cfg.depth_multiplier, math.prod(out.shape[2:]) * cfg.input_shape[0]
    k = math.prod(cfg.kernel_size)
    assert c.macs == pixels * cfg.in_channels * m * (k + cfg.out_channels // cfg.groups)


@settings(max_examples=60)
@given(
    ndim=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    cin=st.integers(1, 3),
    cout=st.integers(1, 3),
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    output_padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    size=st.integers(1, 5),
    bias=st.booleans(),
)
def test_transposed_conv_matches_meta_and_flop_counter(
    ndim, groups, cin, cout, k, stride, padding, output_padding, dilation, size, bias
) -> None:
    output_padding = min(output_padding, max(stride, dilation) - 1)
    conv = TRANSPOSED[ndim](
        cin * groups, cout * groups, k, stride, padding, output_padding, groups, bias, dilation, device="meta"
    )
    shape = (2, cin * groups, *(size,) * ndim)
    try:
        out = conv(torch.empty(shape, device="meta"))
    except RuntimeError:  # PyTorch rejects the combination (negative output size): so must we
        with pytest.raises(ValueError):
            cost(conv, shape)
        return
    c = cost(conv, shape)
    assert c.output_shape == tuple(out.shape)
    assert c.params == sum(p.numel() for p in conv.parameters())
    assert c.flops == counted_flops(conv, shape)
    assert c.bias_adds == (out.numel() if bias else 0)


def test_linear_and_unbatched_inputs() -> None:
    c = cost(nn.Linear(20, 7), (3, 5, 20))
    assert (c.params, c.macs, c.bias_adds, c.output_shape) == (147, 3 * 5 * 20 * 7, 3 * 5 * 7, (3, 5, 7))
    assert c.flops == counted_flops(nn.Linear(20, 7, device="meta"), (3, 5, 20))
    unbatched = cost(nn.Conv2d(3, 4, 3), (3, 10, 10))
    assert unbatched.output_shape == (4, 8, 8) and unbatched.macs == 4 * 64 * 27


def test_compare_gives_ratios_and_closed_form() -> None:
    c = compare(10, 32, 3, (5, 10, 50, 50))
    assert (c.standard.params, c.separable.params) == (2912, 442)
    assert c.macs_ratio == pytest.approx(4_723_200 / 33_177_600)
    assert c.closed_form == pytest.approx(1 / 32 + 1 / 9)
    assert c.macs_ratio == pytest.approx(c.closed_form)  # exact: same output pixels on both sides
    grouped = compare(8, 16, (3, 5), (2, 8, 20, 20), groups=2, depth_multiplier=2, stride=2, padding="same")
    assert grouped.closed_form == pytest.approx(2 * (2 / 16 + 1 / 15))
    assert grouped.macs_ratio == pytest.approx(grouped.closed_form)
    assert grouped.standard.output_shape == grouped.separable.output_shape == (2, 16, 10, 10)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: cost(nn.ReLU(), (1, 3)), TypeError, "supports convolutions, nn.Linear.*got ReLU"),
        (lambda: cost(nn.Conv2d(3, 4, 3), (1, 5, 8, 8)), ValueError, r"expects input_shape \(N, 3, \*2 spatial\)"),
        (lambda: cost(nn.Conv2d(3, 4, 5), (1, 3, 2, 2)), ValueError, "too small"),
        (lambda: cost(nn.Linear(3, 4), (2, 5)), ValueError, r"expects input_shape \(\.\.\., 3\)"),
        (lambda: compare(3, 4, 3, (3, 8)), ValueError, "input_shape must be"),
    ],
)
def test_errors_name_the_problem(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()
