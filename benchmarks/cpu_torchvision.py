"""torchvision's mobilenet_v2 against resnet18 on CPU: PyTorch eager, torch.compile and sepconv, both allocator regimes.

MobileNetV2 has about 6x fewer MACs than ResNet-18 (0.30 vs 1.81 GMACs at 224x224); on CPU its depthwise convs,
1x1 convs and BatchNorms make it far less than 6x faster. Variants, all timed in the same paired rounds
(`sepconv.bench.interleaved_latencies(..., paired=True)`; ratios are medians of per-round ratios):

- `eager_nchw`, `eager_channels_last`: the model as torchvision builds it (random weights), NCHW, or with weights
  and input in channels_last (what a user who knows the CPU would do);
- `accelerate`: `sepconv.accelerate(model)`, NCHW. In eval mode its separable chains are fused (BatchNorms folded
  into the conv weights, ReLU6 between the convs) and every other conv's BatchNorm is folded into it (the stem,
  the expanding 1x1 convs, the last conv); in training mode the BatchNorms cannot be folded and its
  depthwise convs become sepconv's `DepthwiseConv2d` (the CPU strategy per layer: layout, backward algorithms);
- `sepconv`: `sepconv.run_channels_last(sepconv.accelerate(model))` — NCHW in and out, channels_last inside;
- `compiled`: `torch.compile(model)` (default mode: Inductor's generated C++ on CPU), NCHW input; in training the
  whole forward and backward (AOTAutograd), the optimizer step eager. Its first call (the compile: a forward, and
  in training its backward) is recorded as `compile_seconds` and not timed; `torch._inductor.config.fallback_random`
  makes its dropout draw eager's random numbers, so that its outputs can be compared.

Passes: inference (a call under `no_grad`, eval mode; `--batches`) and training (an SGD step on cross-entropy with
random labels, training mode; `--train-batches`).

Each allocator regime (glibc's default, `sepconv.keep_freed_memory()`) runs in fresh processes — PyTorch fixes
its huge-page setting at its first tensor — taking turns (`--repeats` each); results are medians over processes.
Every worker also records how far the sepconv variants' outputs (and in training their input gradients) lie
from eager NCHW's (largest deviation over the largest entry).

    python benchmarks/cpu_torchvision.py        # writes benchmarks/results/cpu_torchvision.{json,png}
    python benchmarks/cpu_torchvision.py --quick --out /tmp
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REGIMES = ("glibc default", "keep_freed_memory()")
MODELS = ("mobilenet_v2", "resnet18")
# per worker: (baseline, variant) pairs whose paired ratio baseline / variant is kept
PAIRS = (
    ("mobilenet_v2/eager_nchw", "mobilenet_v2/sepconv"),
    ("mobilenet_v2/eager_channels_last", "mobilenet_v2/sepconv"),
    ("mobilenet_v2/eager_nchw", "mobilenet_v2/accelerate"),
    ("resnet18/eager_nchw", "mobilenet_v2/eager_nchw"),
    ("resnet18/eager_channels_last", "mobilenet_v2/eager_channels_last"),
    ("resnet18/eager_channels_last", "mobilenet_v2/sepconv"),
    ("mobilenet_v2/compiled", "mobilenet_v2/sepconv"),
    ("resnet18/compiled", "mobilenet_v2/compiled"),
)
PAIR_NAMES = [f"{a} / {b}" for a, b in PAIRS]


def worker(regime: str, args: argparse.Namespace) -> dict:
    """This process's timings (it runs in one regime: keep_freed_memory() comes before the first tensor)."""
    import sepconv

    if regime == REGIMES[1] and not sepconv.keep_freed_memory():
        raise RuntimeError("sepconv.keep_freed_memory() did not apply (Linux with glibc needed)")
    import torch
    import torch._inductor.config

    from sepconv.bench import allocator_name

    torch._inductor.config.fallback_random = True  # compiled dropout draws eager's numbers: outputs comparable
    rows = [timed_row("inference", batch, args) for batch in args.batches]
    rows += [timed_row("training", batch, args) for batch in args.train_batches]
    return {"regime": regime, "allocator": allocator_name(), "threads": torch.get_num_threads(), "rows": rows}


