"""Compiled layout conversions (sepconv.cpu_conversions) against ATen's copies: equal values and strides, used
only where they apply, a failing compile falls back with one warning, and layers give the same float64 results."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import sepconv
from sepconv import cpu_conversions, cpu_strategy

CL, CL3D, NCHW = torch.channels_last, torch.channels_last_3d, torch.contiguous_format


@pytest.fixture
def compiled_calls(monkeypatch) -> list[str]:
    """Compiled conversions on for the test (restored after it); the list of the compiled functions' calls."""
    calls: list[str] = []
    real_compile = cpu_conversions._compile

    def counting_compile(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        compiled = real_compile(fn)

        def call(*args: torch.Tensor) -> torch.Tensor:
            calls.append("call")
            return compiled(*args)

        return call

    switch_on_compiling_with(monkeypatch, counting_compile)
    return calls


def switch_on_compiling_with(monkeypatch, compile: Callable) -> None:
    """Compiled conversions on, compiled by ``compile``, in a fresh state (no compiled function, no failure);
    everything restored after the test."""
    monkeypatch.setattr(cpu_conversions, "_compile", compile)
    monkeypatch.setattr(cpu_conversions, "_compiled", {})
    monkeypatch.setattr(cpu_conversions, "_failed", False)
    monkeypatch.setattr(cpu_conversions, "_in_use", False)
    cpu_conversions.use_compiled_conversions(True)


@pytest.mark.parametrize(
    ("shape", "dtype", "memory_format"),
    [
        ((4, 96, 32, 32), torch.float32, CL),  # sizes above MIN_ELEMENTS_TO_CHANNELS_LAST
        ((1, 160, 48, 48), torch.float32, CL),  # batch 1: Dynamo specializes dimensions of size 1
        ((4, 96, 32, 32), torch.bfloat16, CL),
        ((4, 99, 31, 35), torch.float64, CL),  # odd sizes: no tile divides them
        ((3, 16, 8, 40, 40), torch.float32, CL3D),
    ],
    ids=["fp32", "batch 1", "bf16", "fp64 odd sizes", "5-d"],
)
def test_compiled_conversions_equal_atens_copies_both_ways(compiled_calls, shape, dtype, memory_format) -> None:
    x = torch.randn(shape).to(dtype)
    converted = cpu_conversions.to_memory_format(x, memory_format)
    expected = x.contiguous(memory_format=memory_format)
    assert torch.equal(converted, expected) and converted.stride() == expected.stride()
    back = cpu_conversions.to_memory_format(converted, NCHW)
    assert torch.equal(back, x) and back.stride() == x.stride()
    assert len(compiled_calls) == 2
    assert cpu_conversions.to_memory_format(expected, memory_format) is expected  # already so: no copy, as ATen


@pytest.mark.parametrize("destination_format", [NCHW, CL], ids=["into NCHW", "into channels_last"])
def test_copy_into_a_slice_of_a_batch(compiled_calls, destination_format) -> None:
    source = torch.randn(3, 96, 36, 36).contiguous(memory_format=CL if destination_format is NCHW else NCHW)
    batch = torch.zeros(7, 96, 36, 36).contiguous(memory_format=destination_format)
    cpu_conversions.copy_into(batch[2:5], source)
    assert torch.equal(batch[2:5], source)
    assert not batch[:2].any() and not batch[5:].any()  # nothing written outside the slice
    assert batch.is_contiguous(memory_format=destination_format)
    assert compiled_calls == ["call"]


def test_small_tensors_gradients_tracing_and_compile_keep_atens_copies(compiled_calls) -> None:
    small = torch.randn(1, 128, 36, 36)  # here the compiled call costs more than the copy
    assert cpu_conversions.MIN_ELEMENTS_TO_CONTIGUOUS < small.numel() < cpu_conversions.MIN_ELEMENTS_TO_CHANNELS_LAST
    assert torch.equal(cpu_conversions.to_memory_format(small, CL), small)
    x = torch.randn(4, 96, 32, 32, requires_grad=True)  # in grad mode: autograd must record the copy
    y = cpu_conversions.to_memory_format(x, CL)
    assert y.grad_fn is not None and y.is_contiguous(memory_format=CL)
    traced = torch.jit.trace(lambda t: cpu_conversions.to_memory_format(t, CL), x.detach(), check_trace=False)
    assert torch.equal(traced(x.detach()), x.detach())
    compiled = torch.compile(lambda t: cpu_conversions.to_memory_format(t, CL) * 2, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x.detach()), 2 * x.detach())
    assert compiled_calls == []
    with torch.no_grad():
        cpu_conversions.to_memory_format(x, CL)  # no gradient to record: the compiled copy
    assert compiled_calls == ["call"]


