"""The CPU strategy changes layouts, never results: float64 equality with the plain path, and its cache."""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.strategies import ConvConfig, conv_configs
from torch import nn

import sepconv
from sepconv import cpu_layout, cpu_pointwise, cpu_strategy, cpu_timing
from sepconv.nets import small_resnet, small_vgg

SEPARABLE = {2: sepconv.SeparableConv2d, 3: sepconv.SeparableConv3d}


pytestmark = pytest.mark.usefixtures("fresh_cpu_strategy_cache")  # tests/conftest.py


def forward_and_grads(layer: nn.Module, x: torch.Tensor, mode: str):
    x = x.detach().requires_grad_(True)
    with sepconv.use_cpu_strategy(mode):
        out = layer(x)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], torch.ones_like(out) + out.detach())
    return out, grads


def separable_layer(cfg: ConvConfig) -> nn.Module:
    """The float64 separable layer of a random configuration, with biases on both parts."""
    return SEPARABLE[cfg.ndim](
        cfg.in_channels,
        cfg.out_channels,
        cfg.kernel_size,
        **cfg.conv_kwargs,
        depth_multiplier=cfg.depth_multiplier,
        depthwise_bias=True,
        dtype=torch.float64,
    )


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The channels_last format of a 4-d or 5-d tensor."""
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def layout_decisions() -> dict[tuple, str]:
    """The layers' plans among the strategy's decisions (not a depthwise conv's backward or a pointwise conv's)."""
    decisions = sepconv.cpu_strategy_decisions().items()
    return {key: plan for key, plan in decisions if key[0] not in ("depthwise_backward", "pointwise")}


@settings(max_examples=60)
@given(conv_configs(ndims=(2, 3)))
def test_channels_last_and_auto_equal_the_plain_path_in_float64(cfg: ConvConfig) -> None:
    layer = separable_layer(cfg)
    x = torch.randn(cfg.input_shape, dtype=torch.float64)
    plain, plain_grads = forward_and_grads(layer, x, "off")
    for mode in ("channels_last", "auto"):
        out, grads = forward_and_grads(layer, x, mode)
        assert out.is_contiguous() and out.shape == plain.shape
        torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
        for got, expected in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_depthwise_layer_alone_uses_the_strategy_and_keeps_results() -> None:
    layer = sepconv.DepthwiseConv2d(6, 7, padding="same", depth_multiplier=2, dtype=torch.float64)
    x = torch.randn(2, 6, 13, 11, dtype=torch.float64)
    with sepconv.use_cpu_strategy("off"):
        plain = layer(x)
    torch.testing.assert_close(layer(x), plain, rtol=1e-12, atol=1e-12)
    layouts = [key[0] for key in layout_decisions()]
    assert layouts == ["DepthwiseConv2d"]


def test_decisions_are_cached_per_configuration(monkeypatch) -> None:
    calls = []
    real_measure = cpu_strategy._measure
    monkeypatch.setattr(cpu_strategy, "_measure", lambda *args: calls.append(1) or real_measure(*args))
    layer = sepconv.SeparableConv2d(4, 8, 5, padding=2)
    twin = sepconv.SeparableConv2d(4, 8, 5, padding=2)  # same geometry: shares the decision
    x = torch.randn(2, 4, 16, 16)
    layer(x), layer(x), twin(x)
    assert len(calls) == 1
    layer(torch.randn(2, 4, 17, 16))  # a new input shape
    with torch.no_grad():
        layer(x)  # inference is decided apart from training
    assert len(calls) == 3
    layer(x)  # the layer's memo of its last plan, then the cache: nothing new to measure
    assert len(calls) == 3
    sepconv.clear_cpu_strategy_cache()
    layer(x)  # a cleared cache is measured again, whatever the layer remembers
    assert len(calls) == 4
    sepconv.clear_cpu_strategy_cache()
    layer(x), layer(torch.randn(2, 4, 17, 16))
    with torch.no_grad():
        layer(x)
    decisions = layout_decisions()
    plans = {"contiguous", "channels_last", "dense", cpu_strategy.CHANNELS_LAST_PRODUCT}
    assert len(decisions) == 3 and set(decisions.values()) <= plans
    assert {next(part for part in key if isinstance(part, tuple)) for key in decisions} == {
        (2, 4, 16, 16),
        (2, 4, 17, 16),
    }


def test_a_layer_called_on_several_shapes_in_turn_looks_each_plan_up_once(monkeypatch) -> None:
    """A layer shared across inputs of several shapes (a detector's head over pyramid levels) remembers a plan
    per shape: alternating calls do not repeat the full lookup; a cleared cache does, and a bad input is still
    refused by name after the layer has run."""
    lookups = []
    real_plan = cpu_strategy._plan
    monkeypatch.setattr(cpu_strategy, "_plan", lambda *args: lookups.append(args[1].shape) or real_plan(*args))
    layer = sepconv.SeparableConv2d(4, 8, 3, padding=1, dtype=torch.float64)
    levels = [torch.randn(2, 4, size, size, dtype=torch.float64) for size in (16, 8, 4)]
    with torch.no_grad():
        for _ in range(3):
            for x in levels:
                torch.testing.assert_close(layer(x), layer._forward(x), rtol=1e-12, atol=1e-12)
        assert lookups == [x.shape for x in levels]
        sepconv.clear_cpu_strategy_cache()
        layer(levels[0])
        assert len(lookups) == 4
        with pytest.raises(ValueError, match=r"SeparableConv2d expected input of shape \(N, 4, H, W\)"):
            layer(torch.randn(2, 5, 16, 16, dtype=torch.float64))
        for size in range(3, 3 + 2 * cpu_strategy._LAYER_MEMO_SIZE):
            layer(torch.randn(1, 4, 5, size, dtype=torch.float64))
        assert len(layer.__dict__["_sepconv_cpu_plans"][1]) <= cpu_strategy._LAYER_MEMO_SIZE  # bounded


def dense_whenever_offered(input, convs, params, chunk=None, dense=None, product=None):
    """A stand-in for the timing: the dense plan wherever it is a candidate, else the input as given."""
    return offered_or_as_given(input, dense, cpu_strategy.DENSE)


def product_whenever_offered(input, convs, params, chunk=None, dense=None, product=None):
    """A stand-in for the timing: the channels_last plan with the pointwise product wherever it is a candidate,
    else the input as given."""
    return offered_or_as_given(input, product, cpu_strategy.CHANNELS_LAST_PRODUCT)


def offered_or_as_given(input, offered, plan: str):
    if offered is not None:
        return (plan, None), {}
    return (cpu_strategy.CONTIGUOUS if input.is_contiguous() else cpu_strategy.CHANNELS_LAST, None), {}


@settings(max_examples=60)
@given(conv_configs(ndims=(2, 3)), st.booleans())
def test_the_dense_plan_equals_the_plain_path_in_float64(cfg: ConvConfig, channels_last: bool) -> None:
    """One dense conv of composed weights: the same outputs and gradients (input, both weights, both biases), in
    the caller's layout; used wherever the composition applies (no padding modes, 'same' with stride, or
    pointwise groups: those keep the parts)."""
    layer = separable_layer(cfg)
    x = torch.randn(cfg.input_shape, dtype=torch.float64)
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=memory_format_of(x))
    plain, plain_grads = forward_and_grads(layer, x, "off")
    ran_dense = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_strategy, "_measure", dense_whenever_offered)
        patch.setattr(sepconv.layers, "DENSE_MAX_MAC_RATIO", float("inf"))  # every layer a candidate
        patch.setattr(cpu_layout, "in_channels_last", None)  # no other plan may run
        real_dense = sepconv.layers._SeparableConv._dense_forward
        patch.setattr(
            sepconv.layers._SeparableConv, "_dense_forward", lambda self, t: ran_dense.append(1) or real_dense(self, t)
        )
        sepconv.clear_cpu_strategy_cache()
        out, grads = forward_and_grads(layer, x, "auto")
    composable = cfg.padding_mode == "zeros" and not cfg.strided_same and cfg.groups == 1
    applies = composable and cpu_strategy._input_layout(x) is not None  # batched, not C=1 or 1x1 (ambiguous)
    assert bool(ran_dense) == applies
    assert out.shape == plain.shape and out.stride() == plain.stride()
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_the_dense_plan_is_timed_for_narrow_layers_only(monkeypatch) -> None:
    offered = []
    monkeypatch.setattr(
        cpu_strategy, "_measure", lambda *args: offered.append(args[4] is not None) or dense_whenever_offered(*args)
    )
    x = torch.randn(2, 32, 12, 12)
    with torch.no_grad():
        sepconv.SeparableConv2d(32, 16, 3, padding=1)(x)  # dense: 16*9 / (9 + 16) = 5.8x the MACs
        sepconv.SeparableConv2d(32, 128, 3, padding=1)(x)  # 128*9 / (9 + 128) = 8.4x: not timed
        sepconv.SeparableConv2d(32, 16, 3, padding=1, mid_activation=nn.ReLU)(x)  # not one conv
        sepconv.SeparableConv2d(32, 16, 3, padding=1, padding_mode="reflect")(x)  # not zero padding
        sepconv.DepthwiseConv2d(32, 3, padding=1)(x)  # a depthwise layer alone
    assert offered == [True, False, False, False, False]
    assert next(iter(layout_decisions().values())) == "dense"


def test_a_dense_plan_follows_parts_changed_after_the_decision(monkeypatch) -> None:
    """A part changed after the layer decided dense (here the depthwise padding mode, which the composition
    cannot express): the output is the changed layer's, computed by the parts, and the layer decides again."""
    monkeypatch.setattr(cpu_strategy, "_measure", dense_whenever_offered)
    torch.manual_seed(0)
    layer = sepconv.SeparableConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        assert set(layout_decisions().values()) == {"dense"}
        layer.depthwise.padding_mode = "reflect"
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        mid = nn.functional.conv2d(padded, layer.depthwise.weight, groups=4)
        expected = nn.functional.conv2d(mid, layer.pointwise.weight, layer.pointwise.bias)
        for _ in range(2):  # the call that finds the change, and the next, decided anew
            torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
        assert not layer._dense_worth_timing()


