"""CPU benchmark: in which layout the per-layer strategy hands gradients back, measured inside networks.

The CPU strategy runs a layer in channels_last for an NCHW caller by converting its input and output. A
plain ``.contiguous(memory_format=...)`` hands the gradient back in channels_last, which costs nothing in
an isolated layer but makes the caller's elementwise backwards (ReLU, adds) mix layouts; sepconv converts
it back (``cpu_layout.in_channels_last``). This script times a training step (batch 64, SGD) of the
separable Fashion-MNIST nets in one process, interleaving for 30 rounds:

- ``nchw``: the strategy off (plain PyTorch, NCHW throughout);
- ``channels_last_gradients_converted``: per-layer channels_last, gradients converted back (sepconv);
- ``channels_last_gradients_as_is``: per-layer channels_last with plain conversions.

    python benchmarks/cpu_gradient_layout.py     # writes benchmarks/results/cpu_gradient_layout.{json,png}
    python benchmarks/cpu_gradient_layout.py --keep-freed-memory   # ..._keep_freed_memory.{json,png}
    python benchmarks/cpu_gradient_layout.py --rounds 3 --out /tmp
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import sepconv
from sepconv import cpu_layout
from sepconv.bench import allocator_name, device_name, versions
from sepconv.io import atomic_write_png, atomic_write_text
from sepconv.nets import small_resnet, small_vgg


def _as_is(forward, input):
    """The strategy's conversions as plain ``contiguous`` calls: gradients go back in channels_last."""
    return forward(input.contiguous(memory_format=torch.channels_last)).contiguous()


VARIANTS = {  # name: (CPU strategy mode, conversion)
    "nchw": ("off", cpu_layout.in_channels_last),
    "channels_last_gradients_converted": ("channels_last", cpu_layout.in_channels_last),
    "channels_last_gradients_as_is": ("channels_last", _as_is),
}


def model_row(name: str, build, rounds: int) -> dict:
    torch.manual_seed(0)
    model = build("separable")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    def run(variant: str) -> float:
        mode, conversion = VARIANTS[variant]
        original, cpu_layout.in_channels_last = cpu_layout.in_channels_last, conversion
        try:
            with sepconv.use_cpu_strategy(mode):
                start = time.perf_counter()
                step()
                return time.perf_counter() - start
        finally:
            cpu_layout.in_channels_last = original

    for variant in VARIANTS:  # warm-up
        for _ in range(3):
            run(variant)
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for variant in list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]:
            samples[variant].append(run(variant))
    row = {"model": name, "batch": 64, "rounds": rounds}
    row |= {f"{v}_train_step_ms": statistics.median(s) * 1e3 for v, s in samples.items()}
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.25
    for i, variant in enumerate(VARIANTS):
        values = [r[f"{variant}_train_step_ms"] for r in result["rows"]]
        ax.bar([j + i * width for j in range(len(values))], values, width, label=variant)
    ax.set_xticks([j + width for j in range(len(result["rows"]))], [r["model"] for r in result["rows"]])
    ax.set_ylabel("training step, ms (median)")
    ax.legend(fontsize=8)
    ax.set_title(f"separable nets, batch 64, fp32, {result['allocator']} — {result['device']}", fontsize=9)
    atomic_write_png(fig, path, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timed rounds per variant")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    parser.add_argument("--keep-freed-memory", action="store_true", help="sepconv.keep_freed_memory() first")
    args = parser.parse_args()
    stem = "cpu_gradient_layout"
    if args.keep_freed_memory:
        if not sepconv.keep_freed_memory():
            parser.error("--keep-freed-memory needs Linux with glibc")
        stem = "cpu_gradient_layout_keep_freed_memory"
    result: dict = {
        "benchmark": "cpu_gradient_layout",
        "device": device_name("cpu"),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "versions": versions(),
        "allocator": allocator_name(),
        "rows": [],
    }
    for name, build in (("small_resnet", small_resnet), ("small_vgg", small_vgg)):
        row = model_row(name, build, args.rounds)
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
