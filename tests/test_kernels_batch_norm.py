"""sepconv.kernels.separable_conv2d_batch_norm vs F.conv2d -> F.batch_norm -> activation -> F.conv2d in float64:
outputs, every gradient (the batch statistics' terms included) and the running statistics."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from sepconv.kernels import separable as separable_module
from sepconv.kernels._depthwise_triton import _pixel_tile, _rounded, _tile_pixels
from sepconv.kernels.batch_norm import separable_conv2d_batch_norm
from sepconv.kernels.depthwise import resolve_padding_sides
from sepconv.kernels.output_norm import BatchNormArgs
from test_kernels_depthwise import DEVICE, GridRecorder, layout

NAMES = ("x", "dw_weight", "dw_bias", "pw_weight", "pw_bias", "norm_weight", "norm_bias")


def reference(tensors, running, geometry, act, training, momentum, eps):
    """The four ops in float64 with explicit zero padding for every padding form."""
    x, dw, dw_bias, pw, pw_bias, gamma, beta = tensors
    stride, padding, dilation = geometry
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    top, bottom, left, right = resolve_padding_sides(padding, x.shape[-2:], dw.shape[-2:], pair(stride), pair(dilation))
    z = F.conv2d(F.pad(x, (left, right, top, bottom)), dw, dw_bias, stride, 0, dilation, groups=x.shape[1])
    z = F.batch_norm(z, *running, gamma, beta, training, momentum, eps)
    z = z if act is None else getattr(F, act)(z)
    return F.conv2d(z, pw, pw_bias)


def finalizing(cfg: dict):
    """The statistics combined by a second launch, or with ``cfg["finalize_in_launch"]`` by the last programs of
    the launches computing them (``separable.FINALIZE_IN_LAUNCH``)."""
    return mock.patch.object(separable_module, "FINALIZE_IN_LAUNCH", cfg.get("finalize_in_launch", False))


def check(cfg, dtype=torch.float64, atol=1e-10):
    """Ours (in ``dtype``) against the float64 reference: output, all gradients, running statistics."""
    torch.manual_seed(cfg.get("seed", 0))
    g = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEVICE)  # noqa: E731
    mid = cfg["c"] * cfg["m"]
    # an offset and a scale per channel, so that the normalization has something to undo
    x = layout(g(cfg["n"], cfg["c"], *cfg["hw"]) * 2 + 3, cfg["layout"])
    tensors = [
        x,
        g(mid, 1, *cfg["k"]),
        g(mid) if cfg["dw_bias"] else None,
        g(cfg["o"], mid, 1, 1),
        g(cfg["o"]) if cfg["pw_bias"] else None,
        g(mid).abs() + 0.5 if cfg["affine"] else None,
        g(mid) if cfg["affine"] else None,
    ]
    training, momentum, eps = cfg["training"], cfg.get("momentum", 0.1), cfg.get("eps", 1e-5)
    tracked = cfg["tracked"] or not training
    running = (g(mid), g(mid).abs() + 0.5) if tracked else (None, None)
    buffers = torch.float64 if dtype == torch.float64 else torch.float32  # as a model's BatchNorm under autocast
    ours_running = tuple(None if r is None else r.to(buffers) for r in running)
    ref_running = tuple(None if r is None else r.clone() for r in running)
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    leaves[0] = layout(tensors[0].to(dtype), cfg["layout"]).requires_grad_()
    ref_leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
    geometry = (cfg["stride"], cfg["padding"], cfg["dilation"])
    x_, dw, dwb, pw, pwb, gamma, beta = leaves
    with finalizing(cfg):
        ours = separable_conv2d_batch_norm(
            x_, dw, pw, pwb, *geometry, dwb, cfg["act"], running_mean=ours_running[0], running_var=ours_running[1],
            norm_weight=gamma, norm_bias=beta, training=training, momentum=momentum, eps=eps,
        )  # fmt: skip
    expected = reference(ref_leaves, ref_running, geometry, cfg["act"], training, momentum, eps)
    assert ours.shape == expected.shape and ours.dtype == dtype
    if cfg["layout"] == "channels_last" and cfg["c"] > 1:  # (one channel: both layouts at once)
        assert ours.is_contiguous(memory_format=torch.channels_last)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(ours.double(), expected, atol=atol * scale, rtol=0)
    for name, got, want in zip(("running_mean", "running_var"), ours_running, ref_running, strict=True):
        if want is not None:
            torch.testing.assert_close(got.double(), want, atol=atol, rtol=atol, msg=lambda m, n=name: f"{n}: {m}")
    assert_gradients_close(ours, expected, leaves, ref_leaves, NAMES, dtype, atol)


def assert_gradients_close(ours, expected, leaves, ref_leaves, names, dtype, atol):
    """The gradients of ``ours`` (in ``dtype``) for its non-None ``leaves`` against those of the float64
    ``expected`` for ``ref_leaves``, under one random output gradient; one scale for all: a bias a norm removes
    has gradient 0, what is computed of it is the rounding of sums of the larger gradients."""
    grad = torch.randn_like(expected)
    present = [i for i, t in enumerate(leaves) if t is not None]
    got = torch.autograd.grad(ours, [leaves[i] for i in present], grad.to(dtype))
    want = torch.autograd.grad(expected, [ref_leaves[i] for i in present], grad)
    scale = max(1.0, *(b.abs().max().item() for b in want))
    for i, a, b in zip(present, got, want, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, names[i]
        torch.testing.assert_close(a.double(), b, atol=atol * scale, rtol=0, msg=lambda m, n=names[i]: f"grad {n}: {m}")


@st.composite
def configs(draw):
    return {
        "n": draw(st.integers(1, 3)),
        "c": draw(st.integers(1, 6)),
        "m": draw(st.integers(1, 2)),
        "o": draw(st.integers(1, 20)),
        "hw": (draw(st.integers(2, 8)), draw(st.integers(2, 8))),
        "k": (draw(st.integers(1, 5)), draw(st.integers(1, 5))),
        "stride": draw(st.sampled_from([1, 2, (2, 1)])),
        "padding": draw(st.one_of(st.integers(0, 2), st.sampled_from(["same", ((0, 2), (1, 0))]))),
        "dilation": draw(st.sampled_from([1, 2])),
        "dw_bias": draw(st.booleans()),
        "pw_bias": draw(st.booleans()),
        "affine": draw(st.booleans()),
        "tracked": draw(st.booleans()),
        "training": draw(st.booleans()),
        "momentum": draw(st.sampled_from([0.1, 0.5, 1.0])),
        "layout": draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
        "act": draw(st.sampled_from(separable_module.MID_ACTIVATIONS)),
        "finalize_in_launch": draw(st.booleans()),
    }


def _output_values(cfg) -> int:
    """N·H_out·W_out of the depthwise conv (F.conv2d's own arithmetic on a meta tensor), 0 if it is empty."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    sides = resolve_padding_sides(cfg["padding"], cfg["hw"], cfg["k"], pair(cfg["stride"]), pair(cfg["dilation"]))
    h = cfg["hw"][0] + sides[0] + sides[1]
    w = cfg["hw"][1] + sides[2] + sides[3]
    try:
        z = F.conv2d(torch.empty(cfg["n"], 1, h, w, device="meta"), torch.empty(1, 1, *cfg["k"], device="meta"),
                     stride=cfg["stride"], dilation=cfg["dilation"])  # fmt: skip
    except RuntimeError:
        return 0
    return z.shape[0] * z.shape[2] * z.shape[3]


@settings(max_examples=60, deadline=None)
@given(configs())
def test_matches_conv_batch_norm_conv_in_float64(cfg):
    values = _output_values(cfg)
    if values == 0 or (cfg["training"] and values < 2):
        error = "output would be" if values == 0 else "more than 1 value per channel"
        with pytest.raises(ValueError, match=error):
            check(cfg)
        return
    check(cfg)


BASE = {"n": 2, "c": 3, "m": 2, "o": 5, "hw": (6, 7), "k": (3, 3), "stride": 1, "padding": 1, "dilation": 1,
        "dw_bias": True, "pw_bias": True, "affine": True, "tracked": True, "training": True,
        "layout": "contiguous", "act": "relu6"}  # fmt: skip


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 2e-5), (torch.float16, 1e-2), (torch.bfloat16, 6e-2)], ids=str
)
def test_low_precision(dtype, atol):
    """Statistics and fold in float32, convs in ``dtype``: within ``dtype``'s rounding of the float64 truth (a
    smooth activation: rounding may move a value across relu6's kinks, where the gradient jumps)."""
    check(BASE | {"c": 20, "o": 40, "hw": (11, 11), "layout": "channels_last", "act": "silu"}, dtype, atol)


