"""A pointwise conv as a matrix product (sepconv.cpu_pointwise) and the CPU strategy's choice of it: the same map
as PyTorch's conv in float64, with the same gradients, run only where the strategy measured it faster."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sepconv
from sepconv import cpu_pointwise, cpu_strategy, cpu_timing

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


pytestmark = pytest.mark.usefixtures("fresh_cpu_strategy_cache")  # tests/conftest.py


@settings(max_examples=60)
@given(
    ndim=st.integers(1, 3),
    batch=st.integers(1, 3),
    in_channels=st.integers(1, 6),
    out_channels=st.integers(1, 6),
    size=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    bias=st.booleans(),
)
def test_the_product_is_the_conv_with_its_gradients_in_float64(
    ndim: int, batch: int, in_channels: int, out_channels: int, size: list[int], bias: bool
) -> None:
    x = torch.randn(batch, in_channels, *size[:ndim], dtype=torch.float64, requires_grad=True)
    w = torch.randn(out_channels, in_channels, *(1,) * ndim, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_channels, dtype=torch.float64, requires_grad=True) if bias else None
    assert cpu_pointwise.pointwise_matmul_applies(x, w)
    out, expected = cpu_pointwise.pointwise_matmul(x, w, b), CONV[ndim](x, w, b)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    wanted = [x, w] if b is None else [x, w, b]
    grad_output = torch.randn_like(out)
    got = torch.autograd.grad(out, wanted, grad_output)
    for grad, reference in zip(got, torch.autograd.grad(expected, wanted, grad_output), strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)


@settings(max_examples=40)
@given(
    ndim=st.integers(2, 3),
    batch=st.integers(1, 3),
    in_channels=st.integers(2, 6),
    out_channels=st.integers(1, 6),
    size=st.lists(st.integers(2, 5), min_size=3, max_size=3),
    bias=st.booleans(),
    requires=st.sampled_from(["all", "input", "weights"]),
)
def test_the_product_of_a_channels_last_input_hands_its_gradient_back_in_that_layout(
    ndim: int, batch: int, in_channels: int, out_channels: int, size: list[int], bias: bool, requires: str
) -> None:
    """A channels_last input (a separable layer's intermediate under the strategy's CHANNELS_LAST_PRODUCT plan): a
    contiguous output, the conv's values and gradients in float64 (double backward too), and the input's gradient
    channels_last as the input is, where autograd's own would be NCHW (which the depthwise backward converts)."""
    memory_format = torch.channels_last if ndim == 2 else torch.channels_last_3d
    x = torch.randn(batch, in_channels, *size[:ndim], dtype=torch.float64).contiguous(memory_format=memory_format)
    w = torch.randn(out_channels, in_channels, *(1,) * ndim, dtype=torch.float64)
    b = torch.randn(out_channels, dtype=torch.float64) if bias else None
    x.requires_grad_(requires in ("all", "input"))
    for parameter in (w, b):
        if parameter is not None:
            parameter.requires_grad_(requires in ("all", "weights"))
    out, expected = cpu_pointwise.pointwise_matmul(x, w, b), CONV[ndim](x, w, b)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    wanted = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grad_output = torch.randn_like(out)
    got = torch.autograd.grad(out, wanted, grad_output, create_graph=True)
    for grad, reference in zip(got, torch.autograd.grad(expected, wanted, grad_output, create_graph=True), strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)
    if x.requires_grad:
        assert got[0].is_contiguous(memory_format=memory_format) and not got[0].is_contiguous()
    if requires == "all":  # every input in the graph: the custom backward's own backward, checked numerically
        assert torch.autograd.gradgradcheck(lambda *args: cpu_pointwise.pointwise_matmul(*args), tuple(wanted))


@settings(max_examples=60)
@given(
    ndim=st.integers(2, 3),
    batch=st.integers(1, 3),
    in_channels=st.integers(2, 6),
    out_channels=st.integers(2, 6),
    size=st.lists(st.integers(2, 5), min_size=3, max_size=3),
    bias=st.booleans(),
    input_channels_last=st.booleans(),
    out_channels_last=st.booleans(),
)
def test_the_product_written_into_out_is_the_conv_in_out_s_layout(
    ndim: int,
    batch: int,
    in_channels: int,
    out_channels: int,
    size: list[int],
    bias: bool,
    input_channels_last: bool,
    out_channels_last: bool,
) -> None:
    """``out=`` (the strategy's batch chunks write each chunk into the batch's output): the conv's values in float64,
    in ``out`` itself and in its layout, contiguous or channels_last, from an input of either layout; and into a
    slice of a larger batch, leaving the rest alone."""
    memory_format = torch.channels_last if ndim == 2 else torch.channels_last_3d
    x = torch.randn(batch, in_channels, *size[:ndim], dtype=torch.float64)
    if input_channels_last:
        x = x.contiguous(memory_format=memory_format)
    w = torch.randn(out_channels, in_channels, *(1,) * ndim, dtype=torch.float64)
    b = torch.randn(out_channels, dtype=torch.float64) if bias else None
    layout = memory_format if out_channels_last else torch.contiguous_format
    batch_output = torch.full((batch + 2, out_channels, *size[:ndim]), -7.0, dtype=torch.float64)
    batch_output = batch_output.contiguous(memory_format=layout)
    out = batch_output[1 : batch + 1]
    written = cpu_pointwise.pointwise_matmul(x, w, b, out=out)
    assert written is out and out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, CONV[ndim](x, w, b), rtol=1e-12, atol=1e-12)
    assert bool((batch_output[0] == -7).all()) and bool((batch_output[-1] == -7).all())


