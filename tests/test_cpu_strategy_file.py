"""CPU strategy decisions saved to a file and loaded back: the same decisions, followed without measuring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sepconv
from sepconv import cpu_strategy, cpu_strategy_file

pytestmark = pytest.mark.usefixtures("fresh_cpu_strategy_cache")  # tests/conftest.py


def layers_and_inputs() -> list[tuple[torch.nn.Module, torch.Tensor, bool]]:
    """(layer, input, training): a 2-d training step whose 5x5 depthwise conv decides its backward too (40 outputs:
    no dense plan, which could win the step without a depthwise conv, to time), a 3-d inference call, and a
    depthwise layer alone in float32."""
    torch.manual_seed(0)
    return [
        (
            sepconv.SeparableConv2d(3, 40, 5, padding=2, dtype=torch.float64),
            torch.randn(2, 3, 12, 12, dtype=torch.float64),
            True,
        ),
        (
            sepconv.SeparableConv3d(2, 3, 3, padding=1, dtype=torch.float64),
            torch.randn(2, 2, 6, 6, 6, dtype=torch.float64),
            False,
        ),
        (sepconv.DepthwiseConv2d(4, 3, padding=1), torch.randn(3, 4, 10, 10), False),
    ]


def run_all(mode: str = "auto") -> list[torch.Tensor]:
    """Every layer's output and, in training, its input and weight gradients."""
    results = []
    with sepconv.use_cpu_strategy(mode):
        for layer, x, training in layers_and_inputs():
            if training:
                x = x.requires_grad_(True)
                out = layer(x)
                results += [out, *torch.autograd.grad(out, [x, *layer.parameters()], torch.ones_like(out))]
            else:
                with torch.no_grad():
                    results.append(layer(x))
    return results


def test_saved_decisions_load_back_equal(tmp_path) -> None:
    run_all()
    decisions = sepconv.cpu_strategy_decisions()
    kinds = {key[0] for key in decisions}
    assert kinds == {"SeparableConv2d", "SeparableConv3d", "DepthwiseConv2d", "depthwise_backward", "pointwise"}
    path = tmp_path / "decisions.json"
    assert sepconv.save_cpu_strategy_decisions(path) == len(decisions)
    sepconv.clear_cpu_strategy_cache()
    assert sepconv.cpu_strategy_decisions() == {}
    assert sepconv.load_cpu_strategy_decisions(path) == len(decisions)
    assert sepconv.cpu_strategy_decisions() == decisions