def test_a_dense_plan_outside_autograd_follows_every_change_of_the_weights(monkeypatch) -> None:
    """Inference reuses the composed weights while the parts keep their values; each way of changing them — in
    place without a new version (``.data``), in place with one, a new parameter, a dtype conversion, a bias
    removed — shows in the next output (against the two convs in float64). Frozen parts with an input that
    needs a gradient take the same path and still hand back the input's gradient."""
    monkeypatch.setattr(cpu_strategy, "_measure", dense_whenever_offered)
    torch.manual_seed(0)
    layer = sepconv.SeparableConv2d(4, 6, 3, padding=1, depth_multiplier=2, depthwise_bias=True, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)

    def expected(inp: torch.Tensor) -> torch.Tensor:
        dw, pw = layer.depthwise, layer.pointwise
        mid = nn.functional.conv2d(inp, dw.weight, dw.bias, padding=1, groups=4)
        return nn.functional.conv2d(mid, pw.weight, pw.bias)

    changes = [
        lambda: layer.pointwise.weight.data.normal_(),  # no new version
        lambda: layer.depthwise.bias.data.add_(1.0),
        lambda: layer.depthwise.weight.mul_(-2.0),  # under no_grad below: a new version
        lambda: setattr(layer.pointwise, "weight", nn.Parameter(torch.randn_like(layer.pointwise.weight))),
        lambda: setattr(layer.pointwise, "bias", None),
    ]
    with torch.no_grad():
        for change in [lambda: None, *changes]:
            change()
            torch.testing.assert_close(layer(x), expected(x), rtol=1e-12, atol=1e-12)
        assert set(layout_decisions().values()) == {"dense"}
        layer.float()  # the same parameters, converted through .data
        torch.testing.assert_close(layer(x.float()), expected(x.float()), rtol=1e-5, atol=1e-5)
        layer.double()
    layer.requires_grad_(False)
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(layer(leaf).square().sum(), leaf)
    (reference,) = torch.autograd.grad(expected(leaf).square().sum(), leaf)
    torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)


def test_a_parameter_replaced_after_a_decision_is_the_one_timed_next() -> None:
    """A layer decides in training, then gets a new weight (``conv.weight = nn.Parameter(...)``): the next
    decision (a new input shape) times the new weight's gradient, not the old one's (outside the graph)."""
    layer = sepconv.SeparableConv2d(4, 8, 3, padding=1)
    layer(torch.randn(2, 4, 9, 9)).sum().backward()
    layer.depthwise.weight = nn.Parameter(torch.randn_like(layer.depthwise.weight))
    out = layer(torch.randn(2, 4, 11, 11))
    out.sum().backward()
    assert layer.depthwise.weight.grad is not None and len(layout_decisions()) == 2


def test_decisions_describe_their_layer_input_and_mode() -> None:
    """describe_decision reads the keys a real inference call and training step make (layout, depthwise backward
    and pointwise keys): the layer, the input shape each was made for, and the mode."""
    layer = sepconv.SeparableConv2d(4, 8, 5, padding=2)
    with torch.no_grad():
        layer(torch.randn(3, 4, 9, 9))
    layer(torch.randn(2, 4, 9, 9)).sum().backward()  # 5x5: its depthwise backward is decided too
    described = {cpu_strategy.describe_decision(key) for key in sepconv.cpu_strategy_decisions()}
    assert described == {
        ("SeparableConv2d", "(3, 4, 9, 9)", "inference"),
        ("SeparableConv2d", "(2, 4, 9, 9)", "training"),
        ("depthwise backward, weight (4, 1, 5, 5)", "(2, 4, 9, 9)", "training"),
        ("pointwise conv 4 -> 8", "(3, 4, 9, 9)", "inference"),  # timed in the NCHW plan (not channels_last's)
        ("pointwise conv 4 -> 8", "(2, 4, 9, 9)", "inference"),  # the training step's forward-only pruning round
        ("pointwise conv 4 -> 8", "(2, 4, 9, 9)", "training"),
    }


