"""sepconv.kernels.separable_conv2d (fused depthwise + pointwise) vs two F.conv2d calls in float64."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sepconv.kernels import depthwise as depthwise_module
from sepconv.kernels import separable as separable_module
from sepconv.kernels.depthwise import resolve_padding_sides
from sepconv.kernels.separable import separable_conv2d
from test_kernels_depthwise import DEVICE, GridRecorder, layout


def reference(x, dw, dw_bias, pw, pw_bias, stride, padding, dilation, mid_dtype, act=None):
    """Depthwise then pointwise via F.conv2d in float64, the intermediate rounded to ``mid_dtype`` (as
    PyTorch's two-conv block stores it), explicit zero padding for every padding form."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    top, bottom, left, right = resolve_padding_sides(padding, x.shape[-2:], dw.shape[-2:], pair(stride), pair(dilation))
    mid = F.conv2d(F.pad(x, (left, right, top, bottom)), dw, dw_bias, stride, 0, dilation, groups=x.shape[1])
    mid = mid if act is None else getattr(F, act)(mid)
    return F.conv2d(mid.to(mid_dtype).double(), pw, pw_bias)


def check(x, dw, dw_bias, pw, pw_bias, stride, padding, dilation, *, atol, act=None):
    tensors = (x, dw, dw_bias, pw, pw_bias)
    leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    x_, dw_, dwb_, pw_, pwb_ = leaves
    ours = separable_conv2d(x_, dw_, pw_, pwb_, stride, padding, dilation, dwb_, mid_activation=act)
    expected = reference(*ref_leaves, stride, padding, dilation, x.dtype, act)
    assert ours.shape == expected.shape and ours.dtype == x.dtype
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(ours.double(), expected, atol=atol * scale, rtol=0)
    grad = torch.randn_like(expected)
    present = [i for i, t in enumerate(leaves) if t is not None]
    got = torch.autograd.grad(ours, [leaves[i] for i in present], grad.to(x.dtype))
    want = torch.autograd.grad(expected, [ref_leaves[i] for i in present], grad)
    names = ("grad_x", "grad_dw", "grad_dw_bias", "grad_pw", "grad_pw_bias")
    for i, g, w in zip(present, got, want, strict=True):
        assert g.dtype == x.dtype and g.shape == w.shape, names[i]
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g.double(), w, atol=atol * scale, rtol=0, msg=lambda m, n=names[i]: f"{n}: {m}")
    return ours


@st.composite
def separable_configs(draw):
    return {
        "n": draw(st.integers(1, 2)),
        "c": draw(st.integers(1, 18)),
        "m": draw(st.integers(1, 2)),
        "o": draw(st.integers(1, 40)),
        "hw": (draw(st.integers(1, 9)), draw(st.integers(1, 9))),
        "k": (draw(st.integers(1, 5)), draw(st.integers(1, 5))),
        "stride": draw(st.sampled_from([1, 2, (2, 1)])),
        "padding": draw(st.one_of(st.integers(0, 2), st.sampled_from(["same", ((0, 2), (1, 0))]))),
        "dilation": draw(st.sampled_from([1, 2])),
        "dw_bias": draw(st.booleans()),
        "pw_bias": draw(st.booleans()),
        "layout": draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
        "act": draw(st.sampled_from(separable_module.MID_ACTIVATIONS)),
    }


def make(cfg, dtype=torch.float64):
    g = lambda *s: torch.randn(*s, dtype=dtype, device=DEVICE)  # noqa: E731
    mid = cfg["c"] * cfg["m"]
    x = layout(g(cfg["n"], cfg["c"], *cfg["hw"]), cfg["layout"])
    return (
        x,
        g(mid, 1, *cfg["k"]),
        g(mid) if cfg["dw_bias"] else None,
        g(cfg["o"], mid, 1, 1),
        g(cfg["o"]) if cfg["pw_bias"] else None,
    )


