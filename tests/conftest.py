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
