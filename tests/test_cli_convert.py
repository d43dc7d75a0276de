"""`sepconv convert`: the written weights reload and equal the Python API's; overwrite and error rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sepconv.cli import main
from sepconv.convert import convert
from sepconv.io import load_state_dict, save_state_dict

torchvision = pytest.importorskip("torchvision")


def resnet18(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "r18.safetensors"
    save_state_dict(resnet18().state_dict(), path)
    return path


def test_convert_through_a_subprocess_reloads_and_matches_the_api(tmp_path: Path, weights: Path) -> None:
    out, report = tmp_path / "sep.safetensors", tmp_path / "sep.json"
    command = [sys.executable, "-m", "sepconv", "convert", "torchvision:resnet18", "--weights", str(weights)]
    args = ["--energy", "0.5", "--exclude", "conv1", "--input", "1,3,32,32", "--out", str(out), "--report", str(report)]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Converted 16 of 20 conv layers" in result.stdout.replace("\n", " ").replace("  ", " ")
    data = json.loads(report.read_text())
    assert data["spec"] == "torchvision:resnet18" and data["settings"]["energy"] == 0.5
    api, api_report = convert(resnet18(), energy=0.5, exclude="conv1")
    assert data["ranks"] == api_report.ranks and len(data["ranks"]) == 16
    state = load_state_dict(out)
    assert state.keys() == api.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in api.state_dict().items())
    fresh, _ = convert(resnet18(seed=2), rank=data["ranks"], init="random")  # the documented round trip
    fresh.load_state_dict(state)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), api(x))


def test_refuses_to_overwrite_without_force(tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "sep.safetensors", tmp_path / "sep.json"
    argv = ["convert", "torchvision:resnet18", "--weights", str(weights), "--rank", "1", "--include", "layer1.*"]
    report.write_text("keep me")
    assert main([*argv, "--out", str(out), "--report", str(report)]) == 2
    assert "sep.json exists; pass --force" in capsys.readouterr().err
    assert not out.exists() and report.read_text() == "keep me"  # refused before writing anything
    assert main([*argv, "--out", str(out), "--report", str(report), "--force"]) == 0
    assert json.loads(report.read_text())["ranks"] == {f"layer1.{i}.conv{j}": 1 for i in (0, 1) for j in (1, 2)}
    before = out.read_bytes()
    assert main([*argv, "--out", str(out)]) == 2
    assert "sep.safetensors exists" in capsys.readouterr().err and out.read_bytes() == before


def test_never_loads_a_pickle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pickled = tmp_path / "model.pt"
    torch.save(resnet18(), pickled)  # a whole pickled module, not a state_dict
    argv = ["convert", "torchvision:resnet18", "--weights", str(pickled), "--rank", "1"]
    assert main([*argv, "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "full pickles are never loaded" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "0"], "rank must be an int >= 1, got 0"),
        (["--energy", "1.5"], "energy must be in (0, 1], got 1.5"),
        (["--budget", "0.001"], "budget 0.001 cannot be met"),
        (["--budget", "0.5", "--budget-on", "macs"], "--budget-on macs needs --input"),
        (["--rank", "1", "--include", "nope"], "include pattern 'nope' matches no conv layer"),
        (["--rank", "1", "--input", "1,3,x"], "--input must be positive ints"),
    ],
)
def test_errors_are_one_line_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.safetensors"
    assert main(["convert", "torchvision:resnet18", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sepconv convert: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_out_must_be_safetensors_and_one_choice_is_required(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "torchvision:resnet18", "--rank", "1", "--out", str(tmp_path / "o.pt")]) == 2
    assert "--out must be a .safetensors file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: one of --rank/--energy/--budget is required
        main(["convert", "torchvision:resnet18", "--out", str(tmp_path / "o.safetensors")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["convert", "torchvision:resnet18", "--rank", "1", "--energy", "0.5", "--out", "o.safetensors"])
