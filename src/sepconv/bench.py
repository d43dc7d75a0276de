"""Latency measurement: the median of repeated calls, on CPU or CUDA (synchronized).

>>> import torch
>>> t = median_latency(lambda: torch.ones(8) + 1, min_run_time=0.01)
>>> t.median_ms > 0 and t.runs >= 5
True
>>> calls = {"add": lambda: torch.ones(8) + 1, "mul": lambda: torch.ones(8) * 2}
>>> both = interleaved_latencies(calls, min_run_time=0.01)
>>> sorted(both), all(t.runs >= 3 for t in both.values())
(['add', 'mul'], True)
>>> paired = interleaved_latencies(calls, min_run_time=0.01, paired=True)
>>> paired["add"].runs == paired["mul"].runs and paired_ratio(paired["add"], paired["mul"]) > 0
True
"""

from __future__ import annotations

import math
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "Timing",
    "device_name",
    "interleaved_latencies",
    "median_interval",
    "median_latency",
    "paired_ratio",
    "paired_ratio_interval",
    "peak_memory_bytes",
    "versions",
]


@dataclass(frozen=True)
class Timing:
    """Median and interquartile range of one call, in milliseconds, over ``runs`` timed calls; ``samples_ms``:
    every timed call, in order; ``paired``: one per round of ``interleaved_latencies(..., paired=True)``, sample
    ``i`` taken in the same round as sample ``i`` of every other paired timing of that call."""

    median_ms: float
    iqr_ms: float
    runs: int
    samples_ms: tuple[float, ...] = field(default=(), repr=False)
    paired: bool = False


def median_latency(
    fn: Callable[[], object],
    *,
    min_run_time: float = 0.2,
    warmup: int = 3,
    min_runs: int = 5,
    max_runs: int = 10_000,
) -> Timing:
    """Time ``fn()`` after ``warmup`` calls: at least ``min_runs`` calls and ``min_run_time`` seconds.

    Each call is timed on its own (CUDA synchronized before and after), so the median is robust
    to the odd slow call; the warm-up absorbs allocator, oneDNN/cuDNN algorithm choice and lazy init.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + min_run_time
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < max_runs):
        times.append(_seconds(fn))
    return _timing(times)


def interleaved_latencies(
    fns: Mapping[str, Callable[[], object]],
    *,
    min_run_time: float = 0.2,
    warmup: int = 1,
    min_runs: int = 3,
    max_runs: int = 10_000,
    slow_call_s: float | None = None,
    paired: bool = False,
    alone_over: float | None = None,
    min_rounds: int | None = None,
) -> dict[str, Timing]:
    """Time several functions side by side: :func:`median_latency` for each, in interleaved rounds.

    Each round calls every function that still needs samples once (at least ``min_runs`` calls and
    ``min_run_time`` seconds of its own calls), in an order shuffled anew each round (seeded: reproducible),
    so that drift of the machine and the state one call leaves behind (the allocator's pool: which freed
    blocks the next call reuses) hit all alike: with a fixed or alternating (ABBA) order the functions at the
    ends run twice in a row at every turn and each function always follows the same neighbours. A function
    whose last warm-up call took over ``slow_call_s`` seconds is timed once more on its own (``runs=1``) and
    left out of the rounds.

    ``paired``: every function runs in every round, until the rounds add up to ``min_run_time`` seconds per
    function (and ``min_runs`` rounds), so that sample ``i`` of each was taken in the same round: compare two
    with :func:`paired_ratio`, which a burst of load hitting some rounds moves far less than a ratio of medians.
    ``alone_over`` (paired): a function whose fastest warm-up call took over ``alone_over`` times the median
    function's is timed after the rounds, on its own (unpaired, as without ``paired``): one call of it would take
    most of each round's share of the time, leaving the others a few rounds (a 31x31 depthwise conv in NCHW,
    seconds per call, beside milliseconds). ``min_rounds`` (paired): at least this many rounds (default
    ``min_runs``, which still counts the calls of a function timed on its own): a median over three rounds is
    one round's ratio, moved by whatever load hit it.
    """
    once: dict[str, Timing] = {}
    samples: dict[str, list[float]] = {}
    warm: dict[str, float] = {}
    for name, fn in fns.items():
        warm_up = [_seconds(fn) for _ in range(warmup)] or [0.0]
        if slow_call_s is not None and warm_up[-1] > slow_call_s:
            once[name] = _timing([_seconds(fn)])
        else:
            samples[name], warm[name] = [], min(warm_up)
    alone = []
    if paired and alone_over is not None and warm:
        typical = statistics.median(warm.values())
        alone = [name for name, seconds in warm.items() if seconds > alone_over * typical]
        for name in alone:
            del samples[name]
    order = random.Random(0)
    budget = min_run_time * len(samples)  # paired: the time the rounds take, together

    def needs_more(times: list[float]) -> bool:  # an unpaired function's own calls
        return len(times) < max_runs and (len(times) < min_runs or sum(times) < min_run_time)

    while pending := (
        _round_pending(samples, min_runs if min_rounds is None else min_rounds, max_runs, budget)
        if paired
        else [name for name, times in samples.items() if needs_more(times)]
    ):
        order.shuffle(pending)
        for name in pending:
            samples[name].append(_seconds(fns[name]))
    for name in alone:
        times: list[float] = []
        while needs_more(times):
            times.append(_seconds(fns[name]))
        once[name] = _timing(times)
    return {name: once[name] if name in once else _timing(samples[name], paired=paired) for name in fns}


def _round_pending(samples: dict[str, list[float]], min_runs: int, max_runs: int, budget: float) -> list[str]:
    """All of ``samples``' functions while paired rounds must go on, else none."""
    rounds = len(next(iter(samples.values()), []))
    spent = sum(sum(times) for times in samples.values())
    return list(samples) if rounds < max_runs and (rounds < min_runs or spent < budget) else []


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """The median over rounds of ``numerator``'s call time over ``denominator``'s in the same round (both from one
    ``interleaved_latencies(..., paired=True)``); the ratio of their medians where their samples do not pair up
    (a function timed outside the rounds).

    >>> ours = Timing(1.0, 0.0, 3, (0.5, 1.0, 3.0), paired=True)
    >>> paired_ratio(Timing(2.0, 0.0, 3, (1.0, 2.0, 9.0), paired=True), ours)  # per round: 2, 2, 3
    2.0
    >>> paired_ratio(Timing(5.0, 0.0, 3, (5.0, 6.0, 3.0)), ours)  # timed on its own: 5 / 1, not the median of 10, 6, 1
    5.0
    """
    ratios = _per_round_ratios(numerator, denominator)
    return numerator.median_ms / denominator.median_ms if ratios is None else statistics.median(ratios)


