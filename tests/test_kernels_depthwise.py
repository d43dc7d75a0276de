"""sepconv.kernels.depthwise_conv2d vs F.conv2d in float64: output, grad-input, grad-weight, grad-bias.

Without a GPU the kernels run in Triton's interpreter (the root conftest sets TRITON_INTERPRET=1), so
shapes stay small; with one, the same tests run the compiled kernels on CUDA.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from sepconv.kernels import depthwise as depthwise_module
from sepconv.kernels.depthwise import (
    Tiles,
    _forward,
    _grad_input,
    _grad_weight,
    depthwise_conv2d,
    plain_eager,
    resolve_padding_sides,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = ("contiguous", "channels_last", "strided")


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` (same values) as contiguous, channels_last, or a non-contiguous view of a bigger tensor."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        big = torch.zeros(x.shape[0], 2 * x.shape[1], x.shape[2], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        big[:, ::2, :, ::2] = x
        return big[:, ::2, :, ::2]
    return x.contiguous()


def reference(x, weight, bias, stride, sides, dilation):
    """F.conv2d on explicitly zero-padded input: an independent path for every padding form."""
    top, bottom, left, right = sides
    padded = F.pad(x, (left, right, top, bottom))
    return F.conv2d(padded, weight, bias, stride, 0, dilation, groups=x.shape[1])


def check_against_reference(x, weight, bias, stride, padding, dilation, *, atol, rtol):
    """Our output and all gradients vs the float64 reference computed from the same (rounded) values."""
    leaves = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ours = depthwise_conv2d(leaves[0], leaves[1], leaves[2] if bias is not None else None, stride, padding, dilation)
    sides = resolve_padding_sides(padding, x.shape[-2:], weight.shape[-2:], _pair(stride), _pair(dilation))
    ref_bias = ref_leaves[2] if bias is not None else None
    expected = reference(ref_leaves[0], ref_leaves[1], ref_bias, stride, sides, dilation)
    assert ours.shape == expected.shape
    assert ours.dtype == x.dtype
    torch.testing.assert_close(ours.double(), expected, atol=atol, rtol=rtol)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(ours, leaves, grad.to(ours.dtype))
    want = torch.autograd.grad(expected, ref_leaves, grad)
    for name, g, w in zip(("grad_input", "grad_weight", "grad_bias"), got, want, strict=False):
        assert g.dtype == x.dtype, name
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g.double(), w, atol=atol * scale, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    return ours


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@st.composite
def depthwise_configs(draw):
    kh, kw = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    stride = draw(st.sampled_from([1, 2, (1, 2), (2, 1)]))
    dilation = draw(st.sampled_from([1, 1, 2, (1, 2)]))
    padding = draw(
        st.one_of(
            st.integers(0, 3),
            st.tuples(st.integers(0, 3), st.integers(0, 3)),
            st.tuples(st.tuples(st.integers(0, 3), st.integers(0, 3)), st.tuples(st.integers(0, 3), st.integers(0, 3))),
            st.sampled_from(["same", "valid"]),
        )
    )
    h, w = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    return {
        "shape": (draw(st.integers(1, 2)), draw(st.integers(1, 5)), h, w),
        "multiplier": draw(st.integers(1, 3)),
        "kernel": (kh, kw),
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "bias": draw(st.booleans()),
        "layout": draw(st.sampled_from(LAYOUTS)),
    }


def _output_is_empty(cfg) -> bool:
    sides = resolve_padding_sides(
        cfg["padding"], cfg["shape"][2:], cfg["kernel"], _pair(cfg["stride"]), _pair(cfg["dilation"])
    )
    for n, k, s, d, lo, hi in zip(
        cfg["shape"][2:],
        cfg["kernel"],
        _pair(cfg["stride"]),
        _pair(cfg["dilation"]),
        sides[::2],
        sides[1::2],
        strict=True,
    ):
        if (n + lo + hi - d * (k - 1) - 1) // s + 1 < 1:
            return True
    return False


def make_inputs(cfg, dtype=torch.float64):
    n, c, h, w = cfg["shape"]
    x = layout(torch.randn(n, c, h, w, dtype=dtype, device=DEVICE), cfg["layout"])
    weight = torch.randn(c * cfg["multiplier"], 1, *cfg["kernel"], dtype=dtype, device=DEVICE)
    bias = torch.randn(c * cfg["multiplier"], dtype=dtype, device=DEVICE) if cfg["bias"] else None
    return x, weight, bias


@given(depthwise_configs())
def test_matches_conv2d_in_float64(cfg):
    torch.manual_seed(0)
    x, weight, bias = make_inputs(cfg)
    if _output_is_empty(cfg):
        with pytest.raises(ValueError, match="output would be"):
            depthwise_conv2d(x, weight, bias, cfg["stride"], cfg["padding"], cfg["dilation"])
        return
    y = check_against_reference(x, weight, bias, cfg["stride"], cfg["padding"], cfg["dilation"], atol=1e-10, rtol=1e-10)
    # the output keeps the input's memory format, as PyTorch's convs do
    if cfg["layout"] == "channels_last" and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    elif cfg["layout"] != "channels_last":
        assert y.is_contiguous()


@settings(max_examples=15)  # three interpreted launches per example
@given(
    st.sampled_from([16, 32, 64]),
    st.sampled_from([1, 4, 8]),
    st.sampled_from([1, 2, 4]),
    st.sampled_from([False, True, "rows", "all"]),
    st.sampled_from([0, 4, 8, 16]),
    st.sampled_from(LAYOUTS),
    st.sampled_from([(3, 3), (2, 5), (1, 1), (6, 5)]),  # (6, 5): above the full-unroll area, rows unrolled
    st.sampled_from([1, 2]),
    st.booleans(),
    st.booleans(),
)
def test_every_launch_configuration_computes_the_same_conv(
    block_p, block_c, warps, static, tile_w, kind, kernel, stride, loop_taps, bias
):
    """Any tile shape (flat or rectangular pixels), warps, tap unrolling and grad-weight tap looping: forward,
    grad-input and grad-weight (with the bias's gradient or without) equal the float64 reference (the benchmark's
    sweep times these configurations)."""
    tiles = Tiles(block_p, block_c, warps, static, min(tile_w, block_p), loop_taps)
    torch.manual_seed(1)
    x = layout(torch.randn(2, 5, 9, 7, dtype=torch.float64, device=DEVICE), kind)
    weight = torch.randn(10, 1, *kernel, dtype=torch.float64, device=DEVICE)
    geometry = ((stride, stride), (1, 0, 2, 1), (1, 1))
    expected = reference(x, weight, None, stride, (1, 0, 2, 1), 1)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(_forward(x, weight, None, *geometry, tiles=tiles), expected, rtol=1e-12, atol=1e-12)
    padded = torch.nn.functional.pad(x, (2, 1, 1, 0)).requires_grad_()
    w = weight.detach().requires_grad_()
    want_x, want_w = torch.autograd.grad(F.conv2d(padded, w, None, stride, 0, 1, 5), (padded, w), grad)
    want_x = want_x[:, :, 1 : 1 + x.shape[2], 2 : 2 + x.shape[3]]
    grad_x = _grad_input(grad, x, weight, *geometry, tiles=tiles)
    torch.testing.assert_close(grad_x, want_x, rtol=1e-12, atol=1e-12)
    grad_w, grad_b = _grad_weight(grad, x, weight, *geometry, tiles=tiles, bias=bias)
    torch.testing.assert_close(grad_w, want_w, rtol=1e-10, atol=1e-10)
    if bias:
        torch.testing.assert_close(grad_b, grad.sum((0, 2, 3)), rtol=1e-10, atol=1e-10)
    else:
        assert grad_b is None


@st.composite
def stride_one_calls(draw, channels: int, height: int, width: int, kernel_width: int):
    """A stride-1, dilation-1 call with at least one output pixel, up to these sizes (kernels up to 6 x
    ``kernel_width``): its input ``x`` (fp32), ``weight`` (a drawn depth multiplier), per-side padding and the
    layout of ``x`` (see :func:`layout`)."""
    batch, c, multiplier, h, w, kh, kw = (
        draw(st.integers(1, top)) for top in (2, channels, 2, height, width, 6, kernel_width)
    )
    top, bottom, left, right = sides = draw(st.tuples(*(st.integers(0, 3) for _ in range(4))))
    assume(h + top + bottom >= kh and w + left + right >= kw)
    kind = draw(st.sampled_from(LAYOUTS))
    torch.manual_seed(draw(st.integers(0, 9)))
    x = layout(torch.randn(batch, c, h, w, device=DEVICE), kind)
    return x, torch.randn(c * multiplier, 1, kh, kw, device=DEVICE), sides, kind


@settings(max_examples=12)  # interpreted 3-d products
@given(stride_one_calls(10, 19, 21, 23), st.sampled_from([16, 32]), st.sampled_from([1, 2, 8]), st.booleans())
def test_toeplitz_forward_computes_the_same_conv(call, rows, block_c, with_bias):
    """The experimental tensor-core forward (``Tiles.toeplitz``): any shape, kernel up to 6x23, per-side
    padding, depth multiplier, layout and bias equals the float64 reference (fp32 in, products in full
    precision); where it does not apply (fp64 here, below) the direct kernel runs and gives the same."""
    x, weight, sides, _ = call
    bias = torch.randn(weight.shape[0], device=DEVICE) if with_bias else None
    tiles = Tiles(rows, block_c, 4, False, 0, False, True)
    geometry = ((1, 1), sides, (1, 1))
    expected = reference(x.double(), weight.double(), None if bias is None else bias.double(), 1, sides, 1)
    got = _forward(x, weight, bias, *geometry, tiles=tiles)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    got64 = _forward(x.double(), weight.double(), None if bias is None else bias.double(), *geometry, tiles=tiles)
    torch.testing.assert_close(got64, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kernel", "width"), [((1, 18), 23), ((3, 31), 36), ((2, 35), 35)])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_toeplitz_forward_splits_wide_kernel_rows(kernel, width, kind):
    """A product covers 17 taps of a kernel row: wider rows take several (18 = 17 + 1, 31 = 17 + 14, 35: three),
    with uneven padding on every side, a depth multiplier and a bias."""
    torch.manual_seed(3)
    kh, kw = kernel
    x = layout(torch.randn(2, 3, kh + 2, width, device=DEVICE), kind)
    weight = torch.randn(6, 1, kh, kw, device=DEVICE)
    bias = torch.randn(6, device=DEVICE)
    sides = (1, kh - 1, kw // 2, kw - 1 - kw // 2 + 2)
    expected = reference(x.double(), weight.double(), bias.double(), 1, sides, 1)
    got = _forward(x, weight, bias, (1, 1), sides, (1, 1), tiles=Tiles(16, 8, 4, False, 0, False, True))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize(("min_taps", "runs"), [(57, 2), (58, 0)])
def test_opted_in_toeplitz_forward_serves_the_forward_and_the_flipped_input_gradient(kind, min_taps, runs):
    """TOEPLITZ_FORWARD_MIN_TAPS opts kernels of that many taps (here 3x19 = 57) into the Toeplitz forward: the
    forward and, with FLIPPED_GRAD_INPUT_MIN_TAPS, the input gradient's forward, the choice made when the
    forward runs (the settings are restored before the backward). Output and gradients equal float64's."""
    torch.manual_seed(0)
    x = layout(torch.randn(2, 4, 9, 21, device=DEVICE), kind).requires_grad_()
    weight = torch.randn(4, 1, 3, 19, device=DEVICE, requires_grad=True)
    bias = torch.randn(4, device=DEVICE, requires_grad=True)
    with contextlib.ExitStack() as stack:
        calls = count_calls(stack, "_forward_toeplitz")
        with (
            mock.patch.object(depthwise_module, "TOEPLITZ_FORWARD_MIN_TAPS", min_taps),
            mock.patch.object(depthwise_module, "FLIPPED_GRAD_INPUT_MIN_TAPS", 1),
        ):
            y = depthwise_conv2d(x, weight, bias, 1, "same")
        grad = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, weight, bias), grad)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = reference(*leaves, 1, (1, 1, 9, 9), 1)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
    for mine, theirs in zip(got, torch.autograd.grad(expected, leaves, grad.double()), strict=True):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-3)
    assert calls == [1] * runs