def test_running_statistics_follow_batch_norm_with_momentum_none_over_steps():
    """F.batch_norm's semantics for the running statistics over several steps, as nn.BatchNorm2d drives them."""
    torch.manual_seed(3)
    norm = torch.nn.BatchNorm2d(4, momentum=None).double()
    ref = torch.nn.BatchNorm2d(4, momentum=None).double()
    dw, pw = torch.randn(4, 1, 3, 3).double(), torch.randn(2, 4, 1, 1).double()
    for step in range(3):
        x = torch.randn(2, 4, 5, 5).double() * (step + 1) + step
        factor = 1.0 / (step + 1)  # what nn.BatchNorm2d(momentum=None) passes to F.batch_norm at this step
        y = separable_conv2d_batch_norm(x, dw, pw, padding=1, running_mean=norm.running_mean,
                                        running_var=norm.running_var, training=True, momentum=factor)  # fmt: skip
        want = F.conv2d(ref(F.conv2d(x, dw, padding=1, groups=4)), pw)
        torch.testing.assert_close(y, want)
    torch.testing.assert_close(norm.running_mean, ref.running_mean)
    torch.testing.assert_close(norm.running_var, ref.running_var)


@pytest.mark.parametrize("in_launch", [False, True], ids=["finalize_launch", "finalize_in_launch"])
@pytest.mark.parametrize("buffers", ["float32", "float64", "strided"])
def test_running_statistics_updated_once_in_the_statistics_launch_or_else_by_pytorch(buffers, in_launch):
    """Both norms' running statistics move as F.batch_norm moves them, exactly once. Buffers the statistics'
    launches can write (float32 for float32 statistics, contiguous) are updated inside those launches, without a
    PyTorch operator; others (float64 buffers, a strided view) by PyTorch's operators after them. Either where a
    second launch combines the statistics or where the launches computing them do (``in_launch``)."""
    torch.manual_seed(4)
    x = torch.randn(3, 6, 7, 7, device=DEVICE) * 2 + 1
    dw, pw = torch.randn(6, 1, 3, 3, device=DEVICE), torch.randn(5, 6, 1, 1, device=DEVICE)
    dtype = torch.float64 if buffers == "float64" else torch.float32
    step = 2 if buffers == "strided" else 1

    def running(channels):
        storage = torch.rand(2, channels * step, dtype=dtype, device=DEVICE) + 0.5
        return storage[0, ::step], storage[1, ::step]  # a mean and a positive variance

    mid, after = running(6), running(5)
    expected = [t.double() for t in (*mid, *after)]
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with finalizing({"finalize_in_launch": in_launch}), torch.profiler.profile(activities=cpu) as prof:
        separable_conv2d_batch_norm(
            x, dw, pw, padding=1, running_mean=mid[0], running_var=mid[1], training=True, momentum=0.3,
            out_norm=BatchNormArgs(*after, training=True, momentum=0.3),
        )  # fmt: skip
    z = F.conv2d(x.double(), dw.double(), padding=1, groups=6)
    F.batch_norm(F.conv2d(F.batch_norm(z, *expected[:2], training=True, momentum=0.3), pw.double()), *expected[2:],
                 training=True, momentum=0.3)  # fmt: skip
    for got, want in zip((*mid, *after), expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    updated_in_launch = buffers == "float32"
    assert updated_in_launch != any(event.name == "aten::lerp_" for event in prof.events())


@pytest.mark.parametrize(
    ("channels", "kind", "hw"),
    [(3, "contiguous", (9, 7)), (300, "channels_last", (9, 7)), (40, "channels_last", (5, 11)), (5, "strided", (6, 6))],
)
@pytest.mark.parametrize("in_launch", [False, True], ids=["finalize_launch", "finalize_in_launch"])
def test_statistics_pass_matches_var_mean_of_the_output(channels, kind, hw, in_launch, monkeypatch):
    """The statistics kernel reduces each tile (no output written), the tiles are combined afterwards (by a
    second launch, or by the last program of each channel block: ``in_launch``): the mean and biased variance of
    the depthwise output in float64 — tiles cut by the image's edge, 4x4 rectangles (channels_last from 256
    channels), several channel blocks, depth multiplier 2, stride, per-side padding and dilation, an offset far
    larger than the spread."""
    from sepconv.kernels.batch_norm import _moments

    monkeypatch.setattr(separable_module, "FINALIZE_IN_LAUNCH", in_launch)

    torch.manual_seed(channels)
    x = layout(torch.randn(3, channels, *hw, dtype=torch.float64, device=DEVICE) + 1000, kind)
    weight = torch.randn(2 * channels, 1, 3, 3, dtype=torch.float64, device=DEVICE)
    bias = torch.randn(2 * channels, dtype=torch.float64, device=DEVICE)
    for stride, sides, dilation in (([1, 1], [1, 1, 1, 1], [1, 1]), ([2, 2], [0, 1, 2, 0], [2, 1])):
        padded = F.pad(x, (sides[2], sides[3], sides[0], sides[1]))
        z = F.conv2d(padded, weight, bias, stride, 0, dilation, groups=channels)
        var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
        got_mean, got_var = _moments(x, weight, bias, stride, sides, dilation)
        torch.testing.assert_close(got_mean, mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(got_var, var, rtol=1e-9, atol=0)


@triton.jit
def _tile_count_kernel(out_ptr, ROWS, COLS, BLOCK_P: tl.constexpr, TILE_W: tl.constexpr):
    pid = tl.program_id(0)
    _, _, ok = _pixel_tile(pid, ROWS, COLS, BLOCK_P, TILE_W)
    tl.store(out_ptr + 2 * pid, tl.sum(ok.to(tl.int32), axis=0))
    tl.store(out_ptr + 2 * pid + 1, _tile_pixels(pid, ROWS, COLS, BLOCK_P, TILE_W))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 40), st.integers(1, 40), st.sampled_from([16, 32, 64]), st.sampled_from([0, 4, 8, 16]),
)  # fmt: skip
def test_tile_pixel_counts_by_formula_match_the_tiles_masks(rows, cols, block_p, tile_w):
    """The combination's count of a tile's pixels (``_tile_pixels``, from its place) is the number of valid
    pixels the statistics kernel's tile holds (``_pixel_tile``'s mask), for every tile of runs or rectangles cut
    by the image's edges."""
    from sepconv.kernels.depthwise import Tiles

    programs = Tiles(block_p, 16, tile_w=tile_w).pixel_programs(rows, cols)
    out = torch.full((programs, 2), -1, dtype=torch.int32, device=DEVICE)
    _tile_count_kernel[(programs,)](out, rows, cols, BLOCK_P=block_p, TILE_W=tile_w)
    assert torch.equal(out[:, 0], out[:, 1]) and int(out[:, 0].sum()) == rows * cols


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, _rounded(tl.load(x_ptr + i, mask=i < n), y_ptr.dtype.element_ty), mask=i < n)


