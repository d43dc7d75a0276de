"""`sepconv analyze`: one real subprocess run, and the error paths in-process (one line, exit status 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sepconv.cli import main


def test_analyze_resnet18_json_through_a_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "r18.json"
    command = [sys.executable, "-m", "sepconv", "analyze", "torchvision:resnet18", "--input", "1,3,224,224"]
    result = subprocess.run(
        [*command, "--what-if", "--format", "json", "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["total"]["macs"] == 1_814_073_344 and data["total"]["params"] == 11_689_512
    assert data["what_if"]["total"]["macs_after"] == 223_042_560  # checked against the built twin in test_analyze
    assert data["rows"][0]["name"] == "conv1"


def test_table_depth_and_csv_in_process(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["analyze", "torchvision:resnet18", "--input", "1x3x224x224", "--depth", "1"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "layer4" in table and "layer4.0" not in table and "1.81G" in table
    assert max(len(line) for line in table.splitlines()) <= 100
    out = tmp_path / "r.csv"
    assert main([*argv[:4], "--format", "csv", "--out", str(out)]) == 0
    total_line = out.read_text().splitlines()[-1]
    assert total_line.startswith('total,ResNet,"(1, 3, 224, 224)","(1, 1000)",11689512,1814073344,')
    assert main([*argv[:4], "--format", "csv", "--out", str(out)]) == 2  # exists: refuse without --force
    assert "exists" in capsys.readouterr().err


def test_backward_json_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "torchvision:mobilenet_v2", "--input", "2,3,96,96", "--backward", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backward"] is True
    rows = {r["name"]: r for r in data["rows"]}
    stem = rows.pop("features.0.0")
    assert stem["backward_macs"] == stem["macs"] > 0  # the input needs no gradient: grad-weight only
    later = [r for r in rows.values() if r["macs"]]
    assert len(later) == 52 and all(r["backward_macs"] == 2 * r["macs"] for r in later)  # depthwise, pointwise, fc


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["torchvision:no_such_net", "--input", "1,3,8,8"], "unknown torchvision model 'no_such_net'"),
        (["torchvision:resnet18", "--input", "1,3,a"], "--input must be positive ints"),
        (["torchvision:resnet18", "--input", "1,4,64,64"], "ResNet failed on input (1, 4, 64, 64)"),
        (["nosuchpackage:net", "--input", "1,3"], "cannot import module 'nosuchpackage'"),
        (["torchvision:resnet18", "--input", "1,3,64,64", "--depth", "0"], "--depth must be >= 1"),
        (["torchvision:resnet18", "--input", "1,3,8,8", "--weights", "/no/such/file"], "does not exist"),
    ],
)
def test_errors_are_one_line_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sepconv analyze: error: ") and message in err
    assert err.count("\n") == 1


def test_analyze_a_converted_model_from_its_report(tmp_path: Path) -> None:
    import torch

    import sepconv
    from sepconv.io import atomic_write_text, save_state_dict
    from sepconv.nets import small_vgg

    converted, report = sepconv.convert(small_vgg(), rank=1)
    save_state_dict(converted.state_dict(), tmp_path / "w.safetensors")
    atomic_write_text(tmp_path / "report.json", report.to_json())
    out = tmp_path / "a.json"
    argv = ["analyze", "sepconv.nets:small_vgg", "--input", "2,1,28,28", "--format", "json", "--out", str(out)]
    assert main([*argv, "--ranks", str(tmp_path / "report.json"), "--weights", str(tmp_path / "w.safetensors")]) == 0
    expected = sepconv.analyze(converted, (2, 1, 28, 28)).total
    data = json.loads(out.read_text())
    assert (data["total"]["macs"], data["total"]["params"]) == (expected.macs, expected.params)
    assert expected.macs < sepconv.analyze(small_vgg(), (2, 1, 28, 28)).total.macs
    loaded = sepconv.models.load_model("sepconv.nets:small_vgg", ranks=report.ranks, weights=tmp_path / "w.safetensors")
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded.eval()(x), converted.eval()(x))
    (tmp_path / "bad.json").write_text('{"rows": []}')
    assert main([*argv, "--force", "--ranks", str(tmp_path / "bad.json")]) == 2
