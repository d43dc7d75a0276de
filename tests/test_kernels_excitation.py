"""Squeeze-excitation between the activation and the 1x1 conv (``separable_conv2d(excitation=...)``, inference):
ours against F.conv2d -> activation -> (a * se(a.mean)) -> F.conv2d in float64, and the means pass against
torch.mean."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sepconv.kernels import BatchNormArgs, separable_conv2d
from sepconv.kernels.depthwise import interpreting, resolve_padding_sides
from test_kernels_batch_norm import _output_values
from test_kernels_batch_norm import configs as block_configs
from test_kernels_depthwise import DEVICE, layout


def squeeze_excitation(channels: int, squeezed: int, dtype=torch.float64):
    """torchvision's SqueezeExcitation computation on the means: 1x1 conv, ReLU, 1x1 conv, sigmoid."""
    g = torch.Generator().manual_seed(channels)
    fc1 = torch.randn(squeezed, channels, 1, 1, generator=g, dtype=dtype) / channels**0.5
    fc2 = torch.randn(channels, squeezed, 1, 1, generator=g, dtype=dtype) / squeezed**0.5
    bias = torch.randn(channels, generator=g, dtype=dtype)
    fc1, fc2, bias = (t.to(DEVICE) for t in (fc1, fc2, bias))
    return lambda means: torch.sigmoid(F.conv2d(F.relu(F.conv2d(means, fc1.to(means.dtype))), fc2.to(means.dtype),
                                                bias.to(means.dtype)))  # fmt: skip


def reference(x, dw, dw_bias, pw, pw_bias, cfg, excitation):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    stride, dilation = cfg["stride"], cfg["dilation"]
    top, bottom, left, right = resolve_padding_sides(
        cfg["padding"], x.shape[-2:], dw.shape[-2:], pair(stride), pair(dilation)
    )
    a = F.conv2d(F.pad(x, (left, right, top, bottom)), dw, dw_bias, stride, 0, dilation, groups=x.shape[1])
    a = a if cfg["act"] is None else getattr(F, cfg["act"])(a)
    return F.conv2d(a * excitation(a.mean((2, 3), keepdim=True)), pw, pw_bias)


def tensors(cfg, dtype=torch.float64):
    torch.manual_seed(0)
    g = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEVICE)  # noqa: E731
    mid = cfg["c"] * cfg["m"]
    x = layout(g(cfg["n"], cfg["c"], *cfg["hw"]), cfg["layout"])
    weights = [g(mid, 1, *cfg["k"]), g(mid) if cfg["dw_bias"] else None, g(cfg["o"], mid, 1, 1) / mid**0.5]
    weights.append(g(cfg["o"]) if cfg["pw_bias"] else None)
    return x, weights


@settings(max_examples=50, deadline=None)
@given(block_configs(), st.integers(1, 4))
def test_matches_the_squeeze_excitation_block_in_float64(cfg, squeezed):
    x, (dw, dw_bias, pw, pw_bias) = tensors(cfg)
    excitation = squeeze_excitation(dw.shape[0], squeezed)
    geometry = (cfg["stride"], cfg["padding"], cfg["dilation"])
    if _output_values(cfg) == 0:
        with pytest.raises(ValueError, match="output would be"), torch.no_grad():
            separable_conv2d(x, dw, pw, pw_bias, *geometry, dw_bias, cfg["act"], excitation=excitation)
        return
    with torch.no_grad():
        got = separable_conv2d(x, dw, pw, pw_bias, *geometry, dw_bias, cfg["act"], excitation=excitation)
    want = reference(x, dw, dw_bias, pw, pw_bias, cfg, excitation)
    assert got.shape == want.shape and got.dtype == torch.float64
    if cfg["layout"] == "channels_last" and cfg["c"] > 1 and cfg["o"] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, atol=1e-10 * max(1.0, want.abs().max().item()), rtol=0)


BASE = {"n": 3, "c": 24, "m": 1, "o": 40, "hw": (11, 11), "k": (3, 3), "stride": 1, "padding": 1, "dilation": 1,
        "dw_bias": True, "pw_bias": True, "layout": "channels_last", "act": "silu"}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out", [40, 300], ids=["fused", "unfused"])  # 300 outputs of a 5x5: not fused
