"""convert(): surgery on real architectures, rank choice (rank/energy/budget), skip rules, report, round trip."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sepconv import DepthwiseConv2d, SeparableConv2d
from sepconv.convert import KEPT_BY_BUDGET, ConversionReport, convert
from sepconv.io import load_state_dict, save_state_dict
from sepconv.layers import _SeparableConv

torchvision = pytest.importorskip("torchvision")


def tv(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def numpy_errors(w: np.ndarray, groups: int, rank: int) -> tuple[float, float]:
    """(dropped σ², total σ²) over every input channel's O/g x K^d slice, by numpy's float64 SVD."""
    og, dropped, total = w.shape[0] // groups, 0.0, 0.0
    for g in range(groups):
        for c in range(w.shape[1]):
            s = np.linalg.svd(w[g * og : (g + 1) * og, c].reshape(og, -1).astype(np.float64), compute_uv=False)
            dropped += float((s[rank:] ** 2).sum())
            total += float((s**2).sum())
    return dropped, total


def conv_io_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shape of every conv, recorded independently of convert()."""
    shapes, handles = {}, []

    def hook(name: str):
        def record(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            shapes.setdefault(name, (tuple(args[0].shape), tuple(output.shape)))

        return record

    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            handles.append(m.register_forward_hook(hook(name)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------- real architectures


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "mobilenet_v2", "convnext_tiny"])
def test_full_rank_reproduces_real_models(name: str) -> None:
    model = tv(name)
    x = torch.randn(1, 3, 32, 32)
    converted, report = convert(model, energy=1.0, example_inputs=x)
    with torch.no_grad():
        expected, got = model(x), converted(x)
    assert relative(got, expected) < 1e-5
    assert report.output_error == pytest.approx(relative(got, expected), abs=1e-7)
    assert report.converted and all(row.rank == row.max_rank for row in report.converted)
    assert not any(isinstance(m, _SeparableConv) for m in model.modules())  # original untouched


def test_resnet18_rank1_report_matches_closed_forms() -> None:
    model = tv("resnet18")
    x = torch.randn(1, 3, 32, 32)
    converted, report = convert(model, rank=1, example_inputs=x)
    shapes = conv_io_shapes(model, x)
    modules = dict(model.named_modules())
    new_modules = dict(converted.named_modules())
    assert [row.name for row in report.layers] == list(shapes)
    for row in report.layers:
        conv = modules[row.name]
        c, o, g, k = conv.in_channels, conv.out_channels, conv.groups, math.prod(conv.kernel_size)
        bias = o if conv.bias is not None else 0
        n_out = math.prod(shapes[row.name][1])  # N·O·prod(out)
        assert row.params_before == o * (c // g) * k + bias
        assert row.macs_before == n_out * (c // g) * k
        if conv.kernel_size == (1, 1):
            assert (row.status, row.reason, row.params_after) == ("skipped", "1x1 conv", row.params_before)
            continue
        r = row.rank
        assert row.status == "converted" and r == 1 and isinstance(new_modules[row.name], SeparableConv2d)
        assert row.params_after == c * r * k + (c * r // g) * o + bias
        assert row.params_after == sum(p.numel() for p in new_modules[row.name].parameters())
        assert row.macs_after == (n_out // o) * (c * r * k + (c * r // g) * o)
        dropped, total = numpy_errors(conv.weight.detach().numpy(), g, r)
        assert row.relative_error == pytest.approx(math.sqrt(dropped / total), rel=1e-9)
    assert report.model_params_after == sum(p.numel() for p in converted.parameters())
    ratio = sum(r.params_after for r in report.converted) / sum(r.params_before for r in report.converted)
    assert 1 / 9 < ratio < 1 / 9 + 1 / 64  # closed form per layer: 1/K² + 1/O (+ bias)
    converted.train()
    converted(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in converted.parameters())


def test_mobilenet_v2_converts_only_its_full_convs() -> None:
    _, report = convert(tv("mobilenet_v2"), rank=2)
    reasons = {row.reason for row in report.layers}
    assert reasons == {"", "1x1 conv", "depthwise conv"}
    assert [row.name for row in report.converted] == ["features.0.0"]  # the 3x3 stem, 3 -> 32


def test_1d_and_3d_models_with_groups_and_padding_modes() -> None:
    torch.manual_seed(0)
    model1d = nn.Sequential(
        nn.Conv1d(4, 8, 5, padding="same", padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv1d(8, 6, 3, stride=2, dilation=2, groups=2, padding_mode="circular", padding=2),
    ).double()
    model3d = nn.Sequential(
        nn.Conv3d(2, 6, 3, padding=1, padding_mode="replicate"), nn.GELU(), nn.Conv3d(6, 4, (1, 3, 3), groups=2)
    ).double()
    for model, x in ((model1d, torch.randn(2, 4, 20)), (model3d, torch.randn(1, 2, 5, 7, 7))):
        x = x.double()
        converted, report = convert(model, rank=100, example_inputs=x)
        assert len(report.converted) == 2 and report.output_error < 1e-12
        torch.testing.assert_close(converted(x), model(x))


# ---------------------------------------------------------------- rank choice


@settings(max_examples=20, deadline=None)
@given(energy=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_energy_per_layer_is_the_smallest_sufficient_rank(energy: float, seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 12, 3, groups=4), nn.Conv1d(8, 8, 5))
    _, report = convert(model, energy=energy)
    for row, conv in zip(report.layers, model, strict=True):
        w = conv.weight.detach().numpy()
        kept = [1 - numpy_errors(w, conv.groups, r)[0] / numpy_errors(w, conv.groups, r)[1] for r in range(10)]
        assert kept[row.rank] >= energy - 1e-12
        assert row.rank == 1 or kept[row.rank - 1] < energy
        assert row.kept_energy == pytest.approx(kept[row.rank], abs=1e-12)


def _three_layer_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(6, 6, 3, bias=False) for _ in range(3)]
    with torch.no_grad():  # different spectra: scale the singular directions differently per layer
        for i, layer in enumerate(layers):
            layer.weight.mul_(torch.linspace(1, 4, 9).pow(i).reshape(1, 1, 3, 3))
    return nn.Sequential(*layers)


@settings(max_examples=15, deadline=None)
@given(budget=st.floats(0.28, 1.0), seed=st.integers(0, 1000))
def test_budget_with_equal_costs_is_optimal_by_brute_force(budget: float, seed: int) -> None:
    model = _three_layer_model(seed)
    _, report = convert(model, budget=budget)
    before = sum(row.params_before for row in report.layers)
    after = sum(row.params_after for row in report.layers)
    assert after <= budget * before

    def rel_sq(layer: nn.Module, r: int) -> float:
        dropped, total = numpy_errors(layer.weight.detach().numpy(), 1, r)
        return dropped / total

    per_rank = 6 * 9 + 6 * 6  # params per rank of a 6 -> 6 3x3 layer without bias; the conv has 324
    cap = 3  # the largest rank with 90·r < 324: a layer never costs as much as the original
    best = min(
        sum(rel_sq(layer, r) for layer, r in zip(model, ranks, strict=True))
        for ranks in itertools.product(range(1, cap + 1), repeat=3)
        if per_rank * sum(ranks) <= budget * before
    )
    ours = sum(row.relative_error**2 for row in report.layers)
    assert ours == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert all(row.rank <= cap for row in report.layers)


def _rank_cost(conv: nn.Module, r: int) -> int:
    c, o, g, k = conv.in_channels, conv.out_channels, conv.groups, math.prod(conv.kernel_size)
    return c * r * k + (c * r // g) * o + (o if conv.bias is not None else 0)


@pytest.mark.parametrize("budget_on", ["params", "macs"])
def test_budget_is_met_and_no_step_fits_any_more(budget_on: str) -> None:
    model = tv("resnet18")
    x = torch.randn(1, 3, 32, 32)
    _, report = convert(model, budget=0.25, budget_on=budget_on, example_inputs=x)
    rows = report.converted
    key_before, key_after = f"{budget_on}_before", f"{budget_on}_after"
    limit = 0.25 * sum(getattr(row, key_before) for row in rows)
    used = sum(getattr(row, key_after) for row in rows)
    assert used <= limit
    assert all(getattr(row, key_after) < getattr(row, key_before) for row in rows)
    shapes = conv_io_shapes(model, x)
    modules = dict(model.named_modules())
    for row in rows:  # greedy is maximal: no layer below its cap could take one more step
        conv = modules[row.name]
        cap = max(r for r in range(1, row.max_rank + 1) if _rank_cost(conv, r) < row.params_before)
        step = _rank_cost(conv, 2) - _rank_cost(conv, 1)
        if budget_on == "macs":
            step *= math.prod(shapes[row.name][1][2:])
        assert row.rank == cap or used + step > limit
    assert len({row.rank for row in rows}) > 1  # ranks differ between layers


def test_budget_keeps_a_layer_whose_separable_form_is_not_cheaper() -> None:
    # 64 -> 32 with groups=32: one output per group, so rank 1 costs 64·9 + 64 = 640 > 32·2·9 = 576
    model = nn.Sequential(nn.Conv2d(8, 64, 3), nn.Conv2d(64, 32, 3, groups=32, bias=False))
    converted, report = convert(model, budget=0.5)
    first, second = report.layers
    assert second.reason == KEPT_BY_BUDGET and second.params_after == 576 == second.params_before
    assert type(converted[1]) is nn.Conv2d and torch.equal(converted[1].weight, model[1].weight)
    assert first.params_after + 576 <= 0.5 * (first.params_before + 576)
    assert first.rank == 3  # 8·9·r + 8·64·r + 64 <= 0.5·(4672 + 576) - 576 = 2048


def test_budget_that_cannot_be_met() -> None:
    with pytest.raises(ValueError, match=r"budget 0.01 cannot be met: rank 1 everywhere already costs 0\.1"):
        convert(nn.Sequential(nn.Conv2d(8, 64, 3, bias=False)), budget=0.01)


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_layer_that_does_not_run_has_no_macs() -> None:
    x = torch.randn(1, 3, 8, 8)
    _, report = convert(_TwoHeads(), rank=1, example_inputs=x)
    assert report.layers[0].macs_before == 36 * 8 * 27 and report.layers[1].macs_before is None
    assert report.totals["macs_before"] is None and "MACs" not in report.summary()
    with pytest.raises(ValueError, match="'unused' did not run on example_inputs"):
        convert(_TwoHeads(), budget=0.5, budget_on="macs", example_inputs=x)


# ---------------------------------------------------------------- skip rules, include/exclude


def test_include_exclude_and_skip_reasons() -> None:
    _, report = convert(tv("resnet18"), rank=1, include=["layer1.*", "layer2.*"], exclude="*.conv2")
    converted = [row.name for row in report.converted]
    assert converted == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.1.conv1"]
    reasons = {row.name: row.reason for row in report.layers}
    assert reasons["conv1"] == "not matched by include"
    assert reasons["layer1.0.conv2"] == "matched by exclude"
    assert reasons["layer2.0.downsample.0"] == "1x1 conv"


def test_structural_skip_rules() -> None:
    class Custom(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).relu()

    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=4),  # depthwise
        nn.Conv2d(4, 8, 1),  # 1x1
        nn.Conv2d(8, 8, (1, 7), padding=(0, 3)),  # eligible: 1x7
        nn.Conv2d(8, 8, 3, padding=1),  # kernel below min_kernel_size=4
        nn.ConvTranspose2d(8, 8, 3),
        Custom(8, 8, 3),
        SeparableConv2d(8, 8, 3),
        DepthwiseConv2d(8, 3),
    )
    _, report = convert(model, rank=1, min_kernel_size=4)
    assert [(row.name, row.reason) for row in report.layers] == [
        ("0", "depthwise conv"),
        ("1", "1x1 conv"),
        ("2", ""),
        ("3", "kernel smaller than min_kernel_size=4"),
        ("4", "transposed conv"),
        ("5", "Custom has its own forward"),
        ("6.depthwise", "already a sepconv layer"),
        ("6.pointwise", "already a sepconv layer"),
        ("7", "already a sepconv layer"),
    ]


def test_no_eligible_layer_gives_an_unchanged_copy() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 4, 4))
    converted, report = convert(model, rank=1)
    assert converted is not model and report.converted == ()
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), converted.state_dict().values(), strict=True)
    )
    assert report.summary().startswith("No eligible conv layer: the model is unchanged")
    _, empty = convert(nn.Linear(2, 2), energy=0.5)
    assert empty.layers == () and "unchanged" in empty.summary()


