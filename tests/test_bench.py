"""sepconv.bench's timers: what they call, in which order, and that medians bound the work timed."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable

import pytest

from sepconv.bench import (
    Timing,
    interleaved_latencies,
    median_interval,
    median_latency,
    paired_ratio,
    paired_ratio_interval,
)


def test_interleaved_rounds_call_each_function_once_in_changing_orders():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    timings = interleaved_latencies(fns, min_run_time=0.0, warmup=1, min_runs=12)
    assert calls[:4] == list("abcd")  # one warm-up call each
    rounds = [calls[i : i + 4] for i in range(4, len(calls), 4)]
    assert len(rounds) == 12 and all(sorted(r) == list("abcd") for r in rounds)
    assert {r[0] for r in rounds} == set("abcd")  # no function always goes first
    follows_a = {r[r.index("a") + 1] for r in rounds if r[-1] != "a"}
    assert len(follows_a) > 1  # nor always after the same one
    assert [t.runs for t in timings.values()] == [12] * 4
    again: list[str] = []
    interleaved_latencies({n: (lambda n=n: again.append(n)) for n in "abcd"}, min_run_time=0.0, min_runs=12)
    assert again == calls  # the shuffles are seeded: the same order every run


def slow_and_fast(calls: list[str]) -> dict[str, Callable[[], None]]:
    """A function that sleeps 4 ms and one that returns at once, each noting its calls in ``calls``."""

    def slow() -> None:
        calls.append("slow")
        time.sleep(0.004)

    return {"slow": slow, "fast": lambda: calls.append("fast")}


def test_interleaved_rounds_go_on_for_the_functions_that_need_more_time():
    calls: list[str] = []
    timings = interleaved_latencies(slow_and_fast(calls), min_run_time=0.01, warmup=0, min_runs=2, max_runs=50)
    # slow has its 0.01 s after 3 sleeps of >= 4 ms (2 if they overshoot); fast's calls add up to far less,
    # so it goes on alone, up to max_runs
    slow_runs = timings["slow"].runs
    assert 2 <= slow_runs <= 3 and calls.count("slow") == slow_runs
    assert timings["fast"].runs == calls.count("fast") == 50
    assert all(sorted(calls[2 * i : 2 * i + 2]) == ["fast", "slow"] for i in range(slow_runs))  # together
    assert timings["slow"].median_ms >= 4.0  # a sleep lasts at least as long as asked


def test_a_slow_call_is_timed_once_outside_the_rounds():
    calls: list[str] = []

    def slow() -> None:
        calls.append("slow")
        time.sleep(0.003)

    timings = interleaved_latencies(
        {"slow": slow, "fast": lambda: calls.append("fast")}, min_run_time=0.0, warmup=1, min_runs=4, slow_call_s=0.002
    )
    assert timings["slow"].runs == 1 and timings["slow"].median_ms >= 3.0
    assert calls.count("slow") == 2  # the warm-up call, then the one timed
    assert timings["fast"].runs == 4


def test_median_latency_medians_bound_the_sleep():
    timing = median_latency(lambda: time.sleep(0.002), min_run_time=0.0, warmup=1, min_runs=5)
    assert timing.runs == 5 and timing.median_ms >= 2.0 and timing.iqr_ms >= 0.0


def test_paired_rounds_run_every_function_in_every_round_until_the_rounds_add_up():
    calls: list[str] = []
    timings = interleaved_latencies(
        slow_and_fast(calls), min_run_time=0.01, warmup=0, min_runs=2, max_runs=50, paired=True
    )
    rounds = timings["slow"].runs
    # 0.02 s for the two together: 5 sleeps of >= 4 ms (fewer if they overshoot), and fast goes no further
    assert 2 <= rounds <= 5 and timings["fast"].runs == rounds and len(calls) == 2 * rounds
    assert all(sorted(calls[2 * i : 2 * i + 2]) == ["fast", "slow"] for i in range(rounds))
    assert len(timings["slow"].samples_ms) == rounds and min(timings["slow"].samples_ms) >= 4.0


def test_a_paired_ratio_is_the_median_of_per_round_ratios():
    """A burst of load slows whole rounds: per-round ratios cancel it where a ratio of medians does not."""
    ours_samples = (1.0, 1.0, 1.0, 3.0, 3.0)  # the last two rounds under load
    baseline_samples = (1.2, 1.2, 3.6, 3.6, 3.6)  # 1.2x ours in each round, but for the third: loaded alone
    ours = Timing(statistics.median(ours_samples), 0.0, 5, ours_samples, paired=True)
    baseline = Timing(statistics.median(baseline_samples), 0.0, 5, baseline_samples, paired=True)
    assert paired_ratio(baseline, ours) == statistics.median([1.2, 1.2, 3.6, 1.2, 1.2]) == 1.2
    assert baseline.median_ms / ours.median_ms == 3.6
    # a call timed once outside the rounds has no partner per round: the ratio of the medians
    once = Timing(5.0, 0.0, 1, (5.0,))
    assert paired_ratio(once, ours) == 5.0
    # nor has one timed on its own, even with as many samples as there were rounds
    alone = Timing(3.6, 0.0, 5, baseline_samples)
    assert paired_ratio(alone, ours) == 3.6


def test_a_function_far_slower_than_the_others_is_timed_after_the_rounds_on_its_own():
    """alone_over: the slow one would take most of the rounds' time; the others get the rounds to themselves."""
    calls: list[str] = []
    fns = slow_and_fast(calls)
    fns["fast_too"] = lambda: calls.append("fast_too")
    timings = interleaved_latencies(
        fns, min_run_time=0.01, warmup=1, min_runs=3, max_runs=40, paired=True, alone_over=10
    )
    timed = calls[3:]  # after one warm-up call each
    slow_from = timed.index("slow")
    assert set(timed[slow_from:]) == {"slow"}  # after the rounds, by itself
    rounds = [timed[i : i + 2] for i in range(0, slow_from, 2)]
    assert rounds and all(sorted(r) == ["fast", "fast_too"] for r in rounds)
    # the fast ones' rounds: 0.02 s of their own calls, far beyond 40 rounds; the slow one: 0.01 s of 4 ms sleeps
    assert timings["fast"].runs == timings["fast_too"].runs == len(rounds) == 40
    assert timings["slow"].runs == 3 and timings["slow"].median_ms >= 4.0
    assert timings["fast"].paired and timings["fast_too"].paired and not timings["slow"].paired
    # without alone_over the slow one shares every round: far fewer
    calls.clear()
    shared = interleaved_latencies(fns, min_run_time=0.01, warmup=1, min_runs=3, max_runs=40, paired=True)
    assert shared["slow"].runs == shared["fast"].runs <= 8 and shared["slow"].paired
    # min_rounds: more rounds for the paired ones, min_runs calls for the one timed alone (its 3 take 0.012 s)
    calls.clear()
    more = interleaved_latencies(
        fns,
        min_run_time=0.0,
        warmup=1,
        min_runs=3,
        paired=True,
        alone_over=10,
        min_rounds=9,
    )
    assert more["fast"].runs == more["fast_too"].runs == 9 and more["slow"].runs == 3 and not more["slow"].paired
    calls.clear()
    shared = interleaved_latencies(fns, min_run_time=0.0, warmup=1, min_runs=3, paired=True, min_rounds=6)
    assert {timing.runs for timing in shared.values()} == {6}


