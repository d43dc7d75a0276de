"""torchvision's mobilenet_v2 against resnet18 on CPU, inference: PyTorch eager and sepconv, both allocator regimes.

MobileNetV2 has about 6x fewer MACs than ResNet-18 (0.30 vs 1.81 GMACs at 224x224); on CPU its depthwise convs,
1x1 convs and BatchNorms make it far less than 6x faster. Variants, all timed in the same paired rounds
(`sepconv.bench.interleaved_latencies(..., paired=True)`; ratios are medians of per-round ratios):

- `eager_nchw`, `eager_channels_last`: the model as torchvision builds it (random weights, eval mode), NCHW, or
  with weights and input in channels_last (what a user who knows the CPU would do);
- `accelerate`: `sepconv.accelerate(model)` (its separable chains fused: BatchNorms folded into the conv weights,
  ReLU6 between the convs), NCHW;
- `sepconv`: `sepconv.run_channels_last(sepconv.accelerate(model))` — NCHW in and out, channels_last inside.

Each allocator regime (glibc's default, `sepconv.keep_freed_memory()`) runs in fresh processes — PyTorch fixes
its huge-page setting at its first tensor — taking turns (`--repeats` each); results are medians over processes.
Every worker also records how far the sepconv variants' outputs lie from eager's (largest deviation over the
largest entry).

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
)
PAIR_NAMES = [f"{a} / {b}" for a, b in PAIRS]


def worker(regime: str, args: argparse.Namespace) -> dict:
    """This process's timings (it runs in one regime: keep_freed_memory() comes before the first tensor)."""
    import sepconv

    if regime == REGIMES[1] and not sepconv.keep_freed_memory():
        raise RuntimeError("sepconv.keep_freed_memory() did not apply (Linux with glibc needed)")
    import copy

    import torch
    import torchvision

    from sepconv.bench import allocator_name, interleaved_latencies, paired_ratio

    torch.manual_seed(0)
    cl = torch.channels_last
    width = {"width_mult": 0.35} if args.quick else {}
    eager = {"mobilenet_v2": torchvision.models.mobilenet_v2(**width).eval(),
             "resnet18": torchvision.models.resnet18().eval()}  # fmt: skip
    accelerated, _ = sepconv.accelerate(eager["mobilenet_v2"])
    modules = {
        "mobilenet_v2/eager_nchw": eager["mobilenet_v2"],
        "mobilenet_v2/eager_channels_last": copy.deepcopy(eager["mobilenet_v2"]).to(memory_format=cl),
        "mobilenet_v2/accelerate": accelerated,
        "mobilenet_v2/sepconv": sepconv.run_channels_last(copy.deepcopy(accelerated)),
        "resnet18/eager_nchw": eager["resnet18"],
        "resnet18/eager_channels_last": copy.deepcopy(eager["resnet18"]).to(memory_format=cl),
    }
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size)
        inputs = {name: x.contiguous(memory_format=cl) if name.endswith("channels_last") else x for name in modules}

        def call(name: str, inputs=inputs):
            return lambda: modules[name](inputs[name])

        with torch.no_grad():
            reference = modules["mobilenet_v2/eager_nchw"](x)
            error = {name: (modules[name](x) - reference).abs().max().item() / reference.abs().max().item()
                     for name in ("mobilenet_v2/accelerate", "mobilenet_v2/sepconv")}  # fmt: skip
            timings = interleaved_latencies(
                {name: call(name) for name in modules},
                min_run_time=args.min_run_time,
                warmup=2,
                paired=True,
                min_rounds=args.min_rounds,
            )
        rows.append({
            "batch": batch,
            "ms": {name: t.median_ms for name, t in timings.items()},
            "rounds": {name: t.runs for name, t in timings.items()},
            "paired": {f"{a} / {b}": paired_ratio(timings[a], timings[b]) for a, b in PAIRS},
            "max_rel_error_vs_eager": error,
        })  # fmt: skip
    return {"regime": regime, "allocator": allocator_name(), "rows": rows}


def run_worker(regime: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--worker", regime, "--size", str(args.size), "--min-run-time"]
    argv += [str(args.min_run_time), "--min-rounds", str(args.min_rounds), "--batches", *map(str, args.batches)]
    argv += ["--quick"] if args.quick else []
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(processes: dict[str, list[dict]], batches: list[int]) -> dict:
    """Per regime and batch: the median over processes of each variant's ms and of each paired ratio."""
    summary: dict = {}
    for regime, runs in processes.items():
        for batch in batches:
            rows = [row for run in runs for row in run["rows"] if row["batch"] == batch]
            summary.setdefault(regime, {})[str(batch)] = {
                "ms": {name: statistics.median(row["ms"][name] for row in rows) for name in rows[0]["ms"]},
                "paired": {pair: statistics.median(row["paired"][pair] for row in rows) for pair in rows[0]["paired"]},
            }
    return summary


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sepconv.io import atomic_write_png

    regimes = list(result["summary"])  # a row of panels each, a column per batch
    batches = list(result["summary"][regimes[0]])
    fig, axes = plt.subplots(
        len(regimes), len(batches), figsize=(4.4 * len(batches), 2.9 * len(regimes) + 0.4), squeeze=False
    )
    panels = [(axes[i][j], regime, batch) for i, regime in enumerate(regimes) for j, batch in enumerate(batches)]
    for ax, regime, batch in panels:
        ms = result["summary"][regime][batch]["ms"]
        names = list(ms)
        colors = ["tab:blue" if name.startswith("mobilenet") else "tab:gray" for name in names]
        ax.barh(range(len(names)), [ms[name] for name in names], color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per inference call (median)", fontsize=8)
        ax.set_title(f"{regime}, batch {batch}", fontsize=9)
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
    lines = ["| regime | batch | " + " | ".join(f"{name} ms" for name in names) + " |"]
    lines.append("|---|---|" + "---|" * len(names))
    for regime, batch, entry in _rows(result):
        lines.append(f"| {regime} | {batch} | " + " | ".join(f"{ms:.2f}" for ms in entry["ms"].values()) + " |")
    lines += ["", "| regime | batch | " + " | ".join(PAIR_NAMES) + " |", "|---|---|" + "---|" * len(PAIR_NAMES)]
    for regime, batch, entry in _rows(result):
        lines.append(f"| {regime} | {batch} | " + " | ".join(f"{r:.2f}x" for r in entry["paired"].values()) + " |")
    return "\n".join(lines)


def _rows(result: dict) -> Iterator[tuple[str, str, dict]]:
    for regime, per_batch in result["summary"].items():
        for batch, entry in per_batch.items():
            yield regime, batch, entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a narrow mobilenet_v2, 64x64, batch 1: a check")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per regime")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timing per variant and batch")
    parser.add_argument("--min-rounds", type=int, default=10, help="paired rounds at least")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    parser.add_argument("--worker", choices=REGIMES, help=argparse.SUPPRESS)  # one process's timings, as JSON
    args = parser.parse_args()
    if args.quick and args.worker is None:
        args.batches, args.size, args.repeats, args.min_run_time, args.min_rounds = [1], 64, 1, 0.05, 3
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
        "summary": summarize(processes, args.batches),
        "per_process": processes,
        "total_seconds": time.perf_counter() - start,
    }
    stem = "cpu_torchvision_quick" if args.quick else "cpu_torchvision"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, args.out / f"{stem}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
