"""analyze() against independent truths: analytic formulas computed here, sepconv.cost, torchvision's
published per-model figures, parameter counts, and torch's FlopCounterMode where it is right (and wrong)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from tests.strategies import ConvConfig, conv_configs
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sepconv
from sepconv.analyze import Report, analyze, separable_twin
from sepconv.render import to_csv, to_markdown, to_rich

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SEPARABLE = {1: sepconv.SeparableConv1d, 2: sepconv.SeparableConv2d, 3: sepconv.SeparableConv3d}


def out_size(n: int, k: int, s: int, d: int, pad_lo: int, pad_hi: int) -> int:
    return (n + pad_lo + pad_hi - d * (k - 1) - 1) // s + 1


def same_pads(n: int, k: int, s: int, d: int) -> tuple[int, int]:
    total = max((math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n, 0)
    return total // 2, total - total // 2


def analytic_conv_macs(cfg: ConvConfig) -> tuple[int, tuple[int, ...]]:
    """N·O·(C/g)·K^d·prod(out), with the output size from the formula of DESIGN.md §4."""
    spatial = cfg.input_shape[2:]
    out = []
    for i, n in enumerate(spatial):
        k, s, d = cfg.kernel_size[i], cfg.stride[i], cfg.dilation[i]
        if cfg.padding == "same":
            lo, hi = same_pads(n, k, s, d)
        elif cfg.padding == "valid":
            lo = hi = 0
        else:
            lo = hi = cfg.padding if isinstance(cfg.padding, int) else cfg.padding[i]
        out.append(out_size(n, k, s, d, lo, hi))
    macs = cfg.input_shape[0] * cfg.out_channels * (cfg.in_channels // cfg.groups) * math.prod(cfg.kernel_size)
    return macs * math.prod(out), (cfg.input_shape[0], cfg.out_channels, *out)


# --- single layers: seed numbers, formulas, agreement with cost() -------------------------------------


def test_seed_conv() -> None:
    report = analyze(nn.Conv2d(10, 32, 3), (5, 10, 50, 50))
    (row,) = report.rows
    assert row.macs == 5 * 48 * 48 * 32 * 10 * 9 == 33_177_600 and row.flops == 2 * row.macs
    assert row.bias_adds == 5 * 32 * 48 * 48 and row.params == 2912
    assert row.output_shape == (5, 32, 48, 48) and row.activation_bytes == 5 * 32 * 48 * 48 * 4
    assert report.total.macs == 33_177_600 and report.total.params == 2912


@settings(max_examples=25, deadline=None)
@given(conv_configs(), st.booleans())
def test_conv_rows_match_formula_and_cost(cfg: ConvConfig, bias: bool) -> None:
    if cfg.strided_same:  # nn.ConvNd rejects it; our layers implement it (TF semantics): check the separable layer
        layer = SEPARABLE[cfg.ndim](cfg.in_channels, cfg.out_channels, cfg.kernel_size, bias=bias, **cfg.conv_kwargs)
    else:
        layer = CONV[cfg.ndim](cfg.in_channels, cfg.out_channels, cfg.kernel_size, bias=bias, **cfg.conv_kwargs)
        macs, out_shape = analytic_conv_macs(cfg)
        report = analyze(layer, cfg.input_shape)
        assert report.total.macs == macs and report.total.output_shape == out_shape
    report, truth = analyze(layer, cfg.input_shape), sepconv.cost(layer, cfg.input_shape)
    total = report.total
    assert (total.macs, total.bias_adds, total.params, total.output_shape) == (
        truth.macs,
        truth.bias_adds,
        truth.params,
        truth.output_shape,
    )
    copies_input = cfg.padding_mode != "zeros" or cfg.padding == "same"  # PyTorch may pad into a new tensor
    assert total.activation_bytes >= truth.activation_bytes
    if not copies_input:
        assert total.activation_bytes == truth.activation_bytes


@settings(max_examples=20, deadline=None)
@given(conv_configs(max_kernel=4), st.integers(0, 1))
def test_transposed_conv_matches_formula_and_cost(cfg: ConvConfig, output_padding: int) -> None:
    stride = tuple(max(s, output_padding + 1) for s in cfg.stride)
    layer = TRANSPOSED[cfg.ndim](
        cfg.in_channels, cfg.out_channels, cfg.kernel_size, stride, 0, output_padding, cfg.groups, True, cfg.dilation
    )
    report = analyze(layer, cfg.input_shape)
    n, spatial = cfg.input_shape[0], cfg.input_shape[2:]
    # every input element meets (O/g)·K^d weights
    macs = n * cfg.in_channels * math.prod(spatial) * (cfg.out_channels // cfg.groups) * math.prod(cfg.kernel_size)
    truth = sepconv.cost(layer, cfg.input_shape)
    assert report.total.macs == macs == truth.macs
    assert report.total.bias_adds == truth.bias_adds == math.prod(truth.output_shape)
    assert report.total.output_shape == truth.output_shape


def test_depthwise_same_even_kernel() -> None:
    conv = nn.Conv2d(16, 16, 4, padding="same", groups=16, bias=False)
    (row,) = analyze(conv, (1, 16, 32, 32)).rows
    assert row.macs == 1 * 16 * 1 * 16 * 32 * 32 == 262_144 == sepconv.cost(conv, (1, 16, 32, 32)).macs


def test_linear_matches_cost_for_any_leading_dims() -> None:
    for shape in [(3, 4), (2, 5, 4), (2, 3, 5, 4)]:
        layer = nn.Linear(4, 7)
        (row,) = analyze(layer, shape).rows
        truth = sepconv.cost(layer, shape)
        assert (row.macs, row.bias_adds, row.params, row.output_shape) == (
            math.prod(shape) * 7,
            math.prod(shape[:-1]) * 7,
            35,
            truth.output_shape,
        )
        assert (row.macs, row.bias_adds, row.activation_bytes) == (truth.macs, truth.bias_adds, truth.activation_bytes)


def test_our_layers_match_cost() -> None:
    layer = sepconv.SeparableConv2d(8, 24, 5, stride=2, padding="same", depth_multiplier=2, mid_activation=nn.ReLU)
    report, truth = analyze(layer, (2, 8, 15, 15)), sepconv.cost(layer, (2, 8, 15, 15))
    assert [r.name for r in report.rows] == ["depthwise", "mid_activation", "pointwise"]
    assert report.total.macs == truth.macs == 2 * 8 * 8 * (8 * 2 * 25 + 16 * 24)
    assert report.total.params == truth.params


def test_torchinfo_readme_mult_adds_are_our_macs_plus_bias_adds() -> None:
    """torchinfo's README example (batch 7) lists Mult-Adds 1,048,320 / 2,248,960 / 112,350: bias included."""
    cases = [(nn.Conv2d(1, 10, 5), (7, 1, 28, 28), 1_048_320), (nn.Conv2d(10, 20, 5), (7, 10, 12, 12), 2_248_960)]
    cases.append((nn.Linear(320, 50), (7, 320), 112_350))
    for layer, shape, mult_adds in cases:
        (row,) = analyze(layer, shape).rows
        assert row.macs + row.bias_adds == mult_adds and row.bias_adds > 0


