"""sepconv.cpu_timing: the strategy's timings — interleaved rounds, warm-up, early exits, round caps — on steps
whose work is a known duration, their counted calls the truth. The durations pass on a virtual clock (the
module's ``time.perf_counter``), not in real sleeps: a loaded machine's sleeps overshoot by milliseconds, which
decided close calls at random."""

from __future__ import annotations

import types

import pytest

from sepconv import cpu_timing

_now = [0.0]


def sleep(seconds: float) -> None:
    """Let ``seconds`` pass on the virtual clock ``cpu_timing`` reads."""
    _now[0] += seconds


@pytest.fixture(autouse=True)
def virtual_clock(monkeypatch):
    monkeypatch.setattr(cpu_timing, "time", types.SimpleNamespace(perf_counter=lambda: _now[0]))


def sleeping_steps(seconds: float, *names: str) -> tuple[dict[str, int], dict[str, object]]:
    """Steps that sleep ``seconds`` per call, and the count of their calls."""
    calls = dict.fromkeys(names, 0)

    def step(name: str):
        def run() -> None:
            calls[name] += 1
            sleep(seconds)

        return run

    return calls, {name: step(name) for name in names}


def test_fast_steps_get_more_rounds_until_their_calls_add_up() -> None:
    calls, steps = sleeping_steps(0.001, "a", "b")
    times = cpu_timing.time_candidates(steps)
    timed = calls["a"] - cpu_timing.WARMUP_ROUNDS
    assert calls["a"] == calls["b"]
    assert cpu_timing.TIMED_RUNS < timed <= cpu_timing.MAX_TIMED_RUNS
    assert min(times.values()) >= 0.001
    # rounds stop once the calls add up (the median x rounds approximates that sum), not before
    assert timed * max(times.values()) >= 0.8 * cpu_timing.MIN_TIMED_S or timed == cpu_timing.MAX_TIMED_RUNS


def test_timed_rounds_can_be_capped() -> None:
    calls = {"a": 0, "b": 0}

    def step(name: str):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    cpu_timing.time_candidates({"a": step("a"), "b": step("b")}, timed_rounds=1)
    assert calls == {"a": cpu_timing.WARMUP_ROUNDS + 1, "b": cpu_timing.WARMUP_ROUNDS + 1}


def test_a_step_far_behind_drops_out_while_the_others_are_timed_on(monkeypatch) -> None:
    monkeypatch.setattr(cpu_timing, "MIN_TIMED_S", 0.0)  # the minimum count of timed rounds, no extra ones
    monkeypatch.setattr(cpu_timing, "CLOSE_RUNS", cpu_timing.TIMED_RUNS)
    calls = {"a": 0, "b": 0, "slow": 0}

    def step(name: str, seconds: float):
        def run() -> None:
            calls[name] += 1
            sleep(seconds)

        return run

    times = cpu_timing.time_candidates({"a": step("a", 0.005), "b": step("b", 0.005), "slow": step("slow", 0.1)})
    rounds = cpu_timing.WARMUP_ROUNDS + cpu_timing.TIMED_RUNS
    assert calls == {"a": rounds, "b": rounds, "slow": cpu_timing.WARMUP_ROUNDS + 1}
    assert times["slow"] > cpu_timing.CLEAR_WIN * max(times["a"], times["b"])


@pytest.mark.parametrize(("b_seconds", "timed"), [(0.004, "close"), (0.010, "apart")])
def test_close_steps_get_more_timed_rounds(monkeypatch, b_seconds: float, timed: str) -> None:
    """Steps within _CLOSE of each other are timed for _CLOSE_RUNS rounds (noise decides close calls), steps
    further apart for the usual TIMED_RUNS."""
    monkeypatch.setattr(cpu_timing, "MIN_TIMED_S", 0.0)
    calls = {"a": 0, "b": 0}

    def step(name: str, seconds: float):
        def run() -> None:
            calls[name] += 1
            sleep(seconds)

        return run

    cpu_timing.time_candidates({"a": step("a", 0.004), "b": step("b", b_seconds)})
    runs = cpu_timing.CLOSE_RUNS if timed == "close" else cpu_timing.TIMED_RUNS
    assert calls == {name: cpu_timing.WARMUP_ROUNDS + runs for name in calls}


