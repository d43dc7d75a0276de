"""Model surgery: replace a model's KxK convolutions by depthwise separable ones, keeping their weights.

Each eligible conv becomes the best separable fit of its weight (:func:`sepconv.decompose_conv`:
per-input-channel SVD, no data needed); the :class:`ConversionReport` says per layer what was
converted or skipped (and why), the rank, parameters and MACs before/after and the weight error.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 8, 1))
>>> converted, report = convert(model, rank=2, example_inputs=torch.randn(1, 3, 16, 16))
>>> [(row.name, row.status, row.rank) for row in report.layers]
[('0', 'converted', 2), ('2', 'converted', 2), ('3', 'skipped', None)]
>>> report.layers[2].reason
'1x1 conv'
>>> type(converted[2]).__name__, report.params_after < report.params_before
('SeparableConv2d', True)

Reloading a converted state_dict: build the architecture, convert it with the same ranks and
``init="random"`` (no SVD of the fresh weights is then needed), load the state_dict:

>>> fresh, _ = convert(model, rank=report.ranks, init="random")
>>> fresh.load_state_dict(converted.state_dict())
<All keys matched successfully>
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import heapq
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sepconv.cost import cost
from sepconv.decompose import (
    ChannelSVD,
    build_separable,
    channel_svd,
    check_conv,
    check_energy,
    check_rank,
    empty_separable,
    rank_for_energy,
)
from sepconv.layers import _DepthwiseConv, _PointwiseConv

__all__ = ["ConversionReport", "LayerReport", "convert"]

INITS = ("decompose", "random")
BUDGET_ON = ("params", "macs")
KEPT_BY_BUDGET = "kept by budget: the original is cheaper than its separable form"
Patterns = str | Sequence[str] | None


@dataclass(frozen=True)
class LayerReport:
    """One convolution of the model: converted, or skipped and why.

    ``macs_*`` are None without ``example_inputs`` (and for a layer that did not run on them; a layer
    called several times counts its first call); ``relative_error`` (``||W - Ŵ||_F / ||W||_F``) and
    ``kept_energy`` are None for skipped layers and for ``init="random"``.
    """

    name: str
    type: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    groups: int
    status: str  # "converted" | "skipped"
    reason: str  # why skipped, "" if converted
    rank: int | None
    max_rank: int | None
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    relative_error: float | None
    kept_energy: float | None


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert` did: one :class:`LayerReport` per conv, totals, and the output error.

    ``params_before/after`` and ``macs_before/after`` sum the listed conv layers (MACs need
    ``example_inputs``); ``model_params_before/after`` count the whole model. ``output_error`` is
    ``||f'(x) - f(x)|| / ||f(x)||`` of the whole model in eval mode on ``example_inputs``, over the
    tensors of its output (found in tuples, named ones included, lists, mappings and dataclasses). It is
    None without ``example_inputs``, and when the output holds no tensor or holds another kind of object
    (its tensors cannot be found: None, not a 0.0 that would claim identical outputs).
    """

    layers: tuple[LayerReport, ...]
    settings: dict[str, Any]
    model_params_before: int
    model_params_after: int
    output_error: float | None = None
    input_shapes: tuple[tuple[int, ...], ...] | None = None
    totals: dict[str, int | None] = field(init=False)

    def __post_init__(self) -> None:
        def total(key: str) -> int | None:
            values = [getattr(row, key) for row in self.layers]
            return None if any(v is None for v in values) else sum(values)

        keys = ("params_before", "params_after", "macs_before", "macs_after")
        object.__setattr__(self, "totals", {key: total(key) for key in keys})

    @property
    def converted(self) -> tuple[LayerReport, ...]:
        return tuple(row for row in self.layers if row.status == "converted")

    @property
    def ranks(self) -> dict[str, int]:
        """``{layer name: rank}`` of the converted layers: pass it as ``rank=`` to convert an architecture alike."""
        return {row.name: row.rank for row in self.converted if row.rank is not None}

    @property
    def params_before(self) -> int:
        return int(self.totals["params_before"] or 0)

    @property
    def params_after(self) -> int:
        return int(self.totals["params_after"] or 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: settings, totals, output error and one dict per layer."""
        return {
            "settings": self.settings,
            "input_shapes": [list(s) for s in self.input_shapes] if self.input_shapes else None,
            "totals": {
                **self.totals,
                "model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after,
            },
            "output_error": self.output_error,
            "converted": len(self.converted),
            "ranks": self.ranks,
            "layers": [{**asdict(row), "kernel_size": list(row.kernel_size)} for row in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """One paragraph: how many layers were converted and what that saved and cost.

        >>> _, report = convert(nn.Sequential(nn.Conv1d(4, 4, 1)), rank=1)
        >>> report.summary()
        'No eligible conv layer: the model is unchanged (1 conv layer skipped).'
        """
        n, skipped = len(self.converted), len(self.layers) - len(self.converted)
        if n == 0:
            plural = "s" * (skipped != 1)
            return f"No eligible conv layer: the model is unchanged ({skipped} conv layer{plural} skipped)."
        eligible_before = sum(row.params_before for row in self.converted)
        eligible_after = sum(row.params_after for row in self.converted)
        text = (
            f"Converted {n} of {len(self.layers)} conv layers: their parameters {eligible_before:,} -> "
            f"{eligible_after:,} ({eligible_after / eligible_before:.3f}x); model parameters "
            f"{self.model_params_before:,} -> {self.model_params_after:,} "
            f"({self.model_params_after / max(self.model_params_before, 1):.3f}x)"
        )
        macs_before, macs_after = self.totals["macs_before"], self.totals["macs_after"]
        if macs_before:
            text += f"; conv MACs {macs_before:,} -> {macs_after:,} ({(macs_after or 0) / macs_before:.3f}x)"
        if self.output_error is not None:
            text += f"; relative output error {self.output_error:.4g}"
        return text + "."

    def table(self) -> Any:
        """A ``rich.table.Table`` with one row per conv layer."""
        from rich.markup import escape
        from rich.table import Table

        from sepconv.render import si

        table = Table(title="sepconv convert", caption=self.summary())
        for column in ("layer", "shape", "status", "rank", "params", "MACs", "weight err"):
            table.add_column(column, justify="left" if column in ("layer", "shape", "status") else "right")
        for row in self.layers:
            k = "x".join(map(str, row.kernel_size))
            shape = f"{row.in_channels}->{row.out_channels} k{k}" + (f" g{row.groups}" if row.groups > 1 else "")
            status = "converted" if row.status == "converted" else f"[dim]skipped: {escape(row.reason)}[/dim]"
            rank = "" if row.rank is None else f"{row.rank}/{row.max_rank}"
            params = f"{si(row.params_before)} -> {si(row.params_after)}" if row.status == "converted" else ""
            macs = ""
            if row.status == "converted" and row.macs_before is not None:
                macs = f"{si(row.macs_before)} -> {si(row.macs_after)}"
            err = "" if row.relative_error is None else f"{row.relative_error:.3f}"
            table.add_row(escape(row.name), shape, status, rank, params, macs, err)
        return table


@dataclass
class _Candidate:
    """An eligible conv while ranks are chosen."""

    name: str
    conv: nn.modules.conv._ConvNd
    max_rank: int
    svd: ChannelSVD | None = None
    rank: int = 1


def convert(
    model: nn.Module,
    *,
    rank: int | Mapping[str, int] | None = None,
    energy: float | None = None,
    budget: float | None = None,
    budget_on: str = "params",
    include: Patterns = None,
    exclude: Patterns = None,
    min_kernel_size: int = 2,
    init: str = "decompose",
    inplace: bool = False,
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """Replace ``model``'s eligible convolutions by separable ones; return the model and a report.

    Give exactly one way to pick each layer's rank (its depth multiplier):

    - ``rank``: an int for every layer (clamped to the layer's exact rank ``min(O/groups, K^d)``), or
      a ``{name: rank}`` mapping (e.g. ``report.ranks``) converting exactly the layers it names;
    - ``energy`` in (0, 1]: per layer, the smallest rank keeping that share of squared singular values;
    - ``budget`` > 0: the converted layers together may cost at most this fraction of what the same
      layers cost before, in parameters (``budget_on="params"``) or MACs (``"macs"``, needs
      ``example_inputs``). Ranks start at 1 everywhere; then, greedily, the rank step with the largest
      drop in *relative* squared weight error (``||W - Ŵ||² / ||W||²``, so that layers followed by a
      norm, whose scale does not matter, compete fairly) per unit of added cost is taken while it fits.
      Each layer's error curve is convex in the rank, so this is the classic greedy for a separable
      convex knapsack (optimal when the steps cost the same). A rank never makes a layer cost as much
      as the original conv; a layer whose rank-1 form is not cheaper than the original is kept as it
      is (reason ``KEPT_BY_BUDGET``; it still counts in the budget). A budget below the cheapest choice
      raises ValueError.

    Eligible: plain ``nn.Conv1d/2d/3d`` (any groups, stride, padding, dilation, padding_mode) whose
    name matches an ``include`` pattern (fnmatch; default all) and no ``exclude`` pattern, and whose
    largest kernel dim is >= ``min_kernel_size``. Never converted: 1x1 convs, depthwise convs
    (``groups == in_channels > 1``), sepconv's own layers, transposed convs, conv subclasses with their
    own ``forward``. A conv shared by several parents answers to each of its names (in patterns and rank
    mappings); the report names it by its first. ``init="random"`` builds the same layers freshly
    initialised (BSConv-style), for comparison and for reloading a converted state_dict. The model is
    deep-copied unless ``inplace=True``. With ``example_inputs`` (a tensor or a tuple of positional
    inputs) the report adds MACs per layer and the whole model's relative output error (both models in
    eval mode); ValueError if the model fails on them. New layers keep the conv's ``requires_grad``.

    >>> model = nn.Sequential(nn.Conv2d(8, 64, 3), nn.BatchNorm2d(64), nn.Conv2d(64, 64, 3, groups=64))
    >>> _, report = convert(model, budget=0.3)
    >>> first = report.layers[0]
    >>> report.layers[1].reason, first.rank, first.params_after <= 0.3 * first.params_before
    ('depthwise conv', 2, True)
    """
    rank_given = rank  # a mapping is re-keyed by each conv's first name below; the report keeps the user's
    choice = _check_options(rank, energy, budget, budget_on, init, min_kernel_size, example_inputs)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r} ({type(inplace).__name__})")
    include_patterns, exclude_patterns = _patterns("include", include), _patterns("exclude", exclude)
    model = model if inplace else copy.deepcopy(model)
    paths = _conv_paths(model)
    convs = [(names[0], conv) for conv, names in paths.items()]
    reasons = _skip_reasons(paths, include_patterns, exclude_patterns, min_kernel_size)
    if isinstance(rank, Mapping):
        reasons, rank = _apply_rank_mapping(paths, reasons, rank)
    candidates = [_Candidate(name, conv, _max_rank(conv)) for name, conv in convs if not reasons[name]]  # type: ignore[arg-type]

    shapes: dict[str, tuple[int, ...]] = {}
    reference = None
    if example_inputs is not None:
        reference, shapes = _run_recording_shapes(model, example_inputs, dict(convs))

    if init == "decompose" or choice != "rank":
        for cand in candidates:
            cand.svd = channel_svd(cand.conv)
    kept = _choose_ranks(candidates, choice, rank, energy, budget, budget_on, shapes)
    if kept:
        candidates = [cand for cand in candidates if cand.name not in kept]
        reasons.update({name: KEPT_BY_BUDGET for name in kept})

    replacements: dict[nn.Module, nn.Module] = {}
    for cand in candidates:
        if init == "decompose":
            assert cand.svd is not None
            replacements[cand.conv] = build_separable(cand.conv, cand.svd, cand.rank)
        else:
            replacements[cand.conv] = empty_separable(cand.conv, cand.rank)
    params_before = _count_params(model)
    _replace(model, replacements)

    output_error = None
    if example_inputs is not None:  # the original ran on them: a failure of the converted model is our bug
        output_error = _relative_error(_run_eval(model, example_inputs), reference)

    rows = tuple(
        _layer_row(name, conv, reasons[name], replacements.get(conv), shapes.get(name)) for name, conv in convs
    )
    settings = {
        "rank": dict(rank_given) if isinstance(rank_given, Mapping) else rank_given,
        "energy": energy,
        "budget": budget,
        "budget_on": budget_on,
        "include": include_patterns,
        "exclude": exclude_patterns,
        "min_kernel_size": min_kernel_size,
        "init": init,
    }
    input_shapes = tuple(tuple(x.shape) for x in _as_tuple(example_inputs)) if example_inputs is not None else None
    report = ConversionReport(rows, settings, params_before, _count_params(model), output_error, input_shapes)
    return model, report


def _check_options(
    rank: object,
    energy: object,
    budget: object,
    budget_on: object,
    init: object,
    min_kernel_size: object,
    example_inputs: object,
) -> str:
    """Validate the arguments; return which rank choice was given: 'rank', 'energy' or 'budget'."""
    given = [name for name, value in (("rank", rank), ("energy", energy), ("budget", budget)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of rank, energy or budget; got {', '.join(given) or 'none'}")
    if isinstance(rank, Mapping):
        for name, value in rank.items():
            check_rank(value, f"rank[{name!r}]")
    elif rank is not None:
        check_rank(rank)
    if energy is not None:
        check_energy(energy)
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise TypeError(f"budget must be a number > 0 (a fraction of the layers' cost), got {budget!r}")
        if not (budget > 0 and math.isfinite(budget)):
            raise ValueError(f"budget must be a finite number > 0 (a fraction of the layers' cost), got {budget}")
    if budget_on not in BUDGET_ON:
        raise ValueError(f"budget_on must be one of {BUDGET_ON}, got {budget_on!r}")
    if budget is not None and budget_on == "macs" and example_inputs is None:
        raise ValueError("budget_on='macs' needs example_inputs to know each layer's output size")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    check_rank(min_kernel_size, "min_kernel_size")
    if example_inputs is not None and not all(isinstance(x, Tensor) for x in _as_tuple(example_inputs)):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors (the model's positional inputs)")
    return given[0]


def _patterns(name: str, patterns: Patterns) -> list[str] | None:
    """``include``/``exclude`` as a list of fnmatch patterns (None: not given)."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{name} must be a pattern string or a list or tuple of them, got {patterns!r} ({type(patterns).__name__})"
        )
    return list(patterns)


