"""CPU benchmark of the depthwise conv backward: PyTorch's gradients vs sepconv.cpu_backward's.

For each shape — 2-d: C=128, 28x28, kernel sizes 3..31, batch 1 and 32; 3-d: C=64, 16x28x28, kernel sizes
3, 5, 7, batch 4 — with 'same' padding, NCHW and channels_last input, fp32, side by side in one run, medians
of per-call timings in ms:

- ``forward``: PyTorch's forward (the reference a gradient is compared with);
- ``torch_grad_input`` / ``torch_grad_weight``: ``aten.convolution_backward`` for one gradient only;
- ``conv_grad_input``: the forward conv of the output gradient with the flipped kernel;
- ``fft_grad_weight``: the weight gradient by FFT;
- ``torch_step`` / ``best_step``: forward + both gradients with PyTorch's backward / with the faster
  algorithm of each gradient (what the CPU strategy picks when it measures the same);
- ``compiled_step``: the same step through ``torch.compile`` (the conv compiled, both gradients from its compiled
  backward), timed as one call; compiled anew per row (its first call, the compile, is ``compile_seconds``).

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
from sepconv.io import atomic_write_png, atomic_write_text

KERNELS = (3, 5, 7, 9, 15, 31)
KERNELS_3D = (3, 5, 7)
# ndim -> (channels, spatial size)
SHAPES = {2: (128, (28, 28)), 3: (64, (16, 28, 28))}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
CONV = {2: F.conv2d, 3: F.conv3d}


def row(ndim: int, batch: int, kernel: int, layout: str, min_run_time: float) -> dict:
    torch.manual_seed(0)
    channels, size = SHAPES[ndim]
    memory_format = CHANNELS_LAST[ndim] if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(batch, channels, *size).contiguous(memory_format=memory_format)
    w = torch.randn(channels, 1, *(kernel,) * ndim)
    pad, ones = (kernel // 2,) * ndim, (1,) * ndim
    grad_output = torch.randn_like(CONV[ndim](x, w, padding=pad, groups=channels))

    def torch_backward(mask: list[bool]):
        return lambda: torch.ops.aten.convolution_backward(
            grad_output, x, w, None, list(ones), list(pad), list(ones), False, [0] * ndim, channels, mask
        )

    calls = {
        "forward": lambda: CONV[ndim](x, w, padding=pad, groups=channels),
        "torch_grad_input": torch_backward([True, False, False]),
        "torch_grad_weight": torch_backward([False, True, False]),
        "conv_grad_input": lambda: cpu_backward.flipped_grad_input(grad_output, w, channels, pad, ones),
        "fft_grad_weight": lambda: cpu_backward.fft_grad_weight(x, grad_output, w.shape[2:], ones, pad, ones),
    }
    result: dict = {"ndim": ndim, "batch": batch, "C": channels, "size": list(size), "K": kernel, "layout": layout}
    with torch.no_grad():
        for name, call in calls.items():
            result[f"{name}_ms"] = median_latency(call, min_run_time=min_run_time, warmup=1, min_runs=3).median_ms
    torch._dynamo.reset()  # compiled anew for this row's shapes
    compiled_conv = torch.compile(lambda x, w: CONV[ndim](x, w, padding=pad, groups=channels))
    x_leaf, w_leaf = x.detach().requires_grad_(True), w.detach().requires_grad_(True)

    def compiled_step():
        return torch.autograd.grad(compiled_conv(x_leaf, w_leaf), (x_leaf, w_leaf), grad_output)

    start = time.perf_counter()
    compiled_grads = compiled_step()
    result["compile_seconds"] = time.perf_counter() - start
    result["compiled_step_ms"] = median_latency(
        compiled_step, min_run_time=min_run_time, warmup=1, min_runs=3
    ).median_ms
    best_input = min(result["torch_grad_input_ms"], result["conv_grad_input_ms"])
    best_weight = min(result["torch_grad_weight_ms"], result["fft_grad_weight_ms"])
    result["torch_step_ms"] = result["forward_ms"] + result["torch_grad_input_ms"] + result["torch_grad_weight_ms"]
    result["best_step_ms"] = result["forward_ms"] + best_input + best_weight
    # the errors of our gradients against PyTorch's, relative to the largest entry (float32)
    reference = torch_backward([True, True, False])()
    ours = (calls["conv_grad_input"](), calls["fft_grad_weight"]())
    for name, got, expected in zip(("grad_input", "grad_weight"), ours, reference[:2], strict=True):
        result[f"max_rel_error_{name}"] = ((got - expected).abs().max() / expected.abs().max()).item()
    for name, got, expected in zip(("grad_input", "grad_weight"), compiled_grads, reference[:2], strict=True):
        result[f"compiled_max_rel_error_{name}"] = ((got - expected).abs().max() / expected.abs().max()).item()
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["ndim"], r["batch"]) for r in result["rows"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (ndim, batch) in zip(axes[0], panels, strict=True):
        for layout, style in (("channels_last", "-"), ("contiguous", "--")):
            rows = [r for r in result["rows"] if (r["ndim"], r["batch"], r["layout"]) == (ndim, batch, layout)]
            ks = [r["K"] for r in rows]
            ax.plot(ks, [r["torch_step_ms"] for r in rows], "o" + style, color="tab:red", label=f"PyTorch, {layout}")
            ax.plot(ks, [r["best_step_ms"] for r in rows], "s" + style, color="tab:blue", label=f"best, {layout}")
            compiled = [r["compiled_step_ms"] for r in rows]
            ax.plot(ks, compiled, "^" + style, color="tab:green", label=f"torch.compile, {layout}")
        shape = "x".join(map(str, rows[0]["size"]))
        ax.set(
            xscale="log",
            yscale="log",
            xlabel=f"kernel size K ({ndim}-d)",
            title=f"C={rows[0]['C']}, {shape}, batch {batch}",
        )
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xticks([], minor=True)
    axes[0][0].set_ylabel("forward + both gradients, ms (median)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Depthwise conv training step, 'same' padding, fp32 — {result['device']}", fontsize=9)
    atomic_write_png(fig, path, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-d kernels 3 and 15 and 3-d 3, batch 1 only")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds of timing per measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args()
    # (ndim, batch, kernels)
    plan = [(2, 1, (3, 15)), (3, 1, (3,))] if args.quick else [(2, 1, KERNELS), (2, 32, KERNELS), (3, 4, KERNELS_3D)]
    result: dict = {
        "benchmark": "cpu_depthwise_backward",
        "device": device_name("cpu"),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "versions": versions(),
        "rows": [],
    }
    start = time.perf_counter()
    for ndim, batch, kernels in plan:
        for layout in ("channels_last", "contiguous"):
            for kernel in kernels:
                r = row(ndim, batch, kernel, layout, args.min_run_time)
                print(json.dumps(r), flush=True)
                result["rows"].append(r)
    result["total_seconds"] = time.perf_counter() - start
    atomic_write_text(args.out / "cpu_depthwise_backward.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, args.out / "cpu_depthwise_backward.png")


if __name__ == "__main__":
    main()
