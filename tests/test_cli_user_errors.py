"""User errors in `sepconv convert`, `analyze` and `accelerate`: one line, exit status 2, nothing written;
--debug still shows the traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sepconv.cli import main
from sepconv.convert import convert
from sepconv.io import save_state_dict
from sepconv.nets import small_vgg

SPEC = "sepconv.nets:small_vgg"  # 1 input channel, 28x28 images: small and fast
OPTIONS = {
    "convert": ["--rank", "1", "--out", "OUT"],
    "analyze": ["--input", "1,1,28,28"],
    "accelerate": [],
}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """stderr of ``sepconv *argv``, checked to be one error line of a run that exited with status 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sepconv {argv[0]}: error: ") and err.count("\n") == 1, err
    return err


def command_line(command: str, tmp_path: Path, *extra: str) -> list[str]:
    options = [str(tmp_path / "o.safetensors") if o == "OUT" else o for o in OPTIONS[command]]
    return [command, SPEC, *options, *extra]


def test_convert_with_an_input_the_model_cannot_take(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = command_line("convert", tmp_path, "--input", "1,3,28,28")  # small_vgg takes 1 channel
    err = run(argv, capsys)
    assert "failed on example_inputs (1, 3, 28, 28): RuntimeError: " in err
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(ValueError, match="failed on example_inputs") as info:
        main(["--debug", *argv])
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error stays in the chain


def write_weights(kind: str, path: Path) -> None:
    torch.manual_seed(0)
    if kind == "other shapes":
        state = small_vgg(width=16).state_dict()
    elif kind == "other keys":
        state = torch.nn.Sequential(torch.nn.Linear(2, 2)).state_dict()
    else:  # a converted model's weights
        state = convert(small_vgg(), rank=1)[0].state_dict()
    save_state_dict(state, path)


@pytest.mark.parametrize("command", OPTIONS)
@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("other shapes", r"shapes differ: \S+ is \(16, 1, 3, 3\) in the file, \(32, 1, 3, 3\) in the model"),
        ("other keys", r"\d+ missing keys: .*; 2 unexpected keys: 0\.(weight, 0\.bias|bias, 0\.weight)"),
        ("converted", r"missing keys: .*unexpected keys: .*pointwise.* \(a converted model's weights need .*--ranks"),
    ],
)
def test_weights_that_do_not_fit_the_model(
    command: str, kind: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "w.safetensors"
    write_weights(kind, weights)
    err = run(command_line(command, tmp_path, "--weights", str(weights)), capsys)
    assert f"weights {weights} do not match {SPEC}: " in err and re.search(message, err), err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("command", OPTIONS)
def test_a_corrupt_safetensors_file(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(b"garbage")
    err = run(command_line(command, tmp_path, "--weights", str(corrupt)), capsys)
    assert f"cannot read {corrupt} as a safetensors file: " in err


@pytest.mark.parametrize("option", ["--out", "--report"])
def test_convert_refuses_a_directory_before_writing_anything(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = tmp_path / "o.safetensors", tmp_path / "r.json"
    (out if option == "--out" else report).mkdir()
    argv = ["convert", SPEC, "--rank", "1", "--out", str(out), "--report", str(report), "--force"]
    err = run(argv, capsys)
    assert f"{option} {tmp_path / ('o.safetensors' if option == '--out' else 'r.json')} is a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name if option == "--out" else report.name]
    assert not any((tmp_path / name).is_file() for name in (out.name, report.name))  # neither output written


def test_analyze_refuses_a_directory_as_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "report.json"
    folder.mkdir()
    err = run(["analyze", SPEC, "--input", "1,1,28,28", "--format", "json", "--out", str(folder), "--force"], capsys)
    assert f"{folder} is a directory; give a file path" in err and list(folder.iterdir()) == []
