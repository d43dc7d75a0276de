"""`sepconv.accelerate` across model families on CPU: inference, eager PyTorch against the accelerated model.

The families whose blocks `accelerate` learned to read after the torchvision MobileNets (`cpu_torchvision.py`
times those): timm's tf_ models (TensorFlow 'same' padding at run time), MobileNetV1 (an activation after the
projection's norm), MobileNetV4 (UniversalInvertedResidual), ReXNet, EfficientViT (MIT), GhostNet, MixNet, and models
whose blocks are read by tracing their forward (Res2Net's loops, torchvision's DenseNet). Random weights (nothing is
downloaded), eval mode, fp32, NCHW input. Variants, timed in the same paired rounds per model and batch
(`sepconv.bench.interleaved_latencies(..., paired=True)`; ratios are medians of per-round ratios):

- `eager_nchw`: the model as built; `accelerate`: `sepconv.accelerate(model)` (backend auto: PyTorch's convs on
  the folded weights on CPU);
- `eager_channels_last`: weights and input in channels_last; `sepconv`: `sepconv.run_channels_last` of the
  accelerated model (NCHW in and out, channels_last inside);
- `compiled`: `torch.compile(model)` (default mode: Inductor's C++/OpenMP code on CPU), NCHW input;
  `compiled_frozen`: the same with Inductor's `freezing` option (weights taken as constants: it folds the
  BatchNorms itself); `compiled_channels_last`: `torch.compile` of the model, weights and input in channels_last;
  `compiled_accelerate`: `torch.compile` (default options) of the accelerated model, weights and input in
  channels_last (so `compiled_channels_last / compiled_accelerate` is what `accelerate` adds under torch.compile,
  the layout being the same on both sides). Each is compiled anew for each batch size (`torch._dynamo.reset()`: no
  dynamic-shape recompile), and its first call (the compile) is recorded as `compile_seconds`, outside the timing.

Each model also records what changed (fused chains, routed depthwise convs, folded convs), the BatchNorms it ran
before and after, and the largest output difference of the accelerated variants from eager NCHW (over the largest
output).

    python benchmarks/cpu_accelerate_models.py   # writes benchmarks/results/cpu_accelerate_models.{json,png}
    python benchmarks/cpu_accelerate_models.py --quick --out /tmp
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import Counter
from pathlib import Path

MODELS = (
    "timm:tf_efficientnet_b0",
    "timm:mobilenetv1_100",
    "timm:mobilenetv4_conv_small",
    "timm:rexnet_100",
    "timm:efficientvit_b0",
    "timm:ghostnet_100",
    "timm:res2net50_26w_4s",
    "timm:mixnet_s",
    "torchvision:densenet121",
)
VARIANTS = (
    "eager_nchw",
    "accelerate",
    "eager_channels_last",
    "sepconv",
    "compiled",
    "compiled_frozen",
    "compiled_channels_last",
    "compiled_accelerate",
)
COMPILED = ("compiled", "compiled_frozen", "compiled_channels_last", "compiled_accelerate")
PAIRS = (
    ("eager_nchw", "accelerate"),
    ("eager_channels_last", "sepconv"),
    ("eager_nchw", "sepconv"),
    ("compiled", "sepconv"),
    ("compiled", "compiled_accelerate"),
    ("compiled_frozen", "compiled_accelerate"),
    ("compiled_channels_last", "compiled_accelerate"),
)
CHANNELS_LAST_INPUT = ("eager_channels_last", "compiled_channels_last", "compiled_accelerate")


def variants(spec: str) -> tuple[dict, dict]:
    """The four eager variants of one model (eval mode) and what ``accelerate`` changed in it."""
    import torch

    import sepconv
    from sepconv.models import load_model

    model = load_model(spec).eval()
    fast, changes = sepconv.accelerate(model)
    norms = (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm)
    info = {
        "changes": dict(Counter(change.kind for change in changes)),
        "batch_norms_before": sum(isinstance(m, norms) for m in model.modules()),
        "batch_norms_after": sum(isinstance(m, norms) for m in fast.modules()),
    }
    models = {
        "eager_nchw": model,
        "accelerate": fast,
        "eager_channels_last": copy.deepcopy(model).to(memory_format=torch.channels_last),
        "sepconv": sepconv.run_channels_last(copy.deepcopy(fast)),  # its own copy: it converts in place
    }
    return models, info


def time_model(spec: str, args: argparse.Namespace) -> dict:
    import torch

    from sepconv.bench import interleaved_latencies, paired_ratio

    eager, info = variants(spec)
    rows = {}
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        inputs = {name: x for name in VARIANTS}
        inputs |= {name: x.to(memory_format=torch.channels_last) for name in CHANNELS_LAST_INPUT}
        torch._dynamo.reset()  # compiled anew for this batch size: no recompile with dynamic shapes
        models = eager | {
            "compiled": torch.compile(copy.deepcopy(eager["eager_nchw"])),
            "compiled_frozen": torch.compile(copy.deepcopy(eager["eager_nchw"]), options={"freezing": True}),
            "compiled_channels_last": torch.compile(copy.deepcopy(eager["eager_channels_last"])),
            "compiled_accelerate": torch.compile(
                copy.deepcopy(eager["accelerate"]).to(memory_format=torch.channels_last)
            ),
        }
        with torch.no_grad():
            want = models["eager_nchw"](x)
            compile_seconds = {}
            for name in COMPILED:
                start = time.perf_counter()
                models[name](inputs[name])
                compile_seconds[name] = time.perf_counter() - start
            errors = {
                name: ((models[name](inputs[name]) - want).abs().max() / want.abs().max()).item()
                for name in VARIANTS
                if name != "eager_nchw"
            }

            timings = interleaved_latencies(
                {name: _call(models[name], inputs[name]) for name in VARIANTS},
                min_run_time=args.min_run_time,
                paired=True,
                min_rounds=args.min_rounds,
            )
        rows[str(batch)] = {
            "ms": {name: timing.median_ms for name, timing in timings.items()},
            "iqr_ms": {name: timing.iqr_ms for name, timing in timings.items()},
            "rounds": timings["eager_nchw"].runs,
            "samples_ms": {name: list(timing.samples_ms) for name, timing in timings.items()},  # one per round
            "paired": {f"{a} / {b}": paired_ratio(timings[a], timings[b]) for a, b in PAIRS},
            "max_relative_difference": errors,
            "compile_seconds": compile_seconds,
        }
        print(spec, batch, json.dumps(rows[str(batch)]["paired"]), flush=True)
    return info | {"batches": rows}


def _call(model, x):
    return lambda: model(x)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sepconv.io import atomic_write_png

    batches = [str(b) for b in result["settings"]["batches"]]
    names = list(result["models"])
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 0.8 * len(names) + 2.4), squeeze=False)
    width = 0.8 / len(PAIRS)
    for ax, batch in zip(axes[0], batches, strict=True):
        for k, (a, b) in enumerate(PAIRS):
            ratios = [result["models"][name]["batches"][batch]["paired"][f"{a} / {b}"] for name in names]
            ax.barh([i + k * width for i in range(len(names))], ratios, height=width, label=f"{a} / {b}")
        ax.axvline(1.0, color="black", linewidth=0.8)
        middle = width * (len(PAIRS) - 1) / 2
        ax.set_yticks([i + middle for i in range(len(names))], [n.split(":", 1)[1] for n in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speed-up (median of paired rounds; > 1: accelerated faster)", fontsize=8)
        ax.set_title(f"batch {batch}", fontsize=9)
    fig.suptitle(
        f"sepconv.accelerate on CPU, inference, {result['settings']['size']}x{result['settings']['size']}, fp32 — "
        f"{result['device']}, {result['threads']} threads",
        fontsize=9,
    )
    # below the first panel, outside it (the layout makes room for it): no bar hidden
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.08), ncol=2)
    atomic_write_png(fig, path, overwrite=True)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = [
        "| model | batch norms | batch | "
        + " | ".join(f"{v} ms" for v in VARIANTS)
        + " | "
        + " | ".join(f"{a} / {b}" for a, b in PAIRS)
        + " |",
        "|---|---|---|" + "---|" * (len(VARIANTS) + len(PAIRS)),
    ]
    for name, entry in result["models"].items():
        for batch, row in entry["batches"].items():
            ms = " | ".join(f"{row['ms'][v]:.2f}" for v in VARIANTS)
            ratios = " | ".join(f"{r:.2f}x" for r in row["paired"].values())
            norms = f"{entry['batch_norms_before']} -> {entry['batch_norms_after']}"
            lines.append(f"| {name} | {norms} | {batch} | {ms} | {ratios} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two models, 64x64, batch 1, short timing: a check")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="model specs (torchvision:NAME, timm:NAME)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timing per variant and batch")
    parser.add_argument("--min-rounds", type=int, default=10, help="paired rounds at least")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.size = ["timm:mobilenetv4_conv_small", "timm:res2net50_26w_4s"], [1], 64
        args.min_run_time, args.min_rounds = 0.05, 3
    import torch

    from sepconv.bench import allocator_name, device_name, versions
    from sepconv.io import atomic_write_text

    start = time.perf_counter()
    result = {
        "benchmark": "cpu_accelerate_models",
        "device": device_name("cpu"),
        "threads": torch.get_num_threads(),
        "allocator": allocator_name(),
        "dtype": "float32",
        "versions": versions()
        | {"torchvision": __import__("torchvision").__version__, "timm": __import__("timm").__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {spec: time_model(spec, args) for spec in args.models},
    }
    result["total_seconds"] = time.perf_counter() - start
    stem = "cpu_accelerate_models_quick" if args.quick else "cpu_accelerate_models"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, args.out / f"{stem}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
