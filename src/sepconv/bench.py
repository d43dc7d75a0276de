"""Latency measurement: medians from ``torch.utils.benchmark`` on CPU or CUDA.

>>> import torch
>>> t = median_latency(lambda: torch.ones(8) + 1, min_run_time=0.01)
>>> t.median_ms > 0
True
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

# torch.utils.benchmark imports cpp_extension, which logs a CUDA_HOME warning on CPU-only machines.
_cpp_logger = logging.getLogger("torch.utils.cpp_extension")
_level = _cpp_logger.level
_cpp_logger.setLevel(logging.ERROR)
from torch.utils import benchmark  # noqa: E402

_cpp_logger.setLevel(_level)

__all__ = ["Timing", "median_latency", "peak_memory_bytes"]


@dataclass(frozen=True)
class Timing:
    """Median and interquartile range of one call, in milliseconds, over ``runs`` timed blocks."""

    median_ms: float
    iqr_ms: float
    runs: int


def median_latency(fn: Callable[[], object], *, min_run_time: float = 0.2, warmup: int = 3) -> Timing:
    """Time ``fn()`` with all intra-op threads; CUDA work is synchronized by the timer.

    ``warmup`` calls run first (allocator, cuDNN/oneDNN algorithm choice, lazy init).
    """
    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(median_ms=measurement.median * 1e3, iqr_ms=measurement.iqr * 1e3, runs=len(measurement.times))


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak memory allocated by one call of ``fn()`` above what was allocated before, on a CUDA device.

    On CPU PyTorch keeps no allocator statistics, so this returns ``None`` (reported as "n/a"):
    an estimate would be a different quantity, and ``sepconv.analyze`` already reports the bytes
    every layer writes (``activation_bytes``).

    >>> peak_memory_bytes(lambda: torch.ones(8), "cpu") is None
    True
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
