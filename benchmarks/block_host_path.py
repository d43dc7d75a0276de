"""Host cost of our fused blocks against PyTorch's, with our Triton launches stubbed out: what every call costs
before any kernel runs, counted and timed on a CPU.

On a GPU most separable-block rows at batch 64 are host-bound (KERNEL_NOTES item 9): a call's time is the Python
and dispatch work that issues its kernels. Two measures of that work here, device-independent where possible:

- ``*_ops``: the PyTorch operators a call issues from Python or autograd (top-level ``aten::`` events in the
  profiler; those an operator runs inside itself are not counted) and ``ours_launches`` our Triton launches: on a
  GPU each top-level operator costs the host a dispatch and usually a kernel launch (~5-10 us), each Triton launch
  ~20-45 us (KERNEL_NOTES items 1 and 5);
- ``*_us``: the medians of paired rounds (``sepconv.bench.interleaved_latencies``) on this CPU, batch 1 at 8x8,
  where PyTorch's CPU kernels take little time and ours none (stubbed): host time, roughly. Denormals are flushed
  to zero while it runs (``flush_denormal`` in the JSON): the stubs leave our outputs uninitialized, and denormal
  garbage in them slowed PyTorch's CPU operators that read them by 10x and more, a cost of the stubs alone.

Blocks (fp32, channels_last, 32 -> 16 channels, 3x3): ``separable`` dw -> ReLU6 -> 1x1; ``mobilenet_v2_train``
dw -> BatchNorm -> ReLU6 -> 1x1 -> BatchNorm with batch statistics; ``efficientnet_train`` dw -> BatchNorm -> SiLU
-> squeeze-excitation -> 1x1 -> BatchNorm; passes: forward without gradients (eval-mode norms folded, ours) and
forward+backward in training.

    python benchmarks/block_host_path.py              # writes benchmarks/results/block_host_path.{json,png}
    python benchmarks/block_host_path.py --quick --out /tmp
    python benchmarks/block_host_path.py --finalize-in-launch   # block_host_path_finalize_in_launch.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():  # CPU tensors (the stubs mean no kernel runs); profile_overhead.py imports
    os.environ.setdefault("TRITON_INTERPRET", "1")  # this module on a GPU, where the kernels must compile

import torch.nn.functional as F

from sepconv.bench import device_name, interleaved_latencies, paired_ratio, versions
from sepconv.io import atomic_write_png, atomic_write_text
from sepconv.kernels import separable as separable_module
from sepconv.kernels.batch_norm import separable_conv2d_batch_norm
from sepconv.kernels.differentiable_excitation import ExcitationArgs
from sepconv.kernels.output_norm import BatchNormArgs
from sepconv.kernels.separable import separable_conv2d
from stubbed_launches import StubLaunch, stubbed_launches

CHANNELS, OUT, SIZE, KERNEL, SQUEEZED = 32, 16, 8, 3, 8
IMPLS = ("ours", "eager")


def block_tensors(device: str = "cpu") -> dict[str, torch.Tensor]:
    """The blocks' input and parameters (fp32, channels_last, batch 1), seeded."""
    torch.manual_seed(0)
    c, o, s = CHANNELS, OUT, SQUEEZED
    x = torch.randn(1, c, SIZE, SIZE, device=device).contiguous(memory_format=torch.channels_last)
    shapes = {"dw": (c, 1, KERNEL, KERNEL), "pw": (o, c, 1, 1), "gamma": (c,), "beta": (c,), "out_gamma": (o,),
              "out_beta": (o,), "reduce": (s, c, 1, 1), "reduce_bias": (s,), "expand": (c, s, 1, 1),
              "expand_bias": (c,)}  # fmt: skip
    return {"x": x} | {name: torch.randn(shape, device=device) for name, shape in shapes.items()}


def blocks(t: dict[str, torch.Tensor]) -> dict[str, dict[str, Callable[[dict], torch.Tensor]]]:
    """For each block, ``ours`` and ``eager`` as functions of the tensors (running statistics inside)."""
    c, o, pad = CHANNELS, OUT, KERNEL // 2
    device = t["x"].device
    stats = {impl: [(torch.zeros(n, device=device), torch.ones(n, device=device)) for n in (c, o)] for impl in IMPLS}

    def norms(impl: str, t: dict) -> tuple[BatchNormArgs, BatchNormArgs]:
        mid, after = stats[impl]
        return (
            BatchNormArgs(*mid, t["gamma"], t["beta"], training=True),
            BatchNormArgs(*after, t["out_gamma"], t["out_beta"], training=True),
        )

    def ours_bn(t, excitation=None, activation="relu6"):
        mid, after = norms("ours", t)
        return separable_conv2d_batch_norm(
            t["x"], t["dw"], t["pw"], None, 1, pad, 1, None, activation, running_mean=mid.running_mean,
            running_var=mid.running_var, norm_weight=mid.weight, norm_bias=mid.bias, training=True, out_norm=after,
            excitation=excitation,
        )  # fmt: skip

    def eager_bn(t, excitation=False):
        mid, after = norms("eager", t)
        z = F.batch_norm(F.conv2d(t["x"], t["dw"], None, 1, pad, 1, c), *mid)
        if excitation:
            a = F.silu(z, inplace=True)
            hidden = F.silu(F.conv2d(a.mean((2, 3), keepdim=True), t["reduce"], t["reduce_bias"]))
            a = a * torch.sigmoid(F.conv2d(hidden, t["expand"], t["expand_bias"]))
        else:
            a = F.relu6(z, inplace=True)
        return F.batch_norm(F.conv2d(a, t["pw"]), *after)

    def gate(t):
        return ExcitationArgs(t["reduce"], t["reduce_bias"], t["expand"], t["expand_bias"], "silu", "sigmoid")

    return {
        "separable": {
            "ours": lambda t: separable_conv2d(t["x"], t["dw"], t["pw"], None, 1, pad, 1, None, "relu6"),
            "eager": lambda t: F.conv2d(F.relu6(F.conv2d(t["x"], t["dw"], None, 1, pad, 1, c)), t["pw"]),
        },
        "mobilenet_v2_train": {"ours": ours_bn, "eager": eager_bn},
        "efficientnet_train": {
            "ours": lambda t: ours_bn(t, gate(t), "silu"),
            "eager": lambda t: eager_bn(t, excitation=True),
        },
    }


