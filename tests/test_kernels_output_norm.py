"""A BatchNorm after the separable conv's 1x1 conv (``out_norm``), in both modes, with or without a BatchNorm between
the convs: ours against F.conv2d -> (F.batch_norm) -> activation -> F.conv2d -> F.batch_norm in float64 (outputs,
every gradient, both norms' running statistics), and the fused kernel's statistics epilogue against var_mean."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sepconv.kernels import BatchNormArgs, separable_conv2d
from sepconv.kernels.batch_norm import separable_conv2d_batch_norm
from sepconv.kernels.depthwise import resolve_padding_sides
from test_kernels_batch_norm import _output_values, assert_gradients_close, finalizing
from test_kernels_batch_norm import configs as mid_norm_configs
from test_kernels_depthwise import DEVICE, layout

NAMES = ("x", "dw_weight", "dw_bias", "pw_weight", "pw_bias", "norm_weight", "norm_bias", "out_weight", "out_bias")


def reference(tensors, mid_running, out_running, cfg):
    """The ops in float64, explicit zero padding for every padding form."""
    x, dw, dw_bias, pw, pw_bias, gamma, beta, out_gamma, out_beta = tensors
    stride, padding, dilation = cfg["stride"], cfg["padding"], cfg["dilation"]
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    top, bottom, left, right = resolve_padding_sides(padding, x.shape[-2:], dw.shape[-2:], pair(stride), pair(dilation))
    z = F.conv2d(F.pad(x, (left, right, top, bottom)), dw, dw_bias, stride, 0, dilation, groups=x.shape[1])
    momentum = cfg["momentum"]
    if cfg["mid"] is not None:
        z = F.batch_norm(z, *mid_running, gamma, beta, cfg["mid"], momentum, 1e-5)
    z = z if cfg["act"] is None else getattr(F, cfg["act"])(z)
    y = F.conv2d(z, pw, pw_bias)
    return F.batch_norm(y, *out_running, out_gamma, out_beta, cfg["out_training"], momentum, 1e-3)


def _running(g, channels, present):
    return (g(channels), g(channels).abs() + 0.5) if present else (None, None)


def check(cfg, dtype=torch.float64, atol=1e-10):
    """Ours (in ``dtype``) against the float64 reference: output, all gradients, both norms' running statistics."""
    torch.manual_seed(cfg.get("seed", 0))
    g = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEVICE)  # noqa: E731
    mid, out = cfg["c"] * cfg["m"], cfg["o"]
    x = layout(g(cfg["n"], cfg["c"], *cfg["hw"]) * 2 + 3, cfg["layout"])
    affine = cfg["affine"] and cfg["mid"] is not None
    tensors = [
        x,
        g(mid, 1, *cfg["k"]),
        g(mid) if cfg["dw_bias"] else None,
        g(out, mid, 1, 1),
        g(out) + 4 if cfg["pw_bias"] else None,  # an offset the output norm removes
        g(mid).abs() + 0.5 if affine else None,
        g(mid) if affine else None,
        g(out).abs() + 0.5 if cfg["out_affine"] else None,
        g(out) if cfg["out_affine"] else None,
    ]
    mid_running = _running(g, mid, cfg["mid"] is not None and (cfg["tracked"] or not cfg["mid"]))
    out_running = _running(g, out, cfg["out_tracked"] or not cfg["out_training"])
    buffers = torch.float64 if dtype == torch.float64 else torch.float32  # as a model's BatchNorm under autocast
    ours_running = [tuple(None if r is None else r.to(buffers) for r in pair) for pair in (mid_running, out_running)]
    ref_running = [tuple(None if r is None else r.clone() for r in pair) for pair in (mid_running, out_running)]
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    leaves[0] = layout(tensors[0].to(dtype), cfg["layout"]).requires_grad_()
    ref_leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
    x_, dw, dwb, pw, pwb, gamma, beta, out_gamma, out_beta = leaves
    geometry = (cfg["stride"], cfg["padding"], cfg["dilation"])
    out_norm = BatchNormArgs(*ours_running[1], out_gamma, out_beta, cfg["out_training"], cfg["momentum"], 1e-3)
    with finalizing(cfg):
        if cfg["mid"] is None:
            ours = separable_conv2d(x_, dw, pw, pwb, *geometry, dwb, cfg["act"], out_norm=out_norm)
        else:
            ours = separable_conv2d_batch_norm(
                x_, dw, pw, pwb, *geometry, dwb, cfg["act"], running_mean=ours_running[0][0],
                running_var=ours_running[0][1], norm_weight=gamma, norm_bias=beta, training=cfg["mid"],
                momentum=cfg["momentum"], out_norm=out_norm,
            )  # fmt: skip
    expected = reference(ref_leaves, *ref_running, cfg)
    assert ours.shape == expected.shape and ours.dtype == dtype
    if cfg["layout"] == "channels_last" and cfg["c"] > 1 and cfg["o"] > 1:  # (one channel: both layouts)
        assert ours.is_contiguous(memory_format=torch.channels_last)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(ours.double(), expected, atol=atol * scale, rtol=0)
    for which, got_pair, want_pair in zip(("mid", "out"), ours_running, ref_running, strict=True):
        for name, got, want in zip(("running_mean", "running_var"), got_pair, want_pair, strict=True):
            if want is not None:
                msg = lambda m, n=f"{which} {name}": f"{n}: {m}"  # noqa: E731
                torch.testing.assert_close(got.double(), want, atol=atol, rtol=atol, msg=msg)
    assert_gradients_close(ours, expected, leaves, ref_leaves, NAMES, dtype, atol)


