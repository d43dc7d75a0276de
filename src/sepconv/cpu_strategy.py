"""CPU execution strategy: run depthwise/separable layers in the faster memory format, transparently.

On CPU, PyTorch's depthwise convolution is often many times faster in ``channels_last`` than in the default
contiguous (NCHW) layout — a padded 31x31 depthwise conv by 20-40x — but not always. In mode ``"auto"`` (the
default) the first call of each configuration (layer geometry, input shape, dtype, training or inference, thread
count, allocator regime: :mod:`sepconv.cpu_allocator`) times both layouts on the layer's own convolutions and
caches the faster; later calls only look it up. A third candidate runs channels_last a few samples at a time, so
that each chunk's conversions and intermediate stay in the CPU caches (for layers whose samples are independent: no
training-mode BatchNorm inside); it made a (32, 144, 56, 56) separable 3x3 layer's forward 1.6-2.0x faster than
PyTorch's channels_last with conversions (``benchmarks/cpu.py``). A fourth runs a narrow separable layer as one
dense conv of composed weights, where PyTorch's dense conv beats its depthwise conv (MobileNet's first block,
(1, 32, 112, 112) -> 16 channels: 1.23 -> 0.63 ms). A fifth, for an NCHW caller of a separable layer without mid
modules, runs the depthwise conv in channels_last and the pointwise conv as a matrix product that reads the
channels_last intermediate transposed and writes the caller's layout (``CHANNELS_LAST_PRODUCT``): no conversion
back and none of oneDNN's ~45 us per 1x1 call; it also runs in batch chunks, each chunk's product written straight
into the batch's output (for channels_last callers too, outside autograd). The caller sees no difference: an NCHW
input gives an NCHW output, equal up to float rounding, with autograd intact. A close decision (another plan within
2x of the fastest) is measured again at the layer's 20th call of that configuration, when the process is warm and
other layers run in between, and settled on both measurements. Only contiguous, batched 2-d/3-d CPU inputs are
considered; tracing, ``torch.compile`` and ``torch.export`` always see the plain PyTorch path.

In training, a depthwise conv with a kernel of 25 taps or more (5x5, 3x3x3, ...) also times its
backward: PyTorch's weight gradient against an FFT one, and (stride 1) PyTorch's input gradient
against a forward conv with the flipped kernel (:mod:`sepconv.cpu_backward`; a 31x31 training step
measured 8-10x faster), and caches the faster of each per configuration.

A pointwise (1x1) conv of a contiguous input times PyTorch's conv against the same map as a matrix
product (:mod:`sepconv.cpu_pointwise`) on its first call of each configuration, in training as a training
step, and caches the faster (a (1, 960, 7, 7) -> 160 forward: 0.20 -> 0.12 ms).

Modes: ``"auto"`` (measure once, cache), ``"channels_last"`` (always convert; backward and pointwise still measured),
``"off"`` (plain PyTorch, no measurement).
The environment variable ``SEPCONV_CPU_STRATEGY`` sets the initial mode.

>>> import torch, sepconv
>>> layer = sepconv.SeparableConv2d(8, 16, 7, padding=3)
>>> with use_cpu_strategy("channels_last"):
...     y = layer(torch.rand(1, 8, 20, 20))
>>> y.is_contiguous()  # the layout the caller gave
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from sepconv import cpu_allocator, cpu_backward, cpu_conversions, cpu_layout, cpu_pointwise, cpu_timing

__all__ = [
    "Measurement",
    "clear_cpu_strategy_cache",
    "cpu_strategy_decisions",
    "cpu_strategy_measurements",
    "get_cpu_strategy",
    "set_cpu_strategy",
    "use_cpu_strategy",
]

MODES = ("auto", "channels_last", "off")
CONTIGUOUS, CHANNELS_LAST = "contiguous", "channels_last"
DENSE = "dense"  # a separable layer run as one dense conv with composed weights, in the input's layout
# a separable layer run in channels_last up to its pointwise conv, which reads the intermediate as a matrix product
# into the caller's contiguous layout: no oneDNN 1x1 call, no output conversion (sepconv.cpu_pointwise)
CHANNELS_LAST_PRODUCT = "channels_last, pointwise matmul"
POINTWISE_ALGORITHMS = ("conv", "matmul")  # a pointwise conv's: PyTorch's conv, or cpu_pointwise.pointwise_matmul
_FORMATS = cpu_layout.CHANNELS_LAST_FORMATS
_MARGIN = 1.1
# A decision with another plan within _RECHECK_WITHIN of the fastest is measured again once the layer has run its
# plan _RECHECK_AFTER_CALLS more times (the process warm, other layers' work in between, as in the steady state);
# the plan then chosen on both measurements (geometric mean) must beat the input as given by _RECHECK_MARGIN. A
# single measurement needs _MARGIN: at 5% a full benchmark run picked plans on noise that then lost by up to
# 0.62x; at 10% batch-1 forwards kept the input's layout where converting was 5-9% faster (0.92-0.95x). 2x:
# this VM's process states move single timings that much; a benchmark run's (32, 144, 56, 56) -> 24 forward
# measured its dense plan 1.25x+ ahead of batch chunks, which ran 28 vs 42 ms when measured in a fresh process.
_RECHECK_AFTER_CALLS = 20
_RECHECK_WITHIN = 2.0
_RECHECK_MARGIN = 1.05
# The FFT weight gradient must win its isolated timing by _FFT_MARGIN: inside a training step its fresh buffers
# (padded planes, spectra) cost more than in a loop that reuses them. A channels_last (1, 128, 28, 28) 7x7 step
# picked it at 1.18-1.32x in isolation and then ran 0.85-0.87x PyTorch channels_last in three repeats of its
# benchmark row, 0.98x with PyTorch's weight gradient; where the FFT matters it wins 2.8-13x (NCHW from 5x5,
# channels_last from 15x15: benchmarks/cpu_depthwise_backward.py).
_FFT_MARGIN = 1.5
_LAYER_MEMO_SIZE = 16  # plans a layer remembers (one per input shape, dtype, mode...) before it starts over
_CHUNK_BYTES = 4 * 2**20  # input per chunk of the chunked plan (twice that in training)

_state = threading.local()  # per-thread override from the cpu_strategy() context manager
_global_mode = os.environ.get("SEPCONV_CPU_STRATEGY", "auto")
_decisions: dict[tuple, tuple[str, int | None]] = {}  # key -> (layout, samples per call or None for the batch)
_backward_decisions: dict[tuple, tuple[str, str]] = {}
_pointwise_decisions: dict[tuple, str] = {}  # key -> one of POINTWISE_ALGORITHMS
_rechecks: dict[tuple, _Recheck] = {}  # key -> the second measurement still owed to a close decision
_measurements: list[Measurement] = []  # what the decisions above cost, in the order they were made
# Below this kernel area PyTorch's depthwise backward is within a few times its forward, which an FFT
# cannot beat (5x5 and 7x7 measured slower, 15x15 and 31x31 4-8x faster on a 2-core Xeon): not timed.
MIN_KERNEL_AREA_FOR_BACKWARD = 25
_lock = threading.RLock()  # re-entered: a layout measurement runs layers that decide their backward
_generation = 0  # of the cached decisions: clear_cpu_strategy_cache() starts a new one


def set_cpu_strategy(mode: str) -> None:
    """Set the process-wide CPU strategy: ``"auto"``, ``"channels_last"`` or ``"off"``."""
    global _global_mode
    _global_mode = _check_mode(mode)


def get_cpu_strategy() -> str:
    """The mode in force in this thread."""
    return getattr(_state, "mode", None) or _global_mode


@contextlib.contextmanager
def use_cpu_strategy(mode: str) -> Iterator[None]:
    """Use ``mode`` in this thread for the duration of the ``with`` block."""
    previous = getattr(_state, "mode", None)
    _state.mode = _check_mode(mode)
    try:
        yield
    finally:
        _state.mode = previous


def cpu_strategy_decisions() -> dict[tuple, str]:
    """A copy of the cached choices: configuration key -> ``"contiguous"``, ``"channels_last"``,
    ``"channels_last in batch chunks of N"``, ``"dense"`` or ``"channels_last, pointwise matmul"`` (``... in batch
    chunks of N``) for a layer's plan, ``"grad_input=..., grad_weight=..."`` for a depthwise conv's backward
    algorithms, ``"conv"`` or ``"matmul"`` for a pointwise conv's. A key ends with the thread count, or
    ``(threads, *regime)`` in another allocator regime than glibc's default: after :func:`sepconv.keep_freed_memory`,
    ``(threads, FREED_MEMORY_KEPT)``, with ``HUGE_PAGES`` after it where PyTorch's large tensors get them."""
    with _lock:
        layouts = {key: _plan_name(*plan) for key, plan in _decisions.items()}
        backward = {key: _backward_name(*choice) for key, choice in _backward_decisions.items()}
        return {**layouts, **backward, **_pointwise_decisions}