def test_opted_in_toeplitz_kernels_leave_strided_and_dilated_calls_to_the_direct_kernels():
    """The Toeplitz kernels are stride 1, dilation 1: with every TOEPLITZ_* setting on, a stride-2 or dilated
    call runs the direct kernels on their default tiles (not the Toeplitz launch's), and gives float64's."""
    torch.manual_seed(8)
    x = torch.randn(2, 3, 9, 10, device=DEVICE)
    weight = torch.randn(3, 1, 3, 5, device=DEVICE)
    for stride, dilation in ((2, 1), (1, 2)):
        with contextlib.ExitStack() as stack:
            calls = [count_calls(stack, name) for name in ("_forward_toeplitz", "_grad_weight_toeplitz")]
            tiles = stack.enter_context(mock.patch.object(depthwise_module, "_tiles", wraps=depthwise_module._tiles))
            for setting in ("TOEPLITZ_FORWARD_MIN_TAPS", "TOEPLITZ_GRAD_WEIGHT_MIN_TAPS"):
                stack.enter_context(mock.patch.object(depthwise_module, setting, 1))
            check_against_reference(x, weight, None, stride, 2, dilation, atol=1e-4, rtol=1e-5)
        assert calls == [[], []], (stride, dilation)
        assert tiles.call_count == 3  # default tiles for the forward, grad-input and grad-weight