def test_low_precision_as_close_to_the_truth_as_pytorch(dtype, out):
    """In ``dtype``: ours about as close to the float64 truth (root-mean-square error) as PyTorch's block in
    ``dtype``, which rounds the activation, the means, the scale and the scaled activation to ``dtype`` as ours
    does. Under Triton's interpreter a kernel's fp32 -> bf16 conversion truncates instead of rounding to nearest
    (measured: ``.to(tl.bfloat16)`` equals bit truncation), which doubles bf16 errors there: allowed 2.5x."""
    cfg = BASE | {"o": out, "k": (5, 5) if out == 300 else (3, 3), "padding": 2 if out == 300 else 1}
    x, weights = tensors(cfg)
    excitation = squeeze_excitation(24, 6)
    truth = reference(x, *weights, cfg, excitation)
    low = [None if t is None else t.to(dtype) for t in (x, *weights)]
    with torch.no_grad():
        got = separable_conv2d(low[0], low[1], low[3], low[4], 1, cfg["padding"], 1, low[2], "silu",
                               excitation=excitation)  # fmt: skip
    eager = reference(*low, cfg, excitation)
    error = lambda t: ((t.double() - truth).square().mean() / truth.square().mean()).sqrt().item()  # noqa: E731
    factor = 2.5 if dtype == torch.bfloat16 and interpreting() else 1.25
    assert got.dtype == dtype and error(got) <= factor * error(eager) + 1e-7, (error(got), error(eager))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_means_pass_matches_the_mean_of_the_activation(dtype):
    """``sepconv::depthwise_mean``: each image's channel means of act(dw(x)), tiles cut by the image's end, depth
    multiplier 2, stride, dilation. bf16: the activation is rounded to bf16 before it is summed (as stored), so
    within one bf16 unit (2^-8 relative, 2^-7 for the interpreter's truncation) of the mean magnitude."""
    torch.manual_seed(1)
    x = layout(torch.randn(3, 40, 9, 13, dtype=torch.float64, device=DEVICE), "channels_last").to(dtype)
    weight = torch.randn(80, 1, 3, 3, dtype=torch.float64, device=DEVICE).to(dtype)
    bias = torch.randn(80, dtype=torch.float64, device=DEVICE).to(dtype)
    got = torch.ops.sepconv.depthwise_mean(x, weight, bias, [2, 1], [1, 0, 2, 1], [1, 2], 3)  # hardswish
    inputs = (t.double() for t in (x, weight, bias))
    activation = F.hardswish(F.conv2d(F.pad(next(inputs), (2, 1, 1, 0)), *inputs, (2, 1), 0, (1, 2), groups=40))
    assert got.dtype == torch.promote_types(dtype, torch.float32) and got.shape == (3, 80)
    unit = 1e-12 if dtype == torch.float64 else 2**-7
    tolerance = unit * activation.abs().mean((2, 3))
    assert ((got.double() - activation.mean((2, 3))).abs() <= tolerance).all()


def test_eval_output_norm_folds_and_compile_and_opcheck():
    x, (dw, dw_bias, pw, pw_bias) = tensors(BASE | {"layout": "contiguous"})
    excitation = squeeze_excitation(24, 6)
    mean, var = torch.randn(40, dtype=torch.float64, device=DEVICE), torch.rand(40, dtype=torch.float64, device=DEVICE)
    norm = BatchNormArgs(mean, var + 0.5, torch.rand_like(mean) + 0.5, torch.randn_like(mean))

    def block(x, dw, pw):
        return separable_conv2d(x, dw, pw, pw_bias, 1, 1, 1, dw_bias, "silu", out_norm=norm, excitation=excitation)

    want = F.batch_norm(reference(x, dw, dw_bias, pw, pw_bias, BASE, excitation), *norm)
    with torch.no_grad():
        torch.testing.assert_close(block(x, dw, pw), want)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, dw, pw), want)
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1])
    torch.library.opcheck(torch.ops.sepconv.depthwise_mean.default, (x, dw, dw_bias, *geometry, 4))
    scale = torch.rand(x.shape[0], 24, dtype=torch.float64, device=DEVICE)
    args = (x, dw, dw_bias, pw, pw_bias, scale, *geometry, 4)
    torch.library.opcheck(torch.ops.sepconv.separable_conv2d_scaled.default, args)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"grad": True}, ValueError, "excitation runs for inference only"),
        ({"excitation": lambda means: means[:, :2]}, ValueError, r"excitation must map the \(N, C·m, 1, 1\)"),
        ({"out_norm": BatchNormArgs(None, None, training=True)}, ValueError, "out_norm must be in eval mode"),
    ],
)
def test_bad_arguments_are_named(change, error, match):
    x, dw, pw = torch.randn(2, 3, 6, 6), torch.randn(3, 1, 3, 3), torch.randn(4, 3, 1, 1)
    options = {"excitation": torch.sigmoid, "out_norm": None} | {k: v for k, v in change.items() if k != "grad"}
    with torch.set_grad_enabled(change.get("grad", False)), pytest.raises(error, match=match):
        separable_conv2d(x, dw.requires_grad_(change.get("grad", False)), pw, padding=1, **options)
