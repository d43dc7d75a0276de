"""The alternative CPU depthwise backward (FFT weight gradient, flipped-conv input gradient) against
PyTorch's own convolution and autograd in float64, and its use by the layers through the CPU strategy."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.strategies import ConvConfig, conv_configs

import sepconv
from sepconv import cpu_backward, cpu_strategy
from sepconv.cpu_backward import depthwise_conv, fast_fft_size, flipped_conv_applies

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
DEPTHWISE = {1: sepconv.DepthwiseConv1d, 2: sepconv.DepthwiseConv2d, 3: sepconv.DepthwiseConv3d}


pytestmark = pytest.mark.usefixtures("fresh_cpu_strategy_cache")  # tests/conftest.py


@st.composite
def depthwise_calls(draw):
    """A legal depthwise conv call: (input shape, weight shape, stride, padding, dilation)."""
    n = draw(st.sampled_from([1, 2, 2, 3]))
    channels, multiplier, batch = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = draw(st.tuples(*[st.integers(1, 7 if n < 3 else 4)] * n))
    stride = draw(st.tuples(*[st.integers(1, 3)] * n))
    dilation = draw(st.tuples(*[st.integers(1, 3)] * n))
    padding = draw(st.tuples(*[st.integers(0, 7)] * n))
    lowest = [max(1, d * (k - 1) + 1 - 2 * p) for k, d, p in zip(kernel, dilation, padding, strict=True)]
    sizes = tuple(draw(st.integers(low, low + (8 if n < 3 else 3))) for low in lowest)
    return (batch, channels, *sizes), (channels * multiplier, 1, *kernel), stride, padding, dilation


@settings(max_examples=80, deadline=None)
@given(depthwise_calls(), st.booleans())
def test_fft_and_flipped_conv_gradients_equal_pytorch_in_float64(call, with_bias: bool) -> None:
    input_shape, weight_shape, stride, padding, dilation = call
    n = len(stride)
    x = torch.randn(input_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(weight_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(weight_shape[0], dtype=torch.float64, requires_grad=True) if with_bias else None
    grad_input = "conv" if flipped_conv_applies(weight_shape[2:], stride, padding, dilation) else "torch"
    out = depthwise_conv(x, w, b, stride, padding, dilation, grad_input=grad_input, grad_weight="fft")
    expected = CONV[n](x, w, b, stride, padding, dilation, input_shape[1])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad_output = torch.randn_like(expected)
    leaves = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(out, leaves, grad_output)
    reference = torch.autograd.grad(expected, leaves, grad_output)
    for g, r in zip(got, reference, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_double_backward_works() -> None:
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, 5, 4, dtype=torch.float64, requires_grad=True)

    def conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return depthwise_conv(x, w, None, 1, (2, 1), (1, 2), grad_input="conv", grad_weight="fft")

    assert torch.autograd.gradgradcheck(conv, (x, w))


def test_float32_fft_gradient_stays_near_the_float64_truth_for_a_31x31_kernel() -> None:
    torch.manual_seed(0)
    x64, gy64 = torch.randn(4, 8, 28, 28, dtype=torch.float64), torch.randn(4, 8, 28, 28, dtype=torch.float64)
    truth = cpu_backward.fft_grad_weight(x64, gy64, (31, 31), (1, 1), (15, 15), (1, 1))
    direct = torch.ops.aten.convolution_backward(
        gy64,
        x64,
        torch.zeros(8, 1, 31, 31, dtype=torch.float64),
        None,
        [1, 1],
        [15, 15],
        [1, 1],
        False,
        [0, 0],
        8,
        [False, True, False],
    )[1]
    torch.testing.assert_close(truth, direct, rtol=1e-10, atol=1e-10)  # float64 FFT = float64 direct sum
    got = cpu_backward.fft_grad_weight(x64.float(), gy64.float(), (31, 31), (1, 1), (15, 15), (1, 1))
    # Each entry sums up to 4·28·28 products of unit normals (|entry| ~ 56): float32 rounding, not more.
    assert (got.double() - truth).abs().max() < 1e-4 * truth.abs().max()


@given(st.integers(1, 5000))
def test_fast_fft_size_is_the_smallest_even_11_smooth_size_not_below_n(n: int) -> None:
    def smooth(m: int) -> bool:
        if m % 2:
            return False
        for p in (2, 3, 5, 7, 11):
            while m % p == 0:
                m //= p
        return m == 1

    size = fast_fft_size(n)
    assert size >= n and smooth(size)
    assert not any(smooth(m) for m in range(n, size))


def test_bad_arguments_are_named() -> None:
    x, w = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 3, 3)
    with pytest.raises(ValueError, match="grad_weight must be one of"):
        depthwise_conv(x, w, grad_weight="winograd")
    with pytest.raises(ValueError, match="grad_input must be one of"):
        depthwise_conv(x, w, grad_input="fft")
    with pytest.raises(ValueError, match="grad_input='conv' needs stride 1"):
        depthwise_conv(x, w, stride=2, grad_input="conv")
    with pytest.raises(ValueError, match="weight \\(C·m, 1, \\*kernel\\)"):
        depthwise_conv(x, torch.randn(3, 1, 3, 3))
    with pytest.raises(ValueError, match="padding must be a non-negative int"):
        depthwise_conv(x, w, padding=-1)


@settings(max_examples=40, deadline=None)
@given(conv_configs(ndims=(1, 2, 3), max_kernel=6))
def test_layers_with_the_alternative_backward_equal_the_plain_path(cfg: ConvConfig) -> None:
    """Every padding form ('same' with even kernels and stride > 1, padding modes) reaches the right call."""
    layer = DEPTHWISE[cfg.ndim](
        cfg.in_channels,
        cfg.kernel_size,
        cfg.stride,
        cfg.padding,
        cfg.dilation,
        cfg.depth_multiplier,
        bias=True,
        padding_mode=cfg.padding_mode,
        dtype=torch.float64,
    )
    x = torch.randn(cfg.input_shape[0], cfg.in_channels, *cfg.input_shape[2:], dtype=torch.float64)
    calls = []

    def measured(input, weight, stride, padding, dilation):
        calls.append(padding)
        return ("conv" if flipped_conv_applies(weight.shape[2:], stride, padding, dilation) else "torch"), "fft"

    with (
        mock.patch.object(cpu_strategy, "MIN_KERNEL_AREA_FOR_BACKWARD", 1),
        mock.patch.object(cpu_strategy, "_measure_backward", measured),
        sepconv.use_cpu_strategy("auto"),
    ):
        sepconv.clear_cpu_strategy_cache()
        out, grads = _forward_and_grads(layer, x, "auto")
    plain, plain_grads = _forward_and_grads(layer, x, "off")
    assert calls  # the alternative backward ran (once per layout the layout strategy tried)
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def _forward_and_grads(layer, x, mode):
    x = x.detach().requires_grad_(True)
    with sepconv.use_cpu_strategy(mode):
        out = layer(x)
        grads = torch.autograd.grad(out, [x, *layer.parameters()], torch.ones_like(out) + out.detach())
    return out, grads


def test_the_backward_decision_is_measured_once_per_configuration_and_only_when_training(monkeypatch) -> None:
    calls = []
    real = cpu_strategy._measure_backward
    monkeypatch.setattr(cpu_strategy, "_measure_backward", lambda *args: calls.append(1) or real(*args))
    layer = sepconv.SeparableConv2d(4, 8, 9, padding=4)
    x = torch.randn(2, 4, 20, 20)
    with torch.no_grad():
        layer(x)
    assert calls == []  # inference: nothing to decide
    with sepconv.use_cpu_strategy("off"):
        layer(x).sum().backward()
    assert calls == []
    for _ in range(3):
        layer(x).sum().backward()
    backward_keys = [key for key in sepconv.cpu_strategy_decisions() if key[0] == "depthwise_backward"]
    assert len(calls) == len(backward_keys) >= 1  # once per layout the layout strategy tried
    values = {sepconv.cpu_strategy_decisions()[key] for key in backward_keys}
    assert values <= {f"grad_input={gi}, grad_weight={gw}" for gi in ("torch", "conv") for gw in ("torch", "fft")}


def test_small_kernels_and_non_float_types_keep_pytorchs_backward() -> None:
    x = torch.randn(1, 4, 10, 10, requires_grad=True)
    assert not cpu_strategy.may_choose_depthwise_backward(x, torch.randn(4, 1, 3, 3, requires_grad=True))
    assert cpu_strategy.may_choose_depthwise_backward(x, torch.randn(4, 1, 5, 5, requires_grad=True))
    assert not cpu_strategy.may_choose_depthwise_backward(x.detach(), torch.randn(4, 1, 5, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_strategy.may_choose_depthwise_backward(x, torch.randn(4, 1, 5, 5, requires_grad=True))
    xb = torch.randn(1, 4, 10, 10, dtype=torch.bfloat16, requires_grad=True)
    assert not cpu_strategy.may_choose_depthwise_backward(xb, torch.randn(4, 1, 5, 5, dtype=torch.bfloat16))


def test_export_sees_ordinary_convolutions_with_large_kernels() -> None:
    layer = sepconv.SeparableConv2d(4, 8, 7, padding=3)  # trainable, grad enabled: eager would measure
    x = torch.randn(2, 4, 12, 12)
    exported = torch.export.export(layer, (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets == [torch.ops.aten.conv2d.default] * 2
    assert sepconv.cpu_strategy_decisions() == {}
