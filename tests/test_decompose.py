"""decompose_conv against an independent truth: numpy float64 SVD of each input channel's slice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sepconv import SeparableConv1d, SeparableConv2d, SeparableConv3d
from sepconv.decompose import Decomposition, decompose_conv
from strategies import ConvConfig, conv_configs

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
SEPARABLE = {1: SeparableConv1d, 2: SeparableConv2d, 3: SeparableConv3d}
PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def make_conv(cfg: ConvConfig, *, bias: bool = True, dtype: torch.dtype = torch.float64) -> nn.Module:
    """An nn.ConvNd for ``cfg``; nn.ConvNd has no strided 'same', so that case becomes 'valid'."""
    kwargs = cfg.conv_kwargs
    if cfg.strided_same:
        kwargs["padding"] = "valid"
    return CONV[cfg.ndim](cfg.in_channels, cfg.out_channels, cfg.kernel_size, bias=bias, dtype=dtype, **kwargs)


def numpy_slices(w: np.ndarray, groups: int) -> list[tuple[int, int, np.ndarray]]:
    """(group, channel in group, O/g x K^d slice) for every input channel."""
    o, cg = w.shape[:2]
    og = o // groups
    return [(g, c, w[g * og : (g + 1) * og, c].reshape(og, -1)) for g in range(groups) for c in range(cg)]


def numpy_truth(w: np.ndarray, groups: int, rank: int) -> tuple[np.ndarray, float, float]:
    """Best rank-``rank`` weight by numpy SVD per slice, its squared error (dropped σ²) and the total σ²."""
    best = np.zeros_like(w)
    o, _ = w.shape[:2]
    og = o // groups
    dropped = total = 0.0
    for g, c, m in numpy_slices(w, groups):
        u, s, vh = np.linalg.svd(m, full_matrices=False)
        r = min(rank, len(s))
        best[g * og : (g + 1) * og, c] = ((u[:, :r] * s[:r]) @ vh[:r]).reshape(best[g * og : (g + 1) * og, c].shape)
        dropped += float((s[r:] ** 2).sum())
        total += float((s**2).sum())
    return best, dropped, total


def reconstruct(layer: nn.Module) -> np.ndarray:
    """The dense O x C/g x K^d weight the separable layer computes: W[o, c] = sum_j P[o, c·r+j] D[c·r+j]."""
    d = layer.depthwise.weight.detach().double().numpy()  # (C·r, 1, *K)
    p = layer.pointwise.weight.detach().double().numpy().reshape(layer.out_channels, -1)  # (O, C·r/g)
    g, r, c_total = layer.groups, layer.depth_multiplier, layer.in_channels
    cg, og = c_total // g, layer.out_channels // g
    w = np.zeros((layer.out_channels, cg, *d.shape[2:]))
    for group in range(g):
        for c_local in range(cg):
            c = group * cg + c_local
            for o in range(og):
                for j in range(r):
                    w[group * og + o, c_local] += p[group * og + o, c_local * r + j] * d[c * r + j, 0]
    return w


def reference_conv(cfg: ConvConfig, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.convNd with explicit padding (zero or mode), independent of the layers' code paths."""
    kwargs = cfg.conv_kwargs
    padding = "valid" if cfg.strided_same else kwargs["padding"]
    if padding in ("same", "valid") or cfg.padding_mode == "zeros":
        if cfg.padding_mode == "zeros" or padding == "valid":
            return FCONV[cfg.ndim](x, weight, bias, cfg.stride, padding, cfg.dilation, cfg.groups)
        # 'same' with a padding mode: total d·(K-1), the extra one on the high side, as PyTorch does
        pads = []
        for k, d in zip(reversed(cfg.kernel_size), reversed(cfg.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        p = (padding,) * cfg.ndim if isinstance(padding, int) else padding
        pads = [v for v in reversed(p) for v in (v, v)]
    x = F.pad(x, pads, mode=PAD_MODE[cfg.padding_mode])
    return FCONV[cfg.ndim](x, weight, bias, cfg.stride, 0, cfg.dilation, cfg.groups)


@settings(max_examples=30, deadline=None)
@given(cfg=conv_configs(), rank=st.integers(1, 4), bias=st.booleans())
def test_weights_error_and_outputs_match_numpy_svd(cfg: ConvConfig, rank: int, bias: bool) -> None:
    torch.manual_seed(0)
    conv = make_conv(cfg, bias=bias)
    w = conv.weight.detach().numpy()
    sep = decompose_conv(conv, rank=rank)
    best, dropped, total = numpy_truth(w, cfg.groups, rank)
    max_rank = min(cfg.out_channels // cfg.groups, math.prod(cfg.kernel_size))

    assert isinstance(sep, SEPARABLE[cfg.ndim])
    assert sep.depth_multiplier == min(rank, max_rank)
    assert sep.groups == cfg.groups and sep.depthwise.bias is None
    np.testing.assert_allclose(reconstruct(sep), best, atol=1e-10)
    info = sep.decomposition
    assert info.max_rank == max_rank and info.rank == sep.depth_multiplier
    assert info.relative_error == pytest.approx(math.sqrt(dropped / total), abs=1e-9)
    assert info.kept_energy == pytest.approx(1 - dropped / total, abs=1e-12)
    # The layer computes the conv with the reconstructed weight (stride/padding/dilation/mode on depthwise).
    x = torch.randn(cfg.input_shape, dtype=torch.float64)
    expected = reference_conv(cfg, x, torch.from_numpy(best), conv.bias)
    torch.testing.assert_close(sep(x), expected, atol=1e-9, rtol=1e-9)
    if rank >= max_rank:
        torch.testing.assert_close(sep(x), conv(x), atol=1e-9, rtol=1e-9)


@settings(max_examples=25, deadline=None)
@given(cfg=conv_configs(max_kernel=4))
def test_full_rank_float32_reproduces_outputs(cfg: ConvConfig) -> None:
    torch.manual_seed(1)
    conv = make_conv(cfg, dtype=torch.float32)
    full = min(cfg.out_channels // cfg.groups, math.prod(cfg.kernel_size))
    sep = decompose_conv(conv, rank=full)
    assert sep.depthwise.weight.dtype == torch.float32 and sep.pointwise.weight.dtype == torch.float32
    assert sep.decomposition.relative_error < 1e-7
    x = torch.randn(cfg.input_shape)
    torch.testing.assert_close(sep(x), conv(x), atol=1e-4, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(
    ndim=st.sampled_from([1, 2, 3]),
    out_per_group=st.integers(2, 6),
    groups=st.sampled_from([1, 2]),
    rank=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_eckart_young_random_factorisations_never_beat_svd(
    ndim: int, out_per_group: int, groups: int, rank: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    conv = CONV[ndim](2 * groups, out_per_group * groups, 3, groups=groups, bias=False, dtype=torch.float64)
    w = conv.weight.detach().numpy()
    ours = decompose_conv(conv, rank=rank)
    ours_err = float(((reconstruct(ours) - w) ** 2).sum())
    rivals = []
    for _ in range(20):
        rival = decompose_conv(conv, rank=rank)  # same shapes; overwrite the factors
        with torch.no_grad():
            rival.depthwise.weight.copy_(torch.randn(rival.depthwise.weight.shape, generator=gen, dtype=torch.float64))
            # the least-squares best pointwise for this random depthwise: the strongest random rival
            d = rival.depthwise.weight.reshape(conv.in_channels, ours.depth_multiplier, -1)
            pw = rival.pointwise.weight.view(conv.out_channels, -1)
            og, cg, r = out_per_group, 2, ours.depth_multiplier
            for g in range(groups):
                for c_local in range(cg):
                    target = conv.weight[g * og : (g + 1) * og, c_local].reshape(og, -1)
                    dc = d[g * cg + c_local]  # (r, K^d)
                    p = torch.linalg.lstsq(dc.T, target.T).solution.T  # (og, r)
                    pw[g * og : (g + 1) * og, c_local * r : (c_local + 1) * r] = p
        rivals.append(float(((reconstruct(rival) - w) ** 2).sum()))
    assert min(rivals) >= ours_err - 1e-9
    _, dropped, _ = numpy_truth(w, groups, rank)
    assert ours_err == pytest.approx(dropped, rel=1e-9, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(energy=st.floats(0.01, 1.0), seed=st.integers(0, 2**16), groups=st.sampled_from([1, 3]))
def test_energy_picks_the_smallest_sufficient_rank(energy: float, seed: int, groups: int) -> None:
    torch.manual_seed(seed)
    conv = nn.Conv2d(3 * groups, 5 * groups, 3, groups=groups, dtype=torch.float64)
    sep = decompose_conv(conv, energy=energy)
    w = conv.weight.detach().numpy()
    kept = []
    for r in range(0, 6):
        _, dropped, total = numpy_truth(w, groups, r) if r else (None, 1.0, 1.0)
        kept.append(1 - dropped / total)
    r = sep.depth_multiplier
    assert kept[r] >= energy - 1e-12
    assert r == 1 or kept[r - 1] < energy
    assert sep.decomposition.kept_energy == pytest.approx(kept[r], abs=1e-12)


def test_energy_one_is_exact_and_rank_is_clamped() -> None:
    conv = nn.Conv2d(4, 20, 3, padding=1, dtype=torch.float64)
    assert decompose_conv(conv, energy=1.0).depth_multiplier == 9
    sep = decompose_conv(conv, rank=50)
    assert sep.depth_multiplier == 9 and sep.decomposition == Decomposition(9, 9, sep.decomposition.relative_error, 1.0)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(sep(x), conv(x))


def test_zero_weight_keeps_everything() -> None:
    conv = nn.Conv2d(3, 4, 3, bias=False)
    nn.init.zeros_(conv.weight)
    sep = decompose_conv(conv, energy=0.5)
    assert sep.decomposition == Decomposition(1, 4, 0.0, 1.0)
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(sep(x), torch.zeros(1, 4, 3, 3))


def test_keeps_bias_mode_device_and_trains() -> None:
    conv = nn.Conv3d(2, 6, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), padding_mode="reflect").eval()
    sep = decompose_conv(conv, rank=2)
    assert not sep.training and sep.padding_mode == "reflect" and sep.stride == (1, 2, 2)
    assert torch.equal(sep.pointwise.bias, conv.bias.detach())
    assert sep.depthwise.weight.device == conv.weight.device
    x = torch.randn(1, 2, 3, 8, 8)
    sep(x).square().sum().backward()
    assert sep.depthwise.weight.grad is not None and sep.pointwise.weight.grad is not None


def test_frozen_weight_and_bias_stay_frozen_apart() -> None:
    for weight_grad, bias_grad in ((False, True), (True, False), (False, False)):
        conv = nn.Conv2d(4, 6, 3)
        conv.weight.requires_grad_(weight_grad)
        conv.bias.requires_grad_(bias_grad)
        sep = decompose_conv(conv, rank=2)
        flags = {name: p.requires_grad for name, p in sep.named_parameters()}
        assert flags == {"depthwise.weight": weight_grad, "pointwise.weight": weight_grad, "pointwise.bias": bias_grad}


def test_decomposes_sepconv_own_depthwise_layer_exactly() -> None:
    from sepconv import DepthwiseConv2d

    dw = DepthwiseConv2d(4, 3, stride=2, padding="same", depth_multiplier=2).double()
    sep = decompose_conv(dw, rank=2)
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(sep(x), dw(x))


class _StdConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, "rank must be an int >= 1"),
        ({"rank": -2}, ValueError, "rank must be an int >= 1"),
        ({"rank": 1.5}, TypeError, "rank must be an int"),
        ({"rank": True}, TypeError, "rank must be an int"),
        ({"energy": 0.0}, ValueError, r"energy must be in \(0, 1\]"),
        ({"energy": 1.01}, ValueError, r"energy must be in \(0, 1\]"),
        ({"energy": "0.9"}, TypeError, "energy must be a number"),
        ({"rank": 1, "energy": 0.9}, ValueError, "exactly one of rank or energy"),
        ({}, ValueError, "exactly one of rank or energy"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        decompose_conv(nn.Conv2d(2, 2, 3), **kwargs)


@pytest.mark.parametrize("module", [nn.Linear(2, 2), nn.ConvTranspose2d(2, 2, 3), _StdConv(2, 2, 3)])
def test_rejects_what_is_not_a_plain_conv(module: nn.Module) -> None:
    with pytest.raises(TypeError, match="conv"):
        decompose_conv(module, rank=1)
