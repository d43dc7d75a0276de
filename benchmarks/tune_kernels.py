"""Launch-configuration sweep for our Triton kernels on a GPU: which tile, warps and tap unrolling is fastest.

For each of ``benchmarks/kernels.py``'s shapes (bf16, the batch-64 batch), times the depthwise forward,
grad-input and grad-weight kernels and the fused separable forward under several launch configurations
(``sepconv.kernels.depthwise.Tiles`` / ``separable.SeparableTiles``; the first of each list is the untuned
default), each checked against PyTorch (max abs error in the row). Rows are written as they come
(JSON rewritten after each), most important first, until ``--seconds`` runs out: the defaults in
``sepconv.kernels`` are chosen from this file's results.

    python benchmarks/tune_kernels.py --seconds 100 --out benchmarks/results
    python benchmarks/tune_kernels.py --quick --out /tmp      # CPU: checks the script (interpreter)
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kernels import SEPARABLE_SHAPES, SHAPES, measure  # benchmarks/kernels.py (sets the interpreter on CPU)
from sepconv.bench import device_name, versions
from sepconv.io import atomic_write_text
from sepconv.kernels import depthwise as dw
from sepconv.kernels import separable as sep
from sepconv.kernels.depthwise import Tiles
from sepconv.kernels.separable import SeparableTiles

# (block_p, block_c, num_warps, static_taps[, tile_w]); the first entry of each list is the untuned default.
# static_taps: "all" (every tap unrolled), "rows" (each kernel row's taps) or False (loops)
FORWARD = {
    "nhwc": [(16, 64, 4, False), (64, 32, 4, "all"), (64, 32, 8, "all"), (32, 32, 4, "all"), (128, 32, 8, "all"),
             (16, 128, 4, "rows", 4), (16, 128, 8, "rows", 4), (16, 128, 4, False, 4), (64, 32, 4, "rows"),
             # experimental tensor-core forward (Tiles.toeplitz): block_p output rows x 16 columns x block_c channels
             (32, 8, 4, False, 0, False, True), (64, 8, 8, False, 0, False, True), (16, 16, 4, False, 0, False, True)],
    "nchw": [(128, 8, 4, False), (128, 8, 4, "rows"), (128, 8, 4, "all"), (256, 4, 4, "all"), (64, 16, 4, "all"),
             (128, 8, 4, "all", 32), (32, 8, 4, False, 0, False, True), (64, 8, 8, False, 0, False, True)],
}  # fmt: skip
BACKWARD = {  # grad-input unrolls rows at most
    "nhwc": [(16, 64, 4), (64, 32, 4), (64, 32, 4, False, 8), (64, 32, 4, "rows", 8), (16, 128, 4, False, 4),
             (16, 128, 4, "rows", 4), (32, 64, 4, "rows")],
    "nchw": [(128, 8, 4), (128, 8, 4, "rows"), (256, 4, 4), (256, 4, 4, "rows"), (128, 8, 4, False, 32),
             (128, 8, 4, "rows", 32)],
}  # fmt: skip
# grad-weight: (block_p, block_c, num_warps, static_taps, tile_w, loop_taps). Tap-looping programs (loop_taps)
# measured 1.5-1.9x slower (run 3) and are no longer swept.
# Experimental tensor-core grad-weight (toeplitz, stride 1): block_p output rows x block_c channels x <= 32x32 taps.
GRAD_WEIGHT = {
    "nhwc": [(16, 64, 4), (64, 32, 4), (16, 128, 4), (32, 128, 8), (64, 64, 8), (128, 32, 8), (32, 64, 4),
             (32, 4, 8, False, 0, False, True), (32, 16, 8, False, 0, False, True), (8, 4, 8, False, 0, False, True)],
    "nchw": [(128, 8, 4), (64, 16, 4), (256, 8, 8), (256, 4, 4), (512, 4, 8),
             (32, 4, 8, False, 0, False, True), (8, 4, 8, False, 0, False, True)],
}  # fmt: skip
# (block_p, block_c, block_o or None = the default's, num_warps, num_stages, static_taps)
SEPARABLE = [(64, 32, None, 4, 3, False), (64, 32, None, 4, 3, True), (128, 32, None, 8, 3, True),
             (64, 64, None, 4, 3, True), (32, 32, None, 4, 2, True), (128, 64, None, 8, 2, True),
             (64, 32, 64, 4, 3, True), (64, 32, 256, 8, 3, True)]  # fmt: skip
MAX_STATIC_TAPS = 225  # unrolling all 31x31 = 961 taps makes compiles very slow: not swept
LAYOUTS = {"nhwc": torch.channels_last, "nchw": torch.contiguous_format}


def _inputs(c, h, k, batch, layout, dtype, device):
    x = torch.randn(batch, c, h, h, device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
    w = (torch.randn(c, 1, k, k, device=device) / k).to(dtype)
    return x, w


def _checked(fn, truth, relative: bool = False) -> float:
    got = fn()
    got = got[0] if isinstance(got, tuple) else got
    error = (got.float() - truth.float()).abs().max().item()
    return error / truth.abs().max().item() if relative else error


def _attempt(row: dict[str, Any], fn, truth, device: str, relative: bool = False) -> dict[str, Any]:
    """``row`` with the max error against ``truth`` and the median ms; a launch the chip cannot hold (too much
    shared memory), or one that raises otherwise (a configuration first run on this device), is recorded as an error
    row, not fatal."""
    try:
        return row | {"max_abs_error": _checked(fn, truth, relative), "ms": measure(fn, device)}
    except Exception as error:
        return row | {"error": f"{type(error).__name__}: {error}"[:500]}


def depthwise_rows(kernel: str, layout: str, shapes, dtype, device, deadline: float):
    for name, c, h, k, s, batch in shapes:
        x, w = _inputs(c, h, k, batch, layout, dtype, device)
        pad, geometry = k // 2, ((s, s), (k // 2,) * 4, (1, 1))
        gy = torch.randn_like(F.conv2d(x, w, None, s, pad, 1, c))
        if kernel == "forward":
            truth, launch = F.conv2d(x, w, None, s, pad, 1, c), functools.partial(dw._forward, x, w, None)
        elif kernel == "grad_input":
            truth = torch.nn.grad.conv2d_input(x.shape, w, gy, s, pad, 1, c)
            launch = functools.partial(dw._grad_input, gy, x, w)
        else:
            truth = torch.nn.grad.conv2d_weight(x.float(), w.shape, gy.float(), s, pad, 1, c)
            launch = functools.partial(dw._grad_weight, gy, x, w)
        tried: set[Tiles] = set()
        for cfg in {"forward": FORWARD, "grad_input": BACKWARD, "grad_weight": GRAD_WEIGHT}[kernel][layout]:
            if time.perf_counter() > deadline:
                return
            tiles = Tiles(*cfg)
            if tiles.static_taps == "all" and k * k > MAX_STATIC_TAPS:  # compiles very slowly: not swept
                continue
            if tiles.toeplitz and s != 1:  # the Toeplitz kernels are stride 1: these tiles would run the direct one
                continue
            if tiles in tried:
                continue
            tried.add(tiles)
            row = {"kernel": f"depthwise_{kernel}", "shape": name, "batch": batch, "layout": layout,
                   "config": tiles._asdict()}  # fmt: skip
            fn = functools.partial(launch, *geometry, tiles=tiles)
            yield _attempt(row, fn, truth, device, relative=kernel == "grad_weight")


def separable_rows(layout: str, shapes, dtype, device, deadline: float):
    for name, c, h, o, k, s, batch in shapes:
        x, w = _inputs(c, h, k, batch, layout, dtype, device)
        pw = (torch.randn(o, c, 1, 1, device=device) / c**0.5).to(dtype)
        geometry = ((s, s), (k // 2,) * 4, (1, 1))
        truth = F.conv2d(F.conv2d(x, w, None, s, k // 2, 1, c), pw)
        default = sep._tiles(truth.shape[2] * truth.shape[3], c, o)
        for p, cb, ob, warps, stages, static in SEPARABLE:
            if time.perf_counter() > deadline:
                return
            if static and k * k > MAX_STATIC_TAPS:
                continue
            tiles = SeparableTiles(p, min(cb, default.block_c), ob or default.block_o, warps, stages, static)
            fn = functools.partial(sep._forward, x, w, None, pw, None, *geometry, 0, tiles=tiles)
            row = {"kernel": "separable_forward", "shape": name, "batch": batch, "layout": layout,
                   "config": tiles._asdict()}  # fmt: skip
            yield _attempt(row, fn, truth, device)


PLAN = ("forward:nhwc", "grad_input:nhwc", "grad_weight:nhwc", "separable:nhwc", "forward:nchw",
        "grad_input:nchw", "grad_weight:nchw")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU: checks the script")
    parser.add_argument("--seconds", type=float, default=120.0, help="stop starting new rows after this")
    parser.add_argument("--plan", nargs="+", choices=PLAN, default=list(PLAN), help="sweeps to run, in order")
    parser.add_argument("--min-kernel", type=int, default=1, help="sweep only the shapes with kernels this size and up")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        parser.error("the sweep needs a CUDA GPU; use --quick to check the script on CPU")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = [(n, 4, 6, k, s, 2) for n, _, _, k, s, _ in SHAPES[:2]] if args.quick else SHAPES
    shapes = [shape for shape in shapes if shape[3] >= args.min_kernel]
    sep_shapes = [(n, 16, 6, 16, 3, 1, 2) for n, *_ in SEPARABLE_SHAPES[:1]] if args.quick else SEPARABLE_SHAPES
    start = time.perf_counter()
    deadline = start + args.seconds
    result: dict[str, Any] = {
        "benchmark": "tune_kernels",
        "device": device_name(device) + ("" if device == "cuda" else " (Triton interpreter: timings meaningless)"),
        "versions": versions(),
        "dtype": str(dtype).removeprefix("torch."),
        "timer": "triton.testing.do_bench median" if device == "cuda" else "sepconv.bench.median_latency",
        "rows": [],
    }
    plan = []
    for step in args.plan:
        kernel, layout = step.split(":")
        if kernel == "separable":
            chosen = sep_shapes if args.quick else sep_shapes[1:4] + sep_shapes[5:6]
            plan.append(separable_rows(layout, chosen, dtype, device, deadline))
        else:
            plan.append(depthwise_rows(kernel, layout, shapes, dtype, device, deadline))
    for rows in plan:
        for row in rows:
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            result["total_seconds"] = time.perf_counter() - start
            atomic_write_text(args.out / f"tune_kernels{'_quick' if args.quick else ''}.json",
                              json.dumps(result, indent=1) + "\n", overwrite=True)  # fmt: skip


if __name__ == "__main__":
    main()