@given(separable_configs())
def test_matches_two_convs_in_float64(cfg):
    torch.manual_seed(0)
    tensors = make(cfg)
    geometry = (cfg["stride"], cfg["padding"], cfg["dilation"])
    try:
        expected = reference(*tensors, *geometry, torch.float64)
    except RuntimeError:  # PyTorch refuses: the output would be empty
        with pytest.raises(ValueError, match="output would be"):
            separable_conv2d(tensors[0], tensors[1], tensors[3], tensors[4], *geometry, tensors[2])
        return
    y = check(*tensors, *geometry, atol=1e-12, act=cfg["act"])
    assert y.shape == expected.shape
    if cfg["layout"] != "channels_last":
        assert y.is_contiguous()


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 4e-2)], ids=str
)
def test_low_precision(dtype, atol):
    # 40 mid channels (two channel blocks), 130 outputs (two output blocks), 11x11 pixels (two pixel blocks)
    torch.manual_seed(5)
    cfg = {"n": 2, "c": 20, "m": 2, "o": 130, "hw": (11, 11), "k": (3, 3), "dw_bias": True, "pw_bias": True}
    x, dw, dwb, pw, pwb = make(cfg | {"layout": "channels_last"}, torch.float32)
    tensors = [x.to(dtype), (dw / 3).to(dtype), dwb.to(dtype), (pw / 6).to(dtype), pwb.to(dtype)]
    check(*tensors, 1, 1, 1, atol=atol, act="relu6")


def test_backward_does_not_keep_the_intermediate():
    x = torch.randn(2, 8, 10, 10, device=DEVICE, requires_grad=True)
    dw = torch.randn(32, 1, 3, 3, device=DEVICE, requires_grad=True)  # depth multiplier 4: a large intermediate
    pw = torch.randn(4, 32, 1, 1, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = separable_conv2d(x, dw, pw, padding=1)
    assert (2, 32, 10, 10) not in saved  # the intermediate
    assert sorted(saved) == sorted([(2, 8, 10, 10), (32, 1, 3, 3), (4, 32, 1, 1)])
    y.sum().backward()
    assert x.grad is not None and dw.grad is not None and pw.grad is not None


def test_torch_compile_and_opcheck():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 7, 7, device=DEVICE, requires_grad=True)
    dw = torch.randn(3, 1, 3, 3, device=DEVICE, requires_grad=True)
    pw = torch.randn(16, 3, 1, 1, device=DEVICE, requires_grad=True)

    def block(x, dw, pw):
        return separable_conv2d(x, dw, pw, stride=2, padding="same").relu()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, dw, pw), block(x, dw, pw)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        torch.autograd.grad(got.sum(), (x, dw, pw)), torch.autograd.grad(want.sum(), (x, dw, pw))
    )
    args = (x.detach(), dw.detach(), None, pw.detach(), torch.randn(16, device=DEVICE), [1, 2], [1, 1, 0, 2], [1, 1], 2)
    result = torch.library.opcheck(torch.ops.sepconv.separable_conv2d.default, args)
    assert set(result.values()) == {"SUCCESS"}


@pytest.mark.parametrize(
    ("pw", "pw_bias", "match"),
    [
        (torch.randn(5, 3, 1, 1), None, r"pw_weight must have shape \(O, 4, 1, 1\)"),
        (torch.randn(5, 4, 3, 3), None, r"pw_weight must have shape \(O, 4, 1, 1\)"),
        (torch.randn(5, 4, 1, 1), torch.randn(4), r"pw_bias must have shape \(5,\)"),
        (torch.randn(5, 4, 1, 1), "mish", r"mid_activation must be one of \(None, 'relu', .*'gelu'\); got 'mish'"),
    ],
)
def test_bad_pointwise_arguments(pw, pw_bias, match):
    x, dw = torch.randn(1, 4, 5, 5, device=DEVICE), torch.randn(4, 1, 3, 3, device=DEVICE)
    act = pw_bias if isinstance(pw_bias, str) else None
    pw_bias = pw_bias.to(DEVICE) if isinstance(pw_bias, torch.Tensor) else None
    with pytest.raises(ValueError, match=match):
        separable_conv2d(x, dw, pw.to(DEVICE), pw_bias, mid_activation=act)


