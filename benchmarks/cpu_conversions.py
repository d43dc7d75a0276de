"""CPU benchmark of compiled layout conversions (``sepconv.use_compiled_conversions``): the conversions alone, and
an NCHW caller's separable layer with them.

Conversions: per input of ``cpu.py``'s shapes (batch 1 and 32), ATen's ``contiguous(memory_format=...)`` to
channels_last and back against the compiled kernels, and a plain copy of the same bytes (``clone``: the memory
floor), in the same paired rounds; each compiled result is checked equal to ATen's.

Layers: ``cpu.py``'s separable rows for an NCHW caller, forward and training step: ``ours`` (ATen's conversions)
and ``ours_compiled_conversions`` (the same layer, the setting switched on before each of its calls; its plans
decided and settled in that setting), PyTorch's block in NCHW and converted to channels_last and back, and
``torch.compile`` of PyTorch's NCHW block (Inductor converts with the same kind of kernels); ratios are medians of
per-round ratios with 95% intervals.

    python benchmarks/cpu_conversions.py                    # writes results/cpu_conversions.{json,png}
    python benchmarks/cpu_conversions.py --quick --out /tmp  # two small shapes, to check the script
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

import sepconv
from cpu import (
    QUICK_SHAPES,
    SHAPES,
    ConvertAround,
    _finite,
    forward,
    forward_backward,
    plain_block,
    settle,
    timed_side_by_side,
)
from sepconv import cpu_conversions
from sepconv.bench import allocator_name, device_name, paired_ratio, paired_ratio_interval, versions
from sepconv.commands.accelerate import max_relative_difference
from sepconv.io import atomic_write_png, atomic_write_text

CL = torch.channels_last
CONVERSIONS = ("aten_to_channels_last", "compiled_to_channels_last", "aten_to_nchw", "compiled_to_nchw", "clone")
CONVERSION_PAIRS = [
    ("aten_to_channels_last", "compiled_to_channels_last"),
    ("aten_to_nchw", "compiled_to_nchw"),
    ("clone", "compiled_to_channels_last"),
    ("clone", "compiled_to_nchw"),
]
LAYER_PAIRS = [
    ("ours", "ours_compiled_conversions"),
    ("torch_nchw", "ours_compiled_conversions"),
    ("torch_channels_last_converted", "ours_compiled_conversions"),
    ("compiled_nchw", "ours_compiled_conversions"),
    ("compiled_nchw", "ours"),
]


def compiled_conversion(memory_format: torch.memory_format) -> Callable[[torch.Tensor], torch.Tensor]:
    """The compiled conversion itself (``to_memory_format`` with the setting on, as the strategy calls it)."""

    def convert(t: torch.Tensor) -> torch.Tensor:
        cpu_conversions.use_compiled_conversions(True)
        return cpu_conversions.to_memory_format(t, memory_format)

    return convert


def conversion_row(c: int, h: int, batch: int, min_run_time: float) -> dict:
    x = torch.randn(batch, c, h, h)
    x_cl = x.contiguous(memory_format=CL)
    to_cl, to_nchw = compiled_conversion(CL), compiled_conversion(torch.contiguous_format)
    row: dict = {"C": c, "H": h, "batch": batch, "megabytes": x.numel() * x.element_size() / 1e6}
    start = time.perf_counter()
    converted, back = to_cl(x), to_nchw(x_cl)  # the first calls: a compile where this dtype/shape kind is new
    row["compiled_first_calls_ms"] = (time.perf_counter() - start) * 1e3
    row["equal_to_aten"] = bool(
        torch.equal(converted, x_cl) and converted.stride() == x_cl.stride() and torch.equal(back, x)
    )
    fns = {
        "aten_to_channels_last": lambda: x.contiguous(memory_format=CL),
        "compiled_to_channels_last": lambda: to_cl(x),
        "aten_to_nchw": lambda: x_cl.contiguous(),
        "compiled_to_nchw": lambda: to_nchw(x_cl),
        "clone": lambda: x.clone(),
    }
    timings = timed_side_by_side(fns, min_run_time)
    for name, timing in timings.items():
        row[f"{name}_ms"] = timing.median_ms
    row["paired"] = {f"{b}/{a}": paired_ratio(timings[b], timings[a]) for b, a in CONVERSION_PAIRS}
    row["paired_interval"] = {
        f"{b}/{a}": _finite(paired_ratio_interval(timings[b], timings[a])) for b, a in CONVERSION_PAIRS
    }
    return row


def in_setting(enabled: bool, run: Callable[[], object]) -> Callable[[], object]:
    """``run`` with compiled conversions switched ``enabled`` first (a flag: the layer's plans are memoized per
    setting, so switching costs nothing on the call path)."""

    def switched() -> object:
        cpu_conversions.use_compiled_conversions(enabled)
        return run()

    return switched


def plans(enabled: bool) -> dict[str, str]:
    """Pass -> the layout plan decided for NCHW inputs of ``SeparableConv2d`` in setting ``enabled``."""
    found = {}
    for key, plan in sepconv.cpu_strategy_decisions().items():  # a layout key ends with source, training, ...
        compiled = sepconv.cpu_strategy.COMPILED_CONVERSIONS in sepconv.cpu_strategy._regime_of(key)
        if key[0] == "SeparableConv2d" and key[-4] == "contiguous" and compiled == enabled:
            found["forward_backward" if key[-3] else "forward"] = plan
    return found


def layer_row(c: int, h: int, o: int, k: int, stride: int, batch: int, min_run_time: float) -> dict:
    torch._dynamo.reset()  # compiled anew for this row: static shapes, no recompile limit reached over the rows
    torch.manual_seed(0)
    x = torch.randn(batch, c, h, h)
    ours = sepconv.SeparableConv2d(c, o, k, stride=stride, padding=k // 2)
    plain = plain_block(ours)
    row: dict = {"C": c, "H": h, "O": o, "K": k, "stride": stride, "batch": batch}
    sepconv.clear_cpu_strategy_cache()
    for enabled in (False, True):
        cpu_conversions.use_compiled_conversions(enabled)
        start = time.perf_counter()
        settle(ours, x)
        row[f"settle_s_{'compiled' if enabled else 'aten'}"] = time.perf_counter() - start
    row["plans_aten"], row["plans_compiled"] = plans(False), plans(True)
    variants = {
        "torch_nchw": plain,
        "torch_channels_last_converted": ConvertAround(copy.deepcopy(plain).to(memory_format=CL)),
        "compiled_nchw": torch.compile(copy.deepcopy(plain), dynamic=False),
    }
    for pass_name, make in (("forward", forward), ("forward_backward", forward_backward)):
        fns = {name: make(module, x) for name, module in variants.items()}
        fns["ours"] = in_setting(False, make(ours, x))
        fns["ours_compiled_conversions"] = in_setting(True, make(ours, x))
        want = fns["torch_nchw"]()
        start = time.perf_counter()
        fns["compiled_nchw"]()  # its compile: the first call of this pass
        row[f"compiled_nchw_compile_ms_{pass_name}"] = (time.perf_counter() - start) * 1e3
        row[f"ours_compiled_conversions_max_relative_difference_{pass_name}"] = max_relative_difference(
            fns["ours_compiled_conversions"](), want
        )
        timings = timed_side_by_side(fns, min_run_time)
        for name, timing in timings.items():
            row[f"{name}_{pass_name}_ms"] = timing.median_ms
        row[f"paired_{pass_name}"] = {f"{b}/{a}": paired_ratio(timings[b], timings[a]) for b, a in LAYER_PAIRS}
        row[f"paired_interval_{pass_name}"] = {
            f"{b}/{a}": _finite(paired_ratio_interval(timings[b], timings[a])) for b, a in LAYER_PAIRS
        }
    cpu_conversions.use_compiled_conversions(False)
    return row


def summary(conversions: list[dict], layers: list[dict]) -> list[str]:
    def spread(values: list[float]) -> str:
        values = sorted(values)
        return f"{values[0]:.2f}-{values[-1]:.2f}x (median {values[len(values) // 2]:.2f}x)" if values else "-"

    def count(ratios: list[dict], pair: str) -> int:
        return sum(p[pair] >= 0.95 for p in ratios)

    lines = [
        f"conversions equal to ATen's: {sum(r['equal_to_aten'] for r in conversions)} of {len(conversions)}",
        "compiled vs ATen, to channels_last: "
        + spread([r["paired"]["aten_to_channels_last/compiled_to_channels_last"] for r in conversions]),
        "compiled vs ATen, to NCHW: " + spread([r["paired"]["aten_to_nchw/compiled_to_nchw"] for r in conversions]),
    ]
    for pass_name in ("forward", "forward_backward"):
        ratios = [r[f"paired_{pass_name}"] for r in layers]
        lines += [
            f"{pass_name}, NCHW caller: ours with compiled conversions vs ATen's "
            + spread([p["ours/ours_compiled_conversions"] for p in ratios])
            + "; vs torch.compile "
            + spread([p["compiled_nchw/ours_compiled_conversions"] for p in ratios])
            + " (ATen's conversions: "
            + spread([p["compiled_nchw/ours"] for p in ratios])
            + f"); >= 0.95x torch.compile in {count(ratios, 'compiled_nchw/ours_compiled_conversions')}"
            f" of {len(ratios)} rows (ATen's: {count(ratios, 'compiled_nchw/ours')})"
        ]
    return lines


def plot(conversions: list[dict], layers: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(20, 5.5), gridspec_kw={"width_ratios": [1, 1.4, 1.4]})
    panels = [
        (
            axes[0],
            [f"{r['C']},{r['H']} b{r['batch']}" for r in conversions],
            [
                ([r["paired"]["aten_to_channels_last/compiled_to_channels_last"] for r in conversions], "to CL"),
                ([r["paired"]["aten_to_nchw/compiled_to_nchw"] for r in conversions], "to NCHW"),
            ],
            "conversions: compiled over ATen (speed-up)",
        )
    ]
    for ax, pass_name in zip(axes[1:], ("forward", "forward_backward"), strict=True):
        ratios = [r[f"paired_{pass_name}"] for r in layers]
        panels.append(
            (
                ax,
                [f"{r['C']},{r['H']},{r['O']} k{r['K']} s{r['stride']} b{r['batch']}" for r in layers],
                [
                    ([p["ours/ours_compiled_conversions"] for p in ratios], "ours compiled conv. / ours ATen conv."),
                    (
                        [p["compiled_nchw/ours_compiled_conversions"] for p in ratios],
                        "ours compiled conv. / torch.compile",
                    ),
                    ([p["compiled_nchw/ours"] for p in ratios], "ours ATen conv. / torch.compile"),
                ],
                f"{pass_name}, NCHW caller (speed-up, capped at 4)",
            )
        )
    for ax, labels, series, title in panels:
        width = 0.8 / len(series)
        for offset, (ys, label) in enumerate(series):
            xs = [i + width * offset for i in range(len(labels))]
            ax.bar(xs, [min(y, 4.0) for y in ys], width=width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=90, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("median of per-round ratios")
        ax.legend(fontsize=7, loc="upper left")
    atomic_write_png(fig, path, overwrite=True)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small shapes, batch 1 and 4")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args()
    shapes, batches = (QUICK_SHAPES, (1, 4)) if args.quick else (SHAPES, (1, 32))
    start = time.perf_counter()
    inputs = sorted({(c, h, batch) for c, h, *_ in shapes for batch in batches}, key=lambda s: (s[2], s[0] * s[1] ** 2))
    conversions = []
    for c, h, batch in inputs:
        conversions.append(conversion_row(c, h, batch, args.min_run_time))
        print(json.dumps({k: conversions[-1][k] for k in ("C", "H", "batch", "paired")}))
    layers = []
    for batch in batches:
        for shape in shapes:
            layers.append(layer_row(*shape, batch=batch, min_run_time=args.min_run_time))
            print(
                json.dumps({k: v for k, v in layers[-1].items() if k.startswith(("C", "H", "O", "K", "b", "paired_"))})
            )
    result = {
        "device": device_name("cpu"),
        "threads": torch.get_num_threads(),
        "allocator": allocator_name(),
        "dtype": "float32",
        "versions": versions(),
        "seconds": time.perf_counter() - start,
        "summary": summary(conversions, layers),
        "conversions": conversions,
        "layers": layers,
    }
    name = "cpu_conversions_quick" if args.quick else "cpu_conversions"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(conversions, layers, args.out / f"{name}.png")
    print("\n".join(result["summary"]))


if __name__ == "__main__":
    main()