def test_a_failing_compile_warns_once_and_falls_back_to_atens_copies(monkeypatch) -> None:
    def no_compiler(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def fail(*args: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no C++ compiler here")

        return fail

    switch_on_compiling_with(monkeypatch, no_compiler)
    assert cpu_conversions.compiled_conversions_in_use()
    x = torch.randn(4, 96, 32, 32)
    with pytest.warns(RuntimeWarning, match="no C.. compiler here.*ATen's copies"):
        assert torch.equal(cpu_conversions.to_memory_format(x, CL), x)
    assert not cpu_conversions.compiled_conversions_in_use()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert torch.equal(cpu_conversions.to_memory_format(x, CL), x)
    cpu_conversions.use_compiled_conversions(True)  # asking again does not retry a compile that failed
    assert not cpu_conversions.compiled_conversions_in_use()


def test_the_switch_is_checked_and_read_back(monkeypatch) -> None:
    monkeypatch.setattr(cpu_conversions, "_in_use", False)
    with pytest.raises(TypeError, match="enabled must be True or False; got 'yes'"):
        cpu_conversions.use_compiled_conversions("yes")  # type: ignore[arg-type]
    cpu_conversions.use_compiled_conversions(True)
    assert cpu_conversions.compiled_conversions_in_use()
    assert cpu_strategy.COMPILED_CONVERSIONS in cpu_strategy._regime()
    cpu_conversions.use_compiled_conversions(False)
    assert cpu_strategy.COMPILED_CONVERSIONS not in cpu_strategy._regime()


@pytest.mark.parametrize("chunk", [None, 2], ids=["whole batch", "batch chunks"])
def test_a_layers_channels_last_plan_gives_the_same_float64_results_with_compiled_conversions(
    compiled_calls, monkeypatch, chunk
) -> None:
    """An NCHW caller's layer converted to channels_last (whole, or two samples at a time, outputs copied into
    the batch's) by compiled kernels: output and every gradient equal PyTorch's NCHW block in float64, NCHW out;
    its decision is keyed on the setting."""
    monkeypatch.setattr(cpu_strategy, "_chunk_size", lambda input, training: chunk)
    monkeypatch.setattr(
        cpu_strategy,
        "_measure",
        lambda input, convs, params, chunk=None, dense=None, product=None: ((cpu_strategy.CHANNELS_LAST, chunk), {}),
    )
    sepconv.clear_cpu_strategy_cache()
    torch.manual_seed(0)
    layer = sepconv.SeparableConv2d(32, 24, 3, padding=1, mid_activation=torch.nn.ReLU, dtype=torch.float64)
    x = torch.randn(4, 32, 64, 64, dtype=torch.float64, requires_grad=True)  # a 2-sample chunk's output: a copy
    params = [x, layer.depthwise.weight, layer.pointwise.weight, layer.pointwise.bias]
    expected = F.conv2d(F.relu(F.conv2d(x, layer.depthwise.weight, padding=1, groups=32)), *params[2:])
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    with torch.no_grad():
        inference = layer(x)
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    for result in (inference, out):
        assert result.is_contiguous()
        torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert len(compiled_calls) >= 2  # into channels_last and back, at least
    keys = sepconv.cpu_strategy_decisions()
    assert keys and all(cpu_strategy.COMPILED_CONVERSIONS in cpu_strategy._regime_of(key) for key in keys)