def test_shared_module_is_replaced_everywhere_and_inplace() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    converted, report = convert(model, rank=9, inplace=True)
    assert converted is model and len(report.layers) == 1
    assert isinstance(model[0], SeparableConv2d) and model[0] is model[2]


def test_modes_are_restored_and_batchnorm_stats_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    model[2].eval()
    stats = model[1].running_mean.clone()
    converted, _ = convert(model, rank=1, example_inputs=torch.randn(2, 3, 8, 8))
    assert converted.training and converted[1].training and converted[0].training and not converted[2].training
    assert model.training and not model[2].training
    assert torch.equal(converted[1].running_mean, stats)


# ---------------------------------------------------------------- init, round trip, report


def test_random_init_and_state_dict_round_trip(tmp_path) -> None:
    model = tv("resnet18")
    x = torch.randn(1, 3, 32, 32)
    converted, report = convert(model, budget=0.3, example_inputs=x)
    path = tmp_path / "converted.safetensors"
    save_state_dict(converted.state_dict(), path)
    (tmp_path / "report.json").write_text(report.to_json())
    ranks = json.loads((tmp_path / "report.json").read_text())["ranks"]
    fresh, fresh_report = convert(tv("resnet18"), rank=ranks, init="random")
    assert fresh_report.ranks == report.ranks and all(row.relative_error is None for row in fresh_report.layers)
    different = fresh.layer1[0].conv1.pointwise.weight
    assert not torch.allclose(different, converted.layer1[0].conv1.pointwise.weight)
    fresh.load_state_dict(load_state_dict(path))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), converted.eval()(x))