def test_folded_weights_round_to_nearest_even_as_pytorch_casts():
    """The fold stores its weights in the conv's dtype by ``_rounded``: bf16 bit-for-bit as PyTorch's cast of the
    same float32 values (round to nearest, ties to even), ties of both parities, negatives, subnormals and values
    that round up into the next binade included; fp16 likewise."""
    torch.manual_seed(5)
    high = torch.randint(0, 2**15, (512,), dtype=torch.int32) << 16  # positive finite-ish bf16 patterns
    ties = high | 0x8000  # exactly halfway: even and odd kept halves
    bits = torch.cat([ties, ties | (1 << 16), high | 0x7FFF, high | 0x8001, high | 0xFFFF, high])
    values = bits.view(torch.float32)
    values = torch.cat([values, -values, torch.randn(1024) * 1e3, torch.tensor([1e-40, -3e-39, 0.0, 1.0])])
    values = values[torch.isfinite(values) & (values.abs() < 3e38)].to(DEVICE)
    for dtype in (torch.bfloat16, torch.float16):
        values = values[values.abs() <= torch.finfo(dtype).max]  # (fp16: its finite range)
        got = torch.empty(values.shape, dtype=dtype, device=DEVICE)
        _round_kernel[(triton.cdiv(values.numel(), 256),)](values, got, values.numel(), BLOCK=256)
        want = values.to(dtype)
        same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
        assert same.all(), (values[~same][:5], got[~same][:5], want[~same][:5])