class Measurement(NamedTuple):
    """One measurement of the CPU strategy (see :func:`cpu_strategy_measurements`)."""

    kind: str  # "layout" (a configuration's first call), "recheck" (its 20th), "depthwise_backward", "pointwise"
    key: tuple  # the decision's key in cpu_strategy_decisions()
    plan: str  # what it decided, named as cpu_strategy_decisions() names it
    seconds: float  # wall-clock, including the measurements made inside it (a training step's depthwise backward)


def cpu_strategy_measurements() -> list[Measurement]:
    """The measurements made since import or :func:`clear_cpu_strategy_cache`, oldest first: what the strategy
    cost this process's calls (decisions loaded from a file cost none). A layout measurement includes the
    depthwise backward and pointwise measurements made inside it, which are listed too (before it: they end first).

    >>> import torch, sepconv
    >>> sepconv.clear_cpu_strategy_cache()
    >>> with torch.no_grad():
    ...     _ = sepconv.SeparableConv2d(4, 8, 3)(torch.rand(2, 4, 16, 16))
    >>> sorted({(m.kind, m.seconds > 0) for m in sepconv.cpu_strategy_measurements()})  # and its pointwise conv's
    [('layout', True), ('pointwise', True)]
    """
    with _lock:
        return list(_measurements)


def clear_cpu_strategy_cache() -> None:
    """Forget every cached choice (they are measured again on next use)."""
    with _lock:
        _decisions.clear()
        _backward_decisions.clear()
        _pointwise_decisions.clear()
        _rechecks.clear()
        _measurements.clear()
        _forget_layer_memos()


FREED_MEMORY_KEPT = "freed memory kept"
COMPILED_CONVERSIONS = "compiled conversions"
HUGE_PAGES = "huge pages"


def _regime() -> tuple[str, ...]:
    """The allocator regime this process runs in, by name: () for glibc's defaults, else :data:`FREED_MEMORY_KEPT`
    once :func:`sepconv.keep_freed_memory` applied and :data:`HUGE_PAGES` where PyTorch's large tensors get them
    (:func:`sepconv.huge_pages_in_use`), and :data:`COMPILED_CONVERSIONS` while layouts are converted by compiled
    kernels (:func:`sepconv.cpu_conversions.use_compiled_conversions`)."""
    kept, huge = cpu_allocator.freed_memory_kept(), cpu_allocator.huge_pages_in_use()
    compiled = cpu_conversions.compiled_conversions_in_use()
    return (FREED_MEMORY_KEPT,) * kept + (HUGE_PAGES,) * huge + (COMPILED_CONVERSIONS,) * compiled