# --- attribution: functional calls, shared modules, container ops, attention -------------------------


class FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 2, 3, 3))  # groups=2: 4 in -> 6 out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, stride=2, padding=1, groups=2)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv(x)) + x  # the same conv twice, then a residual add


def test_functional_call_is_counted_with_its_module() -> None:
    (row,) = analyze(FunctionalConv(), (2, 4, 9, 9)).rows
    assert row.name == "" and row.type == "FunctionalConv"
    assert row.macs == 2 * 6 * 2 * 9 * 5 * 5 and row.params == 6 * 2 * 9 and row.output_shape == (2, 6, 5, 5)


def test_shared_module_counted_per_call_and_residual_add_on_container() -> None:
    net = nn.Sequential(Residual())
    report = analyze(net, (1, 4, 8, 8))
    one_call = 4 * 4 * 9 * 64
    assert [(r.name, r.macs, r.params, r.other_ops) for r in report.rows] == [
        ("0.conv", one_call, 4 * 4 * 9, 0),
        ("0.conv#2", one_call, 0, 0),  # second call: its work again, its parameters not again
        ("0", 0, 0, 4 * 64),  # the residual add, on the block that does it, where it runs
    ]
    assert report.total.macs == 2 * one_call
    assert report.total.params == sum(p.numel() for p in net.parameters())


