"""`sepconv train` with and without `sepconv.keep_freed_memory()`: seconds per training step on CPU.

`sepconv train` applies keep_freed_memory() by default (glibc's heap kept for reuse, huge pages for PyTorch's
large tensors); `--no-keep-freed-memory` leaves glibc's defaults. PyTorch fixes its huge-page setting at a
process's first tensor, so each run is a fresh `python -m sepconv train` process; the two regimes take turns
(rotated order, `--repeats` processes each) over the reference nets (`small_vgg`, `small_resnet`, standard and
separable twins), each run `--epochs` epochs of the first `--limit-train` Fashion-MNIST images (batch 128,
channels_last, as `sepconv train` defaults). A run's time per step is its last epoch's `train_seconds` (from its
metrics.json) over the epoch's steps: the earlier epochs warm up the heap. Results are medians over processes.

    python benchmarks/cpu_train_allocator.py        # writes benchmarks/results/cpu_train_allocator.{json,png}
    python benchmarks/cpu_train_allocator.py --quick --out /tmp
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REGIMES = {"glibc default": "--no-keep-freed-memory", "keep_freed_memory()": "--keep-freed-memory"}
NETS = tuple(f"{arch} {conv}" for arch in ("small_vgg", "small_resnet") for conv in ("standard", "separable"))
BATCH = 128


def train_once(arch: str, conv: str, flag: str, args: argparse.Namespace) -> dict:
    """One fresh `sepconv train` process: its allocator and the ms per step of each epoch."""
    with tempfile.TemporaryDirectory() as folder:
        argv = [sys.executable, "-m", "sepconv", "train", "--arch", arch, "--conv", conv, flag, "--device", "cpu"]
        argv += ["--width", str(args.width), "--epochs", str(args.epochs), "--batch-size", str(BATCH)]
        argv += ["--limit-train", str(args.limit_train), "--limit-test", str(args.limit_test), "--out", folder]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr}")
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    steps = math.ceil(args.limit_train / BATCH)
    return {
        "allocator": metrics["allocator"],
        "ms_per_step": [epoch["train_seconds"] * 1e3 / steps for epoch in metrics["epochs"]],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sepconv.io import atomic_write_png

    names = list(result["ms_per_step"][next(iter(REGIMES))])
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.8))
    height = 0.8 / len(REGIMES)
    for i, regime in enumerate(REGIMES):
        ms = [result["ms_per_step"][regime][name] for name in names]
        ax.barh([j + i * height for j in range(len(names))], ms, height, label=regime)
    ax.set_yticks([j + height * (len(REGIMES) - 1) / 2 for j in range(len(names))], names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms per training step, batch {BATCH} (last epoch; median over processes)")
    title = f"sepconv train's allocator regimes, fp32 — {result['device']}, {result['threads']} threads"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_png(fig, path, overwrite=True)
    plt.close(fig)


def markdown(result: dict) -> str:
    default, kept = REGIMES
    lines = [f"| net (ms per step) | {default} | {kept} | speed-up |", "|---|---|---|---|"]
    for name, ms in result["ms_per_step"][default].items():
        other = result["ms_per_step"][kept][name]
        lines.append(f"| {name} | {ms:.1f} | {other:.1f} | {ms / other:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="narrow small_vggs, few images, one process each: a check")
    parser.add_argument("--repeats", type=int, default=3, help="processes per net and regime")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (the last one is timed)")
    parser.add_argument("--limit-train", type=int, default=6400, help="training images per epoch")
    parser.add_argument("--limit-test", type=int, default=1000, help="test images per epoch's evaluation")
    parser.add_argument("--width", type=int, default=32, help="channels of the nets' first stage")
    parser.add_argument("--nets", nargs="+", choices=NETS, metavar="NET", help="a subset, e.g. 'small_vgg standard'")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.limit_train, args.limit_test, args.width = 1, 256, 100, 8
    nets = args.nets or ([net for net in NETS if net.startswith("small_vgg")] if args.quick else NETS)
    import torch

    from sepconv.bench import device_name, versions
    from sepconv.io import atomic_write_text

    start = time.perf_counter()
    runs: dict[str, dict[str, list[dict]]] = {regime: {} for regime in REGIMES}
    for repeat in range(args.repeats):
        for net in nets:
            order = list(REGIMES) if repeat % 2 == 0 else list(REGIMES)[::-1]  # each regime goes first in turn
            for regime in order:
                run = train_once(*net.split(), REGIMES[regime], args)
                runs[regime].setdefault(net, []).append(run)
                print(regime, net, json.dumps(run), flush=True)
    result = {
        "benchmark": "cpu_train_allocator",
        "device": device_name("cpu"),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "versions": versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"batch": BATCH},
        # what each regime's processes reported (huge pages only where the kernel gives them)
        "allocators": {r: sorted({run["allocator"] for n in runs[r].values() for run in n}) for r in REGIMES},
        "ms_per_step": {
            regime: {name: statistics.median(run["ms_per_step"][-1] for run in per) for name, per in per_net.items()}
            for regime, per_net in runs.items()
        },
        "per_process": runs,
        "total_seconds": time.perf_counter() - start,
    }
    stem = "cpu_train_allocator_quick" if args.quick else "cpu_train_allocator"
    stem += "" if args.nets is None else "_" + "_".join(net.replace(" ", "_") for net in args.nets)
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, args.out / f"{stem}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
