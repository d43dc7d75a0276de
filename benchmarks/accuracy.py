"""Accuracy benchmark: standard vs separable vs converted (+ fine-tune, + distillation) on Fashion-MNIST.

Per architecture (``sepconv.nets``) and seed:

- ``standard``: trained from scratch; ``separable``: its separable twin trained from scratch;
- the trained standard model converted (``sepconv.convert``, stem kept) with rank 1 and with
  ``--energy``, each evaluated right after conversion (``converted``), after a short fine-tune
  (``+finetune``) and after the same fine-tune distilling from the standard model (``+distill``).

Each row: test accuracy per seed, mean ± std (sample std over seeds), params, MACs per image, CPU
latency of one inference batch (eval mode, channels_last, median) and training seconds per epoch.
Training uses the same settings as ``sepconv train`` (same seeds, LR, schedule, data order), so one
cell can be rerun from the CLI, e.g. ``sepconv train --arch small_vgg --conv separable --seed 1``.

    python benchmarks/accuracy.py                         # full grid, writes benchmarks/results/accuracy.{json,png}
    python benchmarks/accuracy.py --quick --out /tmp/acc  # a few steps per cell, to check the script
    python benchmarks/accuracy.py --archs small_vgg       # one arch: writes accuracy_small_vgg.{json,png}
    python benchmarks/accuracy.py --combine benchmarks/results/accuracy_small_*.json  # -> accuracy.{json,png,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sepconv
from sepconv.bench import allocator_name, device_name, median_latency, versions
from sepconv.commands.train import ARCHS, EVAL_BATCH, INPUT_SHAPE, LR_FINETUNE, LR_SCRATCH, STEM
from sepconv.data import fashion_mnist
from sepconv.io import atomic_write_png, atomic_write_text
from sepconv.train import Batches, evaluate, finetune, fit

STAGES = ("converted", "+finetune", "+distill")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cpu_latency_ms(model: nn.Module, batch: int, min_run_time: float) -> float:
    model = copy.deepcopy(model).cpu().eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, *INPUT_SHAPE[1:]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return median_latency(lambda: model(x), min_run_time=min_run_time).median_ms


def run_seed(arch: str, seed: int, args: argparse.Namespace, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every variant of ``arch`` for one seed: {variant: {accuracy, model, train_seconds_per_epoch}}."""
    cells: dict[str, dict[str, Any]] = {}
    common = {"memory_format": "channels_last", "test_loader": data["test"]}

    def train(conv: str) -> nn.Module:
        torch.manual_seed(seed)  # as `sepconv train --seed`
        model = ARCHS[arch](conv, width=args.width).to(args.device)
        batches = Batches(data["train"], args.batch_size, shuffle=True, seed=seed, limit=args.limit_train)
        history = fit(model, batches, epochs=args.epochs, lr=LR_SCRATCH, **common)
        cells[conv] = cell(model, history)
        return model

    def cell(model: nn.Module, history: list[dict[str, Any]]) -> dict[str, Any]:
        seconds = [h["train_seconds"] for h in history]
        accuracy = history[-1]["test_accuracy"] if history else evaluate(model, data["test"]).accuracy
        per_epoch = statistics.mean(seconds) if seconds else None  # None: not trained (right after conversion)
        return {"accuracy": accuracy, "model": model, "train_seconds_per_epoch": per_epoch}

    standard = train("standard")
    train("separable")
    for label, setting in (("rank1", {"rank": 1}), (f"energy{args.energy:g}", {"energy": args.energy})):
        converted, _ = sepconv.convert(standard.eval(), exclude=STEM, **setting)
        cells[f"{label} converted"] = cell(converted, [])
        for stage, teacher in (("+finetune", None), ("+distill", standard)):
            student = copy.deepcopy(converted)
            batches = Batches(data["train"], args.batch_size, shuffle=True, seed=seed, limit=args.limit_train)
            history = finetune(student, batches, teacher=teacher, epochs=args.finetune_epochs, lr=LR_FINETUNE, **common)
            cells[f"{label} {stage}"] = cell(student, history)
    return cells