def test_report_json_and_table() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1))
    _, report = convert(model, rank=2, example_inputs=torch.randn(1, 3, 10, 10))
    data = json.loads(report.to_json())
    assert data["ranks"] == {"0": 2} and data["converted"] == 1
    assert data["totals"]["params_after"] == sum(row["params_after"] for row in data["layers"])
    assert data["totals"]["model_params_after"] == report.model_params_after == 3 * 9 * 2 + 6 * 8 + 8 + 8 * 8 + 8
    assert data["totals"]["macs_before"] == 64 * 8 * 3 * 9 + 64 * 8 * 8  # 8x8 outputs; the 1x1 conv too
    assert data["layers"][1]["reason"] == "1x1 conv" and data["input_shapes"] == [[1, 3, 10, 10]]
    assert isinstance(report, ConversionReport)
    from rich.console import Console

    console = Console(record=True, width=140)
    console.print(report.table())
    text = console.export_text()
    assert "skipped: 1x1 conv" in text and "Converted 1 of 2 conv layers" in text


def test_output_error_of_a_random_init_is_large() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    x = torch.randn(2, 3, 12, 12)
    _, decomposed = convert(model, rank=3, example_inputs=x)
    converted, randomised = convert(model, rank=3, init="random", example_inputs=x)
    with torch.no_grad():
        assert randomised.output_error == pytest.approx(relative(converted(x), model(x)), rel=1e-6)
    assert decomposed.output_error < randomised.output_error


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one of rank, energy or budget; got none"),
        ({"rank": 1, "budget": 0.5}, ValueError, "got rank, budget"),
        ({"rank": 0}, ValueError, "rank must be an int >= 1"),
        ({"rank": 2.0}, TypeError, "rank must be an int"),
        ({"rank": {"0": 0}}, ValueError, r"rank\['0'\] must be an int >= 1"),
        ({"rank": {"9": 1}}, ValueError, "'9', which is not a conv layer"),
        ({"rank": {"1": 1}}, ValueError, "'1', which cannot be converted: 1x1 conv"),
        ({"energy": 0}, ValueError, r"energy must be in \(0, 1\]"),
        ({"energy": 2}, ValueError, r"energy must be in \(0, 1\]"),
        ({"budget": 0}, ValueError, "budget must be a finite number > 0"),
        ({"budget": "0.5"}, TypeError, "budget must be a number"),
        ({"budget": 0.5, "budget_on": "flops"}, ValueError, "budget_on must be one of"),
        ({"budget": 0.5, "budget_on": "macs"}, ValueError, "needs example_inputs"),
        ({"rank": 1, "init": "kaiming"}, ValueError, "init must be one of"),
        ({"rank": 1, "min_kernel_size": 0}, ValueError, "min_kernel_size must be an int >= 1"),
        ({"rank": 1, "include": "nope*"}, ValueError, "include pattern 'nope\\*' matches no conv layer"),
        ({"rank": 1, "exclude": ["0", 3]}, TypeError, "exclude must be a pattern string"),
        ({"rank": 1, "include": 3}, TypeError, r"include must be a pattern string .*got 3 \(int\)"),
        ({"rank": 1, "inplace": "no"}, TypeError, "inplace must be True or False, got 'no'"),
        ({"rank": 1, "inplace": 1}, TypeError, "inplace must be True or False, got 1"),
        ({"rank": 1, "example_inputs": [1, 2]}, TypeError, "example_inputs must be a tensor"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)), **kwargs)


