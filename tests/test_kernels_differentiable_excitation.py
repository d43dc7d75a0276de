"""The squeeze-excitation block with gradients (``excitation=ExcitationArgs(...)``): ours against F.conv2d ->
(F.batch_norm) -> activation -> a * gate(a.mean) -> F.conv2d -> (F.batch_norm) in float64: outputs, every
gradient (the gate's weights and both norms' included), running statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sepconv.kernels import BatchNormArgs, ExcitationArgs, separable_conv2d, separable_conv2d_batch_norm
from sepconv.kernels import depthwise as depthwise_module
from sepconv.kernels.depthwise import resolve_padding_sides
from sepconv.kernels.differentiable_excitation import GATES
from sepconv.kernels.separable import MID_ACTIVATIONS
from test_kernels_batch_norm import _output_values, assert_gradients_close
from test_kernels_batch_norm import configs as block_configs
from test_kernels_depthwise import DEVICE, layout

NAMES = ("x", "dw_weight", "dw_bias", "pw_weight", "pw_bias", "norm_weight", "norm_bias", "reduce_weight",
         "reduce_bias", "expand_weight", "expand_bias", "out_weight", "out_bias")  # fmt: skip


def gate_of(reduce_weight, reduce_bias, expand_weight, expand_bias, act, gate):
    """The squeeze-excitation on the (N, C, 1, 1) means as torchvision's module computes it."""

    def excitation(means):
        hidden = F.conv2d(means, reduce_weight, reduce_bias)
        hidden = hidden if act is None else getattr(F, act)(hidden)
        return getattr(F if gate == "hardsigmoid" else torch, gate)(F.conv2d(hidden, expand_weight, expand_bias))

    return excitation


