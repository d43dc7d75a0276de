"""Model-wide cost report: one row per module that does work, totals, "what if separable", measured latency.

Counting happens at the operator level on the ``meta`` device (see :mod:`sepconv.counting` for the
conventions: MAC = multiply-add, ``flops = 2 * macs``, bias adds apart, whole batch, non-MAC ops as
``other_ops`` = elements written). Rows are leaf modules plus a container's own ops (a residual add
is its block's row); a module called twice gives two rows (``name#2``); functional calls count.

>>> import torch
>>> from torch import nn
>>> report = analyze(nn.Sequential(nn.Conv2d(10, 32, 3), nn.ReLU()), (5, 10, 50, 50), what_if=True)
>>> [(r.name, r.macs) for r in report.rows], report.total.macs
([('0', 33177600), ('1', 0)], 33177600)
>>> w = report.what_if[0]; (w.name, w.separable_macs, w.macs_saved)  # 5·48·48·10·(9 + 32) separable
('0', 4723200, 28454400)
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sepconv._block_tables import qualified_name
from sepconv._module_kinds import pads_same
from sepconv.cost import cost
from sepconv.counting import Call, count_calls
from sepconv.layers import SeparableConv1d, SeparableConv2d, SeparableConv3d, _Conv

if TYPE_CHECKING:
    from sepconv.bench import Timing

__all__ = ["Measurement", "Report", "Row", "WhatIf", "analyze", "separable_twin"]

_ROUNDS = 3  # measure=True: interleaved timing rounds per model
_SEPARABLE = {1: SeparableConv1d, 2: SeparableConv2d, 3: SeparableConv3d}
Inputs = Sequence[int] | Tensor | Sequence[Tensor]
# besides _block_tables.SAME_PADDED_CONVS, timm convs whose forward pads for TF's 'same' (timm 0.9-1.0): one that
# does so always (its padding fixed at the first call's size), and ones that do when their `same_pad` flag is set
_SAME_PADDED_EXTRA = frozenset({"timm.layers.conv2d_same.Conv2dSameExport"})
_SAME_PAD_FLAG = frozenset({"timm.layers.std_conv.StdConv2dSame", "timm.layers.std_conv.ScaledStdConv2dSame"})


@dataclass(frozen=True)
class Row:
    """Cost of one module call (its children excluded), or of a group of them; ``flops = 2·macs``."""

    name: str
    type: str
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    params: int
    macs: int
    bias_adds: int
    other_ops: int
    activation_bytes: int
    backward_macs: int = 0
    backward_other_ops: int = 0
    flops: int = field(init=False)
    backward_flops: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "flops", 2 * self.macs)
        object.__setattr__(self, "backward_flops", 2 * self.backward_macs)


@dataclass(frozen=True)
class WhatIf:
    """A standard conv call (groups=1, kernel > 1) and its depthwise separable twin (depth multiplier 1)."""

    name: str
    type: str
    kernel_size: tuple[int, ...]
    params: int
    macs: int
    separable_params: int
    separable_macs: int

    @property
    def params_saved(self) -> int:
        return self.params - self.separable_params

    @property
    def macs_saved(self) -> int:
        return self.macs - self.separable_macs


@dataclass(frozen=True)
class Measurement:
    """Median forward latency and peak memory of the model and its twin, and what the times depend on beside the
    device: the GPU's name, or the CPU's model, threads and allocator regime. ``*_peak_bytes``: the CUDA
    allocator's peak (``None`` on CPU); ``*_tensor_peak_bytes``: the most bytes of tensors the forward allocates
    alive at once, on any device (:mod:`sepconv.memory`: no allocator cache, no library workspaces)."""

    device: str
    model: Timing
    twin: Timing
    model_peak_bytes: int | None
    twin_peak_bytes: int | None
    conditions: str = ""
    model_tensor_peak_bytes: int | None = None
    twin_tensor_peak_bytes: int | None = None


@dataclass(frozen=True)
class Report:
    """Rows in execution order, ``total`` (same fields; ``params`` = every parameter of the model), optional extras."""

    rows: tuple[Row, ...]
    total: Row
    backward: bool = False
    what_if: tuple[WhatIf, ...] | None = None  # ranked by MACs saved, largest first
    measurement: Measurement | None = None
    module_types: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # name -> class name

    def by_depth(self, depth: int) -> list[Row]:
        """Rows summed per module-name prefix of ``depth`` parts (``layer1.0.conv1`` at depth 2 is ``layer1.0``).

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2))
        >>> [(r.name, r.type, r.params, r.macs) for r in analyze(net, (3, 4)).by_depth(1)]
        [('0', 'Sequential', 40, 96), ('1', 'Linear', 18, 48)]
        """
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        groups: dict[str, list[Row]] = {}
        for row in self.rows:
            groups.setdefault(".".join(row.name.split(".")[:depth]), []).append(row)
        types = {name: self.module_types.get(name.split("#")[0], rows[0].type) for name, rows in groups.items()}
        return [_sum_rows(name, types[name], rows) for name, rows in groups.items()]

    def what_if_totals(self) -> dict[str, int]:
        """Model totals before and after replacing every what-if conv by its separable twin."""
        if self.what_if is None:
            raise ValueError("this report has no what-if; call analyze(..., what_if=True)")
        return {
            "params_before": self.total.params,
            "params_after": self.total.params - sum(w.params_saved for w in self.what_if),
            "macs_before": self.total.macs,
            "macs_after": self.total.macs - sum(w.macs_saved for w in self.what_if),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"rows": [...], "total": {...}}`` plus ``what_if`` and ``measure`` when present."""
        data: dict[str, Any] = {"rows": [asdict(r) for r in self.rows], "total": asdict(self.total)}
        data["backward"] = self.backward
        if self.what_if is not None:
            layers = [asdict(w) | {"params_saved": w.params_saved, "macs_saved": w.macs_saved} for w in self.what_if]
            data["what_if"] = {"layers": layers, "total": self.what_if_totals()}
        if self.measurement is not None:
            m = self.measurement
            data["measure"] = {
                "device": m.device,
                "conditions": m.conditions,
                "model": asdict(m.model)
                | {"peak_bytes": m.model_peak_bytes, "tensor_peak_bytes": m.model_tensor_peak_bytes},
                "twin": asdict(m.twin)
                | {"peak_bytes": m.twin_peak_bytes, "tensor_peak_bytes": m.twin_tensor_peak_bytes},
            }
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def analyze(
    model: nn.Module,
    inputs: Inputs,
    *,
    backward: bool = False,
    what_if: bool = False,
    measure: bool = False,
    device: torch.device | str = "cpu",
    min_run_time: float = 0.5,
) -> Report:
    """Count what ``model`` costs on ``inputs`` (a shape, a tensor or a sequence of tensors), layer by layer.

    Counting runs on the ``meta`` device with the model's parameters swapped for meta tensors, so
    nothing is computed and ``model`` is not changed; its train/eval mode is used as it is.
    ``backward=True`` adds the backward pass of a training step (gradients of all parameters, none
    for the input). ``what_if=True`` adds the separable twin of every standard conv (groups=1,
    kernel > 1). ``measure=True`` times the model and that twin (random weights) on ``device``.

    >>> from torch import nn
    >>> report = analyze(nn.Conv2d(16, 16, 4, groups=16, padding="same", bias=False), (1, 16, 32, 32), backward=True)
    >>> report.total.macs, report.total.backward_macs  # grad-weight only: the input needs no gradient
    (262144, 262144)
    """
    if measure:  # checked before counting, so a bad argument fails at once
        device = _measure_device(device)
        min_run_time = _positive_seconds(min_run_time)
    args = _meta_inputs(inputs, _dtype(model))
    state = {
        name: torch.empty_like(t, device="meta").requires_grad_(backward and t.requires_grad)
        for name, t in (*model.named_parameters(), *model.named_buffers())
    }
    try:
        calls = count_calls(model, args, state=state, backward=backward)
    except Exception as error:  # the model's own failure, in any exception type: one line for the user
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        raise ValueError(
            f"{type(model).__name__} failed on input {shapes} (analysis runs on the meta device): "
            f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        ) from error
    rows = tuple(_row(c) for c in sorted(calls, key=lambda c: c.order) if c.did_work)
    total = replace(
        _sum_rows("total", type(model).__name__, rows),
        input_shape=calls[0].input_shape,
        output_shape=calls[0].output_shape,
        params=sum(p.numel() for p in model.parameters()),
    )
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    report = Report(rows=rows, total=total, backward=backward, module_types=types)
    if what_if or measure:
        report = replace(report, what_if=_what_if(calls))
    if measure:
        report = replace(report, measurement=_measure(model, inputs, device, min_run_time))
    return report


