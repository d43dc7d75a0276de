"""`sepconv accelerate`: the changes listed (as JSON and as a table) against the models' known structure, the
outputs check, and the error paths (one line, exit status 2)."""

from __future__ import annotations

import collections
import copy
import json
import statistics
from typing import ClassVar

import pytest
import torch
import torchvision

from sepconv import run_channels_last
from sepconv.accelerate import accelerate
from sepconv.cli import main
from sepconv.commands.accelerate import measure, relative_difference


def test_json_lists_every_efficientnet_block_with_its_squeeze_excitation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["accelerate", "torchvision:efficientnet_b0", "--format", "json", "--check", "1,3,64,64"]) == 0
    data = json.loads(capsys.readouterr().out)
    model = torchvision.models.efficientnet_b0()
    blocks = [f"features.{i}.{j}" for i, stage in enumerate(model.features) for j, block in enumerate(stage)
              if type(block).__name__ == "MBConv"]  # fmt: skip
    fused = [change for change in data["changes"] if change["kind"] == "fused separable"]
    assert len(blocks) == 16 and len(fused) == 16
    for block, change in zip(blocks, fused, strict=True):
        # the depthwise Conv2dNormActivation is the block's first (no expansion) or second Sequential
        assert change["kind"] == "fused separable" and change["activation"] == "silu"
        assert change["excitation"].startswith(f"{block}.block.") and change["replaced"][0].startswith(block)
        assert len(change["folded_norms"]) == 2 and change["batch_norms"] == []
    # every other BatchNorm2d (the stem's, the 15 expanding convs', the last conv's) folded into its conv
    norms = [name for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
    folded = [change for change in data["changes"] if change["kind"] == "folded conv"]
    assert len(fused) + len(folded) == len(data["changes"]) and len(folded) == len(norms) - 2 * 16 == 17
    assert sorted(n for change in data["changes"] for n in change["folded_norms"]) == sorted(norms)
    assert data["norms_left"] == []
    assert 0 <= data["max_relative_difference"] < 1e-5  # BatchNorm folding reorders products: float32 rounding


def test_table_in_training_mode_lists_the_kept_norms(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["accelerate", "torchvision:mobilenet_v2", "--train", "--backend", "triton"]) == 0
    table = capsys.readouterr().out
    assert "17 chains fused, 0 depthwise convs routed" in table
    rows = [line for line in table.splitlines() if "fused separable" in line]
    assert len(rows) == 17 and all(line.split("│")[5].strip() == "2" for line in rows)  # both norms kept
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in torchvision.models.mobilenet_v2().modules())
    assert f"BatchNorms left to run on their own: {norms - 2 * 17} (features.0.1, " in table  # the stem's first