def top_level_ops(fn: Callable[[], object]) -> int:
    """The ``aten::`` operators ``fn()`` issues from Python or autograd: profiler events with no ``aten::``
    event above them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def measure(min_run_time: float) -> list[dict]:
    t = block_tensors()
    leaves = {name: v.detach().requires_grad_() for name, v in t.items()}
    rows = []
    for block, impls in blocks(t).items():
        passes = {"forward, no gradients": None, "forward+backward": "train"} if block == "separable" else {}
        passes |= {"forward+backward": "train"}
        for pass_name, mode in passes.items():
            if mode is None:

                def run(fn):
                    with torch.no_grad():
                        return fn(t)
            else:

                def run(fn, used=USED[block]):
                    y = fn(leaves)
                    inputs = [v for name, v in leaves.items() if name in used]
                    return torch.autograd.grad(y.sum(), inputs)

            fns = {impl: (lambda run=run, fn=fn: run(fn)) for impl, fn in impls.items()}
            row: dict = {"block": block, "pass": pass_name}
            for impl, fn in fns.items():
                fn()  # warm: caches, the first call's lookups
                before = StubLaunch.launches
                row[f"{impl}_ops"] = top_level_ops(fn)
                if impl == "ours":
                    row["ours_launches"] = StubLaunch.launches - before
            timings = interleaved_latencies(fns, min_run_time=min_run_time, warmup=50, min_runs=20, paired=True)
            row |= {f"{impl}_us": timing.median_ms * 1e3 for impl, timing in timings.items()}
            row["ours_over_eager"] = paired_ratio(timings["ours"], timings["eager"])
            row["rounds"] = timings["ours"].runs
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


USED = {  # the tensors each block reads (the inputs of its gradient)
    "separable": frozenset({"x", "dw", "pw"}),
    "mobilenet_v2_train": frozenset({"x", "dw", "pw", "gamma", "beta", "out_gamma", "out_beta"}),
    "efficientnet_train": frozenset(
        {"x", "dw", "pw", "gamma", "beta", "out_gamma", "out_beta", "reduce", "reduce_bias", "expand", "expand_bias"}
    ),
}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    positions = range(len(rows))
    labels = [f"{r['block']}\n{r['pass']}" for r in rows]
    for ax, unit, title in ((axes[0], "ops", "top-level PyTorch operators"), (axes[1], "us", "host time (us)")):
        for offset, impl in ((-0.2, "eager"), (0.2, "ours")):
            ax.bar([p + offset for p in positions], [r[f"{impl}_{unit}"] for r in rows], width=0.4, label=impl)
        if unit == "ops":
            launches = [r["ours_launches"] for r in rows]
            ax.bar([p + 0.2 for p in positions], launches, width=0.4, label="ours: Triton launches",
                   bottom=[r["ours_ops"] for r in rows])  # fmt: skip
        ax.set_xticks(list(positions), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"launches stubbed; {result['device']}; torch {result['versions']['torch']}", fontsize=8)
    atomic_write_png(fig, path, dpi=100, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run: checks the script")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    parser.add_argument(
        "--finalize-in-launch",
        action="store_true",
        help="ours with the statistics combined by the launches computing them (separable.FINALIZE_IN_LAUNCH)",
    )
    args = parser.parse_args()
    separable_module.FINALIZE_IN_LAUNCH = args.finalize_in_launch
    start = time.perf_counter()
    # the stubs leave our kernels' outputs uninitialized: denormal garbage would slow the CPU arithmetic of the
    # PyTorch operators that read them ~10x (measured: 4.8 ms for one batch-norm backward), a cost of the stubs
    flush = torch.set_flush_denormal(True)  # flush denormals to zero, for ours and eager alike
    try:
        with stubbed_launches():
            rows = measure(min_run_time=0.05 if args.quick else 2.0)
    finally:
        torch.set_flush_denormal(False)
    result = {
        "benchmark": "block_host_path",
        "device": device_name("cpu"),
        "versions": versions(),
        "dtype": "float32",
        "shape": {"x": (1, CHANNELS, SIZE, SIZE), "out": OUT, "kernel": KERNEL, "layout": "channels_last"},
        "timer": "sepconv.bench.interleaved_latencies (paired rounds), medians; our launches stubbed",
        "flush_denormal": flush,
        "finalize_in_launch": args.finalize_in_launch,
        "rows": rows,
        "total_seconds": time.perf_counter() - start,
    }
    variant = "_finalize_in_launch" if args.finalize_in_launch else ""
    stem = f"block_host_path{variant}" + ("_quick" if args.quick else "")
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
