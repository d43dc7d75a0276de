"""What `sepconv.accelerate` does to torchvision and timm models: chains fused, convs folded, BatchNorms left.

For each model (random weights, nothing downloaded; BatchNorm statistics and affine parameters drawn at random so
that folding is really exercised), in eval mode and float64: the changes by kind, the BatchNorms the model runs
before and after, the largest output difference from the original on one random input (relative to the largest
output: float64 rounding, ~1e-15, where the rewrite is exact), and the seconds `accelerate` took. Not a timing of
the models: `cpu_torchvision.py`, `cpu_accelerate_models.py` and `kernels.py` time them.

    python benchmarks/accelerate_coverage.py   # writes benchmarks/results/accelerate_coverage.json, prints a table
    python benchmarks/accelerate_coverage.py --quick --out /tmp
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections import Counter
from pathlib import Path

MODELS = (
    "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_large",
    "torchvision:mnasnet1_0",
    "torchvision:shufflenet_v2_x1_0",
    "torchvision:efficientnet_b0",
    "torchvision:efficientnet_v2_s",
    "torchvision:regnet_y_400mf",
    "torchvision:resnet50",
    "torchvision:resnext50_32x4d",
    "torchvision:googlenet",
    "torchvision:inception_v3",
    "torchvision:vgg11_bn",
    "torchvision:densenet121",
    "torchvision:convnext_tiny",
    "timm:mobilenetv1_100",
    "timm:mobilenetv2_100",
    "timm:mobilenetv3_large_100",
    "timm:mobilenetv4_conv_small",
    "timm:mobilenetv4_hybrid_medium",
    "timm:efficientnet_b0",
    "timm:tf_efficientnet_b0",
    "timm:tf_mobilenetv3_large_100",
    "timm:efficientnetv2_rw_s",
    "timm:mnasnet_100",
    "timm:fbnetc_100",
    "timm:lcnet_100",
    "timm:tinynet_a",
    "timm:ghostnet_100",
    "timm:rexnet_100",
    "timm:efficientvit_b0",
    "timm:mixnet_s",
    "timm:xception41",
    "timm:resnet50",
    "timm:resnet50d",
    "timm:res2net50_26w_4s",
    "timm:regnety_016",
    "timm:dla34",
    "timm:dpn68",
    "timm:densenet121",
    "timm:repvgg_a0",
    "timm:fastvit_t8",
    "timm:convnext_atto",
)
SIZES = {"torchvision:inception_v3": 299}  # input height and width where the default does not fit the model


def randomize_norms(model, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and module.running_mean is not None:
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


def coverage(spec: str, size: int) -> dict:
    import torch

    import sepconv
    from sepconv.models import load_model

    torch.manual_seed(0)
    model = randomize_norms(load_model(spec)).double().eval()
    start = time.perf_counter()
    fast, changes = sepconv.accelerate(model)
    seconds = time.perf_counter() - start
    x = torch.randn(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), fast(x)
    norms = (torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm)
    kinds = Counter(change.kind for change in changes)
    return {
        "fused separable": kinds["fused separable"],
        "depthwise": kinds["depthwise"],
        "folded conv": kinds["folded conv"],
        "batch_norms_before": sum(isinstance(m, norms) for m in model.modules()),
        "batch_norms_after": sum(isinstance(m, norms) for m in fast.modules()),
        "max_relative_difference": ((got - want).abs().max() / want.abs().max()).item(),
        "input": [1, 3, size, size],
        "seconds": seconds,
    }


def markdown(result: dict) -> str:
    lines = [
        "| model | chains fused | depthwise routed | convs folded | BatchNorms before -> after | largest difference |",
        "|---|---|---|---|---|---|",
    ]
    for spec, row in result["models"].items():
        norms = f"{row['batch_norms_before']} -> {row['batch_norms_after']}"
        lines.append(
            f"| {spec} | {row['fused separable']} | {row['depthwise']} | {row['folded conv']} | {norms} | "
            f"{row['max_relative_difference']:.0e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three small models: a check")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="model specs (torchvision:NAME, timm:NAME)")
    parser.add_argument("--size", type=int, default=96, help="input height and width (some models need more)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args()
    if args.quick:
        args.models = ["torchvision:mobilenet_v3_large", "timm:tf_efficientnet_b0", "torchvision:densenet121"]
    warnings.filterwarnings("ignore", category=UserWarning)  # timm / torchvision constructor notices
    import torch

    from sepconv.bench import device_name, versions
    from sepconv.io import atomic_write_text

    result = {
        "benchmark": "accelerate_coverage",
        "device": device_name("cpu"),  # where the models ran (the outputs compared; seconds: accelerate's own)
        "dtype": "float64",
        "versions": versions()
        | {"torchvision": __import__("torchvision").__version__, "timm": __import__("timm").__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "models": {},
    }
    for spec in args.models:
        result["models"][spec] = coverage(spec, SIZES.get(spec, args.size))
        print(spec, json.dumps(result["models"][spec]), flush=True)
    stem = "accelerate_coverage_quick" if args.quick else "accelerate_coverage"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