def summarize(arch: str, variant: str, per_seed: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    accuracies = [c["accuracy"] for c in per_seed]
    trained = [c["train_seconds_per_epoch"] for c in per_seed]
    model = per_seed[0]["model"]
    macs = sepconv.analyze(copy.deepcopy(model).cpu().eval(), INPUT_SHAPE).total.macs
    return {
        "arch": arch,
        "variant": variant,
        "seeds": args.seeds,
        "accuracies": accuracies,
        "accuracy_mean": statistics.mean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "params": count_params(model),
        "macs_per_image": macs,
        "cpu_latency_ms_per_batch": cpu_latency_ms(model, args.latency_batch, args.min_run_time),
        "train_seconds_per_epoch": None if trained[0] is None else statistics.mean(trained),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy vs MACs per arch; models right after conversion (far below) are listed, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, len(result["archs"]), figsize=(6.5 * len(result["archs"]), 5.2), squeeze=False)
    variants = list(dict.fromkeys(r["variant"] for r in result["rows"]))
    markers = "os^v<>Dp*hX"
    for ax, arch in zip(axes[0], result["archs"], strict=True):
        untrained = []
        for row in (r for r in result["rows"] if r["arch"] == arch):
            if row["variant"].endswith("converted"):
                untrained.append(f"{row['variant']}: {100 * row['accuracy_mean']:.1f}% (no fine-tune; not drawn)")
                continue
            i = variants.index(row["variant"])
            ax.errorbar(
                row["macs_per_image"] / 1e6,
                100 * row["accuracy_mean"],
                yerr=100 * row["accuracy_std"],
                fmt=markers[i % len(markers)],
                color=f"C{i}",
                label=row["variant"],
                capsize=3,
                alpha=0.85,
                markersize=8,
            )
        ax.legend(fontsize=8, loc="lower right", title="\n".join(untrained), title_fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("MMACs per image (log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{arch} on Fashion-MNIST, mean ± std over {len(result['settings']['seeds'])} seeds")
        ax.grid(alpha=0.3, which="both")
    settings, versions_ = result["settings"], result["versions"]
    fig.suptitle(
        f"{result['device']} ({result['threads']} threads), {result['dtype']}, torch {versions_['torch']}, "
        f"sepconv {versions_['sepconv']}\nfrom scratch: {settings['epochs']} epochs; fine-tunes: "
        f"{settings['finetune_epochs']} epoch(s); batch {settings['batch_size']}",
        fontsize=8,
    )
    atomic_write_png(fig, path, overwrite=True)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| arch | variant | test acc % (mean ± std) | params | MMACs | CPU ms/batch | train s/epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['arch']} | {r['variant']} | {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} | "
            f"{r['params']:,} | {r['macs_per_image'] / 1e6:.2f} | {r['cpu_latency_ms_per_batch']:.1f} | "
            f"{'—' if r['train_seconds_per_epoch'] is None else format(r['train_seconds_per_epoch'], '.1f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch on 512 images: checks the script")
    parser.add_argument("--archs", nargs="+", choices=tuple(ARCHS), default=list(ARCHS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10, help="from-scratch epochs")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="epochs of each fine-tune")
    parser.add_argument("--energy", type=float, default=0.5, help="the energy setting of the conversions")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit-train", type=int, help="first N training images (default: all 60,000)")
    parser.add_argument("--limit-test", type=int, help="first N test images (default: all 10,000)")
    parser.add_argument("--latency-batch", type=int, default=128, help="batch of the CPU latency measurement")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per latency")
    parser.add_argument("--device", default="cpu", help="training device (latency is always measured on CPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sepconv.keep_freed_memory() first (glibc; same results, less page-fault time)",
    )
    parser.add_argument("--combine", nargs="+", type=Path, metavar="JSON", help="merge per-arch results, no training")
    args = parser.parse_args()
    if args.combine:
        result = combine([json.loads(path.read_text()) for path in args.combine])
        write(result, args.out, "accuracy")
        return
    if args.keep_freed_memory:
        sepconv.keep_freed_memory()  # glibc only; the result names the regime it ran in (allocator_name)
    if args.quick:
        args.seeds, args.epochs, args.finetune_epochs = args.seeds[:1], 1, 1
        args.limit_train, args.limit_test, args.min_run_time = 512, 500, 0.05
    sepconv.set_cpu_strategy("off")  # as `sepconv train`: channels_last throughout, no timing-based choices
    train_set, test_set = fashion_mnist("train"), fashion_mnist("test")
    data = {"train": train_set, "test": Batches(test_set, EVAL_BATCH, limit=args.limit_test)}
    result: dict[str, Any] = {
        "benchmark": "accuracy",
        "device": device_name(args.device),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "versions": versions(),
        "allocator": allocator_name(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "archs": args.archs,
        "rows": [],
    }
    start = time.perf_counter()
    for arch in args.archs:
        per_seed = [run_seed(arch, seed, args, data) for seed in args.seeds]
        for variant in per_seed[0]:
            row = summarize(arch, variant, [cells[variant] for cells in per_seed], args)
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
    result["total_seconds"] = time.perf_counter() - start
    stem = "accuracy" if args.archs == list(ARCHS) else "accuracy_" + "_".join(args.archs)
    write(result, args.out, stem + "_quick" if args.quick else stem)


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from per-arch runs; they must share device, versions, allocator and settings but ``archs``."""
    first = results[0]
    for other in results[1:]:
        for key in ("device", "threads", "dtype", "versions", "allocator"):
            if other.get(key) != first.get(key):
                raise SystemExit(f"--combine: results differ in {key!r}: {first.get(key)!r} vs {other.get(key)!r}")
        mine = {k: v for k, v in first["settings"].items() if k not in ("archs", "combine", "out")}
        theirs = {k: v for k, v in other["settings"].items() if k not in ("archs", "combine", "out")}
        if mine != theirs:
            raise SystemExit(f"--combine: results differ in settings: {mine} vs {theirs}")
    merged = {k: v for k, v in first.items() if k not in ("archs", "rows", "total_seconds")}
    merged["archs"] = [arch for r in results for arch in r["archs"]]
    merged["settings"] = {**first["settings"], "archs": merged["archs"]}
    merged["rows"] = [row for r in results for row in r["rows"]]
    merged["total_seconds"] = sum(r["total_seconds"] for r in results)
    return merged


def write(result: dict[str, Any], out: Path, stem: str) -> None:
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, out / f"{stem}.png")
    table = markdown(result)
    atomic_write_text(out / f"{stem}.md", table + "\n", overwrite=True)
    print(table)


if __name__ == "__main__":
    main()