def separable_twin(model: nn.Module, *, device: torch.device | str | None = None) -> nn.Module:
    """A copy of ``model`` with every standard conv (groups=1, kernel > 1) replaced by a fresh SeparableConvNd.

    The new layers are randomly initialised (for timing; ``sepconv convert`` keeps weights).

    >>> from torch import nn
    >>> twin = separable_twin(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)))
    >>> [type(m).__name__ for m in twin]
    ['SeparableConv2d', 'Conv2d']
    """
    twin = copy.deepcopy(model)
    replacements: dict[int, nn.Module] = {}
    for parent in list(twin.modules()):
        for child_name, child in list(parent.named_children()):
            if _replaceable(child):
                if id(child) not in replacements:
                    replacements[id(child)] = _separable_like(child, device=device)  # type: ignore[arg-type]
                setattr(parent, child_name, replacements[id(child)])
    return twin


def _replaceable(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and not isinstance(module, (nn.modules.conv._ConvTransposeNd, _Conv))
        and module.groups == 1
        and math.prod(module.kernel_size) > 1
    )


def _pads_same_at_run_time(conv: nn.Module) -> bool:
    """Whether ``conv``'s forward pads for TensorFlow's 'same' (any stride) whatever its ``padding`` says."""
    name = qualified_name(conv)
    return (
        pads_same(conv)
        or name in _SAME_PADDED_EXTRA
        or (name in _SAME_PAD_FLAG and getattr(conv, "same_pad", False) is True)
    )


