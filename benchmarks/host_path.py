"""Host (Python) time of a ``sepconv.kernels.depthwise_conv2d`` call, with the Triton launches stubbed out.

Runs on a CPU (no GPU needed): the kernels are replaced by stubs that allocate the outputs, so what is left
is what every call costs the host before any kernel runs — validation, autograd bookkeeping, allocation.
Two forms of the plain-eager autograd Function, side by side in paired rounds (medians, microseconds):

- ``ctx_in_forward``: ``sepconv.kernels.depthwise._DepthwiseConv2d`` as shipped (``forward(ctx, ...)``);
- ``setup_context``: the same forward, context and backward as a Function with a separate ``setup_context``
  (its earlier form), whose ``apply`` binds the arguments to the forward's signature on every call;

for three passes: a forward without gradients (the Function is not used), a forward with gradients, and a
forward+backward (input and weight gradients). Batch 1, 144 channels, 8x8, 3x3, channels_last, fp32.

    python benchmarks/host_path.py                  # writes benchmarks/results/host_path.{json,png}
    python benchmarks/host_path.py --quick --out /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors; the stubs below mean no kernel runs at all

import torch

from sepconv.bench import device_name, interleaved_latencies, paired_ratio, versions
from sepconv.io import atomic_write_png, atomic_write_text
from sepconv.kernels import depthwise as dw

SHAPE = (1, 144, 8, 8)  # batch, channels, height, width
KERNEL = 3


class _SetupContextStyle(torch.autograd.Function):
    """``_DepthwiseConv2d``'s earlier form: a separate ``setup_context``."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation):
        return dw._forward(x, weight, bias, stride, padding, dilation)

    setup_context = staticmethod(dw._setup_context)
    backward = staticmethod(dw._backward)
    compute = staticmethod(dw._DepthwiseConv2d.compute)


def _stub_forward(x, weight, bias, stride, padding, dilation, tiles=None):
    return dw._empty_output(x, weight, stride, padding, dilation)


def _stub_grad_input(grad, x, weight, *geometry, tiles=None):
    return torch.empty_like(x)


def _stub_grad_weight(grad, x, weight, *geometry, tiles=None, bias=True):
    return torch.empty_like(weight), weight.new_empty(weight.shape[0]) if bias else None


def _call(function: type[torch.autograd.Function], x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``depthwise_conv2d(x, weight, None, 1, 1)``'s path, through ``function``."""
    x, (weight, bias), geometry, _ = dw.prepare_call(x, (weight, None), 1, 1, 1)
    return dw.run_op(torch.ops.sepconv.depthwise_conv2d, function, (x, weight, bias, *geometry), (x, weight, bias))


def measure(min_run_time: float) -> list[dict]:
    x = torch.randn(*SHAPE).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(SHAPE[1], 1, KERNEL, KERNEL)
    x_grad, weight_grad = x.detach().requires_grad_(), weight.detach().requires_grad_()
    styles = {"ctx_in_forward": dw._DepthwiseConv2d, "setup_context": _SetupContextStyle}
    passes = {
        "forward, no gradients": lambda f: _call(f, x, weight),
        "forward, with gradients": lambda f: _call(f, x_grad, weight_grad),
        "forward+backward": lambda f: torch.autograd.grad(_call(f, x_grad, weight_grad).sum(), (x_grad, weight_grad)),
    }
    rows = []
    for name, run in passes.items():
        fns = {style: (lambda run=run, f=f: run(f)) for style, f in styles.items()}
        timings = interleaved_latencies(fns, min_run_time=min_run_time, warmup=200, min_runs=20, paired=True)
        row = {"pass": name} | {f"{style}_us": t.median_ms * 1e3 for style, t in timings.items()}
        row["setup_context_over_ctx_in_forward"] = paired_ratio(timings["setup_context"], timings["ctx_in_forward"])
        row["rounds"] = timings["ctx_in_forward"].runs
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    positions = range(len(rows))
    for offset, style in ((-0.2, "setup_context"), (0.2, "ctx_in_forward")):
        ax.bar([p + offset for p in positions], [r[f"{style}_us"] for r in rows], width=0.4, label=style)
    ax.set_xticks(list(positions), [r["pass"] for r in rows])
    ax.set_ylabel("host time per call (us), launches stubbed")
    ax.legend()
    ax.set_title(f"{result['device']}; torch {result['versions']['torch']}", fontsize=8)
    atomic_write_png(fig, path, dpi=100, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run: checks the script")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args()
    start = time.perf_counter()
    stubs = {"_forward": _stub_forward, "_grad_input": _stub_grad_input, "_grad_weight": _stub_grad_weight}
    with mock.patch.multiple(dw, **stubs):
        rows = measure(min_run_time=0.05 if args.quick else 2.0)
    result = {
        "benchmark": "host_path",
        "device": device_name("cpu"),
        "versions": versions(),
        "dtype": "float32",
        "shape": {"x": SHAPE, "kernel": KERNEL, "layout": "channels_last"},
        "timer": "sepconv.bench.interleaved_latencies (paired rounds), medians; launches stubbed",
        "rows": rows,
        "total_seconds": time.perf_counter() - start,
    }
    stem = "host_path_quick" if args.quick else "host_path"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
