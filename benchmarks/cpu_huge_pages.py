"""CPU allocator regimes side by side: glibc's defaults, huge pages alone, freed memory kept, and both.

PyTorch fixes its huge-page setting (``THP_MEM_ALLOC_ENABLE``) at a process's first CPU tensor, so the regimes
cannot share a process: each measurement is a fresh child process in one regime, and the regimes take turns
(rotated order, ``--repeats`` processes each), so that drift of the machine hits all alike. A child times, with
``sepconv.bench.interleaved_latencies`` (paired rounds), training steps whose tensors are all fresh allocations:
a ReLU's forward+backward on tensors of 4-154 MB (the 154 MB one: a (32, 96, 112, 112) activation), and
PyTorch's separable block (depthwise 3x3 then pointwise) on batch-32 MobileNet shapes, NCHW and channels_last,
forward and training step. Results are the median over processes of each process's median, in ms.

    python benchmarks/cpu_huge_pages.py            # writes benchmarks/results/cpu_huge_pages.{json,png}
    python benchmarks/cpu_huge_pages.py --quick --out /tmp
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REGIMES = ("glibc default", "huge pages alone", "freed memory kept", "freed memory kept, huge pages")
# THP_MEM_ALLOC_ENABLE per regime (None: unset, so keep_freed_memory() sets it) and whether keep_freed_memory() runs
SETUPS = {
    "glibc default": (None, False),
    "huge pages alone": ("1", False),
    "freed memory kept": ("0", True),
    "freed memory kept, huge pages": (None, True),
}
RELU_MB = (4, 16, 64, 154)
# (C, H, O, stride) at batch 32: DESIGN.md §2's stride-2 stem block and a 56x56 block
BLOCKS = ((96, 112, 24, 2), (144, 56, 24, 1))
QUICK_RELU_MB = (4, 64)
QUICK_BLOCKS = ((16, 56, 8, 2),)


def child(regime: str, quick: bool, min_run_time: float) -> dict:
    """This process's medians (ms) in ``regime``, which its parent set up through the environment."""
    import sepconv

    if SETUPS[regime][1]:
        assert sepconv.keep_freed_memory(), "needs Linux with glibc"
    import torch
    from torch import nn

    from sepconv.bench import allocator_name, interleaved_latencies

    def training_step(module: Callable, x: torch.Tensor) -> Callable[[], object]:
        x = x.detach().requires_grad_(True)
        params = list(module.parameters()) if isinstance(module, nn.Module) else []

        def run() -> object:
            out = module(x)
            return torch.autograd.grad(out, [x, *params], torch.ones_like(out))

        return run

    def forward(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return module(x)

        return run

    torch.manual_seed(0)
    fns: dict[str, Callable[[], object]] = {}
    for mb in QUICK_RELU_MB if quick else RELU_MB:
        fns[f"relu training step, {mb} MB"] = training_step(torch.relu, torch.randn(mb * 2**20 // 4))
    for c, h, o, stride in QUICK_BLOCKS if quick else BLOCKS:
        block = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.Conv2d(c, o, 1))
        x = torch.randn(32, c, h, h)
        for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            module, inp = copy.deepcopy(block).to(memory_format=fmt), x.contiguous(memory_format=fmt)
            fns[f"({c},{h},{o}) s{stride} b32 {layout} forward"] = forward(module, inp)
            fns[f"({c},{h},{o}) s{stride} b32 {layout} training step"] = training_step(module, inp)
    timings = interleaved_latencies(fns, min_run_time=min_run_time, paired=True, min_rounds=5)
    return {"allocator": allocator_name(), "ms": {name: timing.median_ms for name, timing in timings.items()}}


def run_child(regime: str, quick: bool, min_run_time: float) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    huge_pages = SETUPS[regime][0]
    if huge_pages is not None:  # PyTorch reads it at the child's first tensor; keep_freed_memory() leaves it as set
        env["THP_MEM_ALLOC_ENABLE"] = huge_pages
    argv = [sys.executable, __file__, "--child", regime, "--min-run-time", str(min_run_time)]
    result = subprocess.run([*argv, *(["--quick"] if quick else [])], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"the {regime!r} child failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sepconv.io import atomic_write_png

    names = list(result["ms"][REGIMES[0]])
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    height = 0.8 / len(REGIMES)
    for i, regime in enumerate(REGIMES):
        base = result["ms"][REGIMES[0]]
        speedups = [base[name] / result["ms"][regime][name] for name in names]
        ax.barh([j + i * height for j in range(len(names))], speedups, height, label=regime)
    ax.set_yticks([j + height * (len(REGIMES) - 1) / 2 for j in range(len(names))], names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("speed vs glibc's defaults (median over processes)")
    ax.set_title(f"CPU allocator regimes, fp32 — {result['device']}, {result['threads']} threads", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_png(fig, path, overwrite=True)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small tensors and block: a check")
    parser.add_argument("--repeats", type=int, default=3, help="processes per regime")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per function and process")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    parser.add_argument("--child", choices=REGIMES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.quick, args.min_run_time)))
        return
    import torch

    from sepconv.bench import device_name, versions
    from sepconv.io import atomic_write_text

    start = time.perf_counter()
    runs: dict[str, list[dict]] = {regime: [] for regime in REGIMES}
    for repeat in range(args.repeats):
        for i in range(len(REGIMES)):
            regime = REGIMES[(i + repeat) % len(REGIMES)]  # each regime goes first once in a while
            runs[regime].append(run_child(regime, args.quick, args.min_run_time))
            print(regime, json.dumps(runs[regime][-1]), flush=True)
    result = {
        "benchmark": "cpu_huge_pages",
        "device": device_name("cpu"),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "versions": versions(),
        "repeats": args.repeats,
        "min_run_time_s": args.min_run_time,
        # what each regime's processes reported (huge pages only where the kernel gives them: see README)
        "allocators": {regime: sorted({run["allocator"] for run in runs[regime]}) for regime in REGIMES},
        "ms": {
            regime: {name: statistics.median(run["ms"][name] for run in runs[regime]) for name in runs[regime][0]["ms"]}
            for regime in REGIMES
        },
        "per_process_ms": runs,
        "total_seconds": time.perf_counter() - start,
    }
    atomic_write_text(args.out / "cpu_huge_pages.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, args.out / "cpu_huge_pages.png")
    print(markdown(result))


def markdown(result: dict) -> str:
    header = "| workload (ms, median over processes) | " + " | ".join(REGIMES) + " |"
    lines = [header, "|---" * (len(REGIMES) + 1) + "|"]
    for name in result["ms"][REGIMES[0]]:
        lines.append(f"| {name} | " + " | ".join(f"{result['ms'][r][name]:.2f}" for r in REGIMES) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