def _separable_like(conv: nn.modules.conv._ConvNd, *, device: torch.device | str | None) -> nn.Module:
    """The SeparableConvNd with ``conv``'s arguments (depth multiplier 1), on ``device`` (default: conv's).

    A conv padding for TF's 'same' in its forward gets ``padding="same"``: our layers pad the same way, at
    any stride, and so keep its output size.
    """
    weight = conv.weight
    return _SEPARABLE[len(conv.kernel_size)](
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        "same" if _pads_same_at_run_time(conv) else conv.padding,  # type: ignore[arg-type]
        conv.dilation,
        1,
        conv.bias is not None,
        conv.padding_mode,
        device=weight.device if device is None else device,
        dtype=weight.dtype,
    )


def _what_if(calls: list[Call]) -> tuple[WhatIf, ...]:
    entries = []
    for call in calls:
        module = call.module
        if module is None or not _replaceable(module) or call.input_shape is None:
            continue
        twin = cost(_separable_like(module, device="meta"), call.input_shape)  # type: ignore[arg-type]
        entries.append(
            WhatIf(
                name=call.name,
                type=call.type,
                kernel_size=tuple(module.kernel_size),  # type: ignore[arg-type]
                params=call.params,
                macs=call.macs,
                separable_params=twin.params if call.params else 0,  # a shared conv's params count once
                separable_macs=twin.macs,
            )
        )
    return tuple(sorted(entries, key=lambda w: -w.macs_saved))