class Attention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def test_attention_macs() -> None:
    b, h, lq, s, e, ev = 2, 3, 5, 7, 8, 4
    q, k, v = torch.empty(b, h, lq, e), torch.empty(b, h, s, e), torch.empty(b, h, s, ev)
    report = analyze(Attention(), (q, k, v))
    assert report.total.macs == b * h * lq * s * (e + ev)  # Q·Kᵀ then weights·V
    assert report.total.output_shape == (b, h, lq, ev)


# --- whole models: torchvision's published figures ---------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "vit_b_16"])
def test_totals_match_torchvision_published_figures(name: str) -> None:
    with torch.device("meta"):
        model = torchvision.models.get_model(name).eval()
    meta = torchvision.models.get_model_weights(name).DEFAULT.meta
    report = analyze(model, (1, 3, 224, 224))
    assert report.total.macs / 1e9 == pytest.approx(meta["_ops"], rel=5e-3)  # torchvision's "GFLOPS" are GMACs
    assert round(report.total.macs / 1e9, 3) == meta["_ops"]  # in fact equal to the published 3 decimals
    assert report.total.params == meta["num_params"] == sum(p.numel() for p in model.parameters())
    assert sum(r.params for r in report.rows) == report.total.params  # every parameter is in exactly one row
    with FlopCounterMode(display=False) as counter:  # torch's forward count agrees: FLOPs = 2·MACs, bias apart
        model(torch.empty(1, 3, 224, 224, device="meta"))
    assert counter.get_total_flops() == report.total.flops


def test_resnet18_backward_and_every_conv_row_matches_cost() -> None:
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    report = analyze(model, (1, 3, 224, 224), backward=True)
    assert report.total.macs == 1_814_073_344
    first_conv = report.rows[0]
    assert first_conv.name == "conv1" and first_conv.backward_macs == first_conv.macs  # no grad for the input
    # every other conv and the linear: grad-input + grad-weight = 2x forward
    assert report.total.backward_macs == 2 * report.total.macs - first_conv.macs
    modules = dict(model.named_modules())
    checked = 0
    for row in report.rows:
        module = modules[row.name.split("#")[0]]
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            truth = sepconv.cost(module, row.input_shape)
            assert (row.macs, row.bias_adds, row.output_shape, row.params) == (
                truth.macs,
                truth.bias_adds,
                truth.output_shape,
                truth.params,
            )
            checked += 1
    assert checked == 21  # 20 convs + fc


def test_model_is_left_as_it_was() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyze(model, (2, 3, 8, 8), backward=True)
    assert all(torch.equal(before[k], v) and v.device.type == "cpu" for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# --- backward: depthwise and grouped convs, where FlopCounterMode overcounts ---------------------------


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_backward_conv_is_twice_forward_for_any_groups(groups: int) -> None:
    net = nn.Sequential(nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 4, padding="same", groups=groups, bias=False))
    report = analyze(net, (1, 16, 32, 32), backward=True)
    conv = report.rows[1]
    forward = 1 * 16 * (16 // groups) * 16 * 32 * 32  # N·O·(C/g)·K²·H'·W'
    assert conv.macs == forward
    assert conv.backward_macs == 2 * forward  # grad-input (its input needs grad) + grad-weight, each = forward
    assert report.rows[0].backward_macs == 16 * 16 * 32 * 32  # first layer: grad-weight only


def test_flop_counter_mode_overcounts_depthwise_backward_by_groups() -> None:
    conv = nn.Conv2d(16, 16, 4, padding="same", groups=16, bias=False, device="meta")
    x = torch.empty(1, 16, 32, 32, device="meta", requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        conv(x).sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    forward_flops = 2 * 262_144
    assert counts["aten.convolution"] == forward_flops  # forward: we agree
    assert counts["aten.convolution_backward"] == (1 + 16) * forward_flops  # grad-weight counted x groups
    net = nn.Sequential(nn.Identity(), nn.Conv2d(16, 16, 4, padding="same", groups=16, bias=False))
    ours = analyze(net, torch.empty(1, 16, 32, 32, requires_grad=True), backward=True)
    # our input tensors never require grad, so the depthwise conv is first: grad-weight only
    assert ours.total.backward_flops == forward_flops
    deep = analyze(nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), *net), (1, 16, 32, 32), backward=True)
    assert deep.rows[-1].backward_flops == 2 * forward_flops != counts["aten.convolution_backward"]


