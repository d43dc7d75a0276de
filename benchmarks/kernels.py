"""GPU kernel benchmark: our Triton depthwise conv vs PyTorch eager vs torch.compile vs the floors.

For every configuration (shape, batch, dtype, layout), side by side in one run, medians:

- ``ours`` = ``sepconv.kernels.depthwise_conv2d``; ``eager`` = ``F.conv2d(groups=C)`` (cuDNN), no bias;
  ``compile`` = ``torch.compile`` of the same call — forward, and forward+backward (grads of x and w);
- ``memory floor`` = bytes that must move / copy bandwidth measured in this run: forward reads x and
  writes y; forward+backward also reads x and grad-y and writes grad-x;
- ``FLOP floor`` = MACs / the fp32 CUDA-core FMA rate measured in this run (depthwise has no tensor-core
  form here; bf16/fp16 accumulate in fp32 too); ``floor`` = max of the two.

CUDA timings use ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, median). On a
machine without a GPU, ``--quick`` runs two tiny configurations through Triton's interpreter to check
the script (timings of the interpreter mean nothing and are labelled so).

    python benchmarks/kernels.py                      # full run, writes benchmarks/results/kernels.{json,png}
    python benchmarks/kernels.py --quick --out /tmp   # check the script
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # before sepconv.kernels is imported: the interpreter decides at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F
import triton
import triton.language as tl

from sepconv.bench import device_name, median_latency, versions
from sepconv.io import atomic_write, atomic_write_text
from sepconv.kernels.depthwise import depthwise_conv2d

# (name, C, H, K, stride, batch-64 batch): the depthwise issue's list.
SHAPES = [
    ("mbv2 144x56 k3", 144, 56, 3, 1, 64),
    ("mbv2 576x14 k3", 576, 14, 3, 1, 64),
    ("mbv2 96x112 k3 s2", 96, 112, 3, 2, 64),
    ("convnext 384x28 k7", 384, 28, 7, 1, 64),
    ("replknet 256x28 k31", 256, 28, 31, 1, 32),
]
QUICK_SHAPES = [("tiny 8x6 k3", 8, 6, 3, 1, 2), ("tiny 4x5 k5 s2", 4, 5, 5, 2, 2)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


@triton.jit
def _fma_kernel(out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = offs.to(tl.float32) * 1e-6
    b, c, d = a + 1.0, a + 2.0, a + 3.0
    for _ in range(ITERS):  # four independent FMA chains per lane
        a = a * 0.999 + 1e-3
        b = b * 0.999 + 1e-3
        c = c * 0.999 + 1e-3
        d = d * 0.999 + 1e-3
    tl.store(out_ptr + offs, a + b + c + d)


def measure(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds of ``fn()``."""
    if device == "cuda":
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return median_latency(fn, min_run_time=0.01, warmup=1, min_runs=3).median_ms


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    numel = (1 << 28) if device == "cuda" else (1 << 20)
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (measure(lambda: dst.copy_(src), device) * 1e-3)


def fma_rate(device: str) -> float | None:
    """fp32 FMAs per second on CUDA cores (None without a GPU: the interpreter's rate means nothing)."""
    if device != "cuda":
        return None
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    programs, block, iters = 64 * sms, 256, 4096
    out = torch.empty(programs * block, device=device)
    ms = measure(lambda: _fma_kernel[(programs,)](out, ITERS=iters, BLOCK=block), device)
    return programs * block * iters * 4 / (ms * 1e-3)


