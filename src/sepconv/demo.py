"""The seed experiment: a standard conv vs the article's depthwise+pointwise block vs our layer.

>>> rows = seed_experiment(min_run_time=0.01)
>>> [(row.label, row.params) for row in rows]
[('standard', 2912), ('seed dw+pw', 452), ('sepconv', 442)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sepconv.bench import Timing, median_latency
from sepconv.cost import Cost, cost
from sepconv.layers import SeparableConv2d

__all__ = ["DemoRow", "seed_experiment"]


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