def test_a_dense_plan_still_calls_hooked_parts(monkeypatch) -> None:
    monkeypatch.setattr(cpu_strategy, "_measure", dense_whenever_offered)
    layer = sepconv.SeparableConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)  # decided dense, run dense
        assert set(layout_decisions().values()) == {"dense"}
        handle = layer.pointwise.register_forward_hook(lambda module, args, output: 2 * output)
        torch.testing.assert_close(layer(x), 2 * expected, rtol=1e-12, atol=1e-12)  # the hook ran
        handle.remove()
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=60)
@given(conv_configs(ndims=(2, 3)), st.booleans())
def test_the_product_plan_equals_the_plain_path_in_float64(cfg: ConvConfig, channels_last: bool) -> None:
    """The depthwise conv in channels_last, the pointwise conv as a matrix product reading it transposed: the
    same outputs and gradients (input, both weights, both biases), in the caller's layout; offered to NCHW
    callers of layers whose pointwise groups are 1, and the product really runs."""
    layer = separable_layer(cfg)
    x = torch.randn(cfg.input_shape, dtype=torch.float64)
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=memory_format_of(x))
    plain, plain_grads = forward_and_grads(layer, x, "off")
    ran: list[str] = []  # the plan's forward, then the product inside it
    real_forward, real_product = sepconv.layers._SeparableConv._product_forward, cpu_pointwise.pointwise_matmul
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_strategy, "_measure", product_whenever_offered)
        patch.setattr(
            sepconv.layers._SeparableConv,
            "_product_forward",
            lambda self, t, out=None: ran.append("plan") or real_forward(self, t, out),
        )
        patch.setattr(
            cpu_pointwise,
            "pointwise_matmul",
            lambda *a, **k: (ran[-1:] == ["plan"] and ran.append("product")) or real_product(*a, **k),
        )
        sepconv.clear_cpu_strategy_cache()
        out, grads = forward_and_grads(layer, x, "auto")
    applies = cfg.groups == 1 and cpu_strategy._input_layout(x) == cpu_strategy.CONTIGUOUS
    assert ran == (["plan", "product"] if applies else [])
    assert out.shape == plain.shape and out.stride() == plain.stride()
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("make_layer", "shape", "dtype", "channels_last", "offered"),
    [
        (lambda: sepconv.SeparableConv2d(4, 6, 3), (2, 4, 8, 8), torch.float32, False, True),
        (lambda: sepconv.SeparableConv3d(4, 6, 3), (2, 4, 5, 6, 7), torch.float64, False, True),
        (lambda: sepconv.SeparableConv2d(4, 6, 3), (2, 4, 8, 8), torch.float32, True, False),  # unless chunked
        (lambda: sepconv.SeparableConv2d(4, 6, 3, groups=2), (2, 4, 8, 8), torch.float32, False, False),
        (lambda: sepconv.SeparableConv2d(4, 6, 3, mid_activation=nn.ReLU), (2, 4, 8, 8), torch.float32, False, False),
        (lambda: sepconv.SeparableConv2d(4, 6, 3), (2, 4, 8, 8), torch.bfloat16, False, False),  # not on the BLAS
    ],
)
def test_the_product_plan_is_timed_where_it_applies(monkeypatch, make_layer, shape, dtype, channels_last, offered):
    """Timed for NCHW callers of layers without mid modules whose pointwise groups are 1, in float32/float64."""
    seen: list[bool] = []

    def record(input, convs, params, chunk=None, dense=None, product=None):
        seen.append(product is not None)
        return product_whenever_offered(input, convs, params, chunk, dense, product)

    monkeypatch.setattr(cpu_strategy, "_measure", record)
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        make_layer().to(dtype)(x)
    assert seen == [offered]
    assert (cpu_strategy.CHANNELS_LAST_PRODUCT in layout_decisions().values()) == offered


def test_a_product_plan_still_calls_hooked_parts(monkeypatch) -> None:
    monkeypatch.setattr(cpu_strategy, "_measure", product_whenever_offered)
    layer = sepconv.SeparableConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        assert set(layout_decisions().values()) == {cpu_strategy.CHANNELS_LAST_PRODUCT}
        handle = layer.pointwise.register_forward_hook(lambda module, args, output: 2 * output)
        doubled = layer(x)
        torch.testing.assert_close(doubled, 2 * expected, rtol=1e-12, atol=1e-12)  # the hook ran
        assert doubled.is_contiguous()  # converted back from the hooked conv's channels_last output
        handle.remove()
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def product_chunks_whenever_offered(input, convs, params, chunk=None, dense=None, product=None):
    """A stand-in for the timing: the product plan in batch chunks wherever it is a candidate, else as given."""
    if product is not None and chunk is not None:
        return (cpu_strategy.CHANNELS_LAST_PRODUCT, chunk), {}
    return offered_or_as_given(input, None, cpu_strategy.CHANNELS_LAST_PRODUCT)