def reference_weight_gradients(x, weight, grad, sides):
    """Weight and bias gradients of the float64 reference (stride 1, dilation 1) for grad-output ``grad``."""
    w = weight.detach().double().requires_grad_()
    b = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device, requires_grad=True)
    return torch.autograd.grad(reference(x.double(), w, b, 1, sides, 1), (w, b), grad.double())


@settings(max_examples=12)  # interpreted 3-d products
@given(stride_one_calls(6, 9, 40, 35), st.sampled_from([1, 3, 32]), st.sampled_from([1, 2, 8]))
def test_toeplitz_weight_gradient_computes_the_same_gradients(call, rows, block_c):
    """The experimental tensor-core weight gradient (``Tiles.toeplitz``): any shape, kernels up to 6x35 (wider
    than 32 taps: two tap blocks), per-side padding, depth multiplier, layout, output rows and channels per
    program; weight and bias gradients equal the float64 reference's (fp32 in, products in full precision)."""
    x, weight, sides, kind = call
    grad = layout(torch.randn_like(reference(x, weight, None, 1, sides, 1)), kind)
    want_w, want_b = reference_weight_gradients(x, weight, grad, sides)
    tiles = Tiles(rows, block_c, 4, False, 0, False, True)
    got_w, got_b = _grad_weight(grad, x, weight, (1, 1), sides, (1, 1), tiles=tiles)
    assert got_w.dtype == got_b.dtype == torch.float32 and got_w.shape == weight.shape
    torch.testing.assert_close(got_w.double(), want_w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_b.double(), want_b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_toeplitz_weight_gradient_of_a_tall_kernel_in_every_precision(dtype, atol):
    # 33 x 3: two tap blocks in height; 20 channels (not a multiple of 8); half precision accumulates in fp32
    torch.manual_seed(5)
    x = torch.randn(2, 20, 35, 6, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(20, 1, 33, 3, device=DEVICE).to(dtype)
    sides = (16, 16, 1, 1)
    grad = torch.randn(2, 20, 35, 6, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    want_w, want_b = reference_weight_gradients(x, weight, grad, sides)
    got_w, got_b = _grad_weight(grad, x, weight, (1, 1), sides, (1, 1), tiles=Tiles(8, 8, 4, False, 0, False, True))
    assert got_w.dtype == got_b.dtype == dtype
    scale = want_w.abs().max().item()
    torch.testing.assert_close(got_w.double(), want_w, rtol=atol, atol=atol * scale)
    torch.testing.assert_close(got_b.double(), want_b, rtol=atol, atol=atol * want_b.abs().max().item())


@pytest.mark.parametrize(("min_taps", "runs"), [(35, 1), (36, 0)])
def test_opted_in_toeplitz_weight_gradient_runs_before_the_fft(min_taps, runs):
    """TOEPLITZ_GRAD_WEIGHT_MIN_TAPS opts kernels of that many taps (here 5x7 = 35) into the Toeplitz weight
    gradient, ahead of FFT_GRAD_WEIGHT_MIN_TAPS (on here too: it serves the kernels left out), the choice
    made when the forward runs. Every gradient equals float64's."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 9, device=DEVICE, requires_grad=True)
    weight = torch.randn(6, 1, 5, 7, device=DEVICE, requires_grad=True)
    bias = torch.randn(6, device=DEVICE, requires_grad=True)
    with contextlib.ExitStack() as stack:
        calls = {name: count_calls(stack, name) for name in ("_grad_weight_toeplitz", "_fft_grad_weight")}
        with (
            mock.patch.object(depthwise_module, "TOEPLITZ_GRAD_WEIGHT_MIN_TAPS", min_taps),
            mock.patch.object(depthwise_module, "FFT_GRAD_WEIGHT_MIN_TAPS", 1),
        ):
            y = depthwise_conv2d(x, weight, bias, 1, ((2, 2), (3, 3)))
        grad = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, weight, bias), grad)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = reference(*leaves, 1, (2, 2, 3, 3), 1)
    for mine, theirs in zip(got, torch.autograd.grad(expected, leaves, grad.double()), strict=True):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-4)
    assert calls == {"_grad_weight_toeplitz": [1] * runs, "_fft_grad_weight": [1] * (1 - runs)}


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float16, 1e-2), (torch.bfloat16, 8e-2)], ids=str)
def test_toeplitz_forward_in_half_precision(dtype, atol):
    # 20 channels, 13x13, 7x7: the products in the input dtype accumulate in fp32, as the direct kernel's
    torch.manual_seed(1)
    x = torch.randn(2, 20, 13, 13, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(20, 1, 7, 7, device=DEVICE) / 7).to(dtype)
    expected = reference(x.double(), weight.double(), None, 1, (3, 3, 3, 3), 1)
    got = _forward(x, weight, None, (1, 1), (3, 3, 3, 3), (1, 1), tiles=Tiles(16, 8, 4, False, 0, False, True))
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=atol)


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 8e-2)], ids=str
)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_low_precision_accumulates_in_fp32(dtype, atol, kind):
    # 20 channels (not a multiple of 16), 13x13 (not a multiple of any tile), K=7: a sum of 49 products.
    torch.manual_seed(1)
    x = layout(torch.randn(2, 20, 13, 13, device=DEVICE).to(dtype), kind)
    weight = (torch.randn(20, 1, 7, 7, device=DEVICE) / 7).to(dtype)
    bias = torch.randn(20, device=DEVICE).to(dtype)
    check_against_reference(x, weight, bias, 1, 3, 1, atol=atol, rtol=atol)


@pytest.mark.parametrize(
    ("shape", "kernel", "stride", "padding"),
    [
        ((1, 3, 9, 8), (31, 31), 1, 15),  # RepLKNet-size kernel, larger than the input
        ((1, 2, 6, 5), (31, 4), 2, "same"),  # K > H, even and non-square, strided 'same'
        ((1, 33, 1, 1), (3, 3), 1, 1),  # 1x1 spatial, 33 channels
        ((1, 17, 1, 1), (1, 1), 1, 0),  # 1x1 kernel and spatial
        ((3, 4, 2, 40), (1, 5), (1, 2), (0, 2)),  # wide input, tiles cut mid-row
    ],
)
def test_edge_cases(shape, kernel, stride, padding):
    torch.manual_seed(2)
    cfg = {"shape": shape, "multiplier": 1, "kernel": kernel, "bias": True, "layout": "contiguous"}
    x, weight, bias = make_inputs(cfg)
    check_against_reference(x, weight, bias, stride, padding, 1, atol=1e-10, rtol=1e-10)


def test_unbatched_input_and_expanded_gradient():
    x = torch.randn(4, 6, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.randn(8, 1, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = depthwise_conv2d(x, weight, padding=1)
    expected = F.conv2d(x.unsqueeze(0), weight, None, 1, 1, 1, 4).squeeze(0)
    torch.testing.assert_close(y, expected)
    y.sum().backward()  # grad_output with zero strides (an expanded scalar)
    gx, gw = torch.autograd.grad(expected.sum(), (x, weight))
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(weight.grad, gw)


def test_grad_weight_writes_every_partial_sum(monkeypatch):
    """The partial-sum buffer is allocated uninitialized: poisoned with NaN, every entry must be overwritten."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned)
    torch.manual_seed(2)
    x = torch.randn(3, 5, 11, 9, dtype=torch.float64, device=DEVICE)
    weight = torch.randn(10, 1, 3, 2, dtype=torch.float64, device=DEVICE)
    grad = torch.randn(3, 10, 6, 9, dtype=torch.float64, device=DEVICE)
    grad_weight, grad_bias = _grad_weight(grad, x, weight, (2, 1), (1, 1, 1, 0), (1, 1))
    monkeypatch.undo()
    x_ = x.clone().requires_grad_()
    w_ = weight.clone().requires_grad_()
    want = torch.autograd.grad(reference(x_, w_, None, (2, 1), (1, 1, 1, 0), 1), w_, grad)[0]
    torch.testing.assert_close(grad_weight, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_bias, grad.sum((0, 2, 3)), rtol=1e-10, atol=1e-10)


def test_grad_weight_is_deterministic():
    torch.manual_seed(3)
    x = torch.randn(4, 8, 16, 16, device=DEVICE)
    weight = torch.randn(8, 1, 3, 3, device=DEVICE, requires_grad=True)
    grad = torch.randn(4, 8, 16, 16, device=DEVICE)
    first, second = (torch.autograd.grad(depthwise_conv2d(x, weight, padding=1), weight, grad)[0] for _ in range(2))
    assert torch.equal(first, second)


def test_autocast_computes_in_the_autocast_dtype_like_conv2d():
    x = torch.randn(2, 4, 8, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(4, 1, 3, 3, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = depthwise_conv2d(x, weight, padding=1)
        expected_dtype = F.conv2d(x, weight, None, 1, 1, 1, 4).dtype
    assert y.dtype == expected_dtype == torch.bfloat16
    torch.testing.assert_close(y, depthwise_conv2d(x.bfloat16(), weight.bfloat16(), padding=1))
    y.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == torch.float32


def test_torch_compile_fullgraph_forward_and_backward():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 9, 9, device=DEVICE, requires_grad=True)
    weight = torch.randn(6, 1, 3, 3, device=DEVICE, requires_grad=True)

    def block(x, weight):
        return depthwise_conv2d(x, weight, stride=2, padding="same").relu()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(x, weight)
    want = block(x, weight)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        torch.autograd.grad(got.sum(), (x, weight)), torch.autograd.grad(want.sum(), (x, weight))
    )


class _OpLog(TorchDispatchMode):
    """Records the ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_dispatcher_and_modes_take_the_custom_op():
    """Plain eager calls run the kernels directly (less host time); under a dispatch mode (as under tracing,
    fake tensors, functorch) the custom ops run. Same outputs and gradients, float64."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 7, 7, device=DEVICE, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 1, 3, 3, device=DEVICE, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, device=DEVICE, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 6, 4, 4, device=DEVICE, dtype=torch.float64)
    results = []
    for mode in (contextlib.nullcontext(), _OpLog()):
        with mode:
            y = depthwise_conv2d(x, weight, bias, stride=2, padding=1)
            grads = torch.autograd.grad(y, (x, weight, bias), grad)
        results.append((y, *grads))
        ops = getattr(mode, "ops", None)
        if ops is not None:
            assert {"sepconv.depthwise_conv2d.default", "sepconv.depthwise_conv2d_grad_input.default"} <= set(ops)
            assert "sepconv.depthwise_conv2d_grad_weight.default" in ops
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(results[0][0], F.conv2d(x, weight, bias, 2, 1, 1, 3), rtol=1e-12, atol=1e-12)


def test_plain_eager_is_false_for_subclasses_and_under_compile(monkeypatch):
    x = torch.randn(1, 2, 4, 4)
    assert plain_eager((x, torch.nn.Parameter(torch.randn(2, 1, 3, 3)), None))
    assert not plain_eager((x.as_subclass(_Marked),))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not plain_eager((x,))


class _Marked(torch.Tensor):
    pass


def test_custom_op_passes_opcheck():
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    weight = torch.randn(6, 1, 3, 3, device=DEVICE)
    bias = torch.randn(6, device=DEVICE)
    result = torch.library.opcheck(
        torch.ops.sepconv.depthwise_conv2d.default, (x, weight, bias, [2, 1], [1, 0, 1, 1], [1, 2])
    )
    assert set(result.values()) == {"SUCCESS"}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weight": torch.randn(5, 1, 3, 3)}, ValueError, r"weight must have shape \(C·m, 1, KH, KW\) with C = 4"),
        ({"weight": torch.randn(4, 2, 3, 3)}, ValueError, "weight must have shape"),
        ({"bias": torch.randn(3)}, ValueError, r"bias must have shape \(4,\)"),
        (
            {"weight": torch.randn(4, 1, 3, 3, dtype=torch.float64)},
            TypeError,
            "weight has dtype torch.float64 but x has torch.float32",
        ),
        ({"x": torch.randint(0, 3, (1, 4, 5, 5))}, TypeError, "x must have dtype float16, bfloat16, float32, float64"),
        ({"x": torch.randn(4, 5)}, ValueError, r"x must have shape \(N, C, H, W\)"),
        ({"padding": "full"}, ValueError, "padding must be an int >= 0, .* 'same' or 'valid'; got 'full'"),
        ({"padding": -1}, ValueError, "padding must be an int >= 0"),
        ({"padding": ((1, 2), (3,))}, ValueError, "padding must be"),
        ({"stride": 0}, ValueError, "stride must be an int >= 1"),
        ({"dilation": (1, 2, 3)}, ValueError, "dilation must be an int or a tuple of 2 ints"),
        ({"weight": torch.randn(4, 1, 9, 9)}, ValueError, "output would be -3x-3"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, error, match):
    args = {"x": torch.randn(1, 4, 5, 5), "weight": torch.randn(4, 1, 3, 3), "bias": None} | kwargs
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        depthwise_conv2d(**args)


def test_cpu_tensors_without_the_interpreter_name_the_fix(monkeypatch):
    # CPU tensors, with or without a GPU on the machine: the kernels need CUDA or the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        depthwise_conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 1, 3, 3))


def count_calls(stack: contextlib.ExitStack, name: str) -> list[int]:
    """A list that gains an entry per call to ``depthwise_module.<name>`` (which still runs) while ``stack`` is open."""
    calls: list[int] = []
    real = getattr(depthwise_module, name)
    stack.enter_context(mock.patch.object(depthwise_module, name, lambda *a, **k: calls.append(1) or real(*a, **k)))
    return calls


@contextlib.contextmanager
def experimental_backward(setting: str, taps: int, helper: str):
    """``setting`` (an opt-in backward threshold) set to ``taps``; yields the list of calls to ``helper``."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(depthwise_module, setting, taps))
        yield count_calls(stack, helper)


@settings(max_examples=25)
@given(depthwise_configs())
def test_fft_weight_gradient_matches_conv2d_in_float64(cfg):
    """The experimental FFT weight gradient (FFT_GRAD_WEIGHT_MIN_TAPS), every padding form and stride."""
    assume(not _output_is_empty(cfg))
    torch.manual_seed(0)
    x, weight, bias = make_inputs(cfg)
    with experimental_backward("FFT_GRAD_WEIGHT_MIN_TAPS", 1, "_fft_grad_weight") as calls:
        check_against_reference(x, weight, bias, cfg["stride"], cfg["padding"], cfg["dilation"], atol=1e-10, rtol=1e-10)
    assert calls == [1]


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float16, 1e-2), (torch.bfloat16, 8e-2)], ids=str)
def test_fft_weight_gradient_in_half_precision(dtype, atol):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 13, 13, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(6, 1, 9, 9, device=DEVICE) / 9).to(dtype)
    with mock.patch.object(depthwise_module, "FFT_GRAD_WEIGHT_MIN_TAPS", 81):
        check_against_reference(x, weight, None, 1, 4, 1, atol=atol, rtol=atol)


@settings(max_examples=25)
@given(depthwise_configs())
def test_flipped_forward_input_gradient_matches_conv2d_in_float64(cfg):
    """The experimental input gradient by our forward kernel (FLIPPED_GRAD_INPUT_MIN_TAPS), where it applies."""
    assume(not _output_is_empty(cfg))
    torch.manual_seed(0)
    x, weight, bias = make_inputs(cfg)
    stride, dilation = _pair(cfg["stride"]), _pair(cfg["dilation"])
    sides = resolve_padding_sides(cfg["padding"], x.shape[-2:], weight.shape[-2:], stride, dilation)
    with experimental_backward("FLIPPED_GRAD_INPUT_MIN_TAPS", 1, "_flipped_grad_input") as calls:
        check_against_reference(x, weight, bias, cfg["stride"], cfg["padding"], cfg["dilation"], atol=1e-10, rtol=1e-10)
    kh, kw = cfg["kernel"]
    applies = (
        stride == (1, 1)
        and cfg["multiplier"] == 1
        and max(sides[:2]) <= dilation[0] * (kh - 1)
        and max(sides[2:]) <= dilation[1] * (kw - 1)
    )
    assert calls == ([1] if applies else [])


@pytest.mark.parametrize("kind", LAYOUTS)
def test_flipped_forward_input_gradient_with_uneven_padding_and_dilation(kind):
    torch.manual_seed(0)
    x = layout(torch.randn(2, 5, 11, 9, dtype=torch.float64, device=DEVICE), kind)
    weight = torch.randn(5, 1, 5, 3, dtype=torch.float64, device=DEVICE)
    with experimental_backward("FLIPPED_GRAD_INPUT_MIN_TAPS", 15, "_flipped_grad_input") as calls:
        check_against_reference(x, weight, None, 1, ((2, 1), (0, 4)), (1, 2), atol=1e-10, rtol=1e-10)
    assert calls == [1]


class GridRecorder:
    """Stands in for a ``@triton.jit`` kernel: records each launch's grid, then launches the real kernel."""

    def __init__(self, kernel) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_batches_above_the_grid_cap_launch_in_chunks(kind):
    """CUDA caps a grid's z dimension (the batch, or grad-weight's splits) at 65535: bigger batches launch in
    runs of at most that many samples. With the cap patched to 2, a batch of 5 takes 3 launches of each kernel
    (direct and Toeplitz forward, grad-input; Toeplitz grad-weight in at most 2 splits) and every result equals
    the float64 reference."""
    torch.manual_seed(6)
    x = layout(torch.randn(5, 3, 6, 7, device=DEVICE), kind)
    weight = torch.randn(6, 1, 3, 3, device=DEVICE)
    sides = (1, 1, 1, 1)
    expected = reference(x.double(), weight.double(), None, 1, sides, 1)
    grad = layout(torch.randn_like(expected).float(), kind)
    padded = F.pad(x.double(), (1, 1, 1, 1)).requires_grad_()
    w64 = weight.double().requires_grad_()
    want_x, want_w = torch.autograd.grad(F.conv2d(padded, w64, None, 1, 0, 1, 3), (padded, w64), grad.double())
    names = ("depthwise_forward_kernel", "depthwise_forward_toeplitz_kernel", "depthwise_grad_input_kernel")
    recorders = {name: GridRecorder(getattr(depthwise_module, name)) for name in names}
    recorders["grad_weight"] = GridRecorder(depthwise_module.depthwise_grad_weight_toeplitz_kernel)
    geometry = ((1, 1), sides, (1, 1))
    toeplitz = Tiles(1, 8, 4, False, 0, False, True)  # one output row per grad-weight program: 30 rows, 2 splits
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(depthwise_module, "_MAX_GRID_YZ", 2))
        for name, recorder in recorders.items():
            target = "depthwise_grad_weight_toeplitz_kernel" if name == "grad_weight" else name
            stack.enter_context(mock.patch.object(depthwise_module, target, recorder))
        direct = _forward(x, weight, None, *geometry)
        tensor_cores = _forward(x, weight, None, *geometry, tiles=toeplitz)
        grad_x = _grad_input(grad, x, weight, *geometry)
        grad_w, _ = _grad_weight(grad, x, weight, *geometry, tiles=toeplitz)
    for got in (direct, tensor_cores):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x.double(), want_x[:, :, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), want_w, rtol=1e-5, atol=1e-4)
    for name in names:
        assert [grid[2] for grid in recorders[name].grids] == [2, 2, 1], name
    assert [grid[2] for grid in recorders["grad_weight"].grids] == [2]