def test_norms_left_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    """DenseNet: a dense layer's forward (traced) runs norm2 right after conv1, folded, as the stem's norm0 after
    conv0; the others (each layer's norm1, the transitions', norm5) follow a concatenation, a pooling or a
    block: the footer and the JSON name them, norm by norm."""
    model = torchvision.models.densenet121()
    norms = [name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    left = [name for name in norms if not name.endswith(".norm2") and name != "features.norm0"]
    assert main(["accelerate", "torchvision:densenet121", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["norms_left"] == left and len(data["changes"]) == len(norms) - len(left) == 59
    assert main(["accelerate", "torchvision:densenet121"]) == 0
    footer = " ".join(capsys.readouterr().out.split("┘")[-1].split())  # the footer, rich's line breaks undone
    assert (
        footer
        == f"BatchNorms left to run on their own: {len(left)} ({', '.join(left[:5])}, ... ({len(left) - 5} more))"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["resnet18"], "model spec must look like"),
        (["torchvision:mobilenet_v2", "--check", "1,3"], "--check must be an image batch's shape N,C,H,W"),
        (["torchvision:mobilenet_v2", "--device", "nope"], "is not a device name"),
        (["torchvision:mobilenet_v2", "--check", "1,3,a"], "--check must be positive ints"),
        (["torchvision:mobilenet_v2", "--measure", "8,3,224"], "--measure must be an image batch's shape N,C,H,W"),
        (["torchvision:mobilenet_v2", "--measure", "1,3,8,8", "--min-run-time", "0"], "--min-run-time must be"),
        (["torchvision:mobilenet_v2", "--measure", "1,3,8,8", "--min-run-time", "nan"], "--min-run-time must be"),
        (["torchvision:mobilenet_v2", "--with-compile"], "it needs --measure SHAPE"),
    ],
)
def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(["accelerate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_measure_times_four_variants_in_paired_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["accelerate", "torchvision:mobilenet_v3_small", "--measure", "2,3,32,32", "--min-run-time", "0.05"]
    assert main([*argv, "--format", "json"]) == 0
    measured = json.loads(capsys.readouterr().out)["measured"]
    assert measured["input_shape"] == [2, 3, 32, 32] and measured["step"].startswith("forward (eval mode")
    assert measured["threads"] == torch.get_num_threads() and measured["versions"]["torch"] == torch.__version__
    variants = measured["variants"]
    assert list(variants) == ["original", "accelerated", "original, channels_last", "accelerated, channels_last"]
    original = variants["original"]["samples_ms"]
    for row in variants.values():
        samples = row["samples_ms"]
        assert len(samples) == row["rounds"] == len(original) >= 15  # one sample per round, every variant
        assert row["median_ms"] == pytest.approx(statistics.median(samples))
        speedup = statistics.median(a / b for a, b in zip(original, samples, strict=True))
        assert row["speedup"] == pytest.approx(speedup)
        low, high = row["speedup_interval"]
        assert min(a / b for a, b in zip(original, samples, strict=True)) <= low <= row["speedup"] <= high
    assert variants["original"]["speedup"] == 1.0
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "paired rounds" in table and all(f"│ {name} " in table for name in variants)


class _TwoOutputs(torch.nn.Module):
    """A conv + norm returning a named tuple (as GoogLeNet in training), logging its forward and backward calls in a
    class attribute (shared by the copies the measurement makes)."""

    Outputs = collections.namedtuple("Outputs", "logits aux")
    calls: ClassVar[list[str]] = []

    def __init__(self, aux_scale: float = 1.0) -> None:
        super().__init__()
        self.conv, self.norm, self.aux_scale = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), aux_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.norm(self.conv(x))
        _TwoOutputs.calls.append("forward")
        if y.requires_grad:
            y.register_hook(lambda grad: _TwoOutputs.calls.append("backward"))
        return self.Outputs(y.mean((2, 3)), y[:, :2] * self.aux_scale)


@pytest.mark.parametrize("training", [False, True])
def test_measure_runs_a_training_step_in_training_mode(training: bool) -> None:
    model = _TwoOutputs().train(training)
    fast, _ = accelerate(model)
    _TwoOutputs.calls.clear()
    timings = measure(model, fast, (2, 3, 8, 8), min_run_time=0.01).timings
    forwards, backwards = _TwoOutputs.calls.count("forward"), _TwoOutputs.calls.count("backward")
    assert forwards >= 4 * 15 and sum(t.runs for t in timings.values()) <= forwards
    assert backwards == (forwards if training else 0)


@pytest.mark.parametrize("training", [False, True])
def test_measure_with_compile_times_both_compiled_models(training: bool) -> None:
    """The compiled variants, as built and channels_last inside (a training step too), are timed in the same rounds,
    their first call (the compile) apart, and compute the original's outputs, NCHW out."""
    model = _TwoOutputs().train(training)
    fast, _ = accelerate(model)
    measured = measure(model, fast, (2, 3, 8, 8), min_run_time=0.01, compiled=True)
    models, layouts = ("original", "accelerated"), ("", "channels_last, ")
    compiled = {f"{which}, {how}torch.compile" for which in models for how in layouts}
    assert set(measured.timings) == {"original", "accelerated", "original, channels_last",
                                     "accelerated, channels_last"} | compiled  # fmt: skip
    assert set(measured.compile_seconds) == compiled and all(s > 0 for s in measured.compile_seconds.values())
    assert len({t.runs for t in measured.timings.values()}) == 1  # paired: every variant in every round
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for compiled_fast in (torch.compile(fast.eval()), torch.compile(run_channels_last(copy.deepcopy(fast)))):
            for got, want in zip(compiled_fast(x), model.eval()(x), strict=True):
                assert got.is_contiguous()  # NCHW out, channels_last inside or not
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_relative_difference_compares_every_output() -> None:
    """The largest relative difference over the outputs: here the auxiliary one, off by half."""
    model = _TwoOutputs().eval()
    fast = _TwoOutputs(aux_scale=1.5).eval()
    fast.load_state_dict(model.state_dict())
    assert relative_difference(model, fast, (2, 3, 8, 8), seed=0) == pytest.approx(0.5)


def test_skipped_changes_carry_their_reason_in_the_table_and_the_json() -> None:
    """A chain whose 1x1 conv has a hook is left as it is (the hook must see its module's call): the change is
    listed as skipped, with the reason, in the JSON record and in a table column of its own."""
    from rich.console import Console

    from sepconv.commands.accelerate import change_record, changes_table

    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 1),
        torch.nn.BatchNorm2d(16),
    ).eval()
    model[3].register_forward_hook(lambda module, args, output: None)
    _, changes = accelerate(model)
    skipped = [change for change in changes if change.kind == "skipped"]
    assert skipped and all("has hooks" in (change.reason or "") for change in skipped)
    records = [change_record(change) for change in changes]
    assert [r["reason"] for r in records if r["kind"] == "skipped"] == [c.reason for c in skipped]
    assert all(r["reason"] is None for r in records if r["kind"] != "skipped")
    console = Console(width=250, record=True)
    console.print(changes_table(changes, "hooked"))
    text = console.export_text()
    assert f"{len(skipped)} skipped" in text and "reason" in text and "has hooks" in text