def _conv_paths(model: nn.Module) -> dict[nn.Module, list[str]]:
    """Every conv of ``model`` with all its names, in ``named_modules`` order (a shared conv has several)."""
    paths: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.modules.conv._ConvNd):
            paths.setdefault(module, []).append(name)
    return paths


def _skip_reasons(
    paths: dict[nn.Module, list[str]],
    include: list[str] | None,
    exclude: list[str] | None,
    min_kernel_size: int,
) -> dict[str, str]:
    """``{first name: why it is skipped}`` for every conv, ``""`` for the eligible ones.

    A conv is matched by a pattern if any of its names is; ValueError if ``include`` picks a shared conv
    under one name and ``exclude`` drops it under another (which one the user meant is unclear).
    """
    names = [name for names in paths.values() for name in names]
    for label, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or []:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                examples = ", ".join(names[:5]) or "none"
                raise ValueError(f"{label} pattern {pattern!r} matches no conv layer (conv layers: {examples}, ...)")

    def matches(name: str, patterns: list[str] | None) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns or [])

    reasons = {}
    for conv, conv_names in paths.items():
        excluded = [name for name in conv_names if matches(name, exclude)]
        included = [name for name in conv_names if matches(name, include) and name not in excluded]
        if included and excluded:
            raise ValueError(
                f"one conv is shared under the names {included[0]!r} and {excluded[0]!r}: include picks it as "
                f"{included[0]!r}, exclude drops it as {excluded[0]!r}; make the patterns agree"
            )
        reason = _structural_reason(conv, min_kernel_size)
        if not reason and include is not None and not included and not excluded:
            reason = "not matched by include"
        if not reason and excluded:
            reason = "matched by exclude"
        reasons[conv_names[0]] = reason
    return reasons


