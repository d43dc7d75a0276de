"""tune_cpu_strategy / `sepconv tune`: every layer's configuration decided up front, the model left untouched."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import sepconv
from sepconv import cpu_strategy
from sepconv.cli import main
from sepconv.nets import small_resnet, small_vgg

pytestmark = pytest.mark.usefixtures("fresh_cpu_strategy_cache")  # tests/conftest.py


def separable_vgg() -> nn.Module:
    """A model spec for the command line test: ``tests.test_cpu_tune:separable_vgg``."""
    torch.manual_seed(0)
    return small_vgg("separable")


def seen_configurations(model: nn.Module, x: torch.Tensor) -> set[tuple[tuple[int, ...], bool]]:
    """(input shape, training) of every separable layer call in an inference call and a training step of a copy."""
    twin = copy.deepcopy(model)
    seen = set()
    for layer in twin.modules():
        if isinstance(layer, sepconv.SeparableConv2d):
            layer.register_forward_pre_hook(lambda m, args: seen.add((tuple(args[0].shape), torch.is_grad_enabled())))
    with sepconv.use_cpu_strategy("off"), torch.no_grad():
        twin.eval()(x)
    with sepconv.use_cpu_strategy("off"):
        twin.train()(x).sum().backward()
    return seen


@pytest.mark.parametrize("build", [small_vgg, small_resnet])
def test_every_layer_call_of_both_modes_is_decided_and_the_model_is_untouched(build) -> None:
    torch.manual_seed(0)
    model = build("separable").eval()
    state = {name: t.clone() for name, t in model.state_dict().items()}
    x = torch.randn(4, 1, 28, 28)
    made = sepconv.tune_cpu_strategy(model, x)
    layouts = {key for key in made if key[0] == "SeparableConv2d"}
    assert {(key[-6], key[-3]) for key in layouts} == seen_configurations(model, x)
    assert made == sepconv.cpu_strategy_decisions()  # the cache was empty: everything in it was made here
    assert not model.training and all(p.grad is None for p in model.parameters())
    for name, tensor in model.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(tensor, state[name]), name


def test_the_tuned_model_measures_nothing_in_its_first_calls(monkeypatch) -> None:
    """Not in its first calls, nor in the calls after which close decisions are measured again: tuning took those
    second measurements too (every decision made close here: all plans timed equal)."""
    real_time_layouts = cpu_strategy._time_layouts
    monkeypatch.setattr(
        cpu_strategy, "_time_layouts", lambda *args, **kwargs: dict.fromkeys(real_time_layouts(*args, **kwargs), 1.0)
    )
    model = separable_vgg()
    sepconv.tune_cpu_strategy(model, (4, 1, 28, 28))
    assert sepconv.tune_cpu_strategy(model, (4, 1, 28, 28)) == {}  # nothing new to decide

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured although tuned")

    for measurement in ("_measure", "_measure_backward", "_time_layouts"):
        monkeypatch.setattr(cpu_strategy, measurement, no_measuring)
    x = torch.randn(4, 1, 28, 28)
    for _ in range(cpu_strategy._RECHECK_AFTER_CALLS + 1):
        model.train()(x).sum().backward()
        with torch.no_grad():
            model.eval()(x)


def test_one_mode_only() -> None:
    made = sepconv.tune_cpu_strategy(separable_vgg(), (4, 1, 28, 28), training=False)
    assert made and {key[-3] for key in made} == {False}
    made = sepconv.tune_cpu_strategy(separable_vgg(), (4, 1, 28, 28), inference=False)
    assert made and {key[-3] for key in made if key[0] != "depthwise_backward"} == {True}


@pytest.mark.parametrize(
    ("model", "input", "kwargs", "message"),
    [
        (nn.Conv2d(1, 4, 3), (2, 1, 8, 8), {}, "Conv2d has no sepconv depthwise or separable layer"),
        (small_vgg("separable"), (2, 1, 28, 28), {"training": False, "inference": False}, "training=True or"),
        (small_vgg("separable"), (2, 0, 28, 28), {}, r"shape of positive ints such as \(8, 3, 224, 224\)"),
        (small_vgg("separable"), torch.empty(2, 1, 28, 28, device="meta"), {}, "must be a CPU tensor"),
    ],
)
def test_bad_arguments_are_named(model, input, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        sepconv.tune_cpu_strategy(model, input, **kwargs)


def test_the_command_writes_a_file_the_next_process_loads(tmp_path, capsys) -> None:
    out = tmp_path / "cpu_strategy.json"
    argv = ["tune", "tests.test_cpu_tune:separable_vgg", "--input", "4,1,28,28", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "SeparableConv2d" in printed and "training" in printed and "inference" in printed
    decided = sepconv.cpu_strategy_decisions()
    # each decision's measuring time (2 decimals); the layers' (which include those of their pointwise convs, made
    # inside them) together some of the whole, which the title gives
    total = float(re.search(r"decisions made in ([0-9.]+) s", printed).group(1))
    rows = [line.split("│") for line in printed.splitlines() if line.startswith("│")]
    layers = [float(row[-2]) for row in rows if row[1].strip().startswith("SeparableConv2d")]
    assert len(rows) == len(decided) and 0 < sum(layers) <= total + 0.05 + 0.005 * len(layers)
    assert all(row[1].strip().startswith(("SeparableConv2d", "pointwise conv ")) for row in rows)
    sepconv.clear_cpu_strategy_cache()
    assert sepconv.load_cpu_strategy_decisions(out) == len(decided) > 0
    assert sepconv.cpu_strategy_decisions() == decided
    assert main(argv) == 2 and "exists; pass --force" in capsys.readouterr().err
    assert main([*argv, "--force", "--only", "inference"]) == 0
    assert main(["tune", "torch.nn:Identity", "--input", "1,3,8,8", "--out", str(tmp_path / "x.json")]) == 2
    assert "nothing to decide" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_the_command_tunes_the_channels_last_run_when_asked(tmp_path) -> None:
    out = tmp_path / "cpu_strategy.json"
    argv = ["tune", "tests.test_cpu_tune:separable_vgg", "--input", "4,1,28,28", "--out", str(out)]
    assert main([*argv, "--channels-last", "--only", "inference"]) == 0
    # inside a run_channels_last model every separable layer sees channels_last input (source, key[-4])
    layouts = [key for key in sepconv.cpu_strategy_decisions() if key[0] == "SeparableConv2d"]
    assert layouts and {key[-4] for key in layouts} == {"channels_last"}
    assert {key[-3] for key in layouts} == {False}  # inference only


def test_the_command_decides_with_freed_memory_kept_when_asked(tmp_path, monkeypatch, capsys) -> None:
    """--keep-freed-memory puts the allocator regime in force before any measurement, so that every saved decision
    is keyed on it; where it cannot (not glibc) the command stops with an error naming the option, before measuring
    or writing anything."""
    from sepconv import cpu_allocator

    applies = True
    monkeypatch.setattr(cpu_allocator, "_kept", False)  # the real glibc call changes this process for good: stubbed
    monkeypatch.setattr(cpu_allocator, "_set_glibc_thresholds", lambda: applies)
    threads = torch.get_num_threads()

    def saved_runtimes(path) -> set:
        sepconv.clear_cpu_strategy_cache()
        sepconv.load_cpu_strategy_decisions(path)
        return {key[-1] for key in sepconv.cpu_strategy_decisions()}

    out = tmp_path / "cpu_strategy.json"
    argv = ["tune", "tests.test_cpu_tune:separable_vgg", "--input", "2,1,28,28", "--out", str(out), "--only"]
    assert main([*argv, "inference"]) == 0 and not cpu_allocator.freed_memory_kept()  # not asked: not applied
    assert saved_runtimes(out) == {threads}
    sepconv.clear_cpu_strategy_cache()
    capsys.readouterr()
    assert main([*argv, "inference", "--force", "--keep-freed-memory"]) == 0
    modes = re.findall(r"inference, freed memory kept", capsys.readouterr().out)
    assert saved_runtimes(out) == {(threads, cpu_strategy.FREED_MEMORY_KEPT)}  # every decision: none made before
    assert len(modes) == len(sepconv.cpu_strategy_decisions())  # each row of the table names the regime
    cpu_allocator._kept, applies, other = False, False, tmp_path / "other.json"
    sepconv.clear_cpu_strategy_cache()
    capsys.readouterr()
    refused = ["tune", "tests.test_cpu_tune:separable_vgg", "--input", "2,1,28,28", "--out", str(other)]
    assert main([*refused, "--keep-freed-memory"]) == 2
    assert "--keep-freed-memory needs Linux with glibc" in capsys.readouterr().err
    assert not other.exists() and sepconv.cpu_strategy_measurements() == []
