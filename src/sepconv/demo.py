"""The seed experiment: a standard conv vs the article's depthwise+pointwise block vs our layer.

>>> rows = seed_experiment(min_run_time=0.01)
>>> [(row.label, row.params) for row in rows]
[('standard', 2912), ('seed dw+pw', 452), ('sepconv', 442)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sepconv.analyze import analyze
from sepconv.bench import Timing, median_latency
from sepconv.convert import convert
from sepconv.cost import Cost, cost
from sepconv.layers import SeparableConv2d
from sepconv.nets import small_resnet

__all__ = ["ConversionRow", "DemoRow", "conversion_experiment", "seed_experiment"]


@dataclass(frozen=True)
class DemoRow:
    """One layer of the experiment: counted parameters, analytic cost, measured latency."""

    label: str
    name: str
    params: int
    cost: Cost
    output_shape: tuple[int, ...]
    latency: Timing


def seed_experiment(
    *,
    batch: int = 5,
    in_channels: int = 10,
    out_channels: int = 32,
    kernel_size: int = 3,
    size: int = 50,
    min_run_time: float = 0.2,
    seed: int = 0,
) -> list[DemoRow]:
    """Build the three layers of the seed article, check their output shapes agree, time them (fp32, CPU)."""
    torch.manual_seed(seed)
    c, o, k = in_channels, out_channels, kernel_size
    layers = {
        ("standard", f"nn.Conv2d({c}, {o}, {k})"): nn.Conv2d(c, o, k),
        ("seed dw+pw", f"nn.Sequential(nn.Conv2d({c}, {c}, {k}, groups={c}), nn.Conv2d({c}, {o}, 1))"): nn.Sequential(
            nn.Conv2d(c, c, k, groups=c), nn.Conv2d(c, o, 1)
        ),
        ("sepconv", f"sepconv.SeparableConv2d({c}, {o}, {k})"): SeparableConv2d(c, o, k),
    }
    x = torch.rand(batch, c, size, size)
    rows = []
    with torch.inference_mode():
        for (label, name), layer in layers.items():
            params = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            analytic = cost(layer, x.shape)
            if params != analytic.params:
                raise RuntimeError(f"{name}: counted {params} parameters but cost() says {analytic.params}")
            output_shape = tuple(layer(x).shape)
            timing = median_latency(lambda layer=layer: layer(x), min_run_time=min_run_time)
            rows.append(DemoRow(label, name, params, analytic, output_shape, timing))
    shapes = {row.output_shape for row in rows}
    if len(shapes) != 1:
        raise RuntimeError(f"output shapes differ: {[(row.name, row.output_shape) for row in rows]}")
    return rows


@dataclass(frozen=True)
class ConversionRow:
    """One conversion setting applied to a real model: its cost, output error and measured latency."""

    setting: str
    params: int
    macs: int
    relative_output_error: float
    latency: Timing


def conversion_experiment(
    *, model: str = "auto", min_run_time: float = 0.3, seed: int = 0
) -> tuple[str, list[ConversionRow]]:
    """Convert a real model with a few settings; ``model="auto"`` picks torchvision resnet18 (random weights,
    1x3x224x224) when torchvision is installed, else ``"builtin"``: ``sepconv.nets.small_resnet`` on 1x1x28x28.

    >>> name, rows = conversion_experiment(model="builtin", min_run_time=0.01)
    >>> [row.setting for row in rows]
    ['original', 'rank 1', 'MAC budget 0.25', 'full rank (exact)']
    >>> rows[-1].relative_output_error < 1e-4
    True
    """
    torch.manual_seed(seed)
    original, shape, name = _demo_model(model)
    original.eval()
    x = torch.randn(shape)
    settings = {
        "original": None,
        "rank 1": {"rank": 1},
        "MAC budget 0.25": {"budget": 0.25, "budget_on": "macs", "example_inputs": x},
        "full rank (exact)": {
            "rank": max(math.prod(m.kernel_size) for m in original.modules() if isinstance(m, nn.Conv2d))
        },
    }
    rows = []
    with torch.inference_mode():
        reference = original(x)
    for setting, kwargs in settings.items():
        converted = original if kwargs is None else convert(original, **kwargs)[0].eval()
        with torch.inference_mode():
            error = float((converted(x) - reference).norm() / reference.norm())
            timing = median_latency(lambda converted=converted: converted(x), min_run_time=min_run_time)
        total = analyze(converted, shape).total
        rows.append(ConversionRow(setting, total.params, total.macs, error, timing))
    return name, rows


def _demo_model(model: str) -> tuple[nn.Module, tuple[int, ...], str]:
    if model not in ("auto", "resnet18", "builtin"):
        raise ValueError(f"model must be 'auto', 'resnet18' or 'builtin'; got {model!r}")
    if model != "builtin":
        try:
            import torchvision
        except ImportError:
            if model == "resnet18":
                raise ValueError("model='resnet18' needs torchvision: pip install 'sepconv[vision]'") from None
        else:
            built = torchvision.models.resnet18(weights=None)
            return built, (1, 3, 224, 224), "torchvision resnet18 (random weights), input 1x3x224x224"
    return small_resnet("standard"), (1, 1, 28, 28), "sepconv.nets.small_resnet (random weights), input 1x1x28x28"
