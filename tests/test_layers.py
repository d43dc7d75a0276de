"""Layers vs PyTorch: shapes against nn.ConvNd, float64 numerics against nn.ConvNd/F.pad references."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from tests.strategies import ConvConfig, conv_configs
from torch import nn

import sepconv
from sepconv import (
    DepthwiseConv1d,
    DepthwiseConv2d,
    DepthwiseConv3d,
    PointwiseConv1d,
    PointwiseConv2d,
    PointwiseConv3d,
    SeparableConv1d,
    SeparableConv2d,
    SeparableConv3d,
)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SEPARABLE = {1: SeparableConv1d, 2: SeparableConv2d, 3: SeparableConv3d}
DEPTHWISE = {1: DepthwiseConv1d, 2: DepthwiseConv2d, 3: DepthwiseConv3d}
POINTWISE = {1: PointwiseConv1d, 2: PointwiseConv2d, 3: PointwiseConv3d}


def tf_same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's documented 'SAME' rule: ceil(size / stride) outputs, the odd pad at the end."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def build(cfg: ConvConfig, **extra) -> nn.Module:
    return SEPARABLE[cfg.ndim](
        cfg.in_channels,
        cfg.out_channels,
        cfg.kernel_size,
        **cfg.conv_kwargs,
        depth_multiplier=cfg.depth_multiplier,
        dtype=torch.float64,
        **extra,
    )


def reference_forward(layer: nn.Module, cfg: ConvConfig, x: torch.Tensor) -> torch.Tensor:
    """The same computation from plain nn.ConvNd modules (and F.pad for TF-style strided 'same')."""
    c, m = cfg.in_channels, cfg.depth_multiplier
    padding = cfg.padding
    if cfg.strided_same:
        pads = [
            tf_same_pads(n, k, s, d)
            for n, k, s, d in zip(x.shape[2:], cfg.kernel_size, cfg.stride, cfg.dilation, strict=True)
        ]
        flat = [p for lo_hi in reversed(pads) for p in lo_hi]
        x = F.pad(x, flat, mode="constant" if cfg.padding_mode == "zeros" else cfg.padding_mode)
        padding = 0
    depthwise = CONV[cfg.ndim](
        c,
        c * m,
        cfg.kernel_size,
        cfg.stride,
        padding,
        cfg.dilation,
        groups=c,
        bias=layer.depthwise.bias is not None,
        padding_mode=cfg.padding_mode,
        dtype=torch.float64,
    )
    pointwise = CONV[cfg.ndim](c * m, cfg.out_channels, 1, groups=cfg.groups, dtype=torch.float64)
    depthwise.load_state_dict(layer.depthwise.state_dict())
    pointwise.load_state_dict(layer.pointwise.state_dict())
    return pointwise(depthwise(x))


@settings(max_examples=150)
@given(conv_configs())
def test_output_shape_matches_nn_conv(cfg: ConvConfig) -> None:
    layer = SEPARABLE[cfg.ndim](
        cfg.in_channels,
        cfg.out_channels,
        cfg.kernel_size,
        **cfg.conv_kwargs,
        depth_multiplier=cfg.depth_multiplier,
        device="meta",
    )
    x = torch.empty(cfg.input_shape, device="meta")
    if cfg.strided_same:  # nn.ConvNd refuses strided 'same'; TF's rule is ceil(size / stride)
        spatial = tuple(math.ceil(n / s) for n, s in zip(cfg.input_shape[2:], cfg.stride, strict=True))
        expected = (cfg.input_shape[0], cfg.out_channels, *spatial)
    else:
        standard = CONV[cfg.ndim](cfg.in_channels, cfg.out_channels, cfg.kernel_size, **cfg.conv_kwargs, device="meta")
        expected = tuple(standard(x).shape)
    assert tuple(layer(x).shape) == expected
    assert tuple(layer(x[0]).shape) == expected[1:]  # unbatched input, as nn.ConvNd allows


@settings(max_examples=150)
@given(conv_configs())
def test_float64_forward_matches_reference(cfg: ConvConfig) -> None:
    layer = build(cfg, depthwise_bias=True)
    x = torch.randn(cfg.input_shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_forward(layer, cfg, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("size", [5, 6, 7])
def test_same_padding_gradients_match_finite_differences(stride: int, size: int) -> None:
    layer = SeparableConv2d(
        2, 3, (4, 3), stride=stride, padding="same", padding_mode="reflect", depthwise_bias=True, dtype=torch.float64
    )
    x = torch.randn(1, 2, size, size + 1, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())
    assert torch.autograd.gradcheck(
        lambda x, *p: torch.func.functional_call(
            layer, dict(zip([n for n, _ in layer.named_parameters()], p, strict=True)), (x,)
        ),
        (x, *params),
    )


def test_seed_construction_parameter_counts() -> None:
    standard = nn.Conv2d(10, 32, 3)
    seed = nn.Sequential(nn.Conv2d(10, 10, 3, groups=10), nn.Conv2d(10, 32, 1))
    x = torch.rand(5, 10, 50, 50)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(standard) == 10 * 32 * 9 + 32 == 2912
    assert count(SeparableConv2d(10, 32, 3, depthwise_bias=True)) == count(seed) == 452
    assert count(SeparableConv2d(10, 32, 3)) == 10 * 9 + 10 * 32 + 32 == 442
    assert SeparableConv2d(10, 32, 3)(x).shape == standard(x).shape == seed(x).shape == (5, 32, 48, 48)


def test_depthwise_bias_true_reproduces_the_seed_block_exactly() -> None:
    seed = nn.Sequential(nn.Conv2d(10, 10, 3, groups=10), nn.Conv2d(10, 32, 1)).double()
    ours = SeparableConv2d(10, 32, 3, depthwise_bias=True, dtype=torch.float64)
    ours.load_state_dict(
        {"depthwise." + k[2:] if k[0] == "0" else "pointwise." + k[2:]: v for k, v in seed.state_dict().items()}
    )
    x = torch.randn(2, 10, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(ours(x), seed(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_parts_are_ordinary_convolutions(ndim: int) -> None:
    layer = SEPARABLE[ndim](4, 6, 3, depth_multiplier=2)
    assert isinstance(layer.depthwise, CONV[ndim]) and isinstance(layer.pointwise, CONV[ndim])
    assert layer.depthwise.groups == 4 and layer.depthwise.out_channels == 8
    assert layer.depthwise.weight.shape == (8, 1, *(3,) * ndim)
    assert layer.pointwise.weight.shape == (6, 8, *(1,) * ndim)
    assert list(layer.state_dict()) == ["depthwise.weight", "pointwise.weight", "pointwise.bias"]
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.depth_multiplier) == (4, 6, (3,) * ndim, 2)


def test_mid_norm_and_activation_follow_the_depthwise_conv() -> None:
    layer = SeparableConv2d(
        4,
        8,
        3,
        padding=1,
        depth_multiplier=2,
        mid_norm=functools.partial(nn.GroupNorm, 2),
        mid_activation=nn.ReLU,
        dtype=torch.float64,
    )
    assert isinstance(layer.mid_norm, nn.GroupNorm) and layer.mid_norm.num_channels == 8
    assert layer.mid_norm.weight.dtype == torch.float64
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    expected = layer.pointwise(torch.relu(layer.mid_norm(layer.depthwise(x))))
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert list(layer.state_dict())[:3] == ["depthwise.weight", "mid_norm.weight", "mid_norm.bias"]


@pytest.mark.parametrize("strategy", ["auto", "off"])
def test_hooks_on_the_parts_see_every_call(strategy: str) -> None:
    """A separable layer calls its parts without ``nn.Module.__call__`` when nothing is hooked (it saves
    microseconds per call); any hook on a part, or a global module hook, must still see the part's input and
    output, and forward hooks may replace them."""
    layer = SeparableConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    seen: list[tuple[str, tuple[int, ...]]] = []
    layer.depthwise.register_forward_pre_hook(lambda m, args: seen.append(("dw in", tuple(args[0].shape))))
    handle = layer.pointwise.register_forward_hook(lambda m, args, out: out * 2)
    with sepconv.use_cpu_strategy(strategy):
        doubled = layer(x)
        assert seen and set(seen) == {("dw in", (2, 4, 7, 7))}
        reference = F.conv2d(F.conv2d(x, layer.depthwise.weight, None, 1, 1, 1, 4), layer.pointwise.weight)
        torch.testing.assert_close(doubled, 2 * (reference + layer.pointwise.bias[:, None, None]))
        handle.remove()
        torch.testing.assert_close(layer(x), reference + layer.pointwise.bias[:, None, None])
        outputs: list[str] = []
        with nn.modules.module.register_module_forward_hook(lambda m, args, out: outputs.append(type(m).__name__)):
            layer(x)
        assert {"DepthwiseConv2d", "PointwiseConv2d", "SeparableConv2d"} <= set(outputs)


@pytest.mark.parametrize("strategy", ["auto", "off"])
@pytest.mark.parametrize("kernel", [3, 5], ids=["3x3", "5x5 (measured depthwise backward)"])
def test_parametrized_and_pruned_parts_use_their_effective_weights(strategy: str, kernel: int) -> None:
    """Parts whose weight is no plain parameter (torch.nn.utils.parametrize; pruning's pre-hook, which sets
    ``weight`` from ``weight_orig * weight_mask``) run on the weight they present: float64 output and gradients
    equal F.conv2d with that weight, in inference and training."""
    import torch.nn.utils.parametrize as parametrize
    from torch.nn.utils import prune

    class Doubled(nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return 2 * weight

    torch.manual_seed(0)
    layer = SeparableConv2d(4, 6, kernel, padding=kernel // 2, depthwise_bias=True, dtype=torch.float64)
    raw_depthwise = layer.depthwise.weight.detach().clone()
    parametrize.register_parametrization(layer.depthwise, "weight", Doubled())
    prune.random_unstructured(layer.pointwise, "weight", amount=0.5)
    mask = layer.pointwise.weight_mask
    assert 0 < mask.sum() < mask.numel()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)

    def reference() -> torch.Tensor:
        weight = layer.pointwise.weight_orig * mask
        mid = F.conv2d(
            x, 2 * layer.depthwise.parametrizations.weight.original, layer.depthwise.bias, padding=kernel // 2, groups=4
        )
        return F.conv2d(mid, weight, layer.pointwise.bias)

    with sepconv.use_cpu_strategy(strategy):
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference(), rtol=1e-12, atol=1e-12)
        out = layer(x)
        params = [x, layer.depthwise.parametrizations.weight.original, layer.pointwise.weight_orig]
        grads = torch.autograd.grad(out.square().sum(), params)
    expected = reference()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.depthwise.parametrizations.weight.original, raw_depthwise)


def test_jit_trace_records_both_parts() -> None:
    layer = SeparableConv2d(4, 6, 3, padding=1).eval()
    x = torch.randn(1, 4, 8, 8)
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x))
    # the parts were called as modules: the trace keeps them as submodule calls, as it does for nn.Sequential
    assert [node.kind() for node in traced.graph.nodes()].count("prim::CallMethod") == 2


def test_mid_activation_accepts_an_instance_but_mid_norm_does_not() -> None:
    act = nn.LeakyReLU(0.2)
    assert SeparableConv2d(4, 8, 3, mid_activation=act).mid_activation is act
    with pytest.raises(TypeError, match="mid_norm must be a module class or factory"):
        SeparableConv2d(4, 8, 3, mid_norm=nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match="mid_activation must build an nn\\.Module"):
        SeparableConv2d(4, 8, 3, mid_activation=lambda: torch.relu)


def test_reset_parameters_redraws_every_part() -> None:
    layer = SeparableConv2d(4, 8, 3, depthwise_bias=True, mid_norm=nn.BatchNorm2d)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(7.0)
    layer.reset_parameters()
    assert not any(torch.all(p == 7.0) for n, p in layer.named_parameters() if "mid_norm" not in n)
    assert torch.all(layer.mid_norm.weight == 1) and torch.all(layer.mid_norm.bias == 0)


def test_device_and_dtype_reach_every_part() -> None:
    layer = SeparableConv3d(2, 4, 3, mid_norm=nn.BatchNorm3d, dtype=torch.float16, device="meta")
    assert {p.dtype for p in layer.parameters()} == {torch.float16}
    assert {p.device.type for p in layer.parameters()} == {"meta"}


def test_extra_repr_reads_like_nn_conv() -> None:
    layer = SeparableConv2d(8, 16, 3, stride=2, padding="same", groups=2, padding_mode="reflect", depth_multiplier=3)
    assert layer.extra_repr() == (
        "8, 16, kernel_size=(3, 3), stride=(2, 2), padding='same', groups=2, padding_mode='reflect', depth_multiplier=3"
    )
    assert repr(layer).splitlines()[1].strip() == layer.extra_repr()


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_depthwise_and_pointwise_alone_match_nn_conv(ndim: int) -> None:
    x = torch.randn(2, 3, *(7,) * ndim, dtype=torch.float64)
    depthwise = DEPTHWISE[ndim](3, 3, padding=1, depth_multiplier=2, bias=True, dtype=torch.float64)
    reference = CONV[ndim](3, 6, 3, padding=1, groups=3, dtype=torch.float64)
    reference.load_state_dict(depthwise.state_dict())
    torch.testing.assert_close(depthwise(x), reference(x), rtol=1e-12, atol=1e-12)
    pointwise = POINTWISE[ndim](3, 6, groups=3, dtype=torch.float64)
    reference = CONV[ndim](3, 6, 1, groups=3, dtype=torch.float64)
    reference.load_state_dict(pointwise.state_dict())
    torch.testing.assert_close(pointwise(x), reference(x), rtol=1e-12, atol=1e-12)


def test_compile_and_export_see_ordinary_convolutions() -> None:
    layer = SeparableConv2d(4, 8, 3, stride=2, padding="same").eval()
    x = torch.randn(2, 4, 11, 11)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    exported = torch.export.export(layer, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert sum("conv" in t for t in targets) >= 1 and any("pad" in t for t in targets)
    torch.testing.assert_close(exported.module()(x), layer(x))


BAD_ARGUMENTS = [
    (dict(in_channels=0), ValueError, "in_channels must be an int >= 1, got 0"),
    (dict(in_channels=2.0), TypeError, "in_channels must be an int"),
    (dict(out_channels=-1), ValueError, "out_channels must be an int >= 1"),
    (dict(depth_multiplier=0), ValueError, "depth_multiplier must be an int >= 1"),
    (dict(depth_multiplier=1.5), TypeError, "depth_multiplier must be an int"),
    (dict(kernel_size=0), ValueError, "kernel_size must be an int >= 1"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size must be an int or a tuple of 2 ints, got 3 values"),
    (dict(stride=0), ValueError, "stride must be an int >= 1"),
    (dict(dilation=(1, 0)), ValueError, "dilation must be an int >= 1"),
    (dict(padding=-1), ValueError, "padding must be an int >= 0"),
    (dict(padding="full"), ValueError, "padding must be an int, a tuple of 2 ints, 'same' or 'valid'; got 'full'"),
    (dict(padding=(1,)), ValueError, "padding must be an int or a tuple of 2 ints"),
    (
        dict(padding_mode="mirror"),
        ValueError,
        "padding_mode must be one of 'zeros', 'reflect', 'replicate', 'circular'",
    ),
    (dict(groups=3), ValueError, r"in_channels \(4\) must be divisible by groups \(3\)"),
    (dict(groups=4, out_channels=6), ValueError, r"out_channels \(6\) must be divisible by groups \(4\)"),
    (dict(mid_norm="batchnorm"), TypeError, "mid_norm must be None or a module class/factory"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument_and_what_is_allowed(overrides, error, message) -> None:
    kwargs = dict(in_channels=4, out_channels=8, kernel_size=3) | overrides
    with pytest.raises(error, match=message):
        SeparableConv2d(**kwargs)


def test_depthwise_and_pointwise_validate_their_arguments() -> None:
    with pytest.raises(ValueError, match="depth_multiplier must be an int >= 1"):
        DepthwiseConv2d(4, 3, depth_multiplier=0)
    with pytest.raises(ValueError, match=r"out_channels \(5\) must be divisible by groups \(2\)"):
        PointwiseConv2d(4, 5, groups=2)
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        DepthwiseConv1d(4, True)


@pytest.mark.parametrize(
    ("layer", "shape", "message"),
    [
        (
            SeparableConv2d(4, 8, 3),
            (2, 3, 9, 9),
            r"SeparableConv2d expected input of shape \(N, 4, H, W\) or "
            r"\(4, H, W\), got \(2, 3, 9, 9\)",
        ),
        (SeparableConv2d(4, 8, 3), (9, 9), r"got \(9, 9\)"),
        (DepthwiseConv1d(4, 3), (1, 4, 2, 9), r"DepthwiseConv1d expected input of shape \(N, 4, L\)"),
        (PointwiseConv3d(4, 2), (1, 5, 2, 2, 2), r"\(N, 4, D, H, W\) or \(4, D, H, W\), got \(1, 5, 2, 2, 2\)"),
    ],
)
def test_forward_names_expected_and_actual_shape(layer: nn.Module, shape: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layer(torch.empty(shape))


@pytest.mark.parametrize(
    ("ndim", "kernel"),
    [(1, 3), (1, 25), (2, 3), (2, 5), (3, 3)],
    ids=["1d k3", "1d k25", "2d 3x3", "2d 5x5", "3d 3x3x3"],  # 25 taps and more: the measured depthwise backward
)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "training"])
def test_unbatched_inputs_equal_a_batch_of_one(ndim: int, kernel: int, grad: bool) -> None:
    """(C, *spatial) in, (O, *spatial) out, as nn.ConvNd does it, with the CPU strategy on: a 3-d layer's
    (C, D, H, W) input is not read as a batch of 2-d (N, C, H, W) ones, and the measured backward (kernels of 25
    taps and more) gets the batched shape it expects. Gradients against float64 F.convNd on x[None]."""
    torch.manual_seed(0)
    spatial = {1: (40,), 2: (9, 11), 3: (5, 6, 6)}[ndim]
    layers = [
        SEPARABLE[ndim](4, 6, kernel, padding=kernel // 2, depthwise_bias=True, dtype=torch.float64),
        DEPTHWISE[ndim](4, kernel, padding=kernel // 2, depth_multiplier=2, bias=True, dtype=torch.float64),
    ]
    conv = functools.partial({1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ndim], padding=kernel // 2)
    for layer in layers:
        parts = [layer.depthwise, layer.pointwise] if isinstance(layer, SEPARABLE[ndim]) else [layer]
        for _ in range(3):  # the first call measures plans, the later ones run the decided ones
            x = torch.randn(4, *spatial, dtype=torch.float64, requires_grad=grad)
            out = layer(x)
            reference = x[None]
            for part in parts:
                reference = (
                    conv(reference, part.weight, part.bias, groups=part.groups)
                    if part is parts[0]
                    else (F.conv1d if ndim == 1 else F.conv2d if ndim == 2 else F.conv3d)(
                        reference, part.weight, part.bias
                    )
                )
            torch.testing.assert_close(out, reference[0], rtol=1e-10, atol=1e-10)
            if grad:
                weights = [p for part in parts for p in (part.weight, part.bias)]
                got = torch.autograd.grad(out, [x, *weights], torch.ones_like(out))
                want = torch.autograd.grad(reference[0], [x, *weights], torch.ones_like(out))
                for g, w in zip(got, want, strict=True):
                    torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ndim", [2, 3])
def test_an_empty_batch_gives_an_empty_output_like_nn_conv(ndim: int) -> None:
    spatial = (9,) * ndim
    layers = [SEPARABLE[ndim](4, 8, 3), SEPARABLE[ndim](4, 8, 3, padding="same"), DEPTHWISE[ndim](4, 5)]
    for layer in layers:
        x = torch.randn(0, 4, *spatial, requires_grad=True)
        standard = CONV[ndim](4, layer.out_channels, layer.kernel_size, padding=layer.padding)
        expected = standard(x).shape
        with torch.no_grad():
            assert layer(x).shape == expected
        out = layer(x)  # in training: the backward of nothing
        assert out.shape == expected
        out.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


def test_numpy_integers_are_accepted_as_nn_conv_accepts_them() -> None:
    import numpy as np

    layer = SeparableConv2d(np.int64(4), np.int32(8), np.int64(3), stride=np.int16(2), depth_multiplier=np.int64(2))
    reference = SeparableConv2d(4, 8, 3, stride=2, depth_multiplier=2)
    assert [p.shape for p in layer.parameters()] == [p.shape for p in reference.parameters()]
    assert type(layer.in_channels) is int and type(layer.depth_multiplier) is int
    assert layer(torch.rand(1, 4, 9, 9)).shape == (1, 8, 4, 4)
    with pytest.raises(TypeError, match="in_channels must be an int"):
        SeparableConv2d(np.float64(4), 8, 3)


def test_hooks_on_the_parts_fire_once_per_call_while_plans_are_timed() -> None:
    """The CPU strategy times a layer's plans on its first calls (hundreds of runs of the parts); a hook on a part
    sees the layer's calls only."""
    layer = SeparableConv2d(8, 16, 3, padding=1)
    counts = {"depthwise": 0, "pointwise pre": 0}
    layer.depthwise.register_forward_hook(lambda m, args, out: counts.__setitem__("depthwise", counts["depthwise"] + 1))
    layer.pointwise.register_forward_pre_hook(
        lambda m, args: counts.__setitem__("pointwise pre", counts["pointwise pre"] + 1)
    )
    x = torch.randn(2, 8, 16, 16)
    with sepconv.use_cpu_strategy("auto"):
        with torch.no_grad():
            layer(x)
        layer(x.requires_grad_()).sum().backward()  # a training call: its plans timed too
    assert counts == {"depthwise": 2, "pointwise pre": 2}


def test_a_frozen_layer_first_called_in_inference_mode_still_gives_input_gradients() -> None:
    """The dense plan's composed weight, cached across calls, is made of normal tensors also under
    torch.inference_mode: a later grad-mode call (a saliency map of a frozen model) saves it for its backward."""
    torch.manual_seed(0)
    layer = SeparableConv2d(4, 8, 3, padding=1, dtype=torch.float64).requires_grad_(False)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    reference_x = x.clone().requires_grad_()
    reference = F.conv2d(F.conv2d(reference_x, layer.depthwise.weight, None, 1, 1, 1, 4), layer.pointwise.weight)
    (reference + layer.pointwise.bias[:, None, None]).sum().backward()
    for run in (layer._dense_forward, layer):  # the dense plan directly, and whichever plan the strategy picks
        with torch.inference_mode():
            run(torch.randn(2, 4, 9, 9, dtype=torch.float64))
        x.grad = None
        run(x.requires_grad_()).sum().backward()
        torch.testing.assert_close(x.grad, reference_x.grad)
