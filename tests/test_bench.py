"""sepconv.bench's timers: what they call, in which order, and that medians bound the work timed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from sepconv.bench import Timing, interleaved_latencies, median_latency, paired_ratio


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