def test_inplace_is_taken_as_given() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    copied, _ = convert(model, rank=1, inplace=False)
    assert copied is not model and type(model[0]) is nn.Conv2d and isinstance(copied[0], SeparableConv2d)
    same, _ = convert(model, rank=1, inplace=True)
    assert same is model and isinstance(model[0], SeparableConv2d)


def test_a_model_failing_on_example_inputs_is_a_value_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"Sequential failed on example_inputs \(1, 4, 8, 8\): RuntimeError: ") as info:
        convert(model, rank=1, example_inputs=torch.randn(1, 4, 8, 8))
    assert "\n" not in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
    assert type(model[0]) is nn.Conv2d  # deep-copied: the caller's model is untouched


# ---------------------------------------------------------------- calls, outputs, frozen and shared layers


class _KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3)
        self.second = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(input=self.first(input=x))


def test_a_conv_called_with_a_keyword_argument_is_measured() -> None:
    torch.manual_seed(0)
    model, x = _KeywordCall().eval(), torch.randn(2, 3, 10, 10)
    converted, report = convert(model, rank=2, example_inputs=x)
    first, second = report.layers
    assert first.macs_before == 2 * 8 * 8 * 8 * (3 * 9)  # 8x8 outputs of a 3-in, 8-out 3x3 conv, batch 2
    assert second.macs_before == 2 * 8 * 8 * 4 * (8 * 9)
    assert report.input_shapes == ((2, 3, 10, 10),)
    with torch.no_grad():
        assert report.output_error == pytest.approx(relative(converted(x), model(x)), rel=1e-6)


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    note: str