def time_config(name, channels, size, kernel, stride, batch, dtype_name, layout_name, *, device, compile_):
    dtype, fmt = DTYPES[dtype_name], LAYOUTS[layout_name]
    pad = kernel // 2
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
    w = (torch.randn(channels, 1, kernel, kernel, device=device) / kernel).to(dtype)
    if layout_name == "nhwc":
        w = w.contiguous(memory_format=torch.channels_last)

    def ours(x, w):
        return depthwise_conv2d(x, w, None, stride, pad)

    def eager(x, w):
        return F.conv2d(x, w, None, stride, pad, 1, channels)

    impls: dict[str, Callable] = {"ours": ours, "eager": eager}
    if compile_:
        impls["compile"] = torch.compile(eager, dynamic=False)
    y = eager(x, w)
    error = (ours(x, w).float() - y.float()).abs().max().item()
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    grad = torch.randn_like(y)
    row: dict[str, Any] = {
        "shape": name,
        "C": channels,
        "H": size,
        "K": kernel,
        "stride": stride,
        "batch": batch,
        "dtype": dtype_name,
        "layout": layout_name,
        "max_abs_error_vs_eager": error,
        "macs": y.numel() * kernel * kernel,
        "bytes_forward": (x.numel() + y.numel()) * x.element_size(),
        "bytes_forward_backward": (3 * x.numel() + 2 * y.numel()) * x.element_size(),
    }
    with torch.no_grad():
        for impl, fn in impls.items():
            row[f"{impl}_forward_ms"] = measure(lambda fn=fn: fn(x, w), device)
    for impl, fn in impls.items():
        row[f"{impl}_forward_backward_ms"] = measure(
            lambda fn=fn: torch.autograd.grad(fn(xg, wg), (xg, wg), grad), device
        )
    return row


def add_floors(row: dict[str, Any], bandwidth: float, fmas: float | None) -> None:
    for pass_, macs in (("forward", row["macs"]), ("forward_backward", 3 * row["macs"])):
        memory = row[f"bytes_{pass_}"] / bandwidth * 1e3
        flops = None if fmas is None else macs / fmas * 1e3
        row[f"memory_floor_{pass_}_ms"] = memory
        row[f"flop_floor_{pass_}_ms"] = flops
        row[f"floor_{pass_}_ms"] = max(memory, flops or 0.0)
        row[f"ours_vs_floor_{pass_}"] = row[f"ours_{pass_}_ms"] / row[f"floor_{pass_}_ms"]
        best = min(row[f"{impl}_{pass_}_ms"] for impl in ("eager", "compile") if f"{impl}_{pass_}_ms" in row)
        row[f"speedup_vs_best_torch_{pass_}"] = best / row[f"ours_{pass_}_ms"]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['shape']} b{r['batch']} {r['dtype']} {r['layout']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.28 * len(rows) + 2), sharey=True)
    for ax, pass_ in zip(axes, ("forward", "forward_backward"), strict=True):
        speedups = [r[f"speedup_vs_best_torch_{pass_}"] for r in rows]
        ax.barh(labels, speedups, color=["C2" if s >= 1 else "C3" for s in speedups])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"{pass_.replace('_', '+')}: speedup of ours over the faster of eager / compile")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"depthwise conv, {result['device']}; {result['versions']}", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), overwrite=True)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two tiny configurations: checks the script")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves compile time)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        parser.error("the full benchmark needs a CUDA GPU; use --quick to check the script on CPU")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    start = time.perf_counter()
    bandwidth, fmas = copy_bandwidth(device), fma_rate(device)
    rows = []
    for (name, c, h, k, s, big_batch), batch, dtype, layout in itertools.product(shapes, (None, 1), DTYPES, LAYOUTS):
        if device == "cpu" and dtype == "bf16":
            continue
        row = time_config(
            name,
            c,
            h,
            k,
            s,
            batch or big_batch,
            dtype,
            layout,
            device=device,
            compile_=not args.no_compile and device == "cuda",
        )
        add_floors(row, bandwidth, fmas)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "benchmark": "kernels",
        "device": device_name(device) + ("" if device == "cuda" else " (Triton interpreter: timings meaningless)"),
        "versions": versions(),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "fp32_fma_per_s": fmas,
        "timer": "triton.testing.do_bench median" if device == "cuda" else "sepconv.bench.median_latency",
        "rows": rows,
        "total_seconds": time.perf_counter() - start,
    }
    stem = "kernels_quick" if args.quick else "kernels"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