def reference(t, cfg, mid_running, out_running):
    """The block in PyTorch's ops (float64 in the tests), explicit zero padding for every padding form."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    stride, dilation = cfg["stride"], cfg["dilation"]
    sides = resolve_padding_sides(cfg["padding"], t["x"].shape[-2:], t["dw_weight"].shape[-2:], pair(stride),
                                  pair(dilation))  # fmt: skip
    padded = F.pad(t["x"], (sides[2], sides[3], sides[0], sides[1]))
    z = F.conv2d(padded, t["dw_weight"], t["dw_bias"], stride, 0, dilation, groups=t["x"].shape[1])
    if cfg["mid"]:
        z = F.batch_norm(z, *mid_running, t["norm_weight"], t["norm_bias"], cfg["training"], cfg["momentum"])
    a = z if cfg["act"] is None else getattr(F, cfg["act"])(z)
    gate = gate_of(t["reduce_weight"], t["reduce_bias"], t["expand_weight"], t["expand_bias"], cfg["se_act"],
                   cfg["gate"])  # fmt: skip
    y = F.conv2d(a * gate(a.mean((2, 3), keepdim=True)), t["pw_weight"], t["pw_bias"])
    if cfg["out"] is None:
        return y
    return F.batch_norm(y, *out_running, t["out_weight"], t["out_bias"], cfg["out"] == "train", cfg["momentum"])


def ours(t, cfg, mid_running, out_running):
    excitation = ExcitationArgs(t["reduce_weight"], t["reduce_bias"], t["expand_weight"], t["expand_bias"],
                                cfg["se_act"], cfg["gate"])  # fmt: skip
    out_norm = None
    if cfg["out"] is not None:
        out_norm = BatchNormArgs(*out_running, t["out_weight"], t["out_bias"], cfg["out"] == "train", cfg["momentum"])
    geometry = (cfg["stride"], cfg["padding"], cfg["dilation"])
    args = (t["x"], t["dw_weight"], t["pw_weight"], t["pw_bias"], *geometry, t["dw_bias"], cfg["act"])
    if not cfg["mid"]:
        return separable_conv2d(*args, out_norm=out_norm, excitation=excitation)
    return separable_conv2d_batch_norm(
        *args, running_mean=mid_running[0], running_var=mid_running[1], norm_weight=t["norm_weight"],
        norm_bias=t["norm_bias"], training=cfg["training"], momentum=cfg["momentum"], out_norm=out_norm,
        excitation=excitation,
    )  # fmt: skip


def check(cfg, dtype=torch.float64, atol=1e-10):
    """Ours in ``dtype`` against the float64 reference: the output, all gradients, both norms' running statistics."""
    torch.manual_seed(cfg.get("seed", 0))
    g = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEVICE)  # noqa: E731
    mid, out, squeezed = cfg["c"] * cfg["m"], cfg["o"], cfg["squeezed"]
    affine = cfg["affine"]
    tensors = {
        "x": layout(g(cfg["n"], cfg["c"], *cfg["hw"]) * 2 + 1, cfg["layout"]),
        "dw_weight": g(mid, 1, *cfg["k"]),
        "dw_bias": g(mid) if cfg["dw_bias"] else None,
        "pw_weight": g(out, mid, 1, 1) / mid**0.5,
        "pw_bias": g(out) if cfg["pw_bias"] else None,
        "norm_weight": g(mid).abs() + 0.5 if cfg["mid"] and affine else None,
        "norm_bias": g(mid) if cfg["mid"] and affine else None,
        "reduce_weight": g(squeezed, mid, 1, 1) / mid**0.5,
        "reduce_bias": g(squeezed) if cfg["se_bias"] else None,
        "expand_weight": g(mid, squeezed, 1, 1),
        "expand_bias": g(mid) if cfg["se_bias"] else None,
        "out_weight": g(out).abs() + 0.5 if cfg["out"] and affine else None,
        "out_bias": g(out) if cfg["out"] and affine else None,
    }
    tracked = cfg["tracked"] or not cfg["training"]
    mid_running = (g(mid), g(mid).abs() + 0.5) if cfg["mid"] and tracked else (None, None)
    out_tracked = cfg["out"] == "eval" or (cfg["out"] == "train" and cfg["tracked"])
    out_running = (g(out), g(out).abs() + 0.5) if out_tracked else (None, None)
    buffers = torch.float64 if dtype == torch.float64 else torch.float32  # as a model's BatchNorm under autocast
    ours_running = [tuple(None if r is None else r.to(buffers) for r in pair) for pair in (mid_running, out_running)]
    ref_running = [tuple(None if r is None else r.clone() for r in pair) for pair in (mid_running, out_running)]
    leaves = {k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in tensors.items()}
    leaves["x"] = layout(tensors["x"].to(dtype), cfg["layout"]).requires_grad_()
    ref_leaves = {k: None if v is None else v.detach().requires_grad_() for k, v in tensors.items()}
    got = ours(leaves, cfg, *ours_running)
    expected = reference(ref_leaves, cfg, *ref_running)
    assert got.shape == expected.shape and got.dtype == dtype
    if cfg["layout"] == "channels_last" and cfg["c"] > 1 and cfg["o"] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got.double(), expected, atol=atol * scale, rtol=0)
    for ours_pair, ref_pair in zip(ours_running, ref_running, strict=True):
        for name, a, b in zip(("running_mean", "running_var"), ours_pair, ref_pair, strict=True):
            if b is not None:
                torch.testing.assert_close(
                    a.double(), b, atol=atol * 10, rtol=atol * 10, msg=lambda m, n=name: f"{n}: {m}"
                )
    order = list(NAMES)
    assert_gradients_close(
        got, expected, [leaves[k] for k in order], [ref_leaves[k] for k in order], NAMES, dtype, atol
    )


@st.composite
def configs(draw):
    return draw(block_configs()) | {
        "mid": draw(st.booleans()),
        "out": draw(st.sampled_from([None, "eval", "train"])),
        "squeezed": draw(st.integers(1, 4)),
        "se_act": draw(st.sampled_from(MID_ACTIVATIONS)),
        "gate": draw(st.sampled_from(GATES)),
        "se_bias": draw(st.booleans()),
    }