def build_variants(training: bool, quick: bool) -> dict:
    """The variants' modules, all from the same random weights: in eval mode `accelerate` folds every BatchNorm
    into the conv before it (its fused chains' and the other convs'); in training mode it cannot (batch
    statistics), and replaces the depthwise convs by sepconv's DepthwiseConv2d (on CPU: the per-layer strategy,
    its layout and backward plans)."""
    import copy

    import torch
    import torchvision

    import sepconv

    torch.manual_seed(0)
    width = {"width_mult": 0.35} if quick else {}
    mobilenet = torchvision.models.mobilenet_v2(**width).train(training)
    resnet = torchvision.models.resnet18().train(training)
    accelerated, _ = sepconv.accelerate(mobilenet)
    return {
        "mobilenet_v2/eager_nchw": mobilenet,
        "mobilenet_v2/eager_channels_last": copy.deepcopy(mobilenet).to(memory_format=torch.channels_last),
        "mobilenet_v2/accelerate": accelerated,
        "mobilenet_v2/sepconv": sepconv.run_channels_last(copy.deepcopy(accelerated)),
        "resnet18/eager_nchw": resnet,
        "resnet18/eager_channels_last": copy.deepcopy(resnet).to(memory_format=torch.channels_last),
        "resnet18/compiled": torch.compile(copy.deepcopy(resnet)),
        "mobilenet_v2/compiled": torch.compile(copy.deepcopy(mobilenet)),
    }


def timed_row(pass_name: str, batch: int, args: argparse.Namespace) -> dict:
    """One pass (``"inference"``: a no-grad call; ``"training"``: a step of SGD on cross-entropy with random labels)
    at one batch size: every variant in the same paired rounds, and how far the sepconv variants' outputs (and in
    training their input gradients) lie from eager NCHW's, relative to its largest entry."""
    import torch
    import torch.nn.functional as F

    from sepconv.bench import interleaved_latencies, paired_ratio
    from sepconv.commands.accelerate import max_relative_difference

    training = pass_name == "training"
    torch._dynamo.reset()  # compiled anew per pass and batch: no recompile with a dynamic batch dimension
    modules = build_variants(training, args.quick)
    x = torch.randn(batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (batch,))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    inputs = {name: x_cl if name.endswith("channels_last") else x for name in modules}

    def outputs(name: str) -> tuple[torch.Tensor, ...]:  # before any step: every variant still has the same weights
        torch.manual_seed(1)  # the same dropout mask for each (mobilenet_v2's classifier, in training)
        given = x.clone().requires_grad_(training)
        with torch.set_grad_enabled(training):
            out = modules[name](given)
            if not training:
                return (out,)
            (grad,) = torch.autograd.grad(F.cross_entropy(out, labels), given)
            return out.detach(), grad

    compile_seconds = {}
    for name in (name for name in modules if name.endswith("/compiled")):  # compiled before anything else runs them
        start = time.perf_counter()
        with torch.set_grad_enabled(training):
            out = modules[name](inputs[name])
            if training:  # the backward graph too; no step: every variant keeps the same weights
                F.cross_entropy(out, labels).backward()
                modules[name].zero_grad(set_to_none=True)
        compile_seconds[name] = time.perf_counter() - start
    reference = outputs("mobilenet_v2/eager_nchw")
    error = {}
    # eager channels_last: the same math in another layout, the rounding to expect from the layout alone
    for name in (f"mobilenet_v2/{v}" for v in ("eager_channels_last", "accelerate", "sepconv", "compiled")):
        error[name] = max_relative_difference(outputs(name), reference)

    def call(name: str):
        module, inp = modules[name], inputs[name]
        if not training:
            return lambda: module(inp)
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(module(inp), labels).backward()
            optimizer.step()

        return step

    with torch.set_grad_enabled(training):
        timings = interleaved_latencies(
            {name: call(name) for name in modules},
            min_run_time=args.min_run_time,
            warmup=2,
            paired=True,
            min_rounds=args.min_rounds,
        )
    return {
        "pass": pass_name,
        "batch": batch,
        "ms": {name: t.median_ms for name, t in timings.items()},
        "rounds": {name: t.runs for name, t in timings.items()},
        "paired": {f"{a} / {b}": paired_ratio(timings[a], timings[b]) for a, b in PAIRS},
        "max_rel_error_vs_eager": error,
        "compile_seconds": compile_seconds,
    }