def _structural_reason(conv: nn.Module, min_kernel_size: int) -> str:
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return "transposed conv"
    if isinstance(conv, (_DepthwiseConv, _PointwiseConv)):
        return "already a sepconv layer"
    try:
        check_conv(conv)
    except TypeError:
        return f"{type(conv).__name__} has its own forward"
    kernel = conv.kernel_size  # type: ignore[attr-defined]
    if all(k == 1 for k in kernel):
        return "1x1 conv"
    if conv.groups == conv.in_channels > 1:  # type: ignore[attr-defined]
        return "depthwise conv"
    if max(kernel) < min_kernel_size:
        return f"kernel smaller than min_kernel_size={min_kernel_size}"
    return ""


def _apply_rank_mapping(
    paths: dict[nn.Module, list[str]], reasons: dict[str, str], ranks: Mapping[str, int]
) -> tuple[dict[str, str], dict[str, int]]:
    """Convert exactly the layers a ``{name: rank}`` mapping names (any name of a shared conv); each must be
    eligible. Returns the new reasons and the mapping keyed by each conv's first name."""
    first = {name: names[0] for names in paths.values() for name in names}
    by_first: dict[str, int] = {}
    named_as: dict[str, str] = {}
    for name, value in ranks.items():
        if name not in first:
            raise ValueError(f"rank names layer {name!r}, which is not a conv layer of the model")
        key = first[name]
        if reasons[key]:
            raise ValueError(f"rank names layer {name!r}, which cannot be converted: {reasons[key]}")
        if key in by_first and by_first[key] != value:
            raise ValueError(
                f"rank gives one shared conv two ranks: {by_first[key]} as {named_as[key]!r}, {value} as {name!r}"
            )
        by_first[key], named_as[key] = value, name
    new = {name: reason or ("" if name in by_first else "not in the rank mapping") for name, reason in reasons.items()}
    return new, by_first