class _Wrapped(nn.Module):
    """A conv whose output comes back inside an object of kind ``kind``."""

    Pair = collections.namedtuple("Pair", ["logits", "note"])

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.conv = kind, nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> object:
        y = self.conv(x)
        if self.kind == "dataclass":
            return _Output(y, "conv")
        if self.kind == "namedtuple":
            return self.Pair(y, "conv")
        return types.SimpleNamespace(logits=y)  # an object whose tensors cannot be found


@pytest.mark.parametrize("kind", ["dataclass", "namedtuple"])
def test_output_error_looks_into_dataclasses_and_namedtuples(kind: str) -> None:
    torch.manual_seed(0)
    model, x = _Wrapped(kind), torch.randn(1, 3, 8, 8)
    converted, report = convert(model, rank=1, example_inputs=x)
    with torch.no_grad():
        expected = relative(converted(x).logits, model(x).logits)
    assert expected > 1e-3  # rank 1 of 8: the outputs really differ
    assert report.output_error == pytest.approx(expected, rel=1e-6)


def test_output_error_is_none_when_no_tensor_can_be_compared() -> None:
    x = torch.randn(1, 3, 8, 8)
    _, report = convert(_Wrapped("opaque"), rank=1, example_inputs=x)
    assert report.output_error is None and report.to_dict()["output_error"] is None
    assert "output error" not in report.summary()
    assert report.layers[0].macs_before == 6 * 6 * 8 * 27  # the model did run on the inputs