@settings(max_examples=40, deadline=None)
@given(configs())
def test_matches_the_squeeze_excitation_block_in_float64(cfg):
    values = _output_values(cfg)
    batch_statistics = (cfg["mid"] and cfg["training"]) or cfg["out"] == "train"
    if values == 0 or (batch_statistics and values < 2):
        error = "output would be" if values == 0 else "more than 1 value per channel"
        with pytest.raises(ValueError, match=error):
            check(cfg)
        return
    check(cfg)


BASE = {"n": 3, "c": 12, "m": 2, "o": 40, "hw": (9, 9), "k": (3, 3), "stride": 1, "padding": 1, "dilation": 1,
        "dw_bias": False, "pw_bias": False, "affine": True, "tracked": True, "training": True, "momentum": 0.1,
        "layout": "channels_last", "act": "silu", "mid": True, "out": "train", "squeezed": 6, "se_act": "silu",
        "gate": "sigmoid", "se_bias": True}  # fmt: skip


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 2e-5), (torch.float16, 1e-2), (torch.bfloat16, 6e-2)], ids=str
)
@pytest.mark.parametrize("block", ["efficientnet", "mobilenet_v3"])
def test_low_precision(dtype, atol, block):
    """EfficientNet-B0's block (SiLU, sigmoid gate) and MobileNetV3's (hardswish, ReLU, hard sigmoid) in training,
    in ``dtype`` (statistics and folds in float32): within ``dtype``'s rounding of the float64 truth."""
    change = {} if block == "efficientnet" else {"act": "hardswish", "se_act": "relu", "gate": "hardsigmoid"}
    check(BASE | change, dtype, atol)