def _measure(model: nn.Module, inputs: Inputs, device: torch.device | str, min_run_time: float) -> Measurement:
    from sepconv.bench import allocator_name, device_name, median_latency, peak_memory_bytes
    from sepconv.memory import peak_live_bytes

    if any(p.is_meta for p in model.parameters()):
        raise ValueError("measure=True needs a model with real weights, not one on the meta device")
    device = torch.device(device)
    dtype = _dtype(model)
    real = copy.deepcopy(model).to(device)
    twin = separable_twin(real, device=device)
    args = _real_inputs(inputs, dtype, device)
    forwards = [_forward(net.eval(), args) for net in (real, twin)]
    # Interleaved rounds, so a load change on the machine hits both alike; each keeps its median round.
    rounds: list[list[Timing]] = [[], []]
    for _ in range(_ROUNDS):
        for timings, forward in zip(rounds, forwards, strict=True):
            timings.append(median_latency(forward, min_run_time=min_run_time / _ROUNDS))
    model_time, twin_time = (sorted(t, key=lambda t: t.median_ms)[_ROUNDS // 2] for t in rounds)
    model_peak, twin_peak = (peak_memory_bytes(forward, device) for forward in forwards)
    model_tensors, twin_tensors = (peak_live_bytes(forward) for forward in forwards)
    conditions = device_name(device)
    if device.type == "cpu":
        conditions += f", {torch.get_num_threads()} threads, {allocator_name()}"
    return Measurement(
        str(device), model_time, twin_time, model_peak, twin_peak, conditions, model_tensors, twin_tensors
    )


def _forward(net: nn.Module, args: tuple[Tensor, ...]) -> Callable[[], None]:
    def forward() -> None:
        with torch.inference_mode():
            net(*args)

    return forward


def _row(call: Call) -> Row:
    return Row(
        name=call.name,
        type=call.type,
        input_shape=call.input_shape,
        output_shape=call.output_shape,
        params=call.params,
        macs=call.macs,
        bias_adds=call.bias_adds,
        other_ops=call.other_ops,
        activation_bytes=call.activation_bytes,
        backward_macs=call.backward_macs,
        backward_other_ops=call.backward_other_ops,
    )


def _sum_rows(name: str, type_: str, rows: Sequence[Row]) -> Row:
    summed = {f.name: sum(getattr(r, f.name) for r in rows) for f in fields(Row) if f.init and f.type == "int"}
    return Row(
        name=name,
        type=type_,
        input_shape=rows[0].input_shape if rows else None,
        output_shape=rows[-1].output_shape if rows else None,
        **summed,
    )


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())


_INPUTS_ARE = "inputs must be a shape of positive ints, a tensor or a sequence of tensors"


def _describe(value: Any) -> str:
    """``value`` for an error message: a tensor by its shape and dtype, never its values."""
    if isinstance(value, Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, (list, tuple)):
        parts = ", ".join(_describe(v) for v in value)
        return f"[{parts}]" if isinstance(value, list) else f"({parts}{',' if len(value) == 1 else ''})"
    return repr(value)


def _shape_arg(inputs: Inputs) -> tuple[int, ...] | None:
    """``inputs`` as a shape if it is a sequence of ints, else None (tensors); TypeError or ValueError if neither."""
    if isinstance(inputs, Tensor):
        return None
    if not isinstance(inputs, Sequence) or isinstance(inputs, (str, bytes)):
        raise TypeError(f"{_INPUTS_ARE}; got {type(inputs).__name__} {_describe(inputs)}")
    if inputs and all(isinstance(s, Tensor) for s in inputs):
        return None
    if not inputs or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in inputs):
        raise ValueError(f"{_INPUTS_ARE}; got {_describe(inputs)}")
    return tuple(inputs)  # type: ignore[arg-type]


def _meta_inputs(inputs: Inputs, dtype: torch.dtype) -> tuple[Tensor, ...]:
    shape = _shape_arg(inputs)
    if shape is not None:
        return (torch.empty(shape, dtype=dtype, device="meta"),)
    tensors = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)  # type: ignore[arg-type]
    return tuple(torch.empty_like(t, device="meta") for t in tensors)


def _measure_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device that this machine has, else a ValueError naming ``device``."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a torch.device or a name such as 'cpu' or 'cuda'; got {device!r}")
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a device name (e.g. 'cpu', 'cuda', 'cuda:1')") from error
    if parsed.type == "meta":
        raise ValueError("device must be one that computes (e.g. 'cpu', 'cuda'), not 'meta', with measure=True")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def _positive_seconds(min_run_time: float) -> float:
    if isinstance(min_run_time, bool) or not isinstance(min_run_time, (int, float)):
        raise TypeError(f"min_run_time must be a number of seconds > 0, got {min_run_time!r}")
    if not min_run_time > 0:  # NaN too
        raise ValueError(f"min_run_time must be > 0 seconds, got {min_run_time}")
    return float(min_run_time)


def _real_inputs(inputs: Inputs, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    shape = _shape_arg(inputs)
    if shape is not None:
        return (torch.randn(shape, dtype=dtype, device=device),)
    tensors = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)  # type: ignore[arg-type]
    return tuple(t.to(device) for t in tensors)