def test_frozen_parameters_stay_frozen() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3, bias=False))
    model[0].weight.requires_grad_(False)  # bias still trained (e.g. BitFit)
    model[1].requires_grad_(False)
    for init in ("decompose", "random"):
        converted, _ = convert(model, rank=2, init=init)
        for i, conv in enumerate(model):
            new = converted[i]
            assert new.depthwise.weight.requires_grad is conv.weight.requires_grad, (init, i)
            assert new.pointwise.weight.requires_grad is conv.weight.requires_grad, (init, i)
            assert (new.pointwise.bias is None) == (conv.bias is None)
            if conv.bias is not None:
                assert new.pointwise.bias.requires_grad is conv.bias.requires_grad, (init, i)
        trainable = [name for name, p in converted.named_parameters() if p.requires_grad]
        assert trainable == ["0.pointwise.bias", "2.depthwise.weight", "2.pointwise.weight"]


class _SharedConv(nn.Module):
    """One conv object under two names, ``a`` and ``b``, called twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = self.a
        self.other = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.b(self.a(x)))


def test_a_shared_conv_answers_to_each_of_its_names() -> None:
    for kwargs in ({"exclude": "b"}, {"exclude": "a"}, {"include": "other"}):
        converted, report = convert(_SharedConv(), rank=1, **kwargs)
        assert [row.name for row in report.converted] == ["other"], kwargs
        assert type(converted.a) is nn.Conv2d and converted.a is converted.b
        assert report.layers[0].name == "a" and report.layers[0].reason != ""
    for kwargs in ({"include": "b"}, {"include": ["b", "other"], "exclude": "other"}):
        converted, report = convert(_SharedConv(), rank=1, **kwargs)
        assert [row.name for row in report.converted] == ["a"], kwargs
        assert isinstance(converted.b, SeparableConv2d) and converted.a is converted.b


def test_a_rank_mapping_may_name_a_shared_conv_by_any_name() -> None:
    x = torch.randn(1, 4, 6, 6)
    model = _SharedConv()
    converted, report = convert(model, rank={"b": 2}, example_inputs=x)
    assert report.ranks == {"a": 2} and converted.a is converted.b
    assert converted.b.decomposition.rank == 2 and type(converted.other) is nn.Conv2d
    _, same = convert(model, rank={"a": 3, "b": 3})
    assert same.ranks == {"a": 3}
    fresh, _ = convert(_SharedConv(), rank=report.ranks, init="random")  # the documented reload
    fresh.load_state_dict(converted.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), converted(x))
    with pytest.raises(ValueError, match=r"two ranks: 1 as 'a', 2 as 'b'"):
        convert(model, rank={"a": 1, "b": 2})


def test_include_and_exclude_disagreeing_on_a_shared_conv() -> None:
    with pytest.raises(ValueError, match=r"shared under the names 'a' and 'b': include picks it as 'a'"):
        convert(_SharedConv(), rank=1, include="a", exclude="b")
    _, report = convert(_SharedConv(), rank=1, include=["a", "other"], exclude="a")  # one name: exclude wins
    assert [row.name for row in report.converted] == ["other"]


# ---------------------------------------------------------------- deployment: compile, ONNX


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding="same", padding_mode="reflect"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def test_converted_model_runs_under_torch_compile() -> None:
    converted, _ = convert(_small_cnn(), rank=2)
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(converted)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), converted(x), atol=1e-5, rtol=1e-5)


def test_onnx_export_matches_onnxruntime(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    converted, _ = convert(_small_cnn(), rank=2)
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "model.onnx"
    torch.onnx.export(converted, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, converted(x).numpy(), atol=1e-5, rtol=1e-4)
    assert {"Conv"} <= {node.op_type for node in __import__("onnx").load(str(path)).graph.node}


def test_functional_conv_equivalence_of_one_converted_layer() -> None:
    """A converted layer is F.conv2d(dw) then F.conv2d(pw): checked with the raw functional ops."""
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    converted, _ = convert(nn.Sequential(conv), rank=2)
    sep = converted[0]
    x = torch.randn(1, 4, 9, 9)
    mid = F.conv2d(x, sep.depthwise.weight, None, 2, 1, 1, groups=4)
    torch.testing.assert_close(sep(x), F.conv2d(mid, sep.pointwise.weight, sep.pointwise.bias, groups=2))