def test_loaded_decisions_spare_every_measurement_and_keep_results(tmp_path, monkeypatch) -> None:
    with sepconv.use_cpu_strategy("off"):
        plain = run_all("off")
    run_all()
    path = tmp_path / "decisions.json"
    sepconv.save_cpu_strategy_decisions(path)
    sepconv.clear_cpu_strategy_cache()
    sepconv.load_cpu_strategy_decisions(path)

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured although the decision was loaded")

    monkeypatch.setattr(cpu_strategy, "_measure", no_measuring)
    monkeypatch.setattr(cpu_strategy, "_measure_backward", no_measuring)
    monkeypatch.setattr(cpu_strategy, "_measure_pointwise", no_measuring)
    for got, expected in zip(run_all(), plain, strict=True):
        tolerance = 1e-5 if got.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_a_loaded_plan_is_followed_also_by_a_layer_that_ran_before(tmp_path, monkeypatch) -> None:
    layer = sepconv.SeparableConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    x = torch.randn(8, 4, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        layer(x)  # measured and memoized by the layer
        expected = layer._forward(x)
    path = tmp_path / "decisions.json"
    sepconv.save_cpu_strategy_decisions(path)
    document = json.loads(path.read_text())
    [[key, _]] = document["layouts"]
    document["layouts"] = [[key, ["channels_last", 2]]]  # two samples at a time: no measurement picks this here
    document["pointwise"] = []  # the chunks' pointwise conv runs on channels_last input: not timed
    path.write_text(json.dumps(document))
    assert sepconv.load_cpu_strategy_decisions(path) == 1
    chunks = []
    real_in_chunks = cpu_strategy._in_chunks
    monkeypatch.setattr(
        cpu_strategy, "_in_chunks", lambda f, t, chunk: chunks.append(chunk) or real_in_chunks(f, t, chunk)
    )
    with torch.no_grad():
        out = layer(x)
    assert chunks == [2]
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_decisions_from_another_machine_load_only_when_asked(tmp_path) -> None:
    run_all()
    decisions = sepconv.cpu_strategy_decisions()
    path = tmp_path / "decisions.json"
    sepconv.save_cpu_strategy_decisions(path)
    document = json.loads(path.read_text())
    assert document["machine"] == {
        "cpu": sepconv.bench.device_name("cpu"),
        "torch": torch.__version__,
        "sepconv": sepconv.__version__,
    }
    document["machine"]["cpu"] = "a different CPU"
    path.write_text(json.dumps(document))
    sepconv.clear_cpu_strategy_cache()
    with pytest.warns(UserWarning, match="measured on .*a different CPU.*check_machine=False"):
        assert sepconv.load_cpu_strategy_decisions(path) == 0
    assert sepconv.cpu_strategy_decisions() == {}
    assert sepconv.load_cpu_strategy_decisions(path, check_machine=False) == len(decisions)
    assert sepconv.cpu_strategy_decisions() == decisions


def valid_document() -> dict:
    return {
        "format": "sepconv-cpu-strategy",
        "version": 1,
        "machine": cpu_strategy_file._machine(),
        "layouts": [
            [
                ["SeparableConv2d", "geometry", [2, 3, 8, 8], {"dtype": "float32"}, "contiguous", False, True, 2],
                ["channels_last", None],
            ]
        ],
        "depthwise_backward": [[["depthwise_backward", [3, 1, 5, 5], [1, 1]], ["conv", "fft"]]],
        "pointwise": [[POINTWISE_KEY, "matmul"]],
    }


POINTWISE_KEY = ["pointwise", [4, 3], [2, 3, 8, 8], {"dtype": "float32"}, False, True, 2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: "not json {", "not JSON"),
        (lambda d: [], 'no "format"'),
        (lambda d: {**d, "version": 2}, "version 2"),
        (lambda d: {**d, "machine": "cpu"}, '"machine" must be an object'),
        (lambda d: {**d, "layouts": {}}, "'layouts' must be a list"),
        (lambda d: {**d, "layouts": [["SeparableConv2d", ["channels_last", None]]]}, r"layouts\[0\].*not a list"),
        (lambda d: {**d, "layouts": [[["k"], ["diagonal", None]]]}, r"layouts\[0\].*a plan is"),
        (lambda d: {**d, "layouts": [[["k"], ["channels_last", 0]]]}, r"layouts\[0\].*int >= 1"),
        (lambda d: {**d, "layouts": [[["k"], ["channels_last", 1.5]]]}, r"layouts\[0\].*int >= 1"),
        (
            lambda d: {**d, "layouts": [[["k"], ["dense", 2]]]},
            r"layouts\[0\].*for \('channels_last', 'channels_last, p",
        ),
        (lambda d: {**d, "layouts": [[["k"], ["channels_last"]]]}, r"layouts\[0\]"),
        (lambda d: {**d, "layouts": [[["k", {"dtype": "float99"}], ["contiguous", None]]]}, "not a dtype"),
        (lambda d: {**d, "layouts": [[["k", 0.5], ["contiguous", None]]]}, "cannot be part of a decision key"),
        (lambda d: {**d, "depthwise_backward": [[["k"], ["torch", "magic"]]]}, r"depthwise_backward\[0\].*'fft'"),
        (lambda d: {**d, "pointwise": [[["k"], "winograd"]]}, r"pointwise\[0\].*'winograd'.*\('conv', 'matmul'\)"),
        (lambda d: {**d, "pointwise": {}}, "'pointwise' must be a list"),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_the_problem(tmp_path, change, message) -> None:
    path = tmp_path / "decisions.json"
    changed = change(valid_document())
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(ValueError, match=message) as error:
        sepconv.load_cpu_strategy_decisions(path)
    assert str(path) in str(error.value)
    assert sepconv.cpu_strategy_decisions() == {}


def test_the_valid_document_of_the_bad_file_test_loads(tmp_path) -> None:
    path = tmp_path / "decisions.json"
    path.write_text(json.dumps(valid_document()))
    assert sepconv.load_cpu_strategy_decisions(path) == 3
    key = ("SeparableConv2d", "geometry", (2, 3, 8, 8), torch.float32, "contiguous", False, True, 2)
    assert sepconv.cpu_strategy_decisions() == {
        key: "channels_last",
        ("depthwise_backward", (3, 1, 5, 5), (1, 1)): "grad_input=conv, grad_weight=fft",
        ("pointwise", (4, 3), (2, 3, 8, 8), torch.float32, False, True, 2): "matmul",
    }


def test_the_product_plan_in_batch_chunks_loads(tmp_path) -> None:
    document = valid_document()
    document["layouts"][0][1] = ["channels_last, pointwise matmul", 4]
    path = tmp_path / "decisions.json"
    path.write_text(json.dumps(document))
    assert sepconv.load_cpu_strategy_decisions(path) == 3
    key = ("SeparableConv2d", "geometry", (2, 3, 8, 8), torch.float32, "contiguous", False, True, 2)
    assert sepconv.cpu_strategy_decisions()[key] == "channels_last, pointwise matmul in batch chunks of 4"


def test_a_file_from_before_pointwise_decisions_loads(tmp_path) -> None:
    document = valid_document()
    del document["pointwise"]  # written by a sepconv that measured no pointwise convs
    path = tmp_path / "decisions.json"
    path.write_text(json.dumps(document))
    assert sepconv.load_cpu_strategy_decisions(path) == 2
    assert {key[0] for key in sepconv.cpu_strategy_decisions()} == {"SeparableConv2d", "depthwise_backward"}


def test_save_refuses_to_replace_a_file_unless_asked(tmp_path) -> None:
    run_all()
    path = tmp_path / "decisions.json"
    path.write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sepconv.save_cpu_strategy_decisions(path)
    assert path.read_text() == "mine"
    assert sepconv.save_cpu_strategy_decisions(path, overwrite=True) == len(sepconv.cpu_strategy_decisions())
    assert [p.name for p in tmp_path.iterdir()] == ["decisions.json"]  # no temp file left


def test_merging_at_exit_keeps_what_another_process_saved_meanwhile(tmp_path) -> None:
    run_all()
    ours = sepconv.cpu_strategy_decisions()
    path = tmp_path / "decisions.json"
    path.write_text(json.dumps(valid_document()))  # another process's decisions, saved after this one loaded
    cpu_strategy_file._merge_into_file(path, {"layouts": {}, "depthwise_backward": {}, "pointwise": {}})
    sepconv.clear_cpu_strategy_cache()
    assert sepconv.load_cpu_strategy_decisions(path) == len(ours) + 3
    assert set(sepconv.cpu_strategy_decisions()) == set(ours) | {
        ("SeparableConv2d", "geometry", (2, 3, 8, 8), torch.float32, "contiguous", False, True, 2),
        ("depthwise_backward", (3, 1, 5, 5), (1, 1)),
        ("pointwise", (4, 3), (2, 3, 8, 8), torch.float32, False, True, 2),
    }


def test_merging_at_exit_writes_nothing_when_nothing_was_measured(tmp_path) -> None:
    run_all()
    path = tmp_path / "decisions.json"
    cpu_strategy_file._merge_into_file(path, cpu_strategy_file._snapshot())
    assert not path.exists()


SCRIPT = """
import sys, torch, sepconv
print(len(sepconv.cpu_strategy_decisions()))  # loaded at import
with torch.no_grad():
    sepconv.SeparableConv2d(3, 4, 3, padding=1)(torch.randn(2, 3, int(sys.argv[1]), 9))
"""


def run_script(path: Path, height: int) -> int:
    env = {**os.environ, "SEPCONV_CPU_STRATEGY_FILE": str(path)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(height)], env=env, capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_the_environment_variable_loads_at_import_and_merges_at_exit(tmp_path) -> None:
    path = tmp_path / "decisions.json"
    assert run_script(path, 9) == 0  # nothing to load yet; saves its decisions at exit: the layer's, its pointwise's
    assert run_script(path, 9) == 2  # loads them, measures nothing new: the file is left as it was
    assert run_script(path, 10) == 2  # a new input shape: two more decisions merged in
    assert sepconv.load_cpu_strategy_decisions(path) == 4
    shapes = {kind: [] for kind in ("SeparableConv2d", "pointwise")}
    for key in sepconv.cpu_strategy_decisions():
        shapes[key[0]].append(next(part for part in key[2:] if isinstance(part, tuple)))
    assert {kind: sorted(found) for kind, found in shapes.items()} == {
        "SeparableConv2d": [(2, 3, 9, 9), (2, 3, 10, 9)],
        "pointwise": [(2, 3, 9, 9), (2, 3, 10, 9)],  # padding 1: the depthwise output's shape
    }


@pytest.mark.usefixtures("glibc_stub")
def test_decisions_hold_only_in_the_allocator_regime_they_were_timed_in(tmp_path) -> None:
    """keep_freed_memory() ranks plans differently: every kind of decision is taken again after it, also by a
    layer that had decided and memoized its plan before, under keys naming the regime; a file keeps both regimes'
    decisions and warns, counting them, of those that will not apply in the loading process's regime."""
    threads = torch.get_num_threads()
    layer = sepconv.SeparableConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    x = torch.randn(8, 4, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        expected = layer._forward(x)
    plain = run_all("off")
    run_all()
    default = sepconv.cpu_strategy_decisions()
    assert {key[-1] for key in default} == {threads}  # the default regime's keys, as files before it held them
    measured = len(sepconv.cpu_strategy_measurements())

    assert sepconv.keep_freed_memory() and sepconv.freed_memory_kept()
    with torch.no_grad():
        out = layer(x)  # the layer's memo is of the other regime: decided again
    assert len(sepconv.cpu_strategy_measurements()) > measured
    for got, want in zip([out, *run_all()], [expected, *plain], strict=True):
        tolerance = 1e-5 if got.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    kept = {key: plan for key, plan in sepconv.cpu_strategy_decisions().items() if key not in default}
    assert {key[-1] for key in kept} == {(threads, cpu_strategy.FREED_MEMORY_KEPT)}
    layouts = [{key[:-1] for key in keys if "Conv" in key[0]} for keys in (kept, default)]
    assert layouts[0] == layouts[1] and len(layouts[0]) == 4  # every layer's configuration, decided again
    # the layers' decisions described alike but for the regime. Their pointwise and backward decisions follow the
    # layouts each regime's timings picked (a pointwise conv is timed only where its input's layout allows a matrix
    # product, a depthwise backward only for the layout taken), so which of those each regime took may differ: CI
    # saw 'depthwise_backward' in one regime only on a loaded machine. Every one taken names its regime (above).
    described = [{cpu_strategy.describe_decision(key) for key in keys if "Conv" in key[0]} for keys in (kept, default)]
    suffix = ", " + cpu_strategy.FREED_MEMORY_KEPT  # sepconv tune's table names the regime
    assert {(layer, shape, mode.removesuffix(suffix)) for layer, shape, mode in described[0]} == described[1]
    assert all(mode.endswith(suffix) for _, _, mode in map(cpu_strategy.describe_decision, kept))

    path = tmp_path / "decisions.json"
    total = sepconv.save_cpu_strategy_decisions(path)
    assert total == len(default) + len(kept)
    sepconv.clear_cpu_strategy_cache()
    match = rf"{len(default)} of the {total} decisions in .* process's \(freed memory kept\): {len(default)} in glibc's"
    with pytest.warns(UserWarning, match=match):
        assert sepconv.load_cpu_strategy_decisions(path) == total
    assert sepconv.cpu_strategy_decisions() == {**default, **kept}  # the regime survives the JSON round trip

    from sepconv import cpu_allocator

    cpu_allocator._kept = False  # a process that never called it (the fixture restores the flag)
    sepconv.clear_cpu_strategy_cache()
    match = rf"{len(kept)} of the {total} decisions in .* \(glibc's default\): {len(kept)} in freed memory kept\."
    with pytest.warns(UserWarning, match=match):
        sepconv.load_cpu_strategy_decisions(path)


@pytest.mark.usefixtures("glibc_stub")
def test_decisions_timed_on_huge_pages_name_them_and_hold_only_there(tmp_path, monkeypatch) -> None:
    """Where PyTorch's large tensors get huge pages (keep_freed_memory() before the first tensor), decision keys
    say so after the kept heap, sepconv tune's table too, and a process without them is warned of every one."""
    from sepconv import cpu_allocator

    monkeypatch.setattr(cpu_allocator, "_huge_pages", True)  # what huge_pages_in_use() found in such a process
    assert sepconv.keep_freed_memory()
    run_all()
    decisions = sepconv.cpu_strategy_decisions()
    regime = (cpu_strategy.FREED_MEMORY_KEPT, cpu_strategy.HUGE_PAGES)
    assert decisions and {key[-1] for key in decisions} == {(torch.get_num_threads(), *regime)}
    modes = {cpu_strategy.describe_decision(key)[2] for key in decisions}
    assert modes == {"inference, freed memory kept, huge pages", "training, freed memory kept, huge pages"}
    path = tmp_path / "decisions.json"
    total = sepconv.save_cpu_strategy_decisions(path)

    cpu_allocator._huge_pages = False  # a process that kept freed memory but created a tensor before asking
    sepconv.clear_cpu_strategy_cache()
    match = rf"{total} of the {total} decisions .* \(freed memory kept\): {total} in freed memory kept, huge pages\."
    with pytest.warns(UserWarning, match=match):
        assert sepconv.load_cpu_strategy_decisions(path) == total
