"""CPU benchmark of the depthwise conv backward: PyTorch's gradients vs sepconv.cpu_backward's.

For each shape (C=128, 28x28, 'same' padding, kernel sizes 3..31, batch 1 and 32, NCHW and channels_last
input, fp32), side by side in one run, medians of per-call timings in ms:

- ``forward``: PyTorch's forward (the reference a gradient is compared with);
- ``torch_grad_input`` / ``torch_grad_weight``: ``aten.convolution_backward`` for one gradient only;
- ``conv_grad_input``: the forward conv of the output gradient with the flipped kernel;
- ``fft_grad_weight``: the weight gradient by FFT;
- ``torch_step`` / ``best_step``: forward + both gradients with PyTorch's backward / with the faster
  algorithm of each gradient (what the CPU strategy picks when it measures the same).

    python benchmarks/cpu_depthwise_backward.py            # writes benchmarks/results/cpu_depthwise_backward.{json,png}
    python benchmarks/cpu_depthwise_backward.py --quick --out /tmp
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sepconv import cpu_backward
from sepconv.bench import device_name, median_latency, versions
from sepconv.io import atomic_write, atomic_write_text

KERNELS = (3, 5, 7, 9, 15, 31)
CHANNELS, SIZE = 128, 28


def row(batch: int, kernel: int, layout: str, min_run_time: float) -> dict:
    torch.manual_seed(0)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(batch, CHANNELS, SIZE, SIZE).contiguous(memory_format=memory_format)
    w = torch.randn(CHANNELS, 1, kernel, kernel)
    pad = (kernel // 2,) * 2
    grad_output = torch.randn_like(F.conv2d(x, w, padding=pad, groups=CHANNELS))

    def torch_backward(mask: list[bool]):
        return lambda: torch.ops.aten.convolution_backward(
            grad_output, x, w, None, [1, 1], list(pad), [1, 1], False, [0, 0], CHANNELS, mask
        )

    calls = {
        "forward": lambda: F.conv2d(x, w, padding=pad, groups=CHANNELS),
        "torch_grad_input": torch_backward([True, False, False]),
        "torch_grad_weight": torch_backward([False, True, False]),
        "conv_grad_input": lambda: cpu_backward.flipped_grad_input(grad_output, w, CHANNELS, pad, (1, 1)),
        "fft_grad_weight": lambda: cpu_backward.fft_grad_weight(x, grad_output, (kernel, kernel), (1, 1), pad, (1, 1)),
    }
    result: dict = {"batch": batch, "C": CHANNELS, "H": SIZE, "K": kernel, "layout": layout}
    with torch.no_grad():
        for name, call in calls.items():
            result[f"{name}_ms"] = median_latency(call, min_run_time=min_run_time, warmup=1, min_runs=3).median_ms
    best_input = min(result["torch_grad_input_ms"], result["conv_grad_input_ms"])
    best_weight = min(result["torch_grad_weight_ms"], result["fft_grad_weight_ms"])
    result["torch_step_ms"] = result["forward_ms"] + result["torch_grad_input_ms"] + result["torch_grad_weight_ms"]
    result["best_step_ms"] = result["forward_ms"] + best_input + best_weight
    # the errors of our gradients against PyTorch's, relative to the largest entry (float32)
    reference = torch.ops.aten.convolution_backward(
        grad_output, x, w, None, [1, 1], list(pad), [1, 1], False, [0, 0], CHANNELS, [True, True, False]
    )
    ours = (calls["conv_grad_input"](), calls["fft_grad_weight"]())
    for name, got, expected in zip(("grad_input", "grad_weight"), ours, reference[:2], strict=True):
        result[f"max_rel_error_{name}"] = ((got - expected).abs().max() / expected.abs().max()).item()
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, batch in zip(axes, sorted({r["batch"] for r in result["rows"]}), strict=False):
        for layout, style in (("channels_last", "-"), ("contiguous", "--")):
            rows = [r for r in result["rows"] if r["batch"] == batch and r["layout"] == layout]
            ks = [r["K"] for r in rows]
            ax.plot(ks, [r["torch_step_ms"] for r in rows], "o" + style, color="tab:red", label=f"PyTorch, {layout}")
            ax.plot(ks, [r["best_step_ms"] for r in rows], "s" + style, color="tab:blue", label=f"best, {layout}")
        ax.set(xscale="log", yscale="log", xlabel="kernel size K (KxK)", title=f"batch {batch}")
        ax.set_xticks(KERNELS, [str(k) for k in KERNELS])
        ax.set_xticks([], minor=True)
    axes[0].set_ylabel("forward + both gradients, ms (median)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Depthwise conv training step, C={CHANNELS}, {SIZE}x{SIZE}, fp32 — {result['device']}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), overwrite=True)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="kernels 3 and 15, batch 1 only")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds of timing per measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args()
    kernels, batches = ((3, 15), (1,)) if args.quick else (KERNELS, (1, 32))
    result: dict = {
        "benchmark": "cpu_depthwise_backward",
        "device": device_name("cpu"),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "versions": versions(),
        "rows": [],
    }
    start = time.perf_counter()
    for batch in batches:
        for layout in ("channels_last", "contiguous"):
            for kernel in kernels:
                r = row(batch, kernel, layout, args.min_run_time)
                print(json.dumps(r), flush=True)
                result["rows"].append(r)
    result["total_seconds"] = time.perf_counter() - start
    atomic_write_text(args.out / "cpu_depthwise_backward.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, args.out / "cpu_depthwise_backward.png")


if __name__ == "__main__":
    main()
