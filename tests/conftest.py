import os

import pytest
from hypothesis import HealthCheck, settings

import sepconv

# CI runs a fixed set of examples (reproducible); locally hypothesis explores new ones each run.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def fresh_cpu_strategy_cache():
    """The CPU strategy's process-wide decisions cleared before and after a test."""
    sepconv.clear_cpu_strategy_cache()
    yield
    sepconv.clear_cpu_strategy_cache()


@pytest.fixture(autouse=True)
def allocator_regime_without_huge_pages(monkeypatch):
    """Every test runs in a regime without huge pages unless it says otherwise, whatever the machine's kernel does
    (decision keys of glibc's defaults end in the bare thread count), and keep_freed_memory()'s
    THP_MEM_ALLOC_ENABLE does not leak into later tests' subprocesses. The probe itself is tested in fresh
    processes (test_cpu_allocator.py)."""
    from sepconv import cpu_allocator

    monkeypatch.setattr(cpu_allocator, "_huge_pages", False)
    monkeypatch.delenv(cpu_allocator.HUGE_PAGES_ENV, raising=False)


@pytest.fixture
def glibc_stub(monkeypatch):
    """sepconv.keep_freed_memory() as in a glibc process, without changing this test process's allocator for good
    (the glibc call stubbed; the regime flag restored afterwards)."""
    from sepconv import cpu_allocator

    monkeypatch.setattr(cpu_allocator, "_kept", False)
    monkeypatch.setattr(cpu_allocator, "_set_glibc_thresholds", lambda: True)
