"""`sepconv train`: train, convert + distil, resume after a kill (bit-identical), and every refusal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sepconv.cli import main
from sepconv.convert import convert
from sepconv.io import load_state_dict
from sepconv.nets import small_vgg
from sepconv.train import load_checkpoint

TINY = ["--arch", "small_vgg", "--width", "8", "--limit-train", "512", "--limit-test", "200", "--batch-size", "64"]


@pytest.fixture(autouse=True)
def _in_process_runs_keep_this_process_allocator(glibc_stub: None) -> None:
    """`sepconv train` calls keep_freed_memory() by default: stubbed for the runs made inside this process."""


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_train_then_convert_and_distil(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, sep = tmp_path / "base", tmp_path / "sep"
    assert main(["train", *TINY, "--epochs", "2", "--device", "cpu", "--out", str(base)]) == 0
    assert "epoch 2/2: train loss" in capsys.readouterr().out
    assert sorted(p.name for p in base.iterdir()) == ["checkpoint.pt", "metrics.json", "model.safetensors"]
    metrics = json.loads((base / "metrics.json").read_text())
    assert metrics["complete"] and [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["params"] == params(small_vgg("standard", width=8))
    assert metrics["config"]["lr"] == 0.05 and metrics["threads"] == torch.get_num_threads()
    assert metrics["final_test_accuracy"] == metrics["epochs"][-1]["test_accuracy"]
    assert all(e["train_samples"] == 512 and e["train_seconds"] > 0 for e in metrics["epochs"])
    standard = small_vgg("standard", width=8)
    standard.load_state_dict(load_state_dict(base / "model.safetensors"))  # loads: same architecture

    wrong = ["train", *TINY, "--conv", "separable", "--from", str(base), "--epochs", "0", "--out", str(sep)]
    assert main(wrong) == 2  # the weights of another architecture
    err = capsys.readouterr().err
    assert "does not hold --arch small_vgg --conv separable --width 8 weights: Missing key(s)" in err, err
    assert not sep.exists() or not any(sep.iterdir())
    argv = ["train", *TINY, "--from", str(base), "--convert", "rank", "--rank", "1", "--distill", "--epochs", "1"]
    assert main([*argv, "--device", "cpu", "--out", str(sep)]) == 0
    assert "right after conversion" in capsys.readouterr().out
    converted = json.loads((sep / "metrics.json").read_text())
    conversion = converted["conversion"]
    assert set(conversion["ranks"].values()) == {1} and "0.0" not in conversion["ranks"]  # the stem is kept
    # rank 1 with the stem kept is exactly the separable twin of the architecture
    assert converted["params"] == params(small_vgg("separable", width=8))
    assert converted["macs_per_image"] < metrics["macs_per_image"]
    assert 0 <= converted["initial"]["test_accuracy"] <= 1 and converted["config"]["lr"] == 0.01
    # the documented reload: convert the architecture with the recorded ranks, load the weights
    fresh, _ = convert(small_vgg("standard", width=8), rank=conversion["ranks"], init="random")
    fresh.load_state_dict(load_state_dict(sep / "model.safetensors"))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sepconv", "train", *args]


def test_keeps_freed_memory_unless_told_not_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default the command applies sepconv.keep_freed_memory() (its own process) and records the regime its
    seconds were measured in; --no-keep-freed-memory leaves the allocator alone; --keep-freed-memory where glibc's
    call is unavailable is refused before anything is written."""
    from sepconv import cpu_allocator

    argv = ["train", *TINY, "--limit-train", "64", "--epochs", "1", "--device", "cpu"]
    assert main([*argv, "--no-keep-freed-memory", "--out", str(tmp_path / "a")]) == 0
    assert not cpu_allocator.freed_memory_kept()
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["allocator"] == "glibc default"
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert cpu_allocator.freed_memory_kept()
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["allocator"] == "sepconv.keep_freed_memory()"

    monkeypatch.setattr(cpu_allocator, "_kept", False)
    monkeypatch.setattr(cpu_allocator, "_set_glibc_thresholds", lambda: False)  # not glibc
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0  # the default: where it applies
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["allocator"] == "glibc default"
    capsys.readouterr()
    assert main([*argv, "--keep-freed-memory", "--out", str(tmp_path / "d")]) == 2
    assert "--keep-freed-memory needs Linux with glibc" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_the_allocator_regime_changes_no_weight(tmp_path: Path) -> None:
    """Real processes: keep_freed_memory() (huge pages included, where the kernel gives them) vs glibc's defaults
    train to bit-identical weights; each run's metrics name the regime it ran in."""
    run = [*TINY, "--epochs", "1", "--device", "cpu"]
    for name, flag in (("kept", "--keep-freed-memory"), ("default", "--no-keep-freed-memory")):
        done = subprocess.run(cli(*run, flag, "--out", str(tmp_path / name)), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    a, b = (load_state_dict(tmp_path / name / "model.safetensors") for name in ("kept", "default"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept, default = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("kept", "default"))
    assert kept["allocator"].startswith("sepconv.keep_freed_memory()")
    assert default["allocator"].startswith("glibc default")


def test_resume_after_a_kill_gives_bit_identical_weights(tmp_path: Path) -> None:
    # 3 epochs of 32 steps (~0.5 s each): long enough that the kill lands before the run ends
    run = [*TINY, "--limit-train", "2048", "--epochs", "3", "--device", "cpu", "--seed", "7"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    process = subprocess.Popen(cli(*run, "--out", str(killed)), **quiet)
    checkpoint, deadline = killed / "checkpoint.pt", time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert load_checkpoint(checkpoint)["epoch"] < 3 and not (killed / "model.safetensors").exists()

    resumed = subprocess.run(cli(*run, "--out", str(killed), "--resume"), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    reference = subprocess.run(cli(*run, "--out", str(straight)), capture_output=True, text=True, timeout=120)
    assert reference.returncode == 0, reference.stderr
    a, b = load_state_dict(killed / "model.safetensors"), load_state_dict(straight / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads((d / "metrics.json").read_text())["epochs"] for d in (killed, straight)]
    assert [e["test_accuracy"] for e in history[0]] == [e["test_accuracy"] for e in history[1]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--convert", "rank", "--rank", "1"], "--convert needs --from CHECKPOINT"),
        (["--distill"], "--distill needs --from CHECKPOINT"),
        (["--epochs", "0"], "--epochs must be >= 1 when training from scratch"),
        (["--from", "x.safetensors", "--convert", "rank"], "--convert rank needs --rank R"),
        (["--from", "x.safetensors", "--convert", "energy"], "--convert energy needs --energy E"),
        (["--from", "x.safetensors", "--rank", "2"], "--rank needs --convert rank"),
        (
            ["--from", "x.safetensors", "--convert", "rank", "--rank", "1", "--conv", "separable"],
            "needs a --conv standard",
        ),
        (["--from", "missing.safetensors"], "--from missing.safetensors: no such file or run folder"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N; got 'tpu'"),
        (["--resume", "--force"], "--resume and --force exclude each other"),
        (["--resume"], "--resume: no checkpoint.pt in"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.safetensors").write_text("")  # exists; the argument checks come before any reading
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "resnet50"], "argument --arch: invalid choice: 'resnet50'"),
        (["--conv", "depthwise"], "argument --conv: invalid choice: 'depthwise'"),
        (["--batch-size", "0"], "argument --batch-size: must be an int >= 1, got 0"),
        (["--limit-train", "ten"], "argument --limit-train: must be an int >= 1, got 'ten'"),
        (["--lr", "-1"], "argument --lr: must be a number in (0, inf), got -1"),
        (["--alpha", "2"], "argument --alpha: must be a number in [0, 1], got 2"),
        (["--energy", "0"], "argument --energy: must be a number in (0, 1], got 0"),
        (["--convert", "budget"], "argument --convert: invalid choice: 'budget'"),
    ],
)
def test_argument_types_and_choices(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--out", "unused", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_never_overwrites_a_previous_run_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("keep me")
    argv = ["train", *TINY, "--limit-train", "64", "--epochs", "1", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 2
    assert "holds a previous run (metrics.json); pass --resume or --force" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "keep me"
    assert main([*argv, "--force"]) == 0
    assert json.loads((out / "metrics.json").read_text())["complete"]
    capsys.readouterr()
    assert main([*argv, "--resume", "--lr", "0.1"]) == 2  # another setting than the run being resumed
    assert "--resume: settings differ from the run in" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main([*argv[:-1], str(tmp_path / "file")]) == 2
    assert "is a file; it must be a folder" in capsys.readouterr().err
