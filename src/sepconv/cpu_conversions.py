"""Layout conversions (NCHW <-> channels_last) of the CPU strategy, optionally through kernels that
``torch.compile`` generates.

ATen copies a tensor into another memory format element by element with one side strided: on this project's
2-core AMD EPYC VM (torch 2.14.1, fp32) a (32, 128, 28, 28) tensor took 0.54 ms to channels_last and 1.29 ms
back, where a plain copy took 0.11. Inductor's C++ code for the same copies transposes in vectorized tiles:
0.19 and 0.22 ms. Every NCHW caller of a layer whose plan is channels_last pays two such conversions per call
(three more in training). :func:`use_compiled_conversions` routes them through Inductor's kernels.

It is opt-in and process-wide: the first conversion of each kind compiles (about 2 s each with a warm Inductor
cache, more without; a C++ compiler must be installed), and a library should not start a compiler behind its
host's back. Where compiling fails, a warning says so once and ATen's copies are used from then on. The CPU
strategy keys its decisions on the setting, so that a plan is timed with the conversions it will run with: a
layer's first call after the switch decides again (its decisions of the other setting are kept for a switch
back). Small tensors, tensors requiring a gradient in grad mode, and calls during tracing or ``torch.compile``
keep ATen's copies (their results are equal: a copy is exact), as do variants past Dynamo's recompile limit.
Measured (``benchmarks/cpu_conversions.py``, same VM): the conversions alone 0.89-3.9x ATen's where they apply;
an NCHW caller's separable layer median 1.01x in both passes (batch 1 0.94-1.04x), faster where a batch's
conversions are a large part of the call (batch 32 forward up to 1.89x: stride 2).

>>> import torch
>>> x = torch.rand(2, 3, 4, 4)
>>> y = to_memory_format(x, torch.channels_last)
>>> y.is_contiguous(memory_format=torch.channels_last), torch.equal(y, x)
(True, True)
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ENV_VARIABLE", "compiled_conversions_in_use", "copy_into", "to_memory_format", "use_compiled_conversions"]

ENV_VARIABLE = "SEPCONV_COMPILED_CONVERSIONS"  # "1": use_compiled_conversions() at import
# Smaller tensors keep ATen's copies: there the compiled call (~20 us of guards and wrappers) and its dynamic-shape
# kernel were slower (benchmarks/cpu_conversions.json, AMD EPYC, fp32, batch 1: to channels_last 0.61-0.87x at
# 0.1-0.3 M elements, 1.24-4.0x from 0.4 M; to NCHW 0.66x at 0.11 M (576 x 14 x 14), 1.35-3.5x at 0.1 M and more)
MIN_ELEMENTS_TO_CHANNELS_LAST = 360_000
MIN_ELEMENTS_TO_CONTIGUOUS = 150_000  # and copies into a slice (a chunk's output back into the batch's)
_failed = False  # a compile failed in this process: ATen's copies from then on
_in_use = os.environ.get(ENV_VARIABLE, "") == "1"  # enabled, and no compile failed (read on the strategy's call path)
_compiled: dict[str, Callable[..., Tensor]] = {}
_lock = threading.Lock()


def use_compiled_conversions(enabled: bool = True) -> None:
    """Convert layouts through ``torch.compile``'s kernels (``enabled``) or ATen's copies, process-wide; layers
    decide their CPU plans again at their next call.

    >>> use_compiled_conversions(False)
    >>> compiled_conversions_in_use()
    False
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False; got {enabled!r}")
    global _in_use
    _in_use = enabled and not _failed  # layers' plan memos and the decisions are keyed on it: no cache to clear


def compiled_conversions_in_use() -> bool:
    """Whether :func:`use_compiled_conversions` is on and no compile has failed in this process."""
    return _in_use


def to_memory_format(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    """``t.contiguous(memory_format=memory_format)``, through a compiled kernel where that applies."""
    kernel = _CONVERSIONS.get(memory_format)
    least = MIN_ELEMENTS_TO_CONTIGUOUS if memory_format == torch.contiguous_format else MIN_ELEMENTS_TO_CHANNELS_LAST
    if kernel is not None and _applies(t, least) and not t.is_contiguous(memory_format=memory_format):
        converted = _run(kernel, t)
        if converted is not None:
            return converted
    return t.contiguous(memory_format=memory_format)


def copy_into(destination: Tensor, source: Tensor) -> None:
    """``destination.copy_(source)`` (same shape and dtype; any strides, a slice of a larger tensor too), through a
    compiled kernel where that applies."""
    applies = (
        _applies(source, MIN_ELEMENTS_TO_CONTIGUOUS)
        and not destination.requires_grad
        and destination.dtype == source.dtype
    )
    if not (applies and _run(_copy, destination, source) is not None):
        destination.copy_(source)


# One function per conversion: Dynamo caches compiled variants (dtypes, dimensions of size 1) per code object, up to
# its recompile limit (8), so that one lambda for every format would run out of them.
def _to_channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _to_channels_last_3d(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d)


def _to_contiguous(t: Tensor) -> Tensor:
    return t.contiguous()


def _copy(destination: Tensor, source: Tensor) -> Tensor:
    return destination.copy_(source)


_CONVERSIONS = {
    torch.channels_last: _to_channels_last,
    torch.channels_last_3d: _to_channels_last_3d,
    torch.contiguous_format: _to_contiguous,
}


def _applies(t: Tensor, least: int) -> bool:
    return (
        _in_use
        and type(t) is Tensor
        and t.is_cpu
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not (t.requires_grad and torch.is_grad_enabled())
        and t.numel() >= least  # after the tracing test: sizes are traced
    )


def _compile(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    # dynamic: one kernel for all shapes (Dynamo still specializes dimensions of size 1); not fullgraph: past
    # Dynamo's recompile limit a new variant runs eagerly (ATen's copy) instead of failing
    return torch.compile(fn, dynamic=True)


def _run(fn: Callable[..., Tensor], *args: Tensor) -> Tensor | None:
    """``fn`` compiled, applied to ``args``; None once compiling failed (warned once)."""
    global _failed, _in_use
    compiled = _compiled.get(fn.__name__)
    if compiled is None:
        with _lock:
            compiled = _compiled.setdefault(fn.__name__, _compile(fn))
    try:
        with torch.no_grad():
            return compiled(*args)
    except Exception as error:  # no C++ compiler, an Inductor failure: ATen's copies are as exact
        _failed, _in_use = True, False  # layers look their plans up again, under keys without compiled conversions
        warnings.warn(
            f"sepconv: compiled layout conversions failed ({type(error).__name__}: {error}); "
            "using ATen's copies from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
