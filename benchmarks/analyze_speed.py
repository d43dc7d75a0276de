"""How long `sepconv.analyze` takes on real torchvision models at 1x3x224x224 (CPU, meta-device counting).

Bar (issue 3): resnet50 under 2 s. Model construction is timed apart (it allocates real weights).

    python benchmarks/analyze_speed.py     # writes benchmarks/results/analyze_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torchvision

import sepconv
from sepconv.bench import device_name, versions
from sepconv.io import atomic_write_text

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vit_b_16")
MODES = {"forward": {}, "what_if": {"what_if": True}, "backward": {"backward": True}}


def seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "analyze_speed.json")
    args = parser.parse_args()
    rows = []
    for name in MODELS:
        build_s = seconds(lambda name=name: torchvision.models.get_model(name, weights=None), 1)
        model = torchvision.models.get_model(name, weights=None)
        row = {"model": name, "build_s": build_s, "gmacs": sepconv.analyze(model, (1, 3, 224, 224)).total.macs / 1e9}
        for mode, kwargs in MODES.items():
            row[f"analyze_{mode}_s"] = seconds(
                lambda m=model, kw=kwargs: sepconv.analyze(m, (1, 3, 224, 224), **kw), args.repeats
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "benchmark": "analyze_speed",
        "device": device_name("cpu"),
        "input": [1, 3, 224, 224],
        "dtype": "float32",
        "versions": versions() | {"torchvision": torchvision.__version__},
        "repeats": args.repeats,
        "rows": rows,
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n", overwrite=True)


if __name__ == "__main__":
    main()