@st.composite
def configs(draw):
    return draw(mid_norm_configs()) | {
        "mid": draw(st.sampled_from([None, True, False])),  # no norm between the convs, training, eval
        "out_training": draw(st.booleans()),
        "out_affine": draw(st.booleans()),
        "out_tracked": draw(st.booleans()),
    }


@settings(max_examples=60, deadline=None)
@given(configs())
def test_matches_the_ops_with_a_batch_norm_after_the_pointwise_conv_in_float64(cfg):
    values = _output_values(cfg)
    if values == 0 or ((cfg["mid"] or cfg["out_training"]) and values < 2):
        error = "output would be" if values == 0 else "more than 1 value per channel"
        with pytest.raises(ValueError, match=error):
            check(cfg)
        return
    check(cfg)


BASE = {"n": 2, "c": 20, "m": 1, "o": 40, "hw": (11, 11), "k": (3, 3), "stride": 1, "padding": 1, "dilation": 1,
        "dw_bias": True, "pw_bias": True, "affine": True, "tracked": True, "mid": True, "out_training": True,
        "out_affine": True, "out_tracked": True, "momentum": 0.1, "layout": "channels_last", "act": "silu"}  # fmt: skip


@pytest.mark.parametrize("mid", [None, True])
@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 2e-5), (torch.float16, 1e-2), (torch.bfloat16, 6e-2)], ids=str
)
def test_low_precision(mid, dtype, atol):
    """Convs in ``dtype``, statistics in float32 (the output's from its stored, rounded values, as a BatchNorm
    reading it sees them): within ``dtype``'s rounding of the float64 truth."""
    check(BASE | {"mid": mid}, dtype, atol)