def test_three_candidates_are_timed_in_shuffled_rounds(monkeypatch) -> None:
    """With three plans, ABBA would run the ends twice in a row and the middle one always between the same two
    (the benchmark showed such a position cost a layer 1.3x); shuffled rounds give every plan every place."""
    monkeypatch.setattr(cpu_timing, "CLEAR_WIN", float("inf"))  # no step drops out: every round runs
    monkeypatch.setattr(cpu_timing, "MIN_TIMED_S", 0.0)  # instant steps: no extra rounds
    monkeypatch.setattr(cpu_timing, "CLOSE_RUNS", cpu_timing.TIMED_RUNS)
    seen: list[str] = []
    cpu_timing.time_candidates({name: (lambda name=name: seen.append(name)) for name in "abc"})
    rounds = [seen[i : i + 3] for i in range(0, len(seen), 3)]
    assert len(rounds) == cpu_timing.WARMUP_ROUNDS + cpu_timing.TIMED_RUNS
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert {r[1] for r in rounds} == {"a", "b", "c"}  # no plan always in the middle


def test_slow_steps_get_one_warm_up_round_and_stop_at_the_time_budget(monkeypatch) -> None:
    monkeypatch.setattr(cpu_timing, "SLOW_STEP_S", 0.001)  # every step below is "slow"
    monkeypatch.setattr(cpu_timing, "TIME_BUDGET_S", 0.0)  # and over budget from the first timed round
    calls, steps = sleeping_steps(0.003, "a", "b")
    times = cpu_timing.time_candidates(steps)
    # one warm-up round (clean, every step slow), then the minimum of timed rounds
    assert calls == {"a": 1 + cpu_timing.MIN_TIMED_RUNS, "b": 1 + cpu_timing.MIN_TIMED_RUNS}
    assert set(times) == {"a", "b"} and min(times.values()) >= 0.003


def test_a_slow_step_far_behind_ends_the_timing_in_the_first_warm_up_round(monkeypatch) -> None:
    monkeypatch.setattr(cpu_timing, "FIRST_CALL_S", 2 * cpu_timing.SLOW_STEP_S)  # below the gap here
    calls = {"slow": 0, "fast": 0}

    def slow() -> None:
        calls["slow"] += 1
        sleep(4 * cpu_timing.SLOW_STEP_S)

    def fast() -> None:
        calls["fast"] += 1

    times = cpu_timing.time_candidates({"slow": slow, "fast": fast})
    assert calls == {"slow": 1, "fast": 1}
    assert times["slow"] > cpu_timing.CLEAR_WIN * times["fast"]


def test_a_first_call_slow_by_a_one_time_cost_does_not_end_the_timing() -> None:
    """A 20 ms training step measured 0.3 s in its first call (oneDNN building its kernels) and dropped out at
    once, though it was the faster. Here "a" is slow only in its first call, by less than ``_FIRST_CALL_S``."""
    calls = {"a": 0, "b": 0}

    def a() -> None:
        calls["a"] += 1
        sleep(2 * cpu_timing.SLOW_STEP_S if calls["a"] == 1 else 0.002)

    def b() -> None:
        calls["b"] += 1
        sleep(0.01)

    times = cpu_timing.time_candidates({"a": a, "b": b})
    assert calls["a"] > 1 and calls["b"] > 1
    assert times["a"] < times["b"]


def test_a_round_that_measured_a_nested_decision_cannot_end_the_timing() -> None:
    """A layout's first training step may time its depthwise conv's backward algorithms (seconds, once): that
    round must not decide the layout. Here "a" is slow only in its first call, which makes such a measurement."""
    calls = {"a": 0, "b": 0}

    def a() -> None:
        calls["a"] += 1
        if calls["a"] == 1:
            cpu_timing.note_measurement()
            sleep(4 * cpu_timing.SLOW_STEP_S)

    def b() -> None:
        calls["b"] += 1
        sleep(0.01)

    times = cpu_timing.time_candidates({"a": a, "b": b})
    assert calls["a"] > 1 and calls["b"] > 1
    assert times["a"] < times["b"]  # steady state: a is the fast one