def run_worker(regime: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--worker", regime, "--size", str(args.size), "--min-run-time"]
    argv += [str(args.min_run_time), "--min-rounds", str(args.min_rounds), "--batches", *map(str, args.batches)]
    argv += ["--train-batches", *map(str, args.train_batches)] + (["--quick"] if args.quick else [])
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def panel_name(row: dict) -> str:
    return f"{row['pass']}, batch {row['batch']}"


def summarize(processes: dict[str, list[dict]]) -> dict:
    """Per regime, pass and batch: the median over processes of each variant's ms and of each paired ratio."""
    summary: dict = {}
    for regime, runs in processes.items():
        for panel in dict.fromkeys(panel_name(row) for run in runs for row in run["rows"]):
            rows = [row for run in runs for row in run["rows"] if panel_name(row) == panel]
            summary.setdefault(regime, {})[panel] = {
                "ms": {name: statistics.median(row["ms"][name] for row in rows) for name in rows[0]["ms"]},
                "paired": {pair: statistics.median(row["paired"][pair] for row in rows) for pair in rows[0]["paired"]},
            }
    return summary


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sepconv.io import atomic_write_png

    regimes = list(result["summary"])  # a row of panels each, a column per pass and batch
    columns = list(result["summary"][regimes[0]])
    fig, axes = plt.subplots(
        len(regimes), len(columns), figsize=(4.4 * len(columns), 2.9 * len(regimes) + 0.4), squeeze=False
    )
    panels = [(axes[i][j], regime, column) for i, regime in enumerate(regimes) for j, column in enumerate(columns)]
    for ax, regime, column in panels:
        ms = result["summary"][regime][column]["ms"]
        names = sorted(ms, key=lambda name: not name.startswith("mobilenet"))  # mobilenet_v2 first, then resnet18
        colors = ["tab:blue" if name.startswith("mobilenet") else "tab:gray" for name in names]
        ax.barh(range(len(names)), [ms[name] for name in names], color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per call / training step (median)", fontsize=8)
        ax.set_title(f"{regime}: {column}", fontsize=9)
    fig.suptitle(
        f"torchvision on CPU, {result['settings']['size']}x{result['settings']['size']}, fp32 — {result['device']}, "
        f"{result['threads']} threads",
        fontsize=9,
    )
    fig.tight_layout()
    atomic_write_png(fig, path, overwrite=True)
    plt.close(fig)


def markdown(result: dict) -> str:
    names = list(next(_rows(result))[2]["ms"])
    lines = ["| regime | pass, batch | " + " | ".join(f"{name} ms" for name in names) + " |"]
    lines.append("|---|---|" + "---|" * len(names))
    for regime, panel, entry in _rows(result):
        lines.append(f"| {regime} | {panel} | " + " | ".join(f"{ms:.2f}" for ms in entry["ms"].values()) + " |")
    lines += ["", "| regime | pass, batch | " + " | ".join(PAIR_NAMES) + " |", "|---|---|" + "---|" * len(PAIR_NAMES)]
    for regime, panel, entry in _rows(result):
        lines.append(f"| {regime} | {panel} | " + " | ".join(f"{r:.2f}x" for r in entry["paired"].values()) + " |")
    return "\n".join(lines)


def _rows(result: dict) -> Iterator[tuple[str, str, dict]]:
    for regime, panels in result["summary"].items():
        for panel, entry in panels.items():
            yield regime, panel, entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a narrow mobilenet_v2, 64x64, small batches: a check")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes for inference")
    parser.add_argument("--train-batches", type=int, nargs="*", default=[8], help="batch sizes for training steps")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per regime")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timing per variant and batch")
    parser.add_argument("--min-rounds", type=int, default=10, help="paired rounds at least")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    parser.add_argument("--worker", choices=REGIMES, help=argparse.SUPPRESS)  # one process's timings, as JSON
    args = parser.parse_args()
    if args.quick and args.worker is None:
        args.batches, args.train_batches, args.size, args.repeats = [1], [2], 64, 1
        args.min_run_time, args.min_rounds = 0.05, 3
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args)))
        return
    start = time.perf_counter()
    processes: dict[str, list[dict]] = {regime: [] for regime in REGIMES}
    for repeat in range(args.repeats):
        for regime in REGIMES if repeat % 2 == 0 else REGIMES[::-1]:  # each regime goes first in turn
            run = run_worker(regime, args)
            processes[regime].append(run)
            print(json.dumps(run), flush=True)
    import torch

    from sepconv.bench import device_name, versions
    from sepconv.io import atomic_write_text

    result = {
        "benchmark": "cpu_torchvision",
        "device": device_name("cpu"),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "versions": versions() | {"torchvision": __import__("torchvision").__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "summary": summarize(processes),
        "per_process": processes,
        "total_seconds": time.perf_counter() - start,
    }
    stem = "cpu_torchvision_quick" if args.quick else "cpu_torchvision"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, args.out / f"{stem}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