def test_the_depthwise_backward_runs_once_and_no_intermediate_is_kept(monkeypatch):
    """The gate's gradient and the scaled product's reach the activation before the depthwise backward: one
    input-gradient and one weight-gradient pass; autograd keeps x and per-channel tensors only."""
    calls = {"input": 0, "weight": 0}
    for name, key in (("_grad_input", "input"), ("_grad_weight", "weight")):
        original = getattr(depthwise_module, name)

        def counted(*args, original=original, key=key, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(depthwise_module, name, counted)
    cfg = BASE | {"layout": "contiguous"}
    x = torch.randn(3, 12, 9, 9, device=DEVICE, requires_grad=True)
    weights = [torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((24, 1, 3, 3), (40, 24, 1, 1))]
    gate = ExcitationArgs(torch.randn(6, 24, 1, 1, device=DEVICE), None, torch.randn(24, 6, 1, 1, device=DEVICE), None)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = separable_conv2d_batch_norm(x, *weights, padding=1, mid_activation=cfg["act"], running_mean=None,
                                        running_var=None, training=True, excitation=gate)  # fmt: skip
    assert saved and max(saved) == x.numel()  # the intermediate would be 3*24*9*9
    y.square().sum().backward()
    assert calls == {"input": 1, "weight": 1}
    assert all(t.grad is not None for t in (x, *weights))


def test_torch_compile_autocast_and_opcheck():
    """torch.compile (fullgraph) gives eager's output, gradients and running statistics; under autocast the float32
    gate weights run in bf16 and get float32 gradients; the op passes opcheck."""
    torch.manual_seed(4)
    x = torch.randn(2, 8, 7, 7, device=DEVICE, requires_grad=True)
    dw = torch.randn(8, 1, 3, 3, device=DEVICE, requires_grad=True)
    pw = torch.randn(16, 8, 1, 1, device=DEVICE, requires_grad=True)
    reduce, expand = torch.randn(2, 8, 1, 1, device=DEVICE), torch.randn(8, 2, 1, 1, device=DEVICE)
    reduce.requires_grad_(), expand.requires_grad_()
    gate = ExcitationArgs(reduce, None, expand, None, "silu", "hardsigmoid")
    stats = {name: (torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE)) for name in ("eager", "compiled")}

    def block(x, dw, pw, running):
        return separable_conv2d_batch_norm(x, dw, pw, stride=2, padding="same", mid_activation="relu",
                                           running_mean=running[0], running_var=running[1], training=True,
                                           excitation=gate)  # fmt: skip

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, dw, pw, stats["compiled"]), block(x, dw, pw, stats["eager"])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(stats["compiled"], stats["eager"])
    leaves = (x, dw, pw, reduce, expand)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        low = block(x, dw, pw, stats["eager"])
    assert low.dtype == torch.bfloat16
    grads = torch.autograd.grad(low.float().sum(), leaves)
    assert all(g.dtype == torch.float32 and g.shape == t.shape for g, t in zip(grads, leaves, strict=True))
    args = (x, dw, None, None, None, pw, None, reduce, None, expand, None, [1, 1], [1, 1, 1, 1], [1, 1])
    torch.library.opcheck(torch.ops.sepconv.separable_conv2d_excitation.default, (*args, 4, 4, 0, 1e-5, True, True))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"gate": "tanh"}, ValueError, r"excitation.gate must be one of \('sigmoid', 'hardsigmoid'\)"),
        ({"activation": "elu"}, ValueError, "excitation.activation must be one of"),
        ({"reduce_weight": torch.randn(2, 4, 1, 1)}, ValueError, r"reduce_weight must have shape \(S, 3, 1, 1\)"),
        ({"expand_weight": torch.randn(3, 4, 1, 1)}, ValueError, r"expand_weight must have shape \(3, 2, 1, 1\)"),
        ({"expand_weight": None}, ValueError, r"expand_weight must have shape \(3, 2, 1, 1\), got NoneType"),
        ({"reduce_bias": torch.randn(3)}, ValueError, r"reduce_bias must have shape \(2,\) or be None"),
        ({"expand_bias": torch.randn(3).double()}, TypeError, "excitation.expand_bias is torch.float64"),
    ],
)
def test_bad_excitation_arguments_are_named(change, error, match):
    fields = {"reduce_weight": torch.randn(2, 3, 1, 1), "reduce_bias": None, "expand_weight": torch.randn(3, 2, 1, 1),
              "expand_bias": None, "activation": "relu", "gate": "sigmoid"} | change  # fmt: skip
    x, dw, pw = torch.randn(2, 3, 6, 6), torch.randn(3, 1, 3, 3), torch.randn(4, 3, 1, 1)
    with pytest.raises(error, match=match):
        separable_conv2d(x, dw, pw, padding=1, excitation=ExcitationArgs(**fields))


def test_a_plain_tuple_of_the_fields_is_taken_and_a_short_one_refused():
    x, dw = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(3, 1, 3, 3, dtype=torch.float64)
    pw = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    fields = (torch.randn(2, 3, 1, 1, dtype=torch.float64), None, torch.randn(3, 2, 1, 1, dtype=torch.float64), None)
    with torch.no_grad():
        got = separable_conv2d(x, dw, pw, padding=1, excitation=fields)  # relu and sigmoid by default
        torch.testing.assert_close(got, separable_conv2d(x, dw, pw, padding=1, excitation=ExcitationArgs(*fields)))
        with pytest.raises(TypeError, match=r"excitation must be a sepconv\.kernels\.ExcitationArgs, got tuple"):
            separable_conv2d(x, dw, pw, padding=1, excitation=fields[:2])


def test_a_callable_gate_with_a_training_norm_is_refused_with_the_alternative():
    x, dw, pw = torch.randn(2, 3, 6, 6), torch.randn(3, 1, 3, 3), torch.randn(4, 3, 1, 1)
    with pytest.raises(TypeError, match=r"excitation must be a sepconv\.kernels\.ExcitationArgs"):
        separable_conv2d_batch_norm(x, dw, pw, running_mean=None, running_var=None, training=True,
                                    excitation=torch.sigmoid)  # fmt: skip