@pytest.mark.parametrize(
    ("channels", "out", "kind", "hw"),
    [
        (3, 5, "contiguous", (9, 7)),
        (8, 200, "channels_last", (9, 7)),
        (6, 300, "strided", (5, 11)),
        (40, 20, "channels_last", (13, 13)),
    ],
)
@pytest.mark.parametrize("in_launch", [False, True], ids=["finalize_launch", "finalize_in_launch"])
def test_statistics_epilogue_matches_var_mean_of_the_stored_output(channels, out, kind, hw, in_launch, monkeypatch):
    """``(y, mean, var)`` from the fused kernel's epilogue: the mean and biased variance of ``y`` as stored, in
    float64 — pixel tiles cut by the image's end, several output blocks (200 outputs: two of 128), the unfused
    route (300 outputs of a 5x5 kernel: our depthwise kernel and a matrix product), an offset far larger than the
    spread; bf16: the statistics of the rounded outputs. Combined by a second launch or by the epilogue's last
    program per output block (``in_launch``)."""
    from sepconv.kernels import separable as separable_module
    from sepconv.kernels.separable import _forward, fuses

    monkeypatch.setattr(separable_module, "FINALIZE_IN_LAUNCH", in_launch)

    torch.manual_seed(out)
    x = layout(torch.randn(3, channels, *hw, dtype=torch.float64, device=DEVICE), kind)
    k = 5 if out == 300 else 3
    assert fuses(out, (k, k)) == (out != 300)
    dw = torch.randn(2 * channels, 1, k, k, dtype=torch.float64, device=DEVICE)
    pw = torch.randn(out, 2 * channels, 1, 1, dtype=torch.float64, device=DEVICE)
    pw_bias = torch.randn(out, dtype=torch.float64, device=DEVICE) + 1000
    for dtype in (torch.float64, torch.bfloat16):
        args = [t.to(dtype) for t in (x, dw, pw, pw_bias)]
        y, mean, var = _forward(args[0], args[1], None, args[2], args[3], [2, 1], [0, 1, 2, 0], [1, 2], 1,
                                statistics=True)  # fmt: skip
        plain = _forward(args[0], args[1], None, args[2], args[3], [2, 1], [0, 1, 2, 0], [1, 2], 1)
        assert torch.equal(y, plain) and mean.dtype == var.dtype == torch.promote_types(dtype, torch.float32)
        want_var, want_mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
        tolerance = 1e-12 if dtype == torch.float64 else 1e-5  # float32 sums of bf16 values
        torch.testing.assert_close(mean.double(), want_mean, rtol=tolerance, atol=0)
        torch.testing.assert_close(var.double(), want_var, rtol=1e3 * tolerance, atol=0)


def test_backward_saves_x_and_the_output_only():
    """What autograd saves: x, the 1x1 conv's output (the norm's input, as PyTorch's BatchNorm saves it) and
    parameter-sized tensors — never the depthwise output (here 4x the input's channels)."""
    x = torch.randn(2, 8, 10, 10, device=DEVICE, requires_grad=True)
    dw = torch.randn(32, 1, 3, 3, device=DEVICE, requires_grad=True)
    pw = torch.randn(6, 32, 1, 1, device=DEVICE, requires_grad=True)
    gammas = [torch.ones(c, device=DEVICE, requires_grad=True) for c in (32, 6)]
    for mid in (False, True):
        saved: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t, lambda t: t):
            out_norm = BatchNormArgs(None, None, gammas[1], training=True)
            if mid:
                y = separable_conv2d_batch_norm(x, dw, pw, padding=1, running_mean=None, running_var=None,
                                                norm_weight=gammas[0], training=True, out_norm=out_norm)  # fmt: skip
            else:
                y = separable_conv2d(x, dw, pw, padding=1, out_norm=out_norm)
        assert sorted(saved)[-2:] == [y.numel(), x.numel()], saved  # the intermediate would be 2*32*10*10
        y.square().sum().backward()
        assert all(t.grad is not None for t in (x, dw, pw, gammas[1]))


