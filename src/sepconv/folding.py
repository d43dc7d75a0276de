"""Folding an eval-mode BatchNorm into the conv before it: ``norm(conv(x)) == conv'(x)``.

>>> import torch
>>> from torch import nn
>>> conv, norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval()
>>> norm.running_mean.uniform_(-1, 1); norm.running_var.uniform_(0.5, 2)  # doctest: +ELLIPSIS
tensor(...)
>>> weight, bias = fold_batch_norm(conv.weight, conv.bias, norm)
>>> x = torch.randn(2, 3, 8, 8)
>>> torch.allclose(torch.nn.functional.conv2d(x, weight, bias), norm(conv(x)), atol=1e-5)
True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sepconv._dtypes import accumulation_dtype, cast

__all__ = ["fold_batch_norm", "fold_statistics", "foldable_norm"]


_BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def foldable_norm(module: nn.Module, channels: int, dims: int = 2) -> bool:
    """An eval-mode ``BatchNorm2d`` (``BatchNorm1d``, ``BatchNorm3d`` for ``dims`` 1, 3) over ``channels`` with
    running statistics: a per-channel affine map. Subclasses with a forward of their own (timm's ``BatchNormAct2d``
    also applies an activation) are not."""
    norm = _BATCH_NORMS[dims]
    return (
        isinstance(module, norm)
        and type(module).forward is norm.forward
        and not module.training
        and module.track_running_stats
        and module.running_mean is not None
        and module.num_features == channels
    )


def fold_batch_norm(weight: Tensor, bias: Tensor | None, norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``norm ∘ conv`` as one conv, differentiable in every parameter.

    Computed in at least float32 (float64 stays float64), returned in ``weight``'s dtype.
    """
    return fold_statistics(weight, bias, norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)


def fold_statistics(
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    eps: float,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``F.batch_norm(conv(x), mean, var, norm_weight, norm_bias, eps=eps)`` (the statistics
    given: running ones, or a batch's) as one conv, differentiable in all of them. Computed in at least float32
    and in ``dtype``'s precision, returned in ``dtype`` (default: ``weight``'s)."""
    dtype = weight.dtype if dtype is None else dtype
    compute = accumulation_dtype(weight.dtype, dtype)
    scale = (cast(var, compute) + eps).rsqrt()  # out of place throughout: differentiable in every input
    if norm_weight is not None:
        scale = scale * cast(norm_weight, compute)
    if norm_bias is None:
        shift = -(cast(mean, compute) * scale)
    else:
        shift = torch.addcmul(cast(norm_bias, compute), cast(mean, compute), scale, value=-1)
    if bias is not None:
        shift = torch.addcmul(shift, cast(bias, compute), scale)
    folded = cast(weight, compute) * scale.view(-1, *([1] * (weight.dim() - 1)))
    return cast(folded, dtype), cast(shift, dtype)