def _max_rank(conv: nn.modules.conv._ConvNd) -> int:
    return min(conv.out_channels // conv.groups, math.prod(conv.kernel_size))


def _choose_ranks(
    candidates: list[_Candidate],
    choice: str,
    rank: int | Mapping[str, int] | None,
    energy: float | None,
    budget: float | None,
    budget_on: str,
    shapes: dict[str, tuple[int, ...]],
) -> set[str]:
    """Set each candidate's rank; return the names a budget keeps unconverted."""
    for cand in candidates:
        if choice == "rank":
            wanted = rank[cand.name] if isinstance(rank, Mapping) else rank
            cand.rank = min(int(wanted), cand.max_rank)  # type: ignore[arg-type]
        elif choice == "energy":
            assert cand.svd is not None and energy is not None
            cand.rank = rank_for_energy(cand.svd, energy)
    if choice == "budget" and candidates:
        assert budget is not None
        return _greedy_budget(candidates, budget, budget_on, shapes)
    return set()


def _greedy_budget(candidates: list[_Candidate], budget: float, budget_on: str, shapes: dict) -> set[str]:
    """Pick ranks within ``budget`` x the layers' cost, greedily by relative error drop per unit of cost.

    A layer's rank stays below the cost of the original conv; a layer whose rank-1 form is not cheaper
    than the original is kept as it is (exact and cheaper). Returns the names of the kept layers.
    """
    costs = [_rank_costs(c, budget_on, shapes.get(c.name)) for c in candidates]  # (before, at rank 1, per rank)
    caps = [_rank_cap(cand.max_rank, *cost_) for cand, cost_ in zip(candidates, costs, strict=True)]
    before = sum(b for b, _, _ in costs)
    limit = budget * before
    current = sum(one if cap else b for (b, one, _), cap in zip(costs, caps, strict=True))
    if current > limit:
        raise ValueError(
            f"budget {budget} cannot be met: rank 1 everywhere already costs {current / before:.4f} of "
            f"the {len(candidates)} eligible layers' {budget_on} (exclude layers or raise the budget)"
        )
    curves = []
    for cand in candidates:
        assert cand.svd is not None
        dropped = cand.svd.dropped_energy()
        total = float(dropped[0])
        curves.append([float(d) / total if total > 0 else 0.0 for d in dropped])
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        r = candidates[i].rank
        gain = curves[i][r] - curves[i][r + 1] if r < caps[i] else 0.0
        if gain > 0:
            heapq.heappush(heap, (-gain / costs[i][2], i))

    for i in range(len(candidates)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        if current + costs[i][2] <= limit:
            current += costs[i][2]
            candidates[i].rank += 1
            push(i)
        # else: every later step of this layer costs the same and gains less; drop the layer
    return {cand.name for cand, cap in zip(candidates, caps, strict=True) if cap == 0}


def _rank_cap(max_rank: int, before: int, one: int, step: int) -> int:
    """The largest rank <= ``max_rank`` whose separable layer costs less than the original (0 if none).

    >>> _rank_cap(9, before=324, one=90, step=90), _rank_cap(9, before=50, one=60, step=40)
    (3, 0)
    """
    if one >= before:
        return 0
    return min(max_rank, 1 + (before - one - 1) // step) if step > 0 else max_rank


def _rank_costs(cand: _Candidate, budget_on: str, shape: tuple[int, ...] | None) -> tuple[int, int, int]:
    """(cost of the conv, of its separable twin at rank 1, added per rank) in params or MACs, by cost()."""

    def measure(module: nn.Module) -> int:
        if budget_on == "params":
            return sum(p.numel() for p in module.parameters())
        if shape is None:
            raise ValueError(
                f"layer {cand.name!r} did not run on example_inputs, so its MACs are unknown: "
                "exclude it or use budget_on='params'"
            )
        return cost(module, shape).macs

    one = measure(empty_separable(cand.conv, 1, device="meta"))
    two = measure(empty_separable(cand.conv, 2, device="meta"))
    return measure(cand.conv), one, two - one


def _replace(model: nn.Module, replacements: dict[nn.Module, nn.Module]) -> None:
    """Swap every reference to a replaced module (a module shared by two parents is swapped in both)."""
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is not None and child in replacements:
                parent._modules[key] = replacements[child]


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _as_tuple(inputs: Any) -> tuple[Any, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _run_eval(model: nn.Module, inputs: Any) -> Any:
    """The model's output on ``inputs`` in eval mode, without grad; every module's mode is restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(*_as_tuple(inputs))
    finally:
        for module, mode in modes.items():
            module.training = mode


def _run_recording_shapes(
    model: nn.Module, inputs: Any, convs: dict[str, nn.Module]
) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """The model's eval-mode output on ``inputs`` and the input shape each conv saw (the first call's).

    ValueError if the model fails on ``inputs`` (the user's inputs do not fit it: one line, not a traceback).
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input")  # a parent may call conv(input=x)
            if isinstance(x, Tensor):
                shapes.setdefault(name, tuple(x.shape))

        return record

    handles = [conv.register_forward_pre_hook(hook(name), with_kwargs=True) for name, conv in convs.items()]
    try:
        output = _run_eval(model, inputs)
    except Exception as error:  # the model's own failure, in any exception type (as sepconv.analyze reports it)
        given = ", ".join(str(tuple(x.shape)) for x in _as_tuple(inputs))
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"{type(model).__name__} failed on example_inputs {given}: {type(error).__name__}: {message}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return output, shapes


_PLAIN = (str, bytes, int, float, complex, type(None))  # values without tensors inside: nothing to compare


def _leaves(output: Any) -> list[Tensor] | None:
    """The tensors in ``output`` (in tuples, lists, mappings, dataclasses); None if it holds another object.

    >>> @dataclasses.dataclass
    ... class Out:
    ...     logits: Tensor
    ...     extra: Any
    >>> [t.tolist() for t in _leaves({"a": (torch.ones(1), Out(torch.zeros(2), None)), "n": 3})]
    [[1.0], [0.0, 0.0]]
    >>> _leaves([torch.ones(1), object()]) is None
    True
    """
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, _PLAIN):
        return []
    if isinstance(output, Mapping):
        values: Any = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        values = [getattr(output, f.name) for f in dataclasses.fields(output)]
    else:
        return None
    found: list[Tensor] = []
    for value in values:
        leaves = _leaves(value)
        if leaves is None:
            return None
        found += leaves
    return found


def _relative_error(output: Any, reference: Any) -> float | None:
    """``||output - reference|| / ||reference||`` over all tensors of (possibly nested) outputs, in float64;
    None if the outputs hold no tensor or an object whose tensors :func:`_leaves` cannot find."""
    got, want = _leaves(output), _leaves(reference)
    if not got or not want:
        return None
    pairs = list(zip(got, want, strict=True))
    diff = sum(float((a.double() - b.double()).square().sum()) for a, b in pairs)
    norm = sum(float(b.double().square().sum()) for _, b in pairs)
    return math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff)


def _layer_row(
    name: str, conv: nn.Module, reason: str, new: nn.Module | None, shape: tuple[int, ...] | None
) -> LayerReport:
    before = sum(p.numel() for p in conv.parameters())
    after = sum(p.numel() for p in new.parameters()) if new is not None else before
    macs_before = macs_after = None
    if shape is not None:
        macs_before = cost(conv, shape).macs
        macs_after = cost(new, shape).macs if new is not None else macs_before
    info = getattr(new, "decomposition", None)
    return LayerReport(
        name=name,
        type=type(conv).__name__,
        in_channels=conv.in_channels,  # type: ignore[arg-type]
        out_channels=conv.out_channels,  # type: ignore[arg-type]
        kernel_size=tuple(conv.kernel_size),  # type: ignore[arg-type]
        groups=conv.groups,  # type: ignore[arg-type]
        status="converted" if new is not None else "skipped",
        reason=reason,
        rank=new.depth_multiplier if new is not None else None,  # type: ignore[arg-type]
        max_rank=_max_rank(conv) if new is not None else None,  # type: ignore[arg-type]
        params_before=before,
        params_after=after,
        macs_before=macs_before,
        macs_after=macs_after,
        relative_error=info.relative_error if info is not None else None,
        kept_energy=info.kept_energy if info is not None else None,
    )