def test_batches_above_the_grid_cap_launch_in_chunks():
    # CUDA caps a grid's z dimension (the batch) at 65535; with the cap patched to 2, a batch of 5: 3 launches
    torch.manual_seed(7)
    x = torch.randn(5, 4, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    dw, pw, pw_bias = torch.randn(8, 1, 3, 3, device=DEVICE), torch.randn(16, 8, 1, 1, device=DEVICE), torch.randn(16)
    recorder = GridRecorder(separable_module.separable_forward_kernel)
    with (
        mock.patch.object(depthwise_module, "_MAX_GRID_YZ", 2),
        mock.patch.object(separable_module, "separable_forward_kernel", recorder),
    ):
        got = separable_conv2d(x, dw, pw, pw_bias.to(DEVICE), padding=1)
    want = F.conv2d(F.conv2d(x.double(), dw.double(), None, 1, 1, 1, 4), pw.double(), pw_bias.double().to(DEVICE))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert [grid[2] for grid in recorder.grids] == [2, 2, 1]


@pytest.mark.parametrize(
    ("o", "k", "fused"),
    [(128, (31, 31), True), (160, (3, 3), True), (384, (5, 5), False), (260, (7, 1), True), (260, (5, 5), False)],
)
def test_wide_pointwise_convs_after_large_kernels_run_unfused(o, k, fused):
    """A fused program covers 128 outputs, so O outputs repeat the depthwise tile R = ceil(O / 128) times; where
    the repeats cost more than MAX_REPEATED_TAPS multiply-adds per intermediate element, (R - 1)·KH·KW, the call
    runs our depthwise kernel and a matrix product instead: the same results (float64 reference, every gradient),
    the fused kernel never launched, the output in the input's memory format; explicit tiles still fuse."""
    repeats = -(-o // 128)
    assert ((repeats - 1) * k[0] * k[1] <= separable_module.MAX_REPEATED_TAPS) == fused
    assert separable_module.fuses(o, k) == fused
    torch.manual_seed(9)
    cfg = {"n": 2, "c": 3, "m": 2, "o": o, "hw": (8, 7), "k": k, "dw_bias": True, "pw_bias": True}
    for kind in ("contiguous", "channels_last"):
        tensors = make(cfg | {"layout": kind})
        recorder = GridRecorder(separable_module.separable_forward_kernel)
        with mock.patch.object(separable_module, "separable_forward_kernel", recorder):
            y = check(*tensors, 1, "same", 1, atol=1e-12, act="relu6")
        assert len(recorder.grids) == fused, kind
        memory_format = torch.channels_last if kind == "channels_last" else torch.contiguous_format
        assert y.is_contiguous(memory_format=memory_format), kind
    x, dw, dw_bias, pw, pw_bias = (t.float() for t in tensors)
    geometry = ([1, 1], resolve_padding_sides("same", x.shape[-2:], k, (1, 1), (1, 1)), [1, 1])
    recorder = GridRecorder(separable_module.separable_forward_kernel)
    with mock.patch.object(separable_module, "separable_forward_kernel", recorder):
        forced = separable_module._forward(
            x, dw, dw_bias, pw, pw_bias, *geometry, 2, tiles=separable_module._tiles(56, 6, o)
        )
    assert len(recorder.grids) == 1
    torch.testing.assert_close(forced, separable_conv2d(x, dw, pw, pw_bias, 1, "same", 1, dw_bias, "relu6"))


@pytest.mark.parametrize("act", ["relu", "relu6", "hardswish"])
def test_activation_gradient_at_the_kinks_is_pytorchs(act):
    """With zero depthwise weights the intermediate is exactly the depthwise bias: the kinks (0 and 6 of relu6,
    -3 and 3 of hardswish) and values on either side. Every gradient equals PyTorch's autograd through the
    activation in float64."""
    torch.manual_seed(10)
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64, device=DEVICE)
    dw = torch.zeros(8, 1, 3, 3, dtype=torch.float64, device=DEVICE)
    dw_bias = torch.tensor([0.0, 6.0, 3.0, -1.0, 7.0, -3.0, -4.0, 2.0], dtype=torch.float64, device=DEVICE)
    pw = torch.randn(5, 8, 1, 1, dtype=torch.float64, device=DEVICE)
    check(x, dw, dw_bias, pw, None, 1, 1, 1, atol=1e-12, act=act)


@pytest.mark.parametrize("act", ["hardswish", "silu", "gelu"])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.bfloat16, 4e-2)], ids=str)
def test_smooth_mid_activations(act, dtype, atol):
    """hardswish, silu and gelu (erf) applied by the kernel on its accumulator, gradients through PyTorch's own
    backward ops: output and every gradient against F.<act> between two float64 convs (the intermediate rounded
    to the input dtype), channels_last, a depth multiplier, both biases."""
    torch.manual_seed(11)
    cfg = {"n": 2, "c": 5, "m": 2, "o": 20, "hw": (7, 9), "k": (3, 3), "dw_bias": True, "pw_bias": True}
    x, dw, dwb, pw, pwb = make(cfg | {"layout": "channels_last"}, torch.float64)
    tensors = [x.to(dtype), (dw / 3).to(dtype), dwb.to(dtype), (pw / 3).to(dtype), pwb.to(dtype)]
    check(*tensors, 1, "same", 1, atol=atol, act=act)