def test_autocast_keeps_float32_statistics_and_gradients():
    """Under bf16 autocast: a bf16 output as eager's conv -> conv -> BatchNorm under autocast, as close to the
    float64 truth as eager's; float32 running statistics updated, float32 gradients for float32 leaves."""
    torch.manual_seed(8)
    x = torch.randn(4, 16, 9, 9, device=DEVICE, requires_grad=True)
    dw = torch.randn(16, 1, 3, 3, device=DEVICE, requires_grad=True)
    pw = (torch.randn(24, 16, 1, 1, device=DEVICE) / 4).requires_grad_()
    gamma, beta = (torch.rand(24, device=DEVICE) + 0.5).requires_grad_(), torch.randn(24, device=DEVICE)
    mean, var = torch.zeros(24, device=DEVICE), torch.ones(24, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out_norm = BatchNormArgs(mean, var, gamma, beta, training=True)
        y = separable_conv2d(x, dw, pw, padding=1, mid_activation="relu", out_norm=out_norm)
        eager = F.batch_norm(F.conv2d(F.relu(F.conv2d(x, dw, None, 1, 1, 1, 16)), pw), None, None, gamma, beta, True)
    assert y.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32
    truth_y = F.conv2d(F.relu(F.conv2d(x.double(), dw.double(), None, 1, 1, 1, 16)), pw.double())
    truth = F.batch_norm(truth_y, None, None, gamma.double(), beta.double(), True)
    error = lambda t: (t.double() - truth).abs().max().item() / truth.abs().max().item()  # noqa: E731
    assert error(y) <= 1.5 * error(eager.float()) + 1e-3
    torch.testing.assert_close(mean.double(), 0.1 * truth_y.mean((0, 2, 3)), atol=1e-2, rtol=1e-2)
    grads = torch.autograd.grad(y.float().sum(), (x, dw, pw, gamma))
    assert all(g.dtype == torch.float32 for g in grads)


def test_torch_compile_and_opcheck():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 7, 7, device=DEVICE, requires_grad=True)
    dw = torch.randn(3, 1, 3, 3, device=DEVICE, requires_grad=True)
    pw = torch.randn(16, 3, 1, 1, device=DEVICE, requires_grad=True)
    gamma = torch.rand(16, device=DEVICE, requires_grad=True)
    stats = {name: (torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE)) for name in ("eager", "compiled")}

    def block(x, dw, pw, gamma, running):
        out_norm = BatchNormArgs(*running, gamma, None, True)
        return separable_conv2d(x, dw, pw, stride=2, padding="same", mid_activation="relu", out_norm=out_norm)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, dw, pw, gamma, stats["compiled"]), block(x, dw, pw, gamma, stats["eager"])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(stats["compiled"], stats["eager"])
    leaves = (x, dw, pw, gamma)
    grad = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad))
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1])
    torch.library.opcheck(torch.ops.sepconv.separable_conv2d_statistics.default, (x, dw, None, pw, None, *geometry, 2))
    y = torch.randn(4, 5, 3, 3, device=DEVICE, requires_grad=True)
    var, mean = torch.var_mean(y.detach(), dim=(0, 2, 3), correction=0)
    weight, bias = (torch.randn(5, device=DEVICE, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.sepconv.batch_norm_with_statistics.default, (y, mean, var, weight, bias, 1e-5))
    mid = (torch.rand(3, device=DEVICE, requires_grad=True), None)
    args = (x, dw, None, *mid, pw, None, *geometry, 0, 1e-5, True)
    torch.library.opcheck(torch.ops.sepconv.separable_conv2d_batch_norm.default, args)


def test_double_backward_raises():
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    dw = torch.randn(2, 1, 3, 3, dtype=torch.float64, device=DEVICE)
    pw = torch.randn(3, 2, 1, 1, dtype=torch.float64, device=DEVICE)
    y = separable_conv2d(x, dw, pw, padding=1, out_norm=BatchNormArgs(None, None, training=True))
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.square().sum().backward()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"out_norm": (torch.zeros(4),)}, TypeError, "out_norm must be a sepconv.kernels.BatchNormArgs"),
        ({"out_norm": "bn"}, TypeError, "out_norm must be a sepconv.kernels.BatchNormArgs"),
        (
            {"out_norm": BatchNormArgs(torch.zeros(3), torch.ones(3))},
            ValueError,
            r"out_norm.running_mean must have shape \(4,\) \(the 1x1 conv's outputs\)",
        ),
        (
            {"out_norm": BatchNormArgs(None, None, torch.ones(2), training=True)},
            ValueError,
            r"out_norm.weight must have shape \(4,\)",
        ),
        ({"out_norm": BatchNormArgs(None, None)}, ValueError, "out_norm.training=False normalizes"),
        ({"out_norm": BatchNormArgs(torch.zeros(4), None, training=True)}, ValueError, "both be given"),
        ({"x": torch.randn(3, 6, 6)}, ValueError, r"x must have shape \(N, C, H, W\).*got \(3, 6, 6\)"),
        ({"x": torch.randn(1, 3, 1, 1), "padding": 0}, ValueError, "more than 1 value per channel"),
    ],
)
def test_bad_arguments_are_named(change, error, match):
    args = {"x": torch.randn(2, 3, 6, 6), "padding": 1, "out_norm": BatchNormArgs(None, None, training=True)} | change
    dw = torch.randn(3, 1, 1 if args["padding"] == 0 else 3, 1 if args["padding"] == 0 else 3)
    with pytest.raises(error, match=match):
        separable_conv2d(args["x"], dw, torch.randn(4, 3, 1, 1), padding=args["padding"], out_norm=args["out_norm"])