def test_out_of_another_shape_or_layout_is_refused_by_name() -> None:
    x, w = torch.rand(2, 4, 5, 5), torch.rand(3, 4, 1, 1)
    with pytest.raises(ValueError, match=r"out must have the output's shape \(2, 3, 5, 5\); got \(2, 3, 5, 4\)"):
        cpu_pointwise.pointwise_matmul(x, w, out=torch.empty(2, 3, 5, 4))
    with pytest.raises(ValueError, match="out must be contiguous or channels_last"):
        cpu_pointwise.pointwise_matmul(x, w, out=torch.empty(2, 5, 3, 5).transpose(1, 2))


@pytest.mark.parametrize(
    ("input", "weight", "applies"),
    [
        (torch.rand(2, 4, 5, 5), torch.rand(3, 4, 1, 1), True),
        (torch.rand(2, 4, 5, 5).contiguous(memory_format=torch.channels_last), torch.rand(3, 4, 1, 1), False),
        (torch.rand(2, 5, 4, 5).transpose(1, 2), torch.rand(3, 4, 1, 1), False),  # strided
        (torch.rand(2, 4, 5, 5), torch.rand(3, 4, 3, 3), False),  # not 1x1
        (torch.rand(2, 4, 5, 5), torch.rand(3, 2, 1, 1), False),  # groups 2's weight
        (torch.rand(4, 5, 5), torch.rand(3, 4, 1, 1), False),  # unbatched
        (torch.rand(0, 4, 5, 5), torch.rand(3, 4, 1, 1), False),  # empty
        (torch.rand(2, 4, 5), torch.rand(3, 4, 1), True),
        (torch.rand(1, 4, 2, 3, 5), torch.rand(3, 4, 1, 1, 1), True),
    ],
)
def test_what_the_product_applies_to(input: torch.Tensor, weight: torch.Tensor, applies: bool) -> None:
    assert cpu_pointwise.pointwise_matmul_applies(input, weight) == applies


def time_with_speedup(monkeypatch, speedups: dict[int, float]) -> None:
    """Mock the strategy's timings: a pointwise conv of out_channels O runs ``speedups[O]`` times faster as a matrix
    product, the layout plans tie."""
    out_channels: list[int] = []
    real_measure = cpu_strategy._measure_pointwise
    monkeypatch.setattr(
        cpu_strategy,
        "_measure_pointwise",
        lambda input, weight, *args: out_channels.append(weight.shape[0]) or real_measure(input, weight, *args),
    )

    def timings(steps, timed_rounds=None):
        if "matmul" in steps:
            return {"conv": 1.0, "matmul": 1.0 / speedups[out_channels[-1]]}
        return dict.fromkeys(steps, 1.0)

    monkeypatch.setattr(cpu_timing, "time_candidates", timings)


def count_products(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the inputs the layers run as matrix products from now on."""
    shapes: list[tuple[int, ...]] = []
    real = cpu_pointwise.pointwise_matmul
    spy = lambda x, *args: shapes.append(tuple(x.shape)) or real(x, *args)  # noqa: E731
    monkeypatch.setattr(cpu_pointwise, "pointwise_matmul", spy)
    return shapes


@pytest.mark.parametrize(("speedup", "expected"), [(1.05, "conv"), (1.2, "matmul")])
def test_the_product_runs_where_it_won_by_a_tenth_and_keeps_results(monkeypatch, speedup: float, expected: str) -> None:
    """_MARGIN (1.1): a product 5% faster is not taken, 20% is; either way the layer's output and gradients equal the
    plain path's in float64, in training and inference."""
    time_with_speedup(monkeypatch, {8: speedup})
    torch.manual_seed(0)
    layer = sepconv.SeparableConv2d(4, 8, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    with sepconv.use_cpu_strategy("off"):
        plain = layer(x)
        plain_grads = torch.autograd.grad(plain, [x, *layer.parameters()], torch.ones_like(plain))
    layer(x)  # decides (the layout plans tie: the input as given, NCHW)
    products = count_products(monkeypatch)
    for _ in range(3):  # the first call claims its call slot, the next ones read it
        out = layer(x)
        grads = torch.autograd.grad(out, [x, *layer.parameters()], torch.ones_like(out))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), plain, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
        for got, reference in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)
    pointwise = {key: algorithm for key, algorithm in sepconv.cpu_strategy_decisions().items() if key[0] == "pointwise"}
    assert pointwise and set(pointwise.values()) == {expected}
    # per call: the training step's and the inference call's pointwise conv
    assert products == ([(2, 4, 9, 9)] * 6 if expected == "matmul" else [])


