"""Timing of candidate steps for the CPU strategy's decisions: interleaved rounds, warm-up, early exits.

Each round runs every step still in the running once (ABBA order for two, shuffled for more), so that drift and
the allocator's state hit all alike; a step far behind drops out, and slow or clearly ranked steps are timed
less. Returns median seconds per step.

>>> times = time_candidates({"sum": lambda: sum(range(1000)), "nothing": lambda: None})
>>> sorted(times), times["nothing"] < times["sum"]
(['nothing', 'sum'], True)
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from collections.abc import Callable

__all__ = ["note_measurement", "time_candidates"]

WARMUP_ROUNDS = 2
TIMED_RUNS = 5
# Fast steps get more timed rounds, until each one's timed calls add up to MIN_TIMED_S (at most MAX_TIMED_RUNS):
# five calls of a 0.3 ms batch-1 layer were too few to tell plans 1.6x apart reliably on this VM; 20 ms of
# calls let batch-1 training steps of ~2 ms flip between plans 1.4x apart from one decision to the next.
MIN_TIMED_S = 0.05
MAX_TIMED_RUNS = 50
# Two plans whose medians are within CLOSE of each other get timed rounds up to CLOSE_RUNS (budget allowing):
# a CL caller's (576, 14, 96) batch 32 training step decided chunks at 19.4 vs 22.4 ms in five rounds, and
# then ran 24.5 ms against 18.8 ms as given.
CLOSE = 1.25
CLOSE_RUNS = 15
CLEAR_WIN = 3.0
SLOW_STEP_S = 0.2
# What a step's first call may cost once on top of its steady time (oneDNN building its kernels, fresh pages):
# a training step of 20 ms measured 0.3 s in its first warm-up round, which dropped channels_last at once.
FIRST_CALL_S = 1.0
TIME_BUDGET_S = 3.0
MIN_TIMED_RUNS = 3

_nested_measurements = 0  # measurements made so far; a timed step that made one paid a one-time cost


def note_measurement() -> None:
    """Count a decision measured inside a timed step: that step's round held a one-time cost."""
    global _nested_measurements
    _nested_measurements += 1


def time_candidates(
    steps: dict[str, Callable[[], object]],
    timed_rounds: int | None = None,
) -> dict[str, float]:
    """Median seconds of each step after warm-up rounds; rounds interleave the steps (ABBA for two, shuffled
    for more). A step more than ``CLEAR_WIN`` times slower than the fastest drops out with its time so far,
    and timing stops when one step is left — already in a warm-up round when a step takes over
    ``SLOW_STEP_S`` and the gap exceeds what first-call costs can explain, ``FIRST_CALL_S`` (a second per
    call for PyTorch's 31x31 weight gradient), unless the step measured a decision of its own, such as a
    depthwise conv's backward: such a round does not count. Slow steps are timed less: one clean warm-up
    round is enough when every step takes over ``SLOW_STEP_S``, and after ``TIME_BUDGET_S`` seconds timing
    stops at ``MIN_TIMED_RUNS`` timed rounds (a batch-32 training step of (384, 28, 1536) 7x7, three plans at
    ~0.6 s each: the first call 21 -> 17 s); fast steps get more than ``TIMED_RUNS`` rounds, until each
    one's timed calls add up to ``MIN_TIMED_S``, and up to ``CLOSE_RUNS`` while the two fastest are within
    ``CLOSE`` of each other. ``timed_rounds`` caps the timed rounds below ``TIMED_RUNS``."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    results: dict[str, float] = {}  # the times of steps out of the running: more than CLEAR_WIN x the fastest
    running = list(steps)
    shuffles = random.Random(0)
    cap = MAX_TIMED_RUNS if timed_rounds is None else min(timed_rounds, TIMED_RUNS)
    warm_up_left, timed_rounds, started = WARMUP_ROUNDS, 0, time.perf_counter()
    for round_ in itertools.count():
        if len(running) == 2:  # ABBA: no step always goes first
            order = running if round_ % 2 == 0 else running[::-1]
        else:  # ABBA would run the ends twice in a row and the middle always between the same two
            order = shuffles.sample(running, len(running))
        warming_up = warm_up_left > 0
        this_round: dict[str, float] = {}
        measurements_before = _nested_measurements
        for name in order:
            start = time.perf_counter()
            steps[name]()
            this_round[name] = time.perf_counter() - start
            if not warming_up:  # warm-up rounds grow the allocator's pool and caches
                samples[name].append(this_round[name])
        out_of_time = False
        if warming_up:
            warm_up_left -= 1
            if _nested_measurements != measurements_before or max(this_round.values()) <= SLOW_STEP_S:
                continue
            if min(this_round.values()) > SLOW_STEP_S:
                warm_up_left = 0
            current = this_round
        else:
            timed_rounds += 1
            current = {name: statistics.median(samples[name]) for name in running}
            fastest, second = sorted(current.values())[:2] if len(current) > 1 else (0.0, math.inf)
            enough = (
                timed_rounds >= TIMED_RUNS
                and all(sum(samples[name]) >= MIN_TIMED_S for name in running)
                and (timed_rounds >= CLOSE_RUNS or second > CLOSE * fastest)
            )
            out_of_time = (
                enough
                or timed_rounds >= cap
                or (timed_rounds >= MIN_TIMED_RUNS and time.perf_counter() - started > TIME_BUDGET_S)
            )
        fastest = min(current.values())
        # a warm-up round's times hold one-time costs: only a gap they cannot explain counts there
        behind = max(CLEAR_WIN * fastest, fastest + FIRST_CALL_S) if warming_up else CLEAR_WIN * fastest
        for name in [name for name in running if current[name] > behind]:
            results[name] = current[name]
            running.remove(name)
        if len(running) == 1 or out_of_time:
            return {**results, **{name: current[name] for name in running}}
    raise AssertionError("unreachable")  # pragma: no cover