def _per_round_ratios(numerator: Timing, denominator: Timing) -> list[float] | None:
    """``numerator``'s call time over ``denominator``'s, round by round; None where their samples do not pair."""
    if not (numerator.paired and denominator.paired and len(numerator.samples_ms) == len(denominator.samples_ms) > 1):
        return None
    return [a / b for a, b in zip(numerator.samples_ms, denominator.samples_ms, strict=True)]


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of the population ``values`` were drawn from
    (independently): the order statistics ``x(k)`` and ``x(n + 1 - k)`` of the sorted values, ``k`` the largest
    rank with ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2``, so it covers the median at least ``confidence``
    of the time whatever the distribution. With too few values for any such rank (5 or fewer at 0.95) it is
    ``(-inf, inf)``: they cannot bound the median at that confidence.

    >>> median_interval([0.9, 1.0, 1.1, 0.95, 1.05, 0.98, 1.02])  # n = 7: min and max cover it 98.4% of the time
    (0.9, 1.1)
    >>> median_interval([1.0, 2.0, 3.0])
    (-inf, inf)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    ordered, tail = sorted(values), (1 - confidence) / 2
    n, k, below = len(ordered), 0, 0.0  # below: P(Binomial(n, 1/2) <= k - 1)
    while k < n // 2 and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    return (-math.inf, math.inf) if k == 0 else (ordered[k - 1], ordered[n - k])


def paired_ratio_interval(
    numerator: Timing, denominator: Timing, confidence: float = 0.95
) -> tuple[float, float] | None:
    """:func:`median_interval` of the per-round ratios whose median :func:`paired_ratio` reports: how far the
    rounds leave that ratio in doubt (rounds taken as independent draws). ``None`` where the samples do not pair.

    >>> ours = Timing(1.0, 0.0, 7, (1.0,) * 7, paired=True)
    >>> paired_ratio_interval(Timing(2.0, 0.0, 7, (1.8, 1.9, 2.0, 2.0, 2.1, 2.2, 2.3), paired=True), ours)
    (1.8, 2.3)
    """
    ratios = _per_round_ratios(numerator, denominator)
    return None if ratios is None else median_interval(ratios, confidence)


def _seconds(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn()`` takes (CUDA synchronized before and after when in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def _timing(times: list[float], paired: bool = False) -> Timing:
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    samples = tuple(t * 1e3 for t in times)
    return Timing(statistics.median(times) * 1e3, (quartiles[2] - quartiles[0]) * 1e3, len(times), samples, paired)


def device_name(device: torch.device | str = "cpu") -> str:
    """A human name for the device results were measured on (CPU model or GPU name)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def allocator_name() -> str:
    """The CPU allocator regime results were measured in, to store beside them: ``"glibc default"`` or
    ``"sepconv.keep_freed_memory()"``, with ``", huge pages"`` where PyTorch's large tensors get them
    (:func:`sepconv.huge_pages_in_use`)."""
    from sepconv import cpu_allocator

    name = "sepconv.keep_freed_memory()" if cpu_allocator.freed_memory_kept() else "glibc default"
    return name + ", huge pages" if cpu_allocator.huge_pages_in_use() else name


def versions() -> dict[str, str]:
    """Library versions to store beside every benchmark result."""
    import sepconv

    found = {"python": platform.python_version(), "torch": torch.__version__, "sepconv": sepconv.__version__}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        pass
    return found


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