def test_a_call_slot_belongs_to_the_pointwise_conv_that_claimed_it(monkeypatch) -> None:
    """A pointwise conv inside the block's mid modules claims the call's slot first; the block's own pointwise conv
    still runs by its own decision (here the opposite one), on every call."""
    time_with_speedup(monkeypatch, {4: 1.0, 8: 2.0})  # the inner 4 -> 4 conv keeps PyTorch's, the 4 -> 8 is faster
    inner = sepconv.PointwiseConv2d(4, 4, dtype=torch.float64)
    layer = sepconv.SeparableConv2d(4, 8, 3, mid_activation=inner, dtype=torch.float64)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        with sepconv.use_cpu_strategy("off"):
            plain = layer(x)
        layer(x)
        products = count_products(monkeypatch)
        for _ in range(3):
            torch.testing.assert_close(layer(x), plain, rtol=1e-12, atol=1e-12)
    assert products == [(2, 4, 7, 7)] * 3  # the block's own, never the inner one
    [(_, slot)] = layer.__dict__["_sepconv_cpu_plans"][1].values()
    assert slot.pointwise is inner and slot.matmul is False


def test_a_pointwise_conv_changed_after_its_decision_runs_the_conv(monkeypatch) -> None:
    """Padding or groups set after the product was chosen: the conv they ask for, not the remembered product."""
    time_with_speedup(monkeypatch, {6: 2.0})
    layer = sepconv.PointwiseConv2d(4, 6, dtype=torch.float64)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        products = count_products(monkeypatch)
        layer(x)
        assert len(products) == 1
        layer.padding = (1, 1)
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1), rtol=1e-12, atol=1e-12)
        layer.padding, layer.groups = (0, 0), 2
        layer.weight = nn.Parameter(layer.weight[:, :2].clone())
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, groups=2), rtol=1e-12, atol=1e-12)
    assert len(products) == 1


@pytest.mark.parametrize(
    "case",
    ["off", "channels_last", "autocast", "float16"],
)
def test_where_nothing_is_timed_the_conv_runs(monkeypatch, case: str) -> None:
    time_with_speedup(monkeypatch, {6: 2.0})
    products = count_products(monkeypatch)
    layer = sepconv.PointwiseConv2d(4, 6)
    x = torch.randn(2, 4, 5, 5)
    if case == "channels_last":  # the product lost between depthwise convs there (see cpu_pointwise)
        x = x.contiguous(memory_format=torch.channels_last)
    if case == "float16":
        layer, x = layer.half(), x.half()
    mode = "off" if case == "off" else "auto"
    with torch.no_grad(), sepconv.use_cpu_strategy(mode), torch.autocast("cpu", enabled=case == "autocast"):
        out = layer(x)
        expected = F.conv2d(x, layer.weight, layer.bias)
    torch.testing.assert_close(out, expected)
    assert sepconv.cpu_strategy_decisions() == {} and products == []


def test_a_pointwise_decision_is_measured_once_per_configuration(monkeypatch) -> None:
    calls: list[tuple[tuple[int, ...], bool]] = []
    real = cpu_strategy._measure_pointwise
    monkeypatch.setattr(
        cpu_strategy,
        "_measure_pointwise",
        lambda x, w, b, training: calls.append((tuple(x.shape), training)) or real(x, w, b, training),
    )
    layer, twin = sepconv.PointwiseConv2d(4, 6), sepconv.PointwiseConv2d(4, 6)  # same geometry: one decision
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        layer(x), layer(x), twin(x)
        layer(torch.randn(3, 4, 5, 5))
    layer(x).sum().backward()  # training is decided apart
    assert calls == [((2, 4, 5, 5), False), ((3, 4, 5, 5), False), ((2, 4, 5, 5), True)]
    described = {cpu_strategy.describe_decision(key) for key in sepconv.cpu_strategy_decisions()}
    assert described == {
        ("pointwise conv 4 -> 6", "(2, 4, 5, 5)", "inference"),
        ("pointwise conv 4 -> 6", "(3, 4, 5, 5)", "inference"),
        ("pointwise conv 4 -> 6", "(2, 4, 5, 5)", "training"),
    }
    kinds = [m.kind for m in sepconv.cpu_strategy_measurements()]
    assert kinds == ["pointwise"] * 3


def test_the_product_of_a_strided_input_is_still_the_conv() -> None:
    """pointwise_matmul takes any layout: an input it cannot view as samples x channels x pixels is copied, not
    misread (the layers only hand it contiguous inputs: a pointwise conv of another layout runs PyTorch's conv)."""
    w, b = torch.randn(5, 4, 1, 1, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    for x in (
        torch.randn(2, 4, 6, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last),
        torch.randn(2, 7, 4, 6, dtype=torch.float64).permute(0, 2, 3, 1),
    ):
        out = cpu_pointwise.pointwise_matmul(x, w, b)
        torch.testing.assert_close(out, F.conv2d(x, w, b), rtol=1e-12, atol=1e-12)
