"""sepconv.kernels._sizes computes what Triton's host helpers compute (without their constexpr-call overhead)."""

from __future__ import annotations

import triton
from hypothesis import given
from hypothesis import strategies as st

from sepconv.kernels._sizes import cdiv, next_power_of_2


@given(st.integers(0, 2**40), st.integers(1, 2**20))
def test_cdiv_is_tritons(x, y):
    assert cdiv(x, y) == triton.cdiv(x, y) == -(-x // y)


@given(st.integers(0, 2**40))
def test_next_power_of_2_is_tritons(n):
    got = next_power_of_2(n)
    assert got == triton.next_power_of_2(n)
    assert got == 0 if n == 0 else (got >= n and got & (got - 1) == 0 and got // 2 < n)