@pytest.mark.parametrize("act", [None, "relu6", "silu"])
def test_training_step_holds_at_most_two_intermediates(act):
    """A forward+backward holds at most the output and two intermediate-sized tensors at once, plus the
    weights' gradients (sepconv.memory counts every operator's live outputs): the backward recomputes the
    intermediate and its activation's backward writes into it. PyTorch's two-conv block holds three with an
    activation (its saved output too), so ours is lower there."""
    from sepconv.memory import peak_live_bytes

    torch.manual_seed(12)
    n, c, m, h, o = 2, 6, 2, 9, 5
    x = torch.randn(n, c, h, h, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    dw = torch.randn(c * m, 1, 3, 3, device=DEVICE, requires_grad=True)
    pw = torch.randn(o, c * m, 1, 1, device=DEVICE, requires_grad=True)
    pw_bias = torch.randn(o, device=DEVICE, requires_grad=True)
    grad = torch.randn(n, o, h, h, device=DEVICE)
    params = (x, dw, pw, pw_bias)

    def ours():
        return torch.autograd.grad(separable_conv2d(x, dw, pw, pw_bias, 1, 1, mid_activation=act), params, grad)

    def eager():
        mid = F.conv2d(x, dw, None, 1, 1, 1, c)
        return torch.autograd.grad(F.conv2d(mid if act is None else getattr(F, act)(mid), pw, pw_bias), params, grad)

    mid_bytes, y_bytes = n * c * m * h * h * 4, n * o * h * h * 4
    weight_grads = sum(t.numel() for t in (dw, pw, pw_bias)) * 4
    assert peak_live_bytes(ours) <= y_bytes + 2 * mid_bytes + weight_grads
    if act is not None:
        assert peak_live_bytes(ours) < peak_live_bytes(eager)


class _FunctionMode(torch.overrides.TorchFunctionMode):
    """Any active mode sends our calls through the custom op's dispatcher instead of the plain-eager Function."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("through_op", [False, True], ids=["plain-eager", "custom-op"])
@pytest.mark.parametrize("op", ["depthwise", "separable"])
def test_double_backward_raises_instead_of_dropping_a_gradient_penalty(op, through_op):
    """Our backward kernels have no backward of their own: differentiating the first gradients (a gradient
    penalty, create_graph=True) raises, instead of treating them as constants (which silently dropped the
    penalty's gradient), on both call paths. The first gradients themselves still equal F.conv2d's."""
    import contextlib

    from sepconv.kernels import depthwise_conv2d

    torch.manual_seed(13)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    dw = torch.randn(2, 1, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    pw = torch.randn(3, 2, 1, 1, dtype=torch.float64, device=DEVICE)
    with _FunctionMode() if through_op else contextlib.nullcontext():
        y = depthwise_conv2d(x, dw, None, 1, 1) if op == "depthwise" else separable_conv2d(x, dw, pw, None, 1, 1)
        (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    want = F.conv2d(x, dw, None, 1, 1, 1, 2)
    want = want if op == "depthwise" else F.conv2d(want, pw)
    torch.testing.assert_close(grad_x, torch.autograd.grad(want.square().sum(), x)[0])
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (y.sum() + grad_x.square().sum()).backward()