@pytest.mark.parametrize("norm", ["mid", "out"])
def test_finalize_in_launch_matches_the_finalize_launch_over_many_programs(norm):
    """The statistics, the folded depthwise weights and the running statistics combined by the last program of
    each channel block to finish (an atomic counter per block; no finalize launch) equal those of the separate
    finalize launch, within float32 rounding of the same sums in the same order (the reductions' layouts
    differ). On a GPU the programs run concurrently, hundreds per channel block here: a stale or missing part
    would be far off; repeated to give a race its chances."""
    from sepconv.kernels.batch_norm import _moments
    from sepconv.kernels.separable import Fold, RunningUpdate, _forward

    torch.manual_seed(11)
    n, c, hw, repeats = (32, 64, 28, 10) if DEVICE == "cuda" else (3, 40, 9, 1)
    x = torch.randn(n, c, hw, hw, device=DEVICE).contiguous(memory_format=torch.channels_last) * 2 + 1
    dw, dw_bias = torch.randn(c, 1, 3, 3, device=DEVICE), torch.randn(c, device=DEVICE)
    pw = torch.randn(48, c, 1, 1, device=DEVICE)
    gamma, beta = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    channels = c if norm == "mid" else 48
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1])  # stride, padding per side, dilation (as the ops pass them)

    def statistics(in_launch: bool) -> list[torch.Tensor]:
        running = RunningUpdate(torch.zeros(channels, device=DEVICE), torch.ones(channels, device=DEVICE), 0.25)
        launches = GridRecorder(separable_module.finalize_moments_kernel)
        with (
            finalizing({"finalize_in_launch": in_launch}),
            mock.patch.object(separable_module, "finalize_moments_kernel", launches),
        ):
            if norm == "mid":
                fold = Fold(dw, dw_bias, gamma, beta, 1e-5, x.dtype)
                got = _moments(x, dw, dw_bias, *geometry, fold, running)
            else:
                got = _forward(x, dw, dw_bias, pw, None, *geometry, 2, statistics=True, running=running)[1:]
        assert running.done and bool(launches.grids) != in_launch  # a finalize launch unless in launch
        return [*got, running.mean, running.var]

    expected = statistics(False)
    for _ in range(repeats):
        for got, want in zip(statistics(True), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_batches_launched_in_chunks_combine_their_statistics_in_a_launch_of_their_own(monkeypatch):
    """A counter counts one launch's programs: where the batch is launched in chunks (CUDA's grid cap, patched
    to 2 here: a batch of 5 in 3 launches) the statistics are combined by the finalize launch even with the
    in-launch combination on, and both norms' statistics and running statistics stay F.batch_norm's."""
    from sepconv.kernels import depthwise as depthwise_module

    monkeypatch.setattr(depthwise_module, "_MAX_GRID_YZ", 2)
    monkeypatch.setattr(separable_module, "_MAX_GRID_YZ", 2)
    monkeypatch.setattr(separable_module, "FINALIZE_IN_LAUNCH", True)
    launches = GridRecorder(separable_module.finalize_moments_kernel)
    monkeypatch.setattr(separable_module, "finalize_moments_kernel", launches)
    torch.manual_seed(12)
    x = torch.randn(5, 6, 7, 7, dtype=torch.float64, device=DEVICE) * 2 + 1
    dw, pw = (torch.randn(*shape, dtype=torch.float64, device=DEVICE) for shape in ((6, 1, 3, 3), (5, 6, 1, 1)))
    sizes_values = ((6, 0.0), (6, 1.0), (5, 0.0), (5, 1.0))  # both norms' running means 0, variances 1
    stats = [torch.full((n,), value, dtype=torch.float64, device=DEVICE) for n, value in sizes_values]
    expected = [t.clone() for t in stats]
    got = separable_conv2d_batch_norm(
        x, dw, pw, padding=1, running_mean=stats[0], running_var=stats[1], training=True, momentum=0.5,
        mid_activation="relu6", out_norm=BatchNormArgs(stats[2], stats[3], training=True, momentum=0.5),
    )  # fmt: skip
    z = F.relu6(F.batch_norm(F.conv2d(x, dw, padding=1, groups=6), *expected[:2], training=True, momentum=0.5))
    want = F.batch_norm(F.conv2d(z, pw), *expected[2:], training=True, momentum=0.5)
    torch.testing.assert_close(got, want)
    for ours, theirs in zip(stats, expected, strict=True):
        torch.testing.assert_close(ours, theirs)
    assert len(launches.grids) == 2  # one finalize launch per norm


def test_autocast_runs_the_convs_in_bf16_and_the_norm_in_float32_like_pytorch():
    """Under autocast: the output in the autocast dtype, as eager's conv -> BatchNorm -> SiLU -> conv gives it,
    as close to the float64 truth as eager's (bf16 rounding; statistics and fold in float32); float32 leaves get
    float32 gradients; the float32 running statistics are updated."""
    torch.manual_seed(8)
    x = torch.randn(4, 16, 9, 9, device=DEVICE, requires_grad=True)
    dw = torch.randn(16, 1, 3, 3, device=DEVICE, requires_grad=True)
    pw = (torch.randn(24, 16, 1, 1, device=DEVICE) / 4).requires_grad_()
    gamma, beta = torch.rand(16, device=DEVICE) + 0.5, torch.randn(16, device=DEVICE)
    gamma.requires_grad_(), beta.requires_grad_()
    mean, var = torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = separable_conv2d_batch_norm(x, dw, pw, padding=1, mid_activation="silu", running_mean=mean,
                                        running_var=var, norm_weight=gamma, norm_bias=beta, training=True)  # fmt: skip
        z = F.batch_norm(F.conv2d(x, dw, None, 1, 1, 1, 16), None, None, gamma, beta, True)
        eager = F.conv2d(F.silu(z), pw)
    assert y.dtype == eager.dtype == torch.bfloat16
    leaves = (x, dw, pw, gamma, beta)
    truth = reference([None if t is None else t.detach().double() for t in (x, dw, None, pw, None, gamma, beta)],
                      (None, None), (1, 1, 1), "silu", True, 0.1, 1e-5)  # fmt: skip
    error = lambda t: (t.double() - truth).abs().max().item() / truth.abs().max().item()  # noqa: E731
    assert error(y) <= 1.5 * error(eager) + 1e-3  # bf16 rounding: measured 0.0087 for both
    torch.testing.assert_close(mean.double(), 0.1 * F.conv2d(x, dw, None, 1, 1, 1, 16).mean((0, 2, 3)).double(),
                               atol=1e-2, rtol=1e-2)  # fmt: skip
    grads = torch.autograd.grad(y.float().sum(), leaves)
    assert all(g.dtype == torch.float32 and g.shape == t.shape for g, t in zip(grads, leaves, strict=True))


def test_backward_keeps_no_intermediate():
    """What autograd saves: x and parameter-sized tensors, never a tensor of the depthwise output's size."""
    x = torch.randn(2, 8, 10, 10, device=DEVICE, requires_grad=True)
    dw = torch.randn(32, 1, 3, 3, device=DEVICE, requires_grad=True)  # depth multiplier 4
    pw = torch.randn(4, 32, 1, 1, device=DEVICE, requires_grad=True)
    gamma, beta = torch.ones(32, device=DEVICE, requires_grad=True), torch.zeros(32, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = separable_conv2d_batch_norm(
            x, dw, pw, padding=1, running_mean=None, running_var=None, norm_weight=gamma, norm_bias=beta, training=True
        )
    assert saved and max(saved) == x.numel()  # the intermediate would be 2*32*10*10
    y.square().sum().backward()
    assert all(t.grad is not None for t in (x, dw, pw, gamma, beta))


def test_torch_compile_and_opcheck():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 7, 7, device=DEVICE, requires_grad=True)
    dw = torch.randn(3, 1, 3, 3, device=DEVICE, requires_grad=True)
    pw = torch.randn(16, 3, 1, 1, device=DEVICE, requires_grad=True)
    gamma = torch.rand(3, device=DEVICE, requires_grad=True)
    stats = {name: (torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)) for name in ("eager", "compiled")}

    def block(x, dw, pw, gamma, running):
        return separable_conv2d_batch_norm(
            x, dw, pw, stride=2, padding="same", mid_activation="relu", running_mean=running[0],
            running_var=running[1], norm_weight=gamma, training=True,
        )  # fmt: skip

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, dw, pw, gamma, stats["compiled"]), block(x, dw, pw, gamma, stats["eager"])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(stats["compiled"], stats["eager"])
    leaves = (x, dw, pw, gamma)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves))
    args = (x, dw, torch.randn(3, device=DEVICE, requires_grad=True), gamma, None, pw, None, [1, 1], [1, 1, 1, 1])
    torch.library.opcheck(torch.ops.sepconv.separable_conv2d_batch_norm.default, (*args, [1, 1], 2, 1e-5, False))