def test_mobilenet_v2_training_step_vs_flop_counter_mode() -> None:
    with torch.device("meta"):
        model = torchvision.models.mobilenet_v2()
    ours = analyze(model, (1, 3, 224, 224), backward=True)
    stem = ours.rows[0]
    assert stem.name == "features.0.0" and ours.total.macs == 300_774_272
    assert ours.total.backward_macs == 2 * ours.total.macs - stem.macs == 590_710_528
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta")).sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts["aten.convolution"] + counts["aten.addmm"] == ours.total.flops  # forward: agreement
    torch_backward = counts["aten.convolution_backward"] + counts["aten.mm"]
    assert torch_backward == 11_678_152_448 and torch_backward > 9.8 * ours.total.backward_flops  # ~10x: depthwise


# --- what-if ---------------------------------------------------------------------------------------------


def test_what_if_replaces_only_standard_spatial_convs() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),  # candidate
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: no
        nn.Conv2d(16, 32, 1),  # pointwise: no
        nn.Conv2d(32, 32, 3, padding=1, groups=2),  # grouped: no
        nn.ConvTranspose2d(32, 8, 2, stride=2),  # transposed: no
        nn.Conv2d(8, 8, 5, padding="same", bias=False),  # candidate
    )
    report = analyze(net, (2, 3, 16, 16), what_if=True)
    assert report.what_if is not None
    by_name = {w.name: w for w in report.what_if}
    assert set(by_name) == {"0", "5"}
    first = by_name["0"]  # 2·16·16 outputs; depthwise 3·9, pointwise 3·16
    assert first.macs == 2 * 16 * 16 * 16 * 3 * 9
    assert first.separable_macs == 2 * 16 * 16 * (3 * 9 + 3 * 16)
    assert first.separable_params == 3 * 9 + 3 * 16 + 16
    last = by_name["5"]  # 32x32 after the transposed conv
    assert last.separable_macs == 2 * 32 * 32 * (8 * 25 + 8 * 8) and last.separable_params == 8 * 25 + 8 * 8
    saved = [w.macs_saved for w in report.what_if]
    assert saved == sorted(saved, reverse=True)
    totals = report.what_if_totals()
    assert totals["macs_after"] == report.total.macs - first.macs_saved - last.macs_saved
    assert totals["params_after"] == report.total.params - first.params_saved - last.params_saved


def test_what_if_totals_match_the_real_twin() -> None:
    with torch.device("meta"):
        model = torchvision.models.resnet18().eval()
    report = analyze(model, (1, 3, 224, 224), what_if=True)
    twin = analyze(separable_twin(model), (1, 3, 224, 224))
    totals = report.what_if_totals()
    assert (twin.total.macs, twin.total.params) == (totals["macs_after"], totals["params_after"])
    assert len(report.what_if) == 17  # every 3x3 conv and the 7x7 stem; the three 1x1 downsamples stay


def test_what_if_requires_it() -> None:
    with pytest.raises(ValueError, match="what_if=True"):
        analyze(nn.Conv2d(3, 4, 3), (1, 3, 8, 8)).what_if_totals()


# --- measure ----------------------------------------------------------------------------------------------


def test_measure_side_by_side_on_cpu() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    with sepconv.use_cpu_strategy("off"):  # the twin's layers as given: their tensor peak does not hang on a timing
        report = analyze(net, (1, 3, 16, 16), measure=True, min_run_time=0.01)
    m = report.measurement
    assert m is not None and m.device == "cpu"
    # what the times depend on: this process's threads and allocator regime (conftest: glibc's defaults, no huge
    # pages), after the CPU's model
    assert m.conditions.endswith(f", {torch.get_num_threads()} threads, glibc default")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model_name = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("model name"))
        assert m.conditions.startswith(model_name.split(":", 1)[1].strip() + ", ")
    assert m.model.median_ms > 0 and m.twin.median_ms > 0 and m.model.runs >= 1
    assert m.model_peak_bytes is None and m.twin_peak_bytes is None  # no allocator statistics on CPU
    # tensor peak, by hand: conv1's output alive while ReLU writes its own, then ReLU's while conv2 writes: 2 x 8
    # channels x 16 x 16 fp32. The twin's second layer holds its input, its depthwise output and its output (3; with
    # the CPU strategy on, a timed choice would decide: 2 as one dense conv, 4 converted to channels_last)
    plane = 8 * 16 * 16 * 4
    assert m.model_tensor_peak_bytes == 2 * plane and m.twin_tensor_peak_bytes == 3 * plane
    assert report.what_if is not None and len(report.what_if) == 2
    twin = separable_twin(net)
    assert [type(t).__name__ for t in twin] == ["SeparableConv2d", "ReLU", "SeparableConv2d"]
    assert twin(torch.rand(1, 3, 16, 16)).shape == (1, 8, 16, 16)
    assert isinstance(net[0], nn.Conv2d)  # the original is untouched
    md = to_markdown(report).splitlines()
    assert md[-4].startswith(f"| model on cpu ({m.conditions}) (twin: separable")
    assert report.to_dict()["measure"]["conditions"] == m.conditions
    assert md[-2].startswith("| as given | ") and md[-1].startswith("| twin | ")
    assert md[-1].endswith(f"| n/a | {m.twin_tensor_peak_bytes:,} |")
    assert report.to_dict()["measure"]["twin"]["tensor_peak_bytes"] == m.twin_tensor_peak_bytes