def _runtime() -> int | tuple[int | str, ...]:
    """A decision key's last part: the thread count, with the allocator regime's names (:func:`_regime`) where
    it is not glibc's default — the regimes rank plans differently, so a decision holds only in the regime it was
    timed in. Keys of the default regime end in the bare count, as before."""
    threads = torch.get_num_threads()
    regime = _regime()
    return (threads, *regime) if regime else threads


def _regime_of(key: tuple) -> tuple[str, ...]:
    """The allocator regime a decision was timed in, from its key's last part (:func:`_runtime`)."""
    last = key[-1]
    return tuple(part for part in last if isinstance(part, str)) if isinstance(last, tuple) else ()


def _allocator_regime_changed() -> None:
    """:func:`sepconv.keep_freed_memory` applied: layers look their plans up again, under keys of the new regime
    (decided afresh at their next call), and the old regime's owed rechecks will never be due."""
    with _lock:
        _rechecks.clear()
        _forget_layer_memos()


def _forget_layer_memos() -> None:
    """Make every layer's memo of its last plan stale (call it with ``_lock`` held, after changing decisions)."""
    global _generation
    _generation += 1


def may_choose_depthwise_backward(input: Tensor, weight: Tensor) -> bool:
    """Cheap test: might :func:`depthwise_backward` pick something other than PyTorch's backward here?"""
    return (
        torch.is_grad_enabled()
        and (input.requires_grad or weight.requires_grad)
        and input.is_cpu
        and input.dtype in (torch.float32, torch.float64)
        and weight.dtype == input.dtype
        and get_cpu_strategy() != "off"
        and type(input) is Tensor
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and math.prod(weight.shape[2:]) >= MIN_KERNEL_AREA_FOR_BACKWARD  # after the tracing test: shapes are traced
        and input.dim() == weight.dim()  # batched: the measured backward's algorithms expect (N, C, *spatial)
        and input.numel() > 0  # an empty batch has nothing to measure (the FFT refuses empty transforms)
    )


