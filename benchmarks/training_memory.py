"""Peak tensor memory of a separable block's training step (forward + backward): our fused op vs PyTorch's two convs.

Counts the bytes of every tensor the step allocates, alive at once, after each operator (``sepconv.memory``): the
same tensors on any device, so this runs on a CPU, with our Triton kernels stubbed out (their launches do
nothing; the custom ops still allocate their outputs, which is all the count sees). Scratch buffers inside one
operator (cuDNN workspaces, our grad-weight partial sums) are not counted: on a GPU `kernels.py` measures the
caching allocator's peak instead. Shapes: DESIGN.md §2's separable blocks at their benchmark batch
(``kernels.SEPARABLE_SHAPES``: 64, RepLKNet's 32), fp32, channels_last, with between the convs nothing, a
ReLU6, or a training-mode BatchNorm and a ReLU6 (ours ``separable_conv2d_batch_norm``, eager ``F.batch_norm``
then an in-place ReLU6 as torchvision's), and that with a training-mode BatchNorm after the 1x1 conv too
(MobileNetV2's block in training; ours ``out_norm``), and EfficientNet's block in training: BatchNorm, SiLU and a
squeeze-excitation between the convs, BatchNorm after (ours ``excitation=ExcitationArgs(...)``; eager as
torchvision's ``SqueezeExcitation`` computes it, squeezed to a 24th of the depthwise conv's channels).

    python benchmarks/training_memory.py              # writes benchmarks/results/training_memory.{json,png}
    python benchmarks/training_memory.py --quick --out /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors; the stubs below mean no kernel runs at all

import torch
import torch.nn.functional as F

from kernels import SEPARABLE_SHAPES
from sepconv.bench import device_name, versions
from sepconv.io import atomic_write_png, atomic_write_text
from sepconv.kernels import separable as separable_module
from sepconv.kernels.batch_norm import separable_conv2d_batch_norm
from sepconv.kernels.differentiable_excitation import ExcitationArgs
from sepconv.kernels.output_norm import BatchNormArgs
from sepconv.kernels.separable import separable_conv2d
from sepconv.memory import LiveBytes
from stubbed_launches import stubbed_launches

QUICK_SHAPES = [("tiny 8x6->4", 8, 6, 4, 3, 1, 2)]
# (activation, training-mode BatchNorm before it, training-mode BatchNorm after the 1x1 conv, squeeze-excitation)
MIDS = (
    (None, False, False, False),
    ("relu6", False, False, False),
    ("relu6", True, False, False),
    ("relu6", True, True, False),
    ("silu", True, True, True),
)


def row(name: str, c: int, h: int, o: int, k: int, stride: int, batch: int, *mids) -> dict:
    activation, norm, out_norm, excitation = mids  # one of MIDS
    x = torch.randn(batch, c, h, h).contiguous(memory_format=torch.channels_last).requires_grad_()
    dw = torch.randn(c, 1, k, k, requires_grad=True)
    pw = torch.randn(o, c, 1, 1, requires_grad=True)
    out = (h + 2 * (k // 2) - k) // stride + 1
    grad = torch.randn(batch, o, out, out).contiguous(memory_format=torch.channels_last)
    act = (lambda t: t) if activation is None else getattr(F, activation)
    gamma, beta = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    stats = {impl: (torch.zeros(c), torch.ones(c)) for impl in ("ours", "eager")}
    out_stats = {impl: (torch.zeros(o), torch.ones(o)) for impl in ("ours", "eager")}
    out_gamma, out_beta = torch.ones(o, requires_grad=True), torch.zeros(o, requires_grad=True)
    squeezed = max(1, c // 24)
    reduce, expand = (
        torch.randn(squeezed, c, 1, 1, requires_grad=True),
        torch.randn(c, squeezed, 1, 1, requires_grad=True),
    )
    se_biases = torch.zeros(squeezed, requires_grad=True), torch.zeros(c, requires_grad=True)
    leaves = (x, dw, pw, gamma, beta) if norm else (x, dw, pw)
    leaves += (out_gamma, out_beta) if out_norm else ()
    leaves += (reduce, expand, *se_biases) if excitation else ()
    gate = ExcitationArgs(reduce, se_biases[0], expand, se_biases[1], "silu", "sigmoid") if excitation else None

    def ours():
        after = BatchNormArgs(*out_stats["ours"], out_gamma, out_beta, training=True) if out_norm else None
        if norm:
            y = separable_conv2d_batch_norm(
                x, dw, pw, None, stride, k // 2, 1, None, activation, running_mean=stats["ours"][0],
                running_var=stats["ours"][1], norm_weight=gamma, norm_bias=beta, training=True, out_norm=after,
                excitation=gate,
            )  # fmt: skip
        else:
            y = separable_conv2d(x, dw, pw, None, stride, k // 2, mid_activation=activation)
        return torch.autograd.grad(y, leaves, grad)

    def eager():  # no local names for the intermediates: autograd frees them as the step goes
        if norm:  # torchvision's Conv2dNormActivation: BatchNorm2d, then ReLU6(inplace=True)
            normalized = F.batch_norm(F.conv2d(x, dw, None, stride, k // 2, 1, c), *stats["eager"], gamma, beta, True)
            if excitation:  # torchvision's MBConv: SiLU in place, then SqueezeExcitation's ops
                a = F.silu(normalized, inplace=True)
                hidden = F.silu(F.conv2d(a.mean((2, 3), keepdim=True), reduce, se_biases[0]))
                y = F.conv2d(a * torch.sigmoid(F.conv2d(hidden, expand, se_biases[1])), pw)
                del a, hidden
            else:
                y = F.conv2d(F.relu6(normalized, inplace=True), pw)
            del normalized
            if out_norm:
                y = F.batch_norm(y, *out_stats["eager"], out_gamma, out_beta, True)
        else:
            y = F.conv2d(act(F.conv2d(x, dw, None, stride, k // 2, 1, c)), pw)
        return torch.autograd.grad(y, leaves, grad)

    trackers = {}
    for impl, fn in (("ours", ours), ("eager", eager)):
        with LiveBytes() as trackers[impl]:
            fn()
    peaks = {impl: tracker.peak for impl, tracker in trackers.items()}
    intermediate = batch * c * out * out * 4
    composition = {  # what each peak is made of: the tensors alive then, in intermediates (those above 1%)
        f"{impl}_peak_composition": [
            round(size / intermediate, 3) for size in t.peak_sizes if size > intermediate / 100
        ]
        for impl, t in trackers.items()
    }
    composition |= {f"{impl}_peak_after": t.peak_after for impl, t in trackers.items()}
    return {
        "shape": name,
        "batch": batch,
        "activation": activation,
        "mid_norm": "batch norm (training)" if norm else None,
        "out_norm": "batch norm (training)" if out_norm else None,
        "excitation": "squeeze-excitation" if excitation else None,
        "fused": separable_module.fuses(o, (k, k)),
        "intermediate_bytes": intermediate,
        "output_bytes": batch * o * out * out * 4,
        **{f"{impl}_peak_bytes": peak for impl, peak in peaks.items()},
        **{f"{impl}_peak_intermediates": peak / intermediate for impl, peak in peaks.items()},
        "ours_over_eager": peaks["ours"] / peaks["eager"],
        **composition,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    parts = lambda r: ("bn" if r.get("mid_norm") else None, r["activation"], "se" if r.get("excitation") else None,  # noqa: E731
                       "1x1+bn" if r.get("out_norm") else None)  # fmt: skip
    mids = lambda r: "+".join(filter(None, parts(r))) or "nothing"  # noqa: E731
    labels = [f"{r['shape']} b{r['batch']} {mids(r)}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    positions = range(len(rows))
    for offset, impl in ((-0.2, "eager"), (0.2, "ours")):
        ax.barh([p + offset for p in positions], [r[f"{impl}_peak_intermediates"] for r in rows], 0.4, label=impl)
    ax.set_yticks(list(positions), labels, fontsize=7)
    ax.set_xlabel("training step peak tensor memory, in intermediate-sized tensors (fp32)")
    ax.legend()
    ax.set_title(f"tensor bytes (device-independent); torch {result['versions']['torch']}", fontsize=8)
    atomic_write_png(fig, path, dpi=100, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny shape: checks the script")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args()
    start = time.perf_counter()
    with stubbed_launches():
        shapes = QUICK_SHAPES if args.quick else SEPARABLE_SHAPES
        rows = [row(*shape, *mid) for shape in shapes for mid in MIDS]
    for r in rows:
        print(json.dumps(r), flush=True)
    result = {
        "benchmark": "training_memory",
        "device": device_name("cpu") + " (tensor bytes: the same on any device)",
        "versions": versions(),
        "dtype": "float32",
        "layout": "channels_last",
        "counter": "sepconv.memory.peak_live_bytes (live operator outputs; no scratch inside one operator)",
        "rows": rows,
        "total_seconds": time.perf_counter() - start,
    }
    stem = "training_memory_quick" if args.quick else "training_memory"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