@settings(max_examples=60)
@given(conv_configs(ndims=(2, 3)), st.integers(2, 5), st.booleans())
def test_the_product_plan_in_batch_chunks_equals_the_plain_path_in_float64(
    cfg: ConvConfig, batch: int, channels_last: bool
) -> None:
    """The product plan a few samples at a time: the same outputs in float64, in the caller's layout, each chunk
    after the first written straight into the batch's output (outside autograd, for NCHW and channels_last
    callers); in training (NCHW callers) the same gradients too."""
    layer = separable_layer(cfg)
    x = torch.randn(batch, *cfg.input_shape[1:], dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=memory_format_of(x))
    plain, plain_grads = forward_and_grads(layer, x, "off")
    chunk = batch // 2
    calls: list[bool] = []  # per call of the plan's forward: whether it wrote into a given output
    real_forward = sepconv.layers._SeparableConv._product_forward
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_strategy, "_measure", product_chunks_whenever_offered)
        patch.setattr(cpu_strategy, "_chunk_size", lambda input, training: chunk)
        patch.setattr(
            sepconv.layers._SeparableConv,
            "_product_forward",
            lambda self, t, out=None: calls.append(out is not None) or real_forward(self, t, out),
        )
        sepconv.clear_cpu_strategy_cache()
        out, grads = forward_and_grads(layer, x, "auto")
        trained = list(calls)
        with torch.no_grad():
            inference = layer(x)
    source = cpu_strategy._input_layout(x)
    chunks = -(-batch // chunk)
    assert trained == ([False] * chunks if cfg.groups == 1 and source == cpu_strategy.CONTIGUOUS else [])
    offered = cfg.groups == 1 and source is not None
    assert calls[len(trained) :] == ([False] + [True] * (chunks - 1) if offered else [])
    # the plan's output is in the caller's layout (PyTorch's own is contiguous after a circular padding's copy)
    caller_s = torch.contiguous_format if x.is_contiguous() else memory_format_of(x)
    for result, planned in ((out, bool(trained)), (inference, offered)):
        assert result.shape == plain.shape
        assert result.is_contiguous(memory_format=caller_s) if planned else result.stride() == plain.stride()
        torch.testing.assert_close(result, plain, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("channels_last", "training", "offered"),
    [(False, False, True), (False, True, True), (True, False, True), (True, True, False)],
)
def test_the_product_plan_in_batch_chunks_is_timed_where_it_applies(monkeypatch, channels_last, training, offered):
    """In chunks the product writes into the caller's layout, which a channels_last caller's training step cannot
    (autograd joins chunks by concatenating them): timed there as given and in plain chunks only."""
    seen: list[set[str]] = []

    def record(input, convs, params, chunk=None, dense=None, product=None):
        plans = {cpu_strategy._plan_name(cpu_strategy.CHANNELS_LAST, chunk)}
        if product is not None:
            plans.add(cpu_strategy._plan_name(cpu_strategy.CHANNELS_LAST_PRODUCT, chunk))
        seen.append(plans)
        return product_chunks_whenever_offered(input, convs, params, chunk, dense, product)

    monkeypatch.setattr(cpu_strategy, "_measure", record)
    monkeypatch.setattr(cpu_strategy, "_chunk_size", lambda input, training: 2)
    x = torch.randn(4, 4, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.set_grad_enabled(training):
        sepconv.SeparableConv2d(4, 6, 3)(x)
    in_chunks = cpu_strategy._plan_name(cpu_strategy.CHANNELS_LAST_PRODUCT, 2)
    assert seen == [{"channels_last in batch chunks of 2", *([in_chunks] if offered else [])}]
    assert (in_chunks in layout_decisions().values()) == offered


def test_the_product_plan_in_batch_chunks_of_frozen_layers_in_grad_mode_keeps_the_caller_s_layout(monkeypatch) -> None:
    """Grad mode on, nothing requiring a gradient (an evaluation loop without ``torch.no_grad``): inference, so the
    chunks are written into a channels_last output as outside grad mode, not concatenated from contiguous parts."""
    monkeypatch.setattr(cpu_strategy, "_measure", product_chunks_whenever_offered)
    monkeypatch.setattr(cpu_strategy, "_chunk_size", lambda input, training: 2)
    layer = sepconv.SeparableConv2d(4, 6, 3, padding=1, dtype=torch.float64).requires_grad_(False)
    x = torch.randn(5, 4, 7, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with sepconv.use_cpu_strategy("off"):
        plain = layer(x)
    out = layer(x)
    assert set(layout_decisions().values()) == {cpu_strategy._plan_name(cpu_strategy.CHANNELS_LAST_PRODUCT, 2)}
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)


def test_the_product_plan_in_batch_chunks_still_calls_hooked_parts(monkeypatch) -> None:
    """A hooked pointwise conv runs as a module, its output copied into the batch's, channels_last as given."""
    monkeypatch.setattr(cpu_strategy, "_measure", product_chunks_whenever_offered)
    monkeypatch.setattr(cpu_strategy, "_chunk_size", lambda input, training: 2)
    layer = sepconv.SeparableConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    x = torch.randn(5, 4, 7, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = layer(x)
        assert set(layout_decisions().values()) == {cpu_strategy._plan_name(cpu_strategy.CHANNELS_LAST_PRODUCT, 2)}
        batches: list[int] = []
        layer.pointwise.register_forward_hook(lambda module, args, output: batches.append(len(output)) or 2 * output)
        doubled = layer(x)
    assert batches == [2, 2, 1] and doubled.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(doubled, 2 * expected, rtol=1e-12, atol=1e-12)


CHUNKED_LAYERS = {
    "separable 2-d": (lambda: sepconv.SeparableConv2d(3, 5, 3, padding=1, mid_activation=nn.ReLU), (5, 3, 9, 9)),
    "separable 3-d": (lambda: sepconv.SeparableConv3d(3, 5, 3, padding=1, stride=2), (5, 3, 6, 7, 8)),
    "depthwise alone": (lambda: sepconv.DepthwiseConv2d(3, 5, padding="same", depth_multiplier=2), (5, 3, 9, 9)),
}


@pytest.mark.parametrize("kind", list(CHUNKED_LAYERS))
def test_the_chunked_plan_equals_the_plain_path_in_float64(monkeypatch, kind: str) -> None:
    """Channels_last a few samples at a time (batch 5 in chunks of 2: 2, 2, 1): the same outputs and gradients,
    contiguous, in inference and in training; the convs really see the chunks."""
    monkeypatch.setattr(cpu_strategy, "_measure", lambda *args: ((cpu_strategy.CHANNELS_LAST, 2), {}))
    build, shape = CHUNKED_LAYERS[kind]
    layer = build().double()
    x = torch.randn(shape, dtype=torch.float64)
    plain, plain_grads = forward_and_grads(layer, x, "off")
    batches: list[int] = []
    depthwise = getattr(layer, "depthwise", layer)
    conv_forward = depthwise._checked_forward  # spied on the instance: the batch each conv call sees
    depthwise._checked_forward = lambda input: batches.append(input.shape[0]) or conv_forward(input)
    out, grads = forward_and_grads(layer, x, "auto")
    assert batches == [2, 2, 1] and out.is_contiguous()
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, plain_grads, strict=True):
        assert got.is_contiguous()
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        inference = layer(x)
    assert inference.is_contiguous() and batches[3:] == [2, 2, 1]
    torch.testing.assert_close(inference, plain, rtol=1e-12, atol=1e-12)


def test_a_channels_last_caller_in_chunks_keeps_its_layout_and_results(monkeypatch) -> None:
    monkeypatch.setattr(cpu_strategy, "_chunk_size", lambda input, training: 2)
    monkeypatch.setattr(
        cpu_strategy,
        "_measure",
        lambda input, convs, params, chunk, dense=None, product=None: ((cpu_strategy.CHANNELS_LAST, chunk), {}),
    )
    layer = sepconv.SeparableConv2d(3, 5, 3, padding=1, dtype=torch.float64)
    x = torch.randn(5, 3, 9, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    plain, plain_grads = forward_and_grads(layer, x, "off")
    forward_and_grads(layer, x, "auto")  # decided before the hook: a layer with hooked parts is not timed
    with torch.no_grad():
        layer(x)
    batches: list[int] = []
    layer.depthwise.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    out, grads = forward_and_grads(layer, x, "auto")
    with torch.no_grad():
        inference = layer(x)
    assert batches == [2, 2, 1, 2, 2, 1]
    for result in (out, inference):
        assert result.is_contiguous(memory_format=torch.channels_last) and not result.is_contiguous()
        torch.testing.assert_close(result, plain, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_channels_last_caller_with_nothing_to_chunk_is_not_timed(monkeypatch) -> None:
    monkeypatch.setattr(cpu_strategy, "_measure", None)  # any timing would fail
    x = torch.randn(1, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    sepconv.SeparableConv2d(3, 5, 3, mid_activation=nn.ReLU)(x)  # batch 1 (a mid module: no dense plan either)
    sepconv.SeparableConv2d(3, 5, 3, mid_norm=nn.BatchNorm2d)(torch.cat([x, x]))  # samples not independent
    assert sepconv.cpu_strategy_decisions() == {}


def test_one_channels_last_sample_skips_the_plan_lookup_and_keeps_results(monkeypatch) -> None:
    """Nothing to choose for one channels_last sample of a layer with no dense plan: no lookup, no decision, no
    measurement (its pointwise conv's input is channels_last too), the same results and gradients in float64 in
    every mode, and a bad input still refused by name, also after good calls."""
    lookups = []
    real_plan = cpu_strategy._plan
    monkeypatch.setattr(cpu_strategy, "_plan", lambda *args: lookups.append(args[1].shape) or real_plan(*args))
    wide = sepconv.SeparableConv2d(4, 96, 3, padding=1, depthwise_bias=True, dtype=torch.float64)
    narrow = sepconv.SeparableConv2d(4, 2, 3, padding=1, dtype=torch.float64)  # a dense plan to time
    assert not wide._dense_worth_timing() and narrow._dense_worth_timing()
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    dw, pw = wide.depthwise, wide.pointwise
    plain = [nn.Conv2d(4, 4, 3, padding=1, groups=4, dtype=torch.float64), nn.Conv2d(4, 96, 1, dtype=torch.float64)]
    plain = nn.Sequential(*plain)
    plain.load_state_dict({"0.weight": dw.weight, "0.bias": dw.bias, "1.weight": pw.weight, "1.bias": pw.bias})
    expected, expected_grads = forward_and_grads(plain, x, "off")
    for mode in ("auto", "channels_last", "off", "auto"):
        out, grads = forward_and_grads(wide, x, mode)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert lookups == [] and sepconv.cpu_strategy_decisions() == {} and sepconv.cpu_strategy_measurements() == []
    with torch.no_grad():
        narrow(x)
    assert lookups == [x.shape]  # the dense plan is timed against the input as given
    for bad in (torch.randn(1, 5, 9, 8), torch.randn(1, 4, 9, 8, 2)):  # wrong channels; 5-d into a 2-d layer
        with pytest.raises(ValueError, match=r"SeparableConv2d expected input of shape \(N, 4, H, W\)"):
            wide(bad.to(torch.float64).contiguous(memory_format=cpu_strategy._FORMATS[bad.dim()]))


@pytest.mark.parametrize("train_mode", [True, False])
def test_a_training_mode_batchnorm_is_never_run_in_chunks(monkeypatch, train_mode: bool) -> None:
    """BatchNorm statistics of a chunk differ from the batch's: a training-mode BatchNorm between the convs rules
    the chunked candidate out; an eval-mode one (per-sample affine) does not."""
    monkeypatch.setattr(cpu_strategy, "_CHUNK_BYTES", 1)  # one sample per chunk, if chunks are allowed at all
    offered: list[object] = []
    monkeypatch.setattr(
        cpu_strategy,
        "_measure",
        lambda input, convs, params, chunk=None, dense=None, product=None: (
            offered.append(chunk) or (("contiguous", None), {})
        ),
    )
    layer = sepconv.SeparableConv2d(3, 4, 3, mid_norm=nn.BatchNorm2d).train(train_mode)
    with torch.no_grad():
        layer(torch.randn(4, 3, 8, 8))
    assert offered == ([None] if train_mode else [1])


def test_chunks_divide_the_batch_when_a_divisor_is_near_the_target(monkeypatch) -> None:
    sample = torch.empty(1, 4, 8, 8)  # 1 KiB per sample in float32
    monkeypatch.setattr(cpu_strategy, "_CHUNK_BYTES", 10 * 1024)  # 10 samples for inference, 20 in training
    size = lambda batch, training=False: cpu_strategy._chunk_size(sample.expand(batch, -1, -1, -1), training)  # noqa: E731
    assert size(32) == 8  # divisors 8 and 16: 8 is nearer to 10 (ratio 1.25 vs 1.6)
    assert size(32, training=True) == 16
    assert size(31) == 10  # prime: no divisor within 2x, 10 + 10 + 10 + 1
    assert size(30) == 10
    assert size(19) is None  # no divisor near 10, and a chunk of 10 would not leave a second one as large
    assert size(1) is None


def test_training_times_only_the_plans_whose_forward_is_not_clearly_behind(monkeypatch) -> None:
    chunked = cpu_strategy._plan_name(cpu_strategy.CHANNELS_LAST, 4)
    calls: list[object] = []

    def fake_time_layouts(input, convs, params, chunk=None, only=None, timed_rounds=None, dense=None, product=None):
        calls.append((only, timed_rounds))
        if params is None:  # forward: NCHW 10x behind, the other two close
            return {cpu_strategy.CONTIGUOUS: 10.0, cpu_strategy.CHANNELS_LAST: 1.0, chunked: 1.2}
        return {name: {cpu_strategy.CHANNELS_LAST: 2.0, chunked: 1.0}[name] for name in only}

    monkeypatch.setattr(cpu_strategy, "_time_layouts", fake_time_layouts)
    plan, _ = cpu_strategy._measure(torch.randn(8, 3, 4, 4), lambda x: x, [torch.zeros(1, requires_grad=True)], 4)
    # the forward only prunes: one timed round; then the training steps of the two close plans, fully timed
    assert calls == [(None, 1), ({cpu_strategy.CHANNELS_LAST, chunked}, None)]
    assert plan == (cpu_strategy.CHANNELS_LAST, 4)
    calls.clear()
    assert cpu_strategy._measure(torch.randn(8, 3, 4, 4), lambda x: x, None, 4)[0] == (cpu_strategy.CHANNELS_LAST, None)
    assert calls == [(None, None)]  # inference decides on the forward: fully timed


@pytest.mark.parametrize(("speedup", "chosen"), [(1.08, "contiguous"), (1.12, "channels_last")])
def test_an_alternative_layout_must_win_by_the_margin(monkeypatch, speedup: float, chosen: str) -> None:
    """Near-ties stay with the input as given; a plan measured more than _MARGIN (1.1) faster is chosen. (At 1.05
    a full cpu.py run picked more plans that then lost, by up to 0.62x: noise decides 5% gaps on this VM.)"""
    assert cpu_strategy._MARGIN == 1.1
    times = {cpu_strategy.CONTIGUOUS: 1.0, cpu_strategy.CHANNELS_LAST: 1.0 / speedup}
    monkeypatch.setattr(cpu_strategy, "_time_layouts", lambda *args, **kwargs: dict(times))
    plan, _ = cpu_strategy._measure(torch.randn(1, 3, 4, 4), lambda x: x, None)
    assert plan == (chosen, None)


@pytest.mark.parametrize(
    ("first", "again", "decided", "settled"),
    [
        (1.08, 1.08, "contiguous", "channels_last"),  # two measurements 8% apart: switch (5% margin on both)
        (1.08, 0.98, "contiguous", "contiguous"),  # 1.08 then 0.98: 1.03 on both, too little
        (1.20, 0.90, "channels_last", "contiguous"),  # the first measurement's switch undone
        (1.20, 1.00, "channels_last", "channels_last"),  # 1.095 on both
        (1.50, 0.50, "channels_last", "contiguous"),  # a 1.5x switch, then 2x the other way: undone (0.87)
        (2.20, None, "channels_last", "channels_last"),  # clear (over _RECHECK_WITHIN = 2): never measured again
    ],
)
def test_a_close_decision_is_measured_again_after_a_few_calls(
    monkeypatch, first: float, again: float | None, decided: str, settled: str
) -> None:
    """channels_last measured ``first`` then ``again`` times faster than an NCHW input as given: the layer runs
    the first measurement's plan until its ``_RECHECK_AFTER_CALLS``-th call, which times the close plans again;
    the geometric mean of both then decides, channels_last needing a 5% margin. Outputs stay the plain path's."""
    timings: list[set[str] | None] = []

    def fake_time_layouts(input, convs, params, chunk=None, only=None, timed_rounds=None, dense=None, product=None):
        timings.append(only)
        speedup = first if len(timings) == 1 else again
        times = {cpu_strategy.CONTIGUOUS: 1.0, cpu_strategy.CHANNELS_LAST: 1.0 / speedup}
        return {name: seconds for name, seconds in times.items() if only is None or name in only}

    monkeypatch.setattr(cpu_strategy, "_time_layouts", fake_time_layouts)
    converted = []
    real_in_channels_last = cpu_layout.in_channels_last
    monkeypatch.setattr(
        cpu_layout, "in_channels_last", lambda *args: converted.append(1) or real_in_channels_last(*args)
    )
    layer = sepconv.SeparableConv2d(4, 8, 3, padding=1, dtype=torch.float64)  # 8*9 / (9 + 8): no dense plan
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    with sepconv.use_cpu_strategy("off"), torch.no_grad():
        expected = layer(x)
    with torch.no_grad():
        for call in range(1, cpu_strategy._RECHECK_AFTER_CALLS + 3):
            converted.clear()
            torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
            plan = settled if call >= cpu_strategy._RECHECK_AFTER_CALLS else decided
            assert list(layout_decisions().values()) == [plan], call
            assert bool(converted) == (plan == "channels_last"), call  # the plan in force ran
    close = {cpu_strategy.CONTIGUOUS, cpu_strategy.CHANNELS_LAST}
    assert timings == ([None] if again is None else [None, close])
    assert cpu_strategy._rechecks == {}


def test_a_deep_copy_of_a_layer_owed_a_recheck_takes_it(monkeypatch) -> None:
    """A layer copied while its decision is owed a recheck (an EMA twin, say) and then called instead of the
    original: the copy's calls count towards that recheck, which it takes once."""
    timings = []

    def close_times(input, convs, params, chunk=None, only=None, timed_rounds=None, dense=None, product=None):
        timings.append(only)
        return {cpu_strategy.CONTIGUOUS: 1.0, cpu_strategy.CHANNELS_LAST: 1.0 / 1.08}

    monkeypatch.setattr(cpu_strategy, "_time_layouts", close_times)
    layer = sepconv.SeparableConv2d(4, 8, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        layer(x)
        twin = copy.deepcopy(layer)
        for _ in range(2 * cpu_strategy._RECHECK_AFTER_CALLS):
            twin(x)
    assert len(timings) == 2 and cpu_strategy._rechecks == {}
    assert list(layout_decisions().values()) == ["channels_last"]


def test_a_recheck_owed_is_forgotten_with_the_cache_and_by_loaded_decisions(monkeypatch, tmp_path) -> None:
    """Clearing the cache drops owed rechecks (the next call decides afresh); a decision loaded from a file
    replaces this process's close one, owed no recheck."""
    monkeypatch.setattr(
        cpu_strategy,
        "_time_layouts",
        lambda *args, **kwargs: {cpu_strategy.CONTIGUOUS: 1.0, cpu_strategy.CHANNELS_LAST: 1.0},
    )
    layer = sepconv.SeparableConv2d(4, 8, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        layer(x)
        assert len(cpu_strategy._rechecks) == 1
        sepconv.clear_cpu_strategy_cache()
        assert cpu_strategy._rechecks == {}
        layer(x)
        path = tmp_path / "decisions.json"
        sepconv.save_cpu_strategy_decisions(path)
        assert len(cpu_strategy._rechecks) == 1
        sepconv.load_cpu_strategy_decisions(path)
        assert cpu_strategy._rechecks == {}
        monkeypatch.setattr(cpu_strategy, "_time_layouts", None)  # any timing would fail
        for _ in range(cpu_strategy._RECHECK_AFTER_CALLS + 1):
            layer(x)


def test_timing_warms_up_and_alternates_which_layout_goes_first(monkeypatch) -> None:
    """ABBA rounds after the warm-up rounds: neither layout always runs first (first-call and cache-order bias)."""
    monkeypatch.setattr(cpu_timing, "CLEAR_WIN", float("inf"))  # no step drops out: every round runs
    monkeypatch.setattr(cpu_timing, "MIN_TIMED_S", 0.0)  # instant steps: no extra rounds
    monkeypatch.setattr(cpu_timing, "CLOSE_RUNS", cpu_timing.TIMED_RUNS)  # nor for close ones (noise decides)
    seen: list[str] = []

    def convs(x: torch.Tensor) -> torch.Tensor:
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        seen.append(cpu_strategy.CHANNELS_LAST if cl else cpu_strategy.CONTIGUOUS)
        return x * 2

    times = cpu_strategy._time_layouts(torch.randn(1, 3, 4, 4), convs, None)
    rounds = cpu_timing.WARMUP_ROUNDS + cpu_timing.TIMED_RUNS
    assert len(seen) == 2 * rounds
    firsts = seen[::2]
    assert all(a != b for a, b in itertools.pairwise(firsts))  # the first layout alternates
    assert all(seen[2 * r] != seen[2 * r + 1] for r in range(rounds))  # both layouts every round
    assert set(times) == {cpu_strategy.CONTIGUOUS, cpu_strategy.CHANNELS_LAST}


def test_one_measurement_when_threads_race_for_the_same_configuration(monkeypatch) -> None:
    calls = []

    def slow_measure(*args):
        calls.append(1)
        time.sleep(0.2)
        return ("channels_last", None), {}

    monkeypatch.setattr(cpu_strategy, "_measure", slow_measure)
    layer = sepconv.SeparableConv2d(4, 8, 3, padding=1, dtype=torch.float64)
    x = torch.randn(1, 4, 10, 10, dtype=torch.float64)
    with sepconv.use_cpu_strategy("off"):
        expected = layer(x)
    results = [None] * 4

    def worker(i: int) -> None:
        results[i] = layer(x)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    for result in results:
        torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


def test_batchnorm_statistics_see_each_batch_once() -> None:
    torch.manual_seed(0)
    layer = sepconv.SeparableConv2d(4, 8, 3, mid_norm=nn.BatchNorm2d, mid_activation=nn.ReLU, dtype=torch.float64)
    twin = sepconv.SeparableConv2d(4, 8, 3, mid_norm=nn.BatchNorm2d, mid_activation=nn.ReLU, dtype=torch.float64)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4, 12, 12, dtype=torch.float64)
    with sepconv.use_cpu_strategy("auto"):
        out = layer(x)
    with sepconv.use_cpu_strategy("off"):
        expected = twin(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert layer.mid_norm.num_batches_tracked.item() == 1
    torch.testing.assert_close(layer.mid_norm.running_mean, twin.mid_norm.running_mean, rtol=0, atol=0)


def test_ineligible_inputs_run_as_given_and_record_nothing() -> None:
    layer = sepconv.SeparableConv2d(4, 8, 3, padding=1, mid_activation=nn.ReLU)  # no dense plan to time
    x_cl = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    assert layer(x_cl).is_contiguous(memory_format=torch.channels_last)  # the caller's layout, as nn.Conv2d
    sepconv.SeparableConv1d(4, 8, 3)(torch.randn(2, 4, 9))  # 1-d has no channels_last...
    with sepconv.use_cpu_strategy("off"):
        layer(torch.randn(2, 4, 9, 9))
    # ... but its pointwise conv may run as a matrix product: the one decision
    assert [key[:3] for key in sepconv.cpu_strategy_decisions()] == [("pointwise", (8, 4), (2, 4, 7))]


def test_context_manager_is_per_thread_and_modes_are_checked() -> None:
    seen = []
    with sepconv.use_cpu_strategy("off"):
        thread = threading.Thread(target=lambda: seen.append(sepconv.get_cpu_strategy()))
        thread.start()
        thread.join()
        assert sepconv.get_cpu_strategy() == "off"
    assert seen == ["auto"] and sepconv.get_cpu_strategy() == "auto"
    with pytest.raises(ValueError, match="CPU strategy must be one of 'auto', 'channels_last', 'off'; got 'fast'"):
        sepconv.set_cpu_strategy("fast")
    sepconv.set_cpu_strategy("off")
    try:
        assert sepconv.get_cpu_strategy() == "off"
    finally:
        sepconv.set_cpu_strategy("auto")


@pytest.mark.parametrize("build", [small_resnet, small_vgg])
def test_run_channels_last_keeps_nchw_outside_and_results_in_float64(build, monkeypatch) -> None:
    # batches this small: nothing to chunk; the narrow layers' dense plan is timed, here decided "as given"
    monkeypatch.setattr(cpu_strategy, "_measure", lambda input, *args: ((cpu_strategy.CHANNELS_LAST, None), {}))
    torch.manual_seed(0)
    model = build("separable").double()
    twin = copy.deepcopy(model)
    sepconv.run_channels_last(twin)
    assert sepconv.run_channels_last(twin) is twin and len(twin._forward_pre_hooks) == 1  # idempotent
    seen = []
    separable = [m for m in twin.modules() if isinstance(m, sepconv.SeparableConv2d)]
    # a hook at each separable layer, none at its parts: they see the input the layer's hook made channels_last
    assert all(len(layer._forward_pre_hooks) == 1 for layer in separable)
    assert not any(part._forward_pre_hooks for layer in separable for part in layer.children())
    for layer in (separable[0].depthwise, separable[-1].pointwise):  # the last: past norms, pools, adds
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    # the stem's input has one channel (NCHW and channels_last strides coincide): its weight decides, so the
    # stem's output, its norm and activation are channels_last too, not converted at the next conv only
    twin[0][0].register_forward_hook(lambda module, args, output: seen.append(output))
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    with sepconv.use_cpu_strategy("off"):
        expected = model(x)
    out = twin(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in seen)
    out.sum().backward()
    expected.sum().backward()
    for (name, p), q in zip(twin.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert set(layout_decisions().values()) <= {"channels_last"}  # inside, layers keep channels_last


def test_run_channels_last_handles_3d_models_and_returns_contiguous_maps() -> None:
    model = nn.Sequential(sepconv.SeparableConv3d(2, 4, 3, padding=1), nn.ReLU()).double()
    twin = sepconv.run_channels_last(copy.deepcopy(model))
    assert twin[0].pointwise.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert [len(m._forward_pre_hooks) for m in twin.modules()] == [1, 1, 0, 0, 0]  # model, layer; not its parts
    alone = sepconv.run_channels_last(copy.deepcopy(model[0]))  # a separable layer as the whole model: one hook
    assert [len(m._forward_pre_hooks) for m in alone.modules()] == [1, 0, 0]
    x_alone = torch.randn(2, 2, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(alone(x_alone), model[0](x_alone), rtol=1e-10, atol=1e-12)
    x = torch.randn(1, 2, 4, 5, 6, dtype=torch.float64)
    out = twin(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, model(x), rtol=1e-10, atol=1e-12)


def test_timing_runs_every_step_on_the_callers_input_and_leaves_it_as_it_was() -> None:
    """No copy per step (a copy's fresh memory made steps pay page faults that steady calls do not): in
    inference every step of every plan sees the caller's data; a training step sees it through an upstream
    ReLU (whose backward consumes the input gradient, as in a network); the input gets no gradient."""
    x = torch.randn(2, 3, 5, 5)
    weight = torch.randn(3, 1, 3, 3, requires_grad=True)
    seen: list[torch.Tensor] = []

    def convs(t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return nn.functional.conv2d(t, weight, padding=1, groups=3)

    for params, expected in ((None, x), ([weight], torch.relu(x))):
        seen.clear()
        cpu_strategy._time_layouts(x, convs, params)
        as_given = [t for t in seen if t.is_contiguous()]  # the channels_last plan's are converted copies
        assert as_given and len(as_given) < len(seen)
        assert all(torch.equal(t, expected) for t in seen)
        if params is None:
            assert {t.data_ptr() for t in as_given} == {x.data_ptr()}
    assert not x.requires_grad and x.grad is None


def test_gradients_reach_the_caller_in_its_own_layout() -> None:
    """NCHW in, NCHW out — for the gradients too: x.grad and the gradient handed to the previous op."""
    layer = sepconv.SeparableConv2d(8, 16, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    upstream = torch.randn(2, 16, 10, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    grads = {}
    for mode in ("channels_last", "off"):
        leaf = x.clone().requires_grad_(True)
        previous = leaf * 1.0  # an op before the layer: the gradient it receives is checked too
        seen: list[torch.Tensor] = []
        previous.register_hook(seen.append)
        with sepconv.use_cpu_strategy(mode):
            out = layer(previous)
        assert out.is_contiguous()
        out.backward(upstream)
        grads[mode] = leaf.grad
        if mode == "channels_last":
            assert seen[0].is_contiguous() and leaf.grad.is_contiguous()
    torch.testing.assert_close(grads["channels_last"], grads["off"], rtol=1e-12, atol=1e-12)


def test_a_layer_counts_as_trainable_exactly_when_one_of_its_parameters_needs_a_gradient() -> None:
    """The per-call test against ``Module.parameters()``: a parametrized weight's original, a mid norm's
    affine parameters, and each parameter frozen in turn."""
    layer = sepconv.SeparableConv2d(4, 6, 3, mid_norm=nn.BatchNorm2d)
    nn.utils.parametrizations.weight_norm(layer.pointwise)
    params = list(layer.parameters())
    assert len(params) == 6  # depthwise weight, norm weight and bias, pointwise bias, weight_norm's g and v
    for trainable in [None, *params]:
        layer.requires_grad_(False)
        if trainable is not None:
            trainable.requires_grad_(True)
        assert cpu_strategy._any_trainable(layer) == any(p.requires_grad for p in layer.parameters())
        assert cpu_strategy._any_trainable(layer) == (trainable is not None)


def test_measurements_list_each_decision_with_its_plan_and_time(monkeypatch) -> None:
    """cpu_strategy_measurements(): one entry per measurement made, keyed and named as cpu_strategy_decisions()
    lists the decision, timed by the wall clock: a training step's layout measurement holds the depthwise
    backward and pointwise measurements made inside it; later calls add nothing until a recheck, which is listed
    with the plan it settled on; clearing the cache empties the list."""
    monkeypatch.setattr(cpu_timing, "MIN_TIMED_S", 0.0)  # few rounds: this test is about the record, not timing
    # 25 taps: the depthwise backward is measured too; the mid ReLU rules out the dense plan (no depthwise conv)
    layer = sepconv.SeparableConv2d(3, 4, 5, padding=2, mid_activation=nn.ReLU())
    x = torch.randn(2, 3, 9, 9, requires_grad=True)  # as inside a network (the measurement's steps are)
    start = time.perf_counter()
    layer(x).sum().backward()
    elapsed = time.perf_counter() - start
    measured = sepconv.cpu_strategy_measurements()
    decisions = sepconv.cpu_strategy_decisions()
    *nested, layout = measured
    # the backward of each layout timed in training (one at least), the pointwise conv of the NCHW one, the layout
    assert layout.kind == "layout" and {m.kind for m in nested} == {"depthwise_backward", "pointwise"}
    assert {m.key: m.plan for m in measured} == decisions
    assert sum(m.seconds for m in nested) <= layout.seconds <= elapsed
    layer(x).sum().backward()
    assert sepconv.cpu_strategy_measurements() == measured

    monkeypatch.setattr(cpu_strategy, "_RECHECK_WITHIN", float("inf"))  # every decision is close: owed a recheck
    sepconv.clear_cpu_strategy_cache()
    assert sepconv.cpu_strategy_measurements() == []
    with torch.no_grad():
        for _ in range(cpu_strategy._RECHECK_AFTER_CALLS):  # the 20th call rechecks
            layer(x)
    pointwise, first, again = sepconv.cpu_strategy_measurements()
    assert (pointwise.kind, first.kind, again.kind) == ("pointwise", "layout", "recheck") and first.key == again.key
    assert layout_decisions() == {again.key: again.plan}
    assert again.seconds > 0


@pytest.mark.parametrize(
    ("fft_speedup", "flipped_speedup", "expected"),
    [
        (1.3, 1.2, ("conv", "torch")),  # the FFT within _FFT_MARGIN (1.5): PyTorch's weight gradient
        (1.6, 1.05, ("torch", "fft")),  # the flipped conv within _MARGIN (1.1): PyTorch's input gradient
        (3.0, 1.5, ("conv", "fft")),
    ],
)
def test_the_fft_weight_gradient_must_win_by_half_the_flipped_conv_by_a_tenth(
    monkeypatch, fft_speedup: float, flipped_speedup: float, expected: tuple[str, str]
) -> None:
    """The backward algorithms' margins: the FFT's fresh buffers cost more in a training step than in its isolated
    timing (channels_last 7x7 batch 1: chosen at 1.2-1.3x, then 0.85x of PyTorch's step)."""
    speedups = {"conv": flipped_speedup, "fft": fft_speedup}

    def timed(steps, timed_rounds=None):
        ours = next(name for name in steps if name != "torch")
        return {"torch": 1.0, ours: 1.0 / speedups[ours]}

    monkeypatch.setattr(cpu_timing, "time_candidates", timed)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    weight = torch.randn(3, 1, 5, 5, requires_grad=True)
    assert cpu_strategy._measure_backward(x, weight, (1, 1), (2, 2), (1, 1)) == expected


@pytest.mark.parametrize(
    ("weight_requires_grad", "fft_speedup", "weight_gradient_in_both"),
    [(True, 1.0, True), (True, 2.0, False), (False, 1.0, False)],
)
def test_the_flipped_conv_competes_with_pytorch_computing_both_gradients_at_once(
    monkeypatch, weight_requires_grad: bool, fft_speedup: float, weight_gradient_in_both: bool
) -> None:
    """Where PyTorch's weight gradient is kept, PyTorch's single backward call (both gradients) is timed against
    the flipped conv plus PyTorch's weight gradient alone; where the FFT takes the weight gradient, or none is
    needed, against PyTorch's input gradient alone. The timed steps' results say which: their gradients equal
    ``convolution_backward``'s in float64."""
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 5, 5, dtype=torch.float64, requires_grad=weight_requires_grad)
    seen: list[dict] = []

    def timed(steps, timed_rounds=None):
        seen.append({name: step() for name, step in steps.items()})
        return {name: 1.0 / fft_speedup if name == "fft" else 1.0 for name in steps}

    monkeypatch.setattr(cpu_timing, "time_candidates", timed)
    cpu_strategy._measure_backward(x, weight, (1, 1), (2, 2), (1, 1))
    input_candidates = seen[-1]
    torch_input, torch_weight, _ = input_candidates["torch"]
    flipped_input, flipped_extra = input_candidates["conv"]
    assert torch_input.shape == flipped_input.shape == x.shape
    torch.testing.assert_close(flipped_input, torch_input)  # both the same input gradient, of the same grad_output
    assert (torch_weight is not None) == weight_gradient_in_both
    assert (flipped_extra is not None) == weight_gradient_in_both
    if weight_gradient_in_both:
        assert flipped_extra[1].shape == torch_weight.shape == weight.shape
        torch.testing.assert_close(flipped_extra[1], torch_weight)
    assert len(seen) == 1 + weight_requires_grad


class _AttributeDict(OrderedDict):
    """A ``ModelOutput``-like output (Hugging Face's are OrderedDicts whose items are attributes too)."""

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _TableNet(nn.Module):
    """A conv beside a 4-d buffer that forward views (a lookup table, an embedding): only the conv's tensors change
    layout; the output is an OrderedDict subclass read by attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = sepconv.SeparableConv2d(4, 8, 3, padding=1, dtype=torch.float64)
        self.register_buffer("table", torch.randn(8, 2, 3, 3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> _AttributeDict:
        features = self.conv(x)
        return _AttributeDict(features=features, scores=features.mean((2, 3)) @ self.table.view(8, 18))


def test_run_channels_last_leaves_other_tensors_and_output_types_as_they_were() -> None:
    torch.manual_seed(0)
    model = _TableNet()
    twin = sepconv.run_channels_last(copy.deepcopy(model))
    assert twin.table.is_contiguous() and twin.conv.depthwise.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    out, expected = twin(x), model(x)
    assert type(out) is _AttributeDict and list(out) == ["features", "scores"]
    assert out.features.is_contiguous()
    torch.testing.assert_close(out.features, expected.features, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.scores, expected.scores, rtol=1e-12, atol=1e-12)
