"""Weight-preserving decomposition of a trained convolution into a depthwise separable one.

For a conv weight ``W`` (O x C/g x K^d) each input channel ``c`` gives a matrix ``M_c = W[:, c]``
(O/g x K^d, within its group). A depthwise conv with multiplier ``r`` followed by a pointwise conv
computes ``sum_j P[:, c·r+j] D[c·r+j]``: a rank-``r`` factorisation of every ``M_c``. The best one
(Eckart–Young) comes from the SVD ``M_c = U S Vᵀ``: ``D = top-r rows of Vᵀ``, ``P = U_r S_r``, and the
squared error is the sum of the dropped ``σ²``. It is exact when ``r >= min(O/g, K^d)``
(Network Decoupling, Guo et al., BMVC 2018, per-input-channel form).

>>> import torch
>>> from torch import nn
>>> conv = nn.Conv2d(8, 16, 3, padding=1)
>>> sep = decompose_conv(conv, rank=9)  # 9 = K² = the maximal rank: exact
>>> x = torch.randn(1, 8, 10, 10)
>>> torch.allclose(sep(x), conv(x), atol=1e-5), sep.decomposition.relative_error < 1e-6
(True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sepconv.layers import (
    SeparableConv1d,
    SeparableConv2d,
    SeparableConv3d,
    _DepthwiseConv,
    _PointwiseConv,
    _SeparableConv,
)

__all__ = ["Decomposition", "decompose_conv"]

_SEPARABLE: dict[int, type[_SeparableConv]] = {1: SeparableConv1d, 2: SeparableConv2d, 3: SeparableConv3d}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Decomposition:
    """How well a separable layer fits the conv it came from (attached as ``layer.decomposition``).

    ``rank`` is the depth multiplier used; ``max_rank = min(O/groups, K^d)`` is the rank at which the fit
    is exact; ``relative_error = ||W - Ŵ||_F / ||W||_F``; ``kept_energy`` is the share of the squared
    singular values kept (``1 - relative_error²``; 1.0 for an all-zero weight).
    """

    rank: int
    max_rank: int
    relative_error: float
    kept_energy: float


@dataclass(frozen=True)
class ChannelSVD:
    """The SVD of every input channel's slice, in float64: ``U`` (g, C/g, O/g, k), ``S`` (g, C/g, k),
    ``Vh`` (g, C/g, k, K^d), with ``k = min(O/g, K^d)``. ``S`` is sorted descending along its last dim."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    @property
    def max_rank(self) -> int:
        return int(self.S.shape[-1])

    def dropped_energy(self) -> Tensor:
        """``dropped[r]`` = sum of the squared singular values left out at rank ``r`` (r = 0..max_rank)."""
        per_rank = (self.S**2).sum(dim=(0, 1))  # σ_j² summed over channels, for each j
        tail = per_rank.flip(0).cumsum(0).flip(0)  # tail[j] = sum_{i >= j}
        return torch.cat([tail, tail.new_zeros(1)])


def check_conv(conv: object, name: str = "conv") -> nn.modules.conv._ConvNd:
    """``conv`` if it is a plain ``nn.Conv1d/2d/3d`` (or a sepconv depthwise/pointwise layer), else TypeError.

    Subclasses that override ``forward`` (weight standardisation, dynamic padding, ...) compute
    something else than ``F.convNd`` with their weight, so their decomposition would be wrong.
    """
    if not isinstance(conv, _CONV_TYPES):
        raise TypeError(f"{name} must be an nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(conv).__name__}")
    base = next(t for t in _CONV_TYPES if isinstance(conv, t))
    own = isinstance(conv, (_DepthwiseConv, _PointwiseConv))
    if not own and (type(conv).forward is not base.forward or type(conv)._conv_forward is not base._conv_forward):
        raise TypeError(f"{name} is a {type(conv).__name__} with its own forward; only plain convolutions decompose")
    return conv


def channel_svd(conv: nn.modules.conv._ConvNd) -> ChannelSVD:
    """The float64 SVD of each input channel's O/g x K^d slice of ``conv.weight``.

    >>> svd = channel_svd(nn.Conv1d(4, 6, 5, groups=2))
    >>> tuple(svd.U.shape), tuple(svd.S.shape), tuple(svd.Vh.shape)
    ((2, 2, 3, 3), (2, 2, 3), (2, 2, 3, 5))
    """
    w = conv.weight.detach().to(torch.float64)
    g, out_channels, in_per_group = conv.groups, w.shape[0], w.shape[1]
    k = math.prod(w.shape[2:])
    # (O, C/g, K^d) -> (g, O/g, C/g, K^d) -> (g, C/g, O/g, K^d): one O/g x K^d matrix per input channel
    slices = w.reshape(g, out_channels // g, in_per_group, k).permute(0, 2, 1, 3)
    U, S, Vh = torch.linalg.svd(slices, full_matrices=False)
    return ChannelSVD(U, S, Vh)


def rank_for_energy(svd: ChannelSVD, energy: float) -> int:
    """The smallest rank whose kept share of squared singular values (summed over channels) is >= ``energy``."""
    dropped = svd.dropped_energy()
    total = float(dropped[0])
    if total == 0.0:
        return 1
    kept = 1.0 - dropped / total
    # A tiny tolerance so that energy=1.0 accepts the full rank despite float rounding.
    ok = torch.nonzero(kept >= energy - 1e-12).flatten()
    return max(1, int(ok[0])) if len(ok) else svd.max_rank


def check_rank(rank: object, name: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{name} must be an int >= 1, got {rank!r} ({type(rank).__name__})")
    if rank < 1:
        raise ValueError(f"{name} must be an int >= 1, got {rank}")
    return rank


def check_energy(energy: object) -> float:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)):
        raise TypeError(f"energy must be a number in (0, 1], got {energy!r} ({type(energy).__name__})")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    return float(energy)


