"""dtype helpers for per-call paths, without dispatcher calls: ``torch.promote_types`` and a ``Tensor.to`` that
changes nothing are operators too (``aten::promote_types``, ``aten::to``), about a microsecond of host time each,
tens of them per call of a fused op (``benchmarks/block_host_path.py`` counts them).

>>> import torch
>>> accumulation_dtype(torch.bfloat16), accumulation_dtype(torch.float32, torch.float64)
(torch.float32, torch.float64)
>>> t = torch.ones(2)
>>> cast(t, torch.float32) is t, cast(t, torch.float64).dtype, cast(None, torch.float64)
(True, torch.float64, None)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "cast"]


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any of ``dtypes`` is, else float32: ``torch.promote_types`` of them and float32, for the
    floating-point dtypes our kernels take."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t.to(dtype)``, or ``t`` itself (no operator call) where it has that dtype already; None stays None."""
    return t if t is None or t.dtype == dtype else t.to(dtype)