# 95% confidence ranks (k, n + 1 - k) for the median of n values, as printed in nonparametric statistics tables
# (e.g. Conover, Practical Nonparametric Statistics, table A3; Hollander & Wolfe)
PUBLISHED_RANKS_95 = {6: (1, 6), 10: (2, 9), 20: (6, 15), 30: (10, 21), 50: (18, 33), 100: (40, 61)}


@pytest.mark.parametrize(("n", "ranks"), PUBLISHED_RANKS_95.items())
def test_median_interval_takes_the_published_order_statistics(n: int, ranks: tuple[int, int]) -> None:
    values = [float(i) for i in range(1, n + 1)]  # value i is the i-th order statistic
    random.Random(n).shuffle(values)
    assert median_interval(values) == (float(ranks[0]), float(ranks[1]))


def test_median_interval_cannot_bound_the_median_from_five_values_at_95_percent() -> None:
    # min and max of 5 cover the median with probability 1 - 2 / 2**5 = 0.9375 < 0.95
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (-math.inf, math.inf)
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0], confidence=0.9) == (1.0, 5.0)
    with pytest.raises(ValueError, match="confidence must be in"):
        median_interval([1.0, 2.0], confidence=1.0)


def test_median_interval_covers_the_true_median_as_often_as_promised() -> None:
    """A skewed distribution (exponential, median ln 2): 15 draws give ranks (4, 12), exact coverage
    1 - 2 P(Binomial(15, 1/2) <= 3) = 0.9648; 4000 seeded trials land within a few standard errors of it."""
    rng, trials = random.Random(0), 4000
    covered = sum(
        low <= math.log(2) <= high
        for low, high in (median_interval([rng.expovariate(1.0) for _ in range(15)]) for _ in range(trials))
    )
    exact = 1 - 2 * sum(math.comb(15, i) for i in range(4)) / 2**15
    assert abs(covered / trials - exact) < 4 * math.sqrt(exact * (1 - exact) / trials)


def test_a_paired_ratio_interval_is_the_median_interval_of_per_round_ratios() -> None:
    ours_samples = (1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0)
    baseline_samples = (1.1, 0.9, 2.4, 1.0, 1.3, 1.05, 0.95)  # per round: 1.1 0.9 1.2 1.0 1.3 1.05 0.95
    ours = Timing(1.0, 0.0, 7, ours_samples, paired=True)
    baseline = Timing(1.05, 0.0, 7, baseline_samples, paired=True)
    low, high = paired_ratio_interval(baseline, ours)
    assert (low, high) == (0.9, 1.3) and low <= paired_ratio(baseline, ours) == 1.05 <= high
    assert paired_ratio_interval(Timing(1.0, 0.0, 7, baseline_samples), ours) is None  # timed on its own