def test_measure_needs_real_weights() -> None:
    with pytest.raises(ValueError, match="real weights"):
        analyze(nn.Conv2d(3, 4, 3, device="meta"), (1, 3, 8, 8), measure=True)


# --- aggregation and output ------------------------------------------------------------------------------


def resnet_report(**kwargs: bool) -> Report:
    with torch.device("meta"):
        model = torchvision.models.resnet18().eval()
    return analyze(model, (1, 3, 224, 224), **kwargs)


def test_by_depth_sums_rows() -> None:
    report = resnet_report()
    depth1 = report.by_depth(1)
    top = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert [r.name for r in depth1] == top
    assert sum(r.macs for r in depth1) == report.total.macs and sum(r.params for r in depth1) == report.total.params
    layer1 = next(r for r in depth1 if r.name == "layer1")
    assert layer1.type == "Sequential" and depth1[0].type == "Conv2d"
    assert layer1.macs == 4 * 115_605_504  # four 3x3 convs, 64->64 at 56x56
    with pytest.raises(ValueError):
        report.by_depth(0)


def test_to_dict_and_json() -> None:
    report = resnet_report(what_if=True)
    data = json.loads(report.to_json())
    assert set(data) >= {"rows", "total", "what_if"}
    assert data["total"]["macs"] == 1_814_073_344 and data["total"]["flops"] == 2 * 1_814_073_344
    assert len(data["rows"]) == len(report.rows) and data["rows"][0]["name"] == "conv1"
    assert data["rows"][0]["output_shape"] == [1, 64, 112, 112]
    assert data["what_if"]["total"]["macs_after"] == report.what_if_totals()["macs_after"]


def test_table_fits_100_columns_with_totals_last() -> None:
    report = resnet_report(what_if=True, backward=True)
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(to_rich(report))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 100
    table_end = next(i for i, line in enumerate(lines) if line.startswith("MACs:"))
    last_row = [line for line in lines[:table_end] if line.strip()][-1]
    assert last_row.split()[:3] == ["total", "ResNet", "1×1000"] and "1.81G" in last_row and "3.51G" in last_row
    assert "layer4.1.conv2" in "\n".join(lines[:table_end])  # every row shown by default


def test_markdown_and_csv() -> None:
    report = resnet_report(what_if=True)
    md = to_markdown(report).splitlines()
    assert md[2].startswith("| conv1 | Conv2d | 1×64×112×112 | 9,408 | 118,013,952 |")
    assert "| **total** | ResNet | 1×1000 | 11,689,512 | 1,814,073,344 |" in "\n".join(md)
    rows = list(csv.DictReader(io.StringIO(to_csv(report))))
    assert len(rows) == len(report.rows) + 1 and rows[-1]["name"] == "total"
    assert int(rows[-1]["macs"]) == 1_814_073_344 and sum(int(r["macs"]) for r in rows[:-1]) == 1_814_073_344


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inputs", [(1, 0, 8, 8), (1, -3), ("a", 3), ()])
def test_bad_shapes_are_value_errors(inputs: tuple) -> None:
    with pytest.raises(ValueError, match="inputs must be"):
        analyze(nn.Conv2d(3, 4, 3), inputs)


def test_model_that_fails_on_the_input_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"^Conv2d failed on input \(1, 5, 8, 8\)") as info:
        analyze(nn.Conv2d(3, 4, 3), (1, 5, 8, 8))
    assert "\n" not in str(info.value)