def test_double_backward_raises():
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    dw = torch.randn(2, 1, 3, 3, dtype=torch.float64, device=DEVICE)
    pw = torch.randn(3, 2, 1, 1, dtype=torch.float64, device=DEVICE)
    y = separable_conv2d_batch_norm(x, dw, pw, padding=1, running_mean=None, running_var=None, training=True)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.square().sum().backward()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"x": torch.randn(3, 6, 6)}, ValueError, r"x must have shape \(N, C, H, W\)"),
        ({"running_mean": torch.zeros(4)}, ValueError, r"running_mean must have shape \(3,\)"),
        ({"norm_weight": torch.ones(2)}, ValueError, r"norm_weight must have shape \(3,\)"),
        ({"running_var": None}, ValueError, "both be given or both be None"),
        ({"running_mean": None, "running_var": None, "training": False}, ValueError, "training=False normalizes"),
        ({"running_mean": torch.zeros(3, dtype=torch.long)}, TypeError, "running_mean must be a floating-point"),
        (
            {"x": torch.randn(1, 3, 1, 1), "padding": 0, "dw": torch.randn(3, 1, 1, 1)},
            ValueError,
            "more than 1 value per channel",
        ),
        ({"act": "tanh"}, ValueError, "mid_activation must be one of"),
        ({"momentum": None}, TypeError, r"momentum must be a number, .*1 / num_batches_tracked.*got NoneType"),
        ({"momentum": torch.tensor(0.1)}, TypeError, "momentum must be a number"),
    ],
)
def test_bad_arguments_are_named(change, error, match):
    args = {"x": torch.randn(2, 3, 6, 6), "dw": torch.randn(3, 1, 3, 3), "pw": torch.randn(4, 3, 1, 1),
            "padding": 1, "act": None, "running_mean": torch.zeros(3), "running_var": torch.ones(3),
            "norm_weight": None, "training": True, "momentum": 0.1} | change  # fmt: skip
    with pytest.raises(error, match=match):
        separable_conv2d_batch_norm(
            args["x"], args["dw"], args["pw"], padding=args["padding"], mid_activation=args["act"],
            running_mean=args["running_mean"], running_var=args["running_var"], norm_weight=args["norm_weight"],
            training=args["training"], momentum=args["momentum"],
        )  # fmt: skip