def depthwise_backward(
    input: Tensor, weight: Tensor, stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[str, str]:
    """``(grad_input, grad_weight)`` algorithms of :func:`sepconv.cpu_backward.depthwise_conv` for this call.

    The first call of each configuration times PyTorch's weight gradient against the FFT, then PyTorch's input
    gradient against the flipped forward conv (with PyTorch's weight gradient, where the call needs it: one
    call of PyTorch computes both, cheaper than the two apart) on the call's own shapes, and caches the faster
    of each (the flipped conv must win by 10%, the FFT by 50%: ``_FFT_MARGIN``); later calls only look it up.
    Call it only where :func:`may_choose_depthwise_backward` holds (the layers test that first, once per call).
    """
    key = (
        "depthwise_backward",
        tuple(weight.shape),
        stride,
        padding,
        dilation,
        tuple(input.shape),
        input.dtype,
        _memory_format(input),
        input.requires_grad,
        weight.requires_grad,
        _runtime(),
    )
    choice = _backward_decisions.get(key)
    if choice is None:
        with _lock:
            choice = _backward_decisions.get(key)
            if choice is None:
                cpu_timing.note_measurement()
                start = time.perf_counter()
                choice = _backward_decisions[key] = _measure_backward(input, weight, stride, padding, dilation)
                _log_measurement("depthwise_backward", key, _backward_name(*choice), start)
    return choice


def pointwise_as_matmul(layer: nn.Module, input: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether this call of ``layer``, a pointwise conv of ``weight`` and ``bias`` (groups 1, stride 1, no padding:
    the caller's to check), runs as :func:`sepconv.cpu_pointwise.pointwise_matmul`. The first call of each
    configuration (shapes, layout, dtype, training or inference, threads) times it against PyTorch's conv, as a
    training step in training, and caches whether it won by 10% (``_MARGIN``). Later calls look it up in the
    layer's own memo, as :func:`run` does, or inside a separable layer's managed call in that call's
    :class:`_CallSlot`: per call, a lookup costs ~2 us measured standalone but 3-4 times that between large
    convs (Python runs cold after them), where the slot costs an attribute read.
    """
    state = _state.__dict__
    slot = state.get("call")
    if slot is not None and slot.pointwise is layer:  # decided at this call configuration's first call
        return slot.matmul
    if (
        (state.get("mode") or _global_mode) == "off"
        or not input.is_cpu
        or type(input) is not Tensor
        or torch.is_autocast_enabled("cpu")  # the product and the conv would both run in bfloat16: not measured so
        or torch.compiler.is_compiling()
        or torch._C._is_tracing()
        or torch._C._are_functorch_transforms_active()
    ):
        return False
    training = torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    key = (input.shape, input.stride(), input.dtype, weight.shape, weight.dtype, bias is not None, training)
    key += (torch.get_num_threads(),)  # the allocator regime: a new generation of memos when it changes
    memo = layer.__dict__.get("_sepconv_pointwise")
    if memo is None or memo[0] != _generation:
        memo = layer.__dict__["_sepconv_pointwise"] = (_generation, {})
    matmul = memo[1].get(key)
    if matmul is None:
        if len(memo[1]) >= _LAYER_MEMO_SIZE:
            memo[1].clear()
        matmul = memo[1][key] = _pointwise_algorithm(input, weight, bias, training) == "matmul"
    if slot is not None and slot.pointwise is None:
        slot.matmul, slot.pointwise = matmul, layer  # in this order: another thread may read it meanwhile
    return matmul


def _pointwise_algorithm(input: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> str:
    """The decision of :func:`pointwise_as_matmul` for this configuration: cached, else measured now."""
    if not (
        input.dtype in (torch.float32, torch.float64)
        and weight.dtype == input.dtype
        and cpu_pointwise.pointwise_matmul_applies(input, weight)
    ):
        return "conv"
    key = (
        "pointwise",
        tuple(weight.shape[:2]),
        tuple(input.shape),  # contiguous (pointwise_matmul_applies)
        input.dtype,
        training,  # third from the end, as in a layout key
        bias is not None,
        _runtime(),
    )
    with _lock:
        algorithm = _pointwise_decisions.get(key)
        if algorithm is None:
            cpu_timing.note_measurement()
            start = time.perf_counter()
            algorithm = _pointwise_decisions[key] = _measure_pointwise(input, weight, bias, training)
            _log_measurement("pointwise", key, algorithm, start)
    return algorithm


def describe_decision(key: tuple) -> tuple[str, str, str]:
    """(layer, input shape, mode) of a key of :func:`cpu_strategy_decisions`, for people: a depthwise backward
    key (built in :func:`depthwise_backward`), a pointwise key (:func:`_pointwise_algorithm`) or a layout key
    (:func:`_decide`), read here, next to where they are built. The mode names the allocator regime where it is
    not glibc's default (:func:`_runtime`).

    >>> describe_decision(("SeparableConv2d", "4, 4, ...", "4, 8, ...", (2, 4, 9, 9), torch.float32,
    ...                    "contiguous", True, True, 2))
    ('SeparableConv2d', '(2, 4, 9, 9)', 'training')
    >>> describe_decision(("pointwise", (8, 4), (2, 4, 9, 9), torch.float32, False, True, (2, FREED_MEMORY_KEPT)))
    ('pointwise conv 4 -> 8', '(2, 4, 9, 9)', 'inference, freed memory kept')
    """
    if key[0] == "depthwise_backward":
        return f"depthwise backward, weight {tuple(key[1])}", str(tuple(key[5])), _mode_name(True, key)
    if key[0] == "pointwise":
        out_channels, in_channels = key[1]
        return f"pointwise conv {in_channels} -> {out_channels}", str(tuple(key[2])), _mode_name(key[-3], key)
    # the layout key: (*signature strings, *candidate names, input shape, dtype, source, training, batch
    # independent, threads [and allocator regime]); the signature and candidates are strings, so the first tuple
    # is the shape
    shape = next(part for part in key if isinstance(part, tuple))
    return str(key[0]), str(shape), _mode_name(key[-3], key)


def _mode_name(training: bool, key: tuple) -> str:
    return ", ".join(("training" if training else "inference", *_regime_of(key)))


def _recheck_on_next_call() -> bool:
    """Make every owed recheck due at its layer's next call (for :func:`sepconv.tune_cpu_strategy`, which runs
    the model once more); whether any was owed."""
    with _lock:
        for recheck in _rechecks.values():
            recheck.calls_left = 1
        return bool(_rechecks)


def _log_measurement(kind: str, key: tuple, plan: str, start: float) -> None:
    """Add a measurement begun at ``start`` (``time.perf_counter()``) to :func:`cpu_strategy_measurements`."""
    _measurements.append(Measurement(kind, key, plan, time.perf_counter() - start))


def _backward_name(grad_input: str, grad_weight: str) -> str:
    return f"grad_input={grad_input}, grad_weight={grad_weight}"


def _measure_backward(
    input: Tensor, weight: Tensor, stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[str, str]:
    n, channels = input.dim() - 2, input.shape[1]
    x, w = input.detach(), weight.detach()
    with torch.no_grad():
        grad_output = torch.rand_like(cpu_backward.depthwise_conv(x, w, None, stride, padding, dilation))

    def torch_backward(mask: list[bool]) -> Callable[[], object]:
        return lambda: torch.ops.aten.convolution_backward(
            grad_output, x, w, None, stride, padding, dilation, False, [0] * n, channels, mask
        )

    grad_input = grad_weight = "torch"
    with torch.no_grad():
        if weight.requires_grad:
            times = cpu_timing.time_candidates(
                {
                    "torch": torch_backward([False, True, False]),
                    "fft": lambda: cpu_backward.fft_grad_weight(x, grad_output, w.shape[2:], stride, padding, dilation),
                }
            )
            grad_weight = "fft" if times["fft"] * _FFT_MARGIN < times["torch"] else "torch"
        if input.requires_grad and cpu_backward.flipped_conv_applies(weight.shape[2:], stride, padding, dilation):
            # With PyTorch's weight gradient too, the flipped conv competes with one call computing both: the
            # input gradient alone cost more than its share of it (channels_last (32, 128, 28, 28) 7x7: the
            # flipped conv 4.0 ms vs 5.0 alone, but with the weight gradient 35.9 vs 34.7 ms both at once).
            both = weight.requires_grad and grad_weight == "torch"
            weight_gradient = torch_backward([False, True, False]) if both else lambda: None
            times = cpu_timing.time_candidates(
                {
                    "torch": torch_backward([True, both, False]),
                    "conv": lambda: (
                        cpu_backward.flipped_grad_input(grad_output, w, channels, padding, dilation),
                        weight_gradient(),
                    ),
                }
            )
            grad_input = "conv" if times["conv"] * _MARGIN < times["torch"] else "torch"
    return grad_input, grad_weight


def _measure_pointwise(input: Tensor, weight: Tensor, bias: Tensor | None, training: bool) -> str:
    """``"matmul"`` where the matrix product beat PyTorch's conv by ``_MARGIN`` on this call's shapes, else ``"conv"``;
    in training a step computes the gradients the call needs (of the input, where it requires one, and of the
    parameters that do)."""
    x = input.detach().requires_grad_(training and input.requires_grad)
    conv = (F.conv1d, F.conv2d, F.conv3d)[input.dim() - 3]
    wanted = [t for t in (x, weight, bias) if t is not None and t.requires_grad]

    def step(forward: Callable[[], Tensor]) -> Callable[[], None]:
        def run_step() -> None:
            with torch.enable_grad() if training else torch.no_grad():
                out = forward()
                if training:
                    torch.autograd.grad(out, wanted, torch.ones_like(out))

        return run_step

    times = cpu_timing.time_candidates(
        {
            "conv": step(lambda: conv(x, weight, bias)),
            "matmul": step(lambda: cpu_pointwise.pointwise_matmul(x, weight, bias)),
        },
        # no more: a close call keeps the conv anyway (_MARGIN); it ran 3-50 otherwise
        timed_rounds=cpu_timing.TIMED_RUNS,
    )
    return "matmul" if times["matmul"] * _MARGIN < times["conv"] else "conv"


def _memory_format(input: Tensor) -> str:
    if input.is_contiguous():
        return CONTIGUOUS
    if input.dim() in _FORMATS and input.is_contiguous(memory_format=_FORMATS[input.dim()]):
        return CHANNELS_LAST
    return "strided"


def run(
    layer: nn.Module,
    input: Tensor,
    forward: Callable[[Tensor], Tensor],
    convs: Callable[[Tensor], Tensor],
    *,
    batch_independent: bool = False,
    check: Callable[[Tensor], None] | None = None,
    dense: Callable[[Tensor], Tensor] | None = None,
    product: Callable[..., Tensor] | None = None,
) -> Tensor:
    """``forward(input)`` in the layout the strategy picks; ``convs`` is the stateless part that is timed.

    ``batch_independent``: each sample's output depends on that sample alone (no training-mode BatchNorm
    inside), so that inference may run the batch a few samples at a time. Layers nested inside a managed
    call (a separable layer's depthwise part) run as they are given. ``check(input)`` validates the input;
    it is skipped when the input matches the layer's previous call (shape included), which it passed.
    ``dense``: the layer as one dense conv, a further plan to time (narrow separable layers, see
    :meth:`sepconv.layers._SeparableConv._dense_worth_timing`). ``product``: the layer in channels_last with a
    contiguous output (its pointwise conv as a matrix product), or written into ``out=`` in that tensor's layout:
    further plans for a contiguous input, run on its conversion to channels_last, whole or in batch chunks, and
    for a channels_last one in batch chunks outside autograd.
    """
    if dense is None and not input.is_contiguous() and input.shape[0] == 1:
        # Nothing to choose, in any mode: one sample in channels_last (or another layout but contiguous) is not
        # converted and has no chunks, and there is no dense plan to time. As given, without the plan lookup
        # below, whose key costs 5-10 us between large convs (Python runs cold there): a channels_last
        # caller's (1, 576, 14, 14) -> 96 forward 0.96 -> 0.98x PyTorch's, paired in the same rounds. The check
        # runs once per input shape, as on the lookup's path.
        shape = input.shape
        if check is not None and layer.__dict__.get("_sepconv_checked") != shape:
            check(input)
            layer.__dict__["_sepconv_checked"] = shape
        return forward(input)
    state = _state.__dict__  # this thread's: one lookup instead of one per attribute
    mode = state.get("mode") or _global_mode
    if (
        mode == "off"
        or state.get("call")  # inside another managed call
        or not input.is_cpu
        or type(input) is not Tensor
        or torch.compiler.is_compiling()  # first: Dynamo cannot trace the next test, which it never reaches
        or torch._C._is_tracing()  # torch.jit.is_tracing() without its two Python frames: this is the per-call path
    ):
        if check is not None:
            check(input)
        return forward(input)
    # The per-call path: everything a plan depends on, looked up in this layer's own memo of the plans it ran
    # (a few: a layer shared across inputs of several shapes, as in a detector's head over pyramid levels, has
    # one each). The full lookup in _plan measured ~20 us per call on this VM.
    training = torch.is_grad_enabled() and (input.requires_grad or _any_trainable(layer))
    threads = torch.get_num_threads()
    key = (mode, input.shape, input.stride(), input.dtype, training, batch_independent, dense is not None, threads)
    key += (product is not None, cpu_conversions._in_use)  # the conversions setting: a plan was timed with them
    memo = layer.__dict__.get("_sepconv_cpu_plans")
    if memo is None or memo[0] != _generation:
        memo = layer.__dict__["_sepconv_cpu_plans"] = (_generation, {})
    plans = memo[1]
    entry = plans.get(key)
    if entry is None:
        if check is not None:
            check(input)
        if len(plans) >= _LAYER_MEMO_SIZE:
            plans.clear()
        plan = _plan(layer, input, convs, batch_independent, training, mode, dense, product)
        entry = plans[key] = (plan, _CallSlot())
    plan, slot = entry
    if type(plan) is _Pending:  # a decision owed its recheck: the plan until then, or the recheck now
        recheck = plan.recheck
        recheck.calls_left -= 1  # unlocked: threads racing here at worst make the recheck a call early or late
        if recheck.calls_left > 0:
            plan = plan.plan
        else:
            _recheck(recheck, layer, input, convs, batch_independent, training, dense, product)
            # settled, or not this memo's to settle: a deep copy's memo holds a copy of the recheck; the registered
            # one (still owed) replaces it, so that the copy's calls count towards it instead of coming back here
            plan = _plan(layer, input, convs, batch_independent, training, mode, dense, product)
            slot = _CallSlot()  # the new plan's pointwise input may differ: decided afresh
            plans[key] = (plan, slot)
            if type(plan) is _Pending:
                plan = plan.plan
    state["call"] = slot
    try:
        if plan is None:
            return forward(input)
        layout, chunk = plan
        if layout == DENSE:
            return dense(input)  # type: ignore[misc]  # a dense plan is only decided where dense was given
        if layout == CHANNELS_LAST_PRODUCT:  # decided where product was given
            if chunk is not None:  # in training (NCHW callers only) autograd joins the chunks instead
                return _in_chunks(product, input, chunk, writes_into=not training)  # type: ignore[arg-type]
            return cpu_layout.in_channels_last(product, input)  # type: ignore[arg-type]
        if chunk is not None:  # the layout to convert to is channels_last: the only other alternative
            return _in_chunks(forward, input, chunk)
        return cpu_layout.in_channels_last(forward, input)
    finally:
        state["call"] = None


def _plan(
    layer: nn.Module,
    input: Tensor,
    convs: Callable[[Tensor], Tensor],
    batch_independent: bool,
    training: bool,
    mode: str,
    dense: Callable[[Tensor], Tensor] | None = None,
    product: Callable[..., Tensor] | None = None,
) -> tuple[str, int | None] | _Pending | None:
    """The plan for this call: a layout to convert to and a chunk size, ``(DENSE, None)``, or None to run the
    input as given; wrapped in a :class:`_Pending` while its decision is owed a recheck."""
    source = _input_layout(input)
    # a channels_last input's alternatives: chunks, for a batch whose samples are independent, and dense
    chunkable = batch_independent and input.shape[0] > 1
    if source is None or (source == CHANNELS_LAST and not chunkable and dense is None):
        return None
    if mode == "channels_last":
        return None if source == CHANNELS_LAST else (CHANNELS_LAST, None)
    (layout, chunk), recheck = _decide(layer, input, convs, batch_independent, source, training, dense, product)
    plan = None if chunk is None and layout == source else (layout, chunk)
    return plan if recheck is None else _Pending(plan, recheck)


class _CallSlot:
    """Per layer and call configuration (an entry of the layer's memo in :func:`run`): what the pointwise conv
    inside the call decided on its first call (:func:`pointwise_as_matmul`), so that later calls skip the lookup
    (~2 us measured standalone, 3-4 times that between large convs)."""

    __slots__ = ("matmul", "pointwise")

    def __init__(self) -> None:
        self.pointwise: nn.Module | None = None  # the layer that decided: a call may hold other pointwise convs
        self.matmul = False


@dataclasses.dataclass
class _Recheck:
    """The second measurement a close decision (``key``) is owed once its plan has run ``calls_left`` more times:
    ``first`` holds the first measurement's plans within ``_RECHECK_WITHIN`` of the fastest, name -> (plan,
    seconds)."""

    key: tuple
    source: str
    first: dict[str, tuple[tuple[str, int | None], float]]
    calls_left: int


class _Pending(NamedTuple):
    """A layer memo's entry for a decision awaiting its :class:`_Recheck`: the plan to run until then."""

    plan: tuple[str, int | None] | None
    recheck: _Recheck


def _recheck(
    recheck: _Recheck,
    layer: nn.Module,
    input: Tensor,
    convs: Callable[[Tensor], Tensor],
    batch_independent: bool,
    training: bool,
    dense: Callable[[Tensor], Tensor] | None,
    product: Callable[..., Tensor] | None,
) -> None:
    """Time ``recheck``'s plans again on this call's input and settle its decision on both measurements: the
    fastest by the geometric mean of the two, where it beats the input as given by ``_RECHECK_MARGIN``."""
    with _lock:
        if _rechecks.get(recheck.key) is not recheck:  # done by another thread, or the cache was cleared
            return
        if _hooked_inside(layer):  # not timed again with hooks that would see it (_hooked_inside): the first stands
            del _rechecks[recheck.key]
            _forget_layer_memos()
            return
        cpu_timing.note_measurement()
        start = time.perf_counter()
        _, params = _layer_signature(layer)
        trainable = [p for p in params if p.requires_grad] if training else None
        chunk = _chunk_size(input, training) if batch_independent else None
        again = _time_layouts(input, convs, trainable, chunk, set(recheck.first), dense=dense, product=product)
        both = {name: math.sqrt(seconds * again[name]) for name, (_, seconds) in recheck.first.items()}
        best = min(both, key=both.__getitem__)
        keep = recheck.source in both and not both[best] * _RECHECK_MARGIN < both[recheck.source]
        _decisions[recheck.key] = (recheck.source, None) if keep else recheck.first[best][0]
        del _rechecks[recheck.key]
        _log_measurement("recheck", recheck.key, _plan_name(*_decisions[recheck.key]), start)
        _forget_layer_memos()


def _any_trainable(module: nn.Module) -> bool:
    """``any(p.requires_grad for p in module.parameters())`` without its generators (~4 -> ~1 us): on the
    per-call path of a network's first layer in training, whose input needs no gradient. Read afresh on each
    call: a parameter may be frozen or replaced at any time (parametrization originals are submodules')."""
    for parameter in module._parameters.values():
        if parameter is not None and parameter.requires_grad:
            return True
    for child in module._modules.values():  # noqa: SIM110 (a loop: no generator frame per call)
        if child is not None and _any_trainable(child):
            return True
    return False


def _in_chunks(forward: Callable[..., Tensor], input: Tensor, chunk: int, *, writes_into: bool = False) -> Tensor:
    """``forward`` run in channels_last on ``chunk`` samples at a time of ``input``; out in ``input``'s layout.

    Each chunk's conversions and intermediate stay in the CPU caches instead of making round trips to
    memory: an NCHW caller's (32, 144, 56, 56) separable 3x3 forward measured 49.5 ms converted whole,
    19.8 ms four samples at a time; its training step 122 -> 75 ms. ``forward`` must treat samples
    independently (no training-mode BatchNorm). ``writes_into``: ``forward(part, out=...)`` writes a chunk's
    output into the batch's (the product plan's), after the first chunk has given its shape; for calls that
    autograd does not record (nothing in them requires a gradient), in or outside grad mode.
    """
    memory_format = _FORMATS[input.dim()]
    converts = input.is_contiguous()  # an NCHW caller; a channels_last one needs no conversions
    if torch.is_grad_enabled() and not writes_into:  # autograd joins the chunks' gradients; cat keeps their layout
        run = (lambda part: cpu_layout.in_channels_last(forward, part)) if converts else forward
        return torch.cat([run(part) for part in input.split(chunk)])
    output = None
    for start in range(0, input.shape[0], chunk):
        part = cpu_conversions.to_memory_format(input[start : start + chunk], memory_format)
        if writes_into and output is not None:
            forward(part, out=output[start : start + chunk])
            continue
        part = forward(part)
        if output is None:
            layout = torch.contiguous_format if converts else memory_format
            output = torch.empty((input.shape[0], *part.shape[1:]), dtype=part.dtype, memory_format=layout)
        cpu_conversions.copy_into(output[start : start + chunk], part)  # converted back while the chunk is in cache
    assert output is not None
    return output


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"CPU strategy must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    return mode


def _input_layout(input: Tensor) -> str | None:
    """``CONTIGUOUS`` or ``CHANNELS_LAST`` for a batched 2-d/3-d CPU input the strategy may handle, else None
    (other layouts, C=1 or 1x1 spatial where both layouts coincide, an empty batch, tracing, ``torch.compile``)."""
    if not (input.is_cpu and input.dim() in _FORMATS and type(input) is Tensor and input.numel() > 0):
        return None
    contiguous, channels_last = input.is_contiguous(), input.is_contiguous(memory_format=_FORMATS[input.dim()])
    if contiguous == channels_last or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    return CONTIGUOUS if contiguous else CHANNELS_LAST


def _decide(
    layer: nn.Module,
    input: Tensor,
    run_convs: Callable[[Tensor], Tensor],
    batch_independent: bool,
    source: str,
    training: bool,
    dense: Callable[[Tensor], Tensor] | None = None,
    product: Callable[..., Tensor] | None = None,
) -> tuple[tuple[str, int | None], _Recheck | None]:
    """(the plan decided for this configuration, its recheck while one is owed)."""
    signature, params = _layer_signature(layer)
    chunk = _chunk_size(input, training) if batch_independent else None
    if source == CHANNELS_LAST and chunk is None and dense is None:
        return (CHANNELS_LAST, None), None  # nothing to choose: as given
    if source != CONTIGUOUS and (chunk is None or training):
        product = None  # its output is contiguous, but in chunks outside autograd it writes into the caller's layout
    candidates = (DENSE,) if dense is not None else ()  # a layer with mid modules has the same convs, no dense plan
    candidates += (CHANNELS_LAST_PRODUCT,) if product is not None else ()
    key = (*signature, *candidates, tuple(input.shape), input.dtype, source, training, batch_independent)
    key += (_runtime(),)
    plan = _decisions.get(key)
    if plan is None and _hooked_inside(layer):  # as given, not timed (a decision already made applies, above)
        return (source, None), None
    if plan is None:
        with _lock:  # one measurement per key, even when threads race to it
            plan = _decisions.get(key)
            if plan is None:
                trainable = [p for p in params if p.requires_grad] if training else None
                start = time.perf_counter()
                plan, close = _measure(input, run_convs, trainable, chunk, dense, product)
                _decisions[key] = plan
                _log_measurement("layout", key, _plan_name(*plan), start)
                if close:
                    _rechecks[key] = _Recheck(key, source, close, _RECHECK_AFTER_CALLS)
    return plan, _rechecks.get(key)


def _chunk_size(input: Tensor, training: bool) -> int | None:
    """Samples per call for the chunked candidate: about 4 MB of input for inference, 8 MB for training (with
    the intermediate, the output and, in training, their gradients: working sets that stay in the caches;
    measured best on this project's Xeon), or None when that would not split the batch in two or more.
    A divisor of the batch within 2x of that is preferred: equal chunks are one shape to decide for (a last,
    smaller chunk would have its depthwise backward measured again)."""
    batch = input.shape[0]
    sample_bytes = input.numel() // max(batch, 1) * input.element_size()
    target = _CHUNK_BYTES * (2 if training else 1) / max(sample_bytes, 1)
    divisors = [d for d in range(1, batch // 2 + 1) if batch % d == 0]
    nearest = min(divisors, key=lambda d: abs(math.log(d / target)), default=None)
    if nearest is not None and 0.5 <= nearest / target <= 2:
        return nearest
    chunk = max(1, round(target))
    return chunk if 2 * chunk <= batch else None


def _plan_name(layout: str, chunk: int | None) -> str:
    return layout if chunk is None else f"{layout} in batch chunks of {chunk}"


def _layer_signature(layer: nn.Module) -> tuple[tuple[str, ...], list[Tensor]]:
    """(class and conv geometry, conv parameters) of ``layer`` as it is now: a conv or parameter replaced since
    the layer's last decision is not timed in its predecessor's place (autograd would find the old parameter
    outside the graph). Parametrized weights contribute their originals. Runs on a plan memo miss only."""
    convs = [m for m in layer.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return (type(layer).__name__, *(conv.extra_repr() for conv in convs)), [p for c in convs for p in c.parameters()]


def _measure(
    input: Tensor,
    convs: Callable[[Tensor], Tensor],
    params: list[Tensor] | None,
    chunk: int | None = None,
    dense: Callable[[Tensor], Tensor] | None = None,
    product: Callable[..., Tensor] | None = None,
) -> tuple[tuple[str, int | None], dict[str, tuple[tuple[str, int | None], float]]]:
    """The fastest plan for ``convs``, conversions included: contiguous, channels_last, and with ``chunk``
    channels_last ``chunk`` samples at a time (a channels_last input: as given or in chunks), and with
    ``dense`` that dense conv in the input's layout, and with ``product`` that channels_last block with a
    contiguous output (a contiguous input), and in chunks (with ``chunk``) writing into the caller's layout.
    Forward first, then forward+backward when training, unless the forward alone already shows a clear winner (it
    spares the slow layout's backward, which can take seconds: 31x31 depthwise in NCHW). Returns the plan and, where
    two or more plans came within ``_RECHECK_WITHIN`` of the fastest, those plans (name -> (plan, seconds)) for
    a recheck; else an empty dict."""
    source = CONTIGUOUS if input.is_contiguous() else CHANNELS_LAST  # the plain path: the input as given
    plans = {_plan_name(layout, None): (layout, None) for layout in (CONTIGUOUS, CHANNELS_LAST)}
    if chunk is not None:
        plans[_plan_name(CHANNELS_LAST, chunk)] = (CHANNELS_LAST, chunk)
    if dense is not None:
        plans[DENSE] = (DENSE, None)
    if product is not None:
        if source == CONTIGUOUS:
            plans[CHANNELS_LAST_PRODUCT] = (CHANNELS_LAST_PRODUCT, None)
        if chunk is not None:
            plans[_plan_name(CHANNELS_LAST_PRODUCT, chunk)] = (CHANNELS_LAST_PRODUCT, chunk)
    # in training the forward alone only prunes (a 3x gap): one timed round is enough for that
    rounds = None if params is None else 1
    times = _time_layouts(input, convs, None, chunk, timed_rounds=rounds, dense=dense, product=product)
    if params is not None and not _clear_winner(times):
        # a plan whose forward alone is clearly behind is not timed in training (nor are its backward choices:
        # 31x31 batch 32, the first training call 18 -> 10 s)
        contenders = {name for name, seconds in times.items() if seconds <= cpu_timing.CLEAR_WIN * min(times.values())}
        times = _time_layouts(input, convs, params, chunk, contenders, dense=dense, product=product)
    # an alternative must win clearly: its conversions cost more inside a network than in this isolated test
    best = min(times, key=times.__getitem__)
    plan = plans[best] if times[best] * _MARGIN < times.get(source, math.inf) else (source, None)
    close = {name: (plans[name], t) for name, t in times.items() if t <= _RECHECK_WITHIN * times[best]}
    return plan, (close if len(close) > 1 else {})


def _clear_winner(times: dict[str, float]) -> bool:
    """Whether the fastest is more than ``cpu_timing.CLEAR_WIN`` times faster than every other."""
    first, second = sorted(times.values())[:2]
    return second > cpu_timing.CLEAR_WIN * first


def _time_layouts(
    input: Tensor,
    convs: Callable[[Tensor], Tensor],
    params: list[Tensor] | None,
    chunk: int | None = None,
    only: set[str] | None = None,
    timed_rounds: int | None = None,
    dense: Callable[[Tensor], Tensor] | None = None,
    product: Callable[..., Tensor] | None = None,
) -> dict[str, float]:
    """Median seconds of one step per plan (see :func:`_measure`; ``timed_rounds`` caps the timed rounds), every
    step on the caller's input (detached: nothing writes to it). Not on a fresh copy per step: each copy took
    the block the step's own buffers would reuse, so steps paid page faults for fresh memory that steady
    calls do not — (96, 112, 24) stride 2 batch 1 training: 4.6-5.3 ms a step with copies, 3.5 ms without
    and 3.3 ms in an interleaved benchmark; the inflated times ranked plans differently from call to call.
    A training step feeds the layer from an elementwise op (ReLU) whose backward consumes the input gradient,
    as inside a network: a channels_last caller's (576, 14, 96) batch 32 step in batch chunks measured 19.4
    vs 22.4 ms as given on a leaf input, yet ran 24.5 vs 18.8 ms with the ReLU (chunks: 24.3 vs 16.1 with it)."""

    x = input.detach()
    if params is not None:
        x.requires_grad_(True)

    def step(run_plan: Callable[[Tensor], Tensor]) -> Callable[[], None]:
        def run_step() -> None:
            with torch.enable_grad() if params is not None else torch.no_grad():
                out = run_plan(x if params is None else torch.relu(x))  # the upstream op in training
                if params is not None:
                    torch.autograd.grad(out, [x, *params], torch.ones_like(out))

        return run_step

    if input.is_contiguous():
        steps = {CONTIGUOUS: step(convs), CHANNELS_LAST: step(lambda x: cpu_layout.in_channels_last(convs, x))}
        if product is not None:
            steps[CHANNELS_LAST_PRODUCT] = step(lambda x: cpu_layout.in_channels_last(product, x))
    else:  # a channels_last input: as given, or in chunks
        steps = {CHANNELS_LAST: step(convs)}
    if chunk is not None:
        steps[_plan_name(CHANNELS_LAST, chunk)] = step(lambda x: _in_chunks(convs, x, chunk))
    if product is not None and chunk is not None:
        in_chunks = step(lambda x: _in_chunks(product, x, chunk, writes_into=params is None))
        steps[_plan_name(CHANNELS_LAST_PRODUCT, chunk)] = in_chunks
    if dense is not None:
        steps[DENSE] = step(dense)
    if only is not None:  # the plans still in the running
        steps = {name: run_step for name, run_step in steps.items() if name in only}
    return cpu_timing.time_candidates(steps, timed_rounds=timed_rounds)


def _hooked_inside(layer: nn.Module) -> bool:
    """Whether a module inside ``layer`` (its own hooks fire once around the call) carries hooks, or global module
    hooks are set: timing the layer's plans would run them hundreds of times — a counting hook would count them, a
    capturing one keep them, a stateful one (``torch.nn.utils.spectral_norm``'s power iteration) advance on each."""
    if (
        _nn_module._global_forward_pre_hooks
        or _nn_module._global_forward_hooks
        or _nn_module._global_backward_pre_hooks
        or _nn_module._global_backward_hooks
    ):
        return True
    for module in layer.modules():
        if module is not layer and (
            module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
        ):
            return True
    return False
