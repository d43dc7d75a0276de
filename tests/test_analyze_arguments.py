"""analyze()'s bad arguments: one clear error naming the argument and what it takes, raised before any work; and
`sepconv analyze --what-if --format csv` carries the what-if."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from sepconv.analyze import analyze, separable_twin
from sepconv.cli import main
from sepconv.render import to_csv

CONV = nn.Conv2d(3, 4, 3)


@pytest.mark.parametrize("inputs", [5, 2.5, None, "1,3,8,8", {"x": 1}])
def test_inputs_of_the_wrong_type_are_type_errors(inputs: object) -> None:
    with pytest.raises(TypeError, match=r"^inputs must be a shape of positive ints, a tensor or a sequence"):
        analyze(CONV, inputs)  # type: ignore[arg-type]


def test_mixed_inputs_show_tensor_shapes_not_values() -> None:
    with pytest.raises(ValueError, match=r"inputs must be") as info:
        analyze(CONV, [torch.zeros(1, 3, 8, 8), 3])  # type: ignore[list-item]
    message = str(info.value)
    assert "shape=(1, 3, 8, 8)" in message and "tensor(" not in message and "\n" not in message


@pytest.mark.parametrize("seconds", [-1, 0, 0.0, math.nan])
def test_measure_needs_a_positive_min_run_time(seconds: float) -> None:
    with pytest.raises(ValueError, match=r"^min_run_time must be > 0 seconds"):
        analyze(CONV, (1, 3, 8, 8), measure=True, min_run_time=seconds)


@pytest.mark.parametrize("seconds", ["0.5", True, None])
def test_min_run_time_must_be_a_number(seconds: object) -> None:
    with pytest.raises(TypeError, match=r"^min_run_time must be a number"):
        analyze(CONV, (1, 3, 8, 8), measure=True, min_run_time=seconds)  # type: ignore[arg-type]


def test_min_run_time_is_not_checked_without_measure() -> None:
    assert analyze(CONV, (1, 3, 8, 8), min_run_time=-1).total.macs == 6 * 6 * 4 * 3 * 9


@pytest.mark.parametrize("device", ["foo", "cuda:x", "meta"])
def test_measure_on_an_unknown_device_names_the_argument(device: str) -> None:
    with pytest.raises(ValueError, match=r"^device"):
        analyze(CONV, (1, 3, 8, 8), measure=True, device=device)


def test_measure_on_cuda_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device 'cuda': CUDA is not available"):
        analyze(CONV, (1, 3, 8, 8), measure=True, device="cuda")


def test_measure_device_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"^device must be a torch.device or a name"):
        analyze(CONV, (1, 3, 8, 8), measure=True, device=0.5)  # type: ignore[arg-type]


# --- CSV with the what-if ----------------------------------------------------------------------------------


def test_csv_carries_the_what_if_per_row_and_in_total() -> None:
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.Conv2d(8, 8, 5))
    report = analyze(net, (2, 3, 12, 12), what_if=True)
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(to_csv(report)))}
    pixels = 2 * 12 * 12
    first = rows["0"]  # 3x3, 3 -> 16: depthwise 3·9 and pointwise 3·16 per pixel; params with the bias
    assert int(first["macs"]) == pixels * 16 * 3 * 9
    assert int(first["macs_if_separable"]) == pixels * (3 * 9 + 3 * 16)
    assert int(first["params_if_separable"]) == 3 * 9 + 3 * 16 + 16
    assert rows["2"]["macs_if_separable"] == rows["2"]["macs"]  # a 1x1 conv: no twin, unchanged
    last = rows["3"]  # 5x5 valid on 12x12: 8x8 outputs
    assert int(last["macs_if_separable"]) == 2 * 8 * 8 * (8 * 25 + 8 * 8)
    twin = analyze(separable_twin(net), (2, 3, 12, 12)).total
    assert int(rows["total"]["macs_if_separable"]) == twin.macs
    assert int(rows["total"]["params_if_separable"]) == twin.params
    assert "macs_if_separable" not in to_csv(analyze(net, (2, 3, 12, 12))).splitlines()[0]  # no what-if: no column


@pytest.mark.parametrize("depth", [None, "1", "2"])
def test_cli_csv_with_what_if(tmp_path: Path, depth: str | None) -> None:
    out = tmp_path / "r.csv"
    argv = ["analyze", "torchvision:resnet18", "--input", "1,3,64,64", "--what-if", "--format", "csv"]
    assert main([*argv, *(["--depth", depth] if depth else []), "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    with torch.device("meta"):
        model = torchvision.models.resnet18().eval()
    twin = analyze(separable_twin(model), (1, 3, 64, 64)).total  # the built twin: an independent count
    total = rows[-1]
    assert total["name"] == "total"
    assert (int(total["macs_if_separable"]), int(total["params_if_separable"])) == (twin.macs, twin.params)
    # every row's figures add up to the twin's: the what-if is spread over the rows it belongs to
    assert sum(int(r["macs_if_separable"]) for r in rows[:-1]) == twin.macs