def build_separable(conv: nn.modules.conv._ConvNd, svd: ChannelSVD, rank: int) -> _SeparableConv:
    """The separable layer holding the rank-``rank`` SVD fit of ``conv`` (``rank`` clamped to ``max_rank``)."""
    rank = min(rank, svd.max_rank)
    layer = empty_separable(conv, rank)
    g, cg = svd.S.shape[:2]
    depthwise = svd.Vh[..., :rank, :].reshape(g * cg * rank, 1, *conv.kernel_size)  # row c·r + j = Vh_c[j]
    us = svd.U[..., :rank] * svd.S[..., None, :rank]  # (g, C/g, O/g, r)
    pointwise = us.permute(0, 2, 1, 3).reshape(conv.out_channels, cg * rank)  # [group·O/g + o, c·r + j]
    ones = (1,) * len(conv.kernel_size)
    with torch.no_grad():
        layer.depthwise.weight.copy_(depthwise)
        layer.pointwise.weight.copy_(pointwise.reshape(conv.out_channels, cg * rank, *ones))
        if conv.bias is not None:
            layer.pointwise.bias.copy_(conv.bias)
    dropped = svd.dropped_energy()
    total = float(dropped[0])
    kept = 1.0 if total == 0.0 else 1.0 - float(dropped[rank]) / total
    error = 0.0 if total == 0.0 else math.sqrt(float(dropped[rank]) / total)
    layer.decomposition = Decomposition(rank, svd.max_rank, error, kept)
    return layer


def empty_separable(
    conv: nn.modules.conv._ConvNd, rank: int, *, device: torch.device | str | None = None
) -> _SeparableConv:
    """A freshly initialised separable twin of ``conv`` with depth multiplier ``rank`` (BSConv-style init),
    on ``conv``'s device unless ``device`` is given (``"meta"`` to count costs without allocating), in its
    dtype and training mode; both weights keep ``conv.weight``'s ``requires_grad``, the bias ``conv.bias``'s
    (a frozen layer stays frozen)."""
    ndim = len(conv.kernel_size)
    layer = _SEPARABLE[ndim](
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
        depth_multiplier=rank,
        device=conv.weight.device if device is None else device,
        dtype=conv.weight.dtype,
    )
    layer.depthwise.weight.requires_grad_(conv.weight.requires_grad)
    layer.pointwise.weight.requires_grad_(conv.weight.requires_grad)
    if conv.bias is not None:
        layer.pointwise.bias.requires_grad_(conv.bias.requires_grad)
    return layer.train(conv.training)


def decompose_conv(conv: nn.Module, *, rank: int | None = None, energy: float | None = None) -> _SeparableConv:
    """The depthwise separable layer closest to ``conv`` (best rank-``rank`` fit per input channel, by SVD).

    Give exactly one of ``rank`` (the depth multiplier, an int >= 1; values above
    ``min(O/groups, K^d)`` are clamped to it, where the fit is exact) or ``energy`` in (0, 1] (the smallest
    rank keeping that share of the squared singular values of all channels together). Stride, padding,
    dilation and padding_mode go on the depthwise part, the bias and ``groups`` on the pointwise part.
    The SVD runs in float64; the weights are cast back to ``conv``'s dtype and device. The fit's quality
    is in ``layer.decomposition`` (:class:`Decomposition`).

    >>> conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2)
    >>> sep = decompose_conv(conv, energy=0.9)
    >>> sep.depthwise.weight.shape[0] == 16 * sep.decomposition.rank, sep.decomposition.kept_energy >= 0.9
    (True, True)
    """
    check_conv(conv)
    if (rank is None) == (energy is None):
        raise ValueError(f"give exactly one of rank or energy, got rank={rank!r}, energy={energy!r}")
    svd = channel_svd(conv)
    chosen = check_rank(rank) if rank is not None else rank_for_energy(svd, check_energy(energy))
    return build_separable(conv, svd, chosen)
