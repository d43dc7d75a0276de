"""CPU benchmark of one plan: an NCHW caller's separable layer run in channels_last up to its pointwise conv,
which reads the channels_last intermediate as a matrix product into a contiguous output
(``cpu_strategy.CHANNELS_LAST_PRODUCT``, whole or in batch chunks), against the same strategy without that plan;
and the plan in batch chunks for channels_last callers' forward, where each chunk's product is written into the
channels_last output.

Per row (the shapes of ``cpu.py``, batch 1 and 32, forward and training step as there): ``ours`` (the strategy,
the plan among its candidates), ``ours_without_product`` (a subclass that does not offer it: its own decisions),
PyTorch's block in NCHW and converted to channels_last and back (what an NCHW caller can have in plain PyTorch),
and in the forward pass the same three on a channels_last input (``ours_cl_in``, ``ours_without_product_cl_in``,
``torch_channels_last``: PyTorch's block in channels_last; a channels_last caller's training step has no product
plan), all in the same paired rounds (``sepconv.bench.interleaved_latencies``); ratios are medians of per-round
ratios with their 95% intervals. Both layers are settled (their close decisions measured again) before the rounds.

    python benchmarks/cpu_product_plan.py                    # writes results/cpu_product_plan.{json,png}
    python benchmarks/cpu_product_plan.py --quick --out /tmp  # two small shapes, to check the script
"""

from __future__ import annotations

import argparse
import copy
import json
import time
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
from sepconv.bench import allocator_name, device_name, paired_ratio, paired_ratio_interval, versions
from sepconv.io import atomic_write_png, atomic_write_text

CL = torch.channels_last
VARIANTS = ("torch_nchw", "torch_channels_last_converted", "ours_without_product", "ours")
CL_VARIANTS = ("torch_channels_last", "ours_without_product_cl_in", "ours_cl_in")  # forward only
# (baseline, ours) pairs whose per-round ratio a row keeps
PAIRS = [
    ("ours_without_product", "ours"),
    ("torch_nchw", "ours"),
    ("torch_channels_last_converted", "ours"),
    ("torch_nchw", "ours_without_product"),
    ("torch_channels_last_converted", "ours_without_product"),
]
CL_PAIRS = [
    ("ours_without_product_cl_in", "ours_cl_in"),
    ("torch_channels_last", "ours_cl_in"),
    ("torch_channels_last", "ours_without_product_cl_in"),
]


class SeparableConv2dWithoutProduct(sepconv.SeparableConv2d):
    """The layer as it was before the plan: the strategy times every other plan (its decisions are keyed on this
    class's name, apart from ``SeparableConv2d``'s)."""

    _offers_product = False


def plan_of(layer_name: str, training: bool, source: str = "contiguous") -> str | None:
    """The plan decided for an input of layout ``source`` of the layer class ``layer_name`` in this pass (None:
    nothing decided, as for one channels_last sample, which runs as given)."""
    for key, plan in sepconv.cpu_strategy_decisions().items():
        if key[0] == layer_name and key[-4] == source and key[-3] == training:
            return plan
    return None


def is_product(plan: str | None) -> bool:
    """Whether ``plan`` is the product plan, whole or in batch chunks."""
    return plan is not None and plan.startswith(sepconv.cpu_strategy.CHANNELS_LAST_PRODUCT)


def row_for(c: int, h: int, o: int, k: int, stride: int, batch: int, min_run_time: float) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, c, h, h)
    x_cl = x.contiguous(memory_format=CL)
    ours = sepconv.SeparableConv2d(c, o, k, stride=stride, padding=k // 2)
    without = SeparableConv2dWithoutProduct(c, o, k, stride=stride, padding=k // 2)
    without.load_state_dict(ours.state_dict())
    plain = plain_block(ours)
    plain_cl_block = copy.deepcopy(plain).to(memory_format=CL)  # a copy: .to() would change `plain` too
    plain_cl = ConvertAround(plain_cl_block)
    sepconv.clear_cpu_strategy_cache()
    settle(ours, x)
    settle(without, x)
    row: dict = {"C": c, "H": h, "O": o, "K": k, "stride": stride, "batch": batch}
    variants = {"torch_nchw": plain, "torch_channels_last_converted": plain_cl, "ours_without_product": without}
    variants["ours"] = ours
    for pass_name, make in (("forward", forward), ("forward_backward", forward_backward)):
        training = make is forward_backward
        row[f"plan_{pass_name}"] = plan_of("SeparableConv2d", training)
        row[f"plan_without_product_{pass_name}"] = plan_of(SeparableConv2dWithoutProduct.__name__, training)
        fns = {name: make(module, x) for name, module in variants.items()}
        pairs = PAIRS
        if not training:
            row["plan_cl_in_forward"] = plan_of("SeparableConv2d", False, "channels_last")
            row["plan_without_product_cl_in_forward"] = plan_of(
                SeparableConv2dWithoutProduct.__name__, False, "channels_last"
            )
            cl_modules = {
                "torch_channels_last": plain_cl_block,
                "ours_without_product_cl_in": without,
                "ours_cl_in": ours,
            }
            fns.update({name: make(module, x_cl) for name, module in cl_modules.items()})
            pairs = PAIRS + CL_PAIRS
        timings = timed_side_by_side(fns, min_run_time)
        for name, timing in timings.items():
            row[f"{name}_{pass_name}_ms"] = timing.median_ms
            row[f"{name}_{pass_name}_runs"] = timing.runs
        row[f"paired_{pass_name}"] = {f"{b}/{a}": paired_ratio(timings[b], timings[a]) for b, a in pairs}
        row[f"paired_interval_{pass_name}"] = {
            f"{b}/{a}": _finite(paired_ratio_interval(timings[b], timings[a])) for b, a in pairs
        }
    return row


def summary(rows: list[dict]) -> list[str]:
    lines = []
    for pass_name, caller, suffix in PANELS:
        chose = [r for r in rows if is_product(r[f"plan{suffix}_{pass_name}"])]
        gains = sorted(r[f"paired_{pass_name}"][f"ours_without_product{suffix}/ours{suffix}"] for r in chose)
        lines.append(
            f"{pass_name}, {caller} caller: the plan chosen in {len(chose)} of {len(rows)} rows; ours vs without it "
            "there: " + (", ".join(f"{g:.2f}x" for g in gains) or "-")
        )
    return lines


# (pass, caller, the suffix of its variants' names)
PANELS = [("forward", "NCHW", ""), ("forward_backward", "NCHW", ""), ("forward", "channels_last", "_cl_in")]


def best_pytorch(row: dict, pass_name: str, suffix: str = "") -> str:
    """The faster PyTorch variant of a row's pass (medians): what the caller could have without sepconv."""
    if suffix:  # a channels_last caller: PyTorch's block as it is
        return "torch_channels_last"
    return min(("torch_nchw", "torch_channels_last_converted"), key=lambda name: row[f"{name}_{pass_name}_ms"])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(19, 5), sharey=True)
    labels = [f"{r['C']},{r['H']},{r['O']} k{r['K']} s{r['stride']} b{r['batch']}" for r in rows]
    for ax, (pass_name, caller, suffix) in zip(axes, PANELS, strict=True):
        chosen = [is_product(r[f"plan{suffix}_{pass_name}"]) for r in rows]
        ours = f"ours{suffix}"
        series = (
            (
                [r[f"paired_{pass_name}"][f"ours_without_product{suffix}/{ours}"] for r in rows],
                "ours / ours without the plan",
            ),
            (
                [r[f"paired_{pass_name}"][f"{best_pytorch(r, pass_name, suffix)}/{ours}"] for r in rows],
                "ours / the faster PyTorch layout",
            ),
        )
        for offset, (ys, label) in enumerate(series):
            xs = [i + 0.4 * offset for i in range(len(rows))]
            bars = ax.bar(xs, [min(y, 2.0) for y in ys], width=0.4, label=label)
            for bar, plan_chosen in zip(bars, chosen, strict=True):
                if plan_chosen:
                    bar.set_hatch("//")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylim(0.5, 2.0)
        ax.set_xticks([i + 0.2 for i in range(len(rows))], labels, rotation=90, fontsize=7)
        ax.set_title(f"{pass_name}, {caller} caller (hatched: the plan chosen; capped at 2)", fontsize=9)
        ax.set_ylabel("speed-up (median of per-round ratios)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_png(fig, path, overwrite=True)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small shapes, batch 1 and 4")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args()
    shapes, batches = (QUICK_SHAPES, (1, 4)) if args.quick else (SHAPES, (1, 32))
    start, rows = time.perf_counter(), []
    for batch in batches:
        for shape in shapes:
            rows.append(row_for(*shape, batch=batch, min_run_time=args.min_run_time))
            print(json.dumps({k: v for k, v in rows[-1].items() if k.startswith(("C", "H", "O", "K", "b", "plan"))}))
    result = {
        "device": device_name("cpu"),
        "threads": torch.get_num_threads(),
        "allocator": allocator_name(),
        "dtype": "float32",
        "versions": versions(),
        "seconds": time.perf_counter() - start,
        "summary": summary(rows),
        "rows": rows,
    }
    name = "cpu_product_plan_quick" if args.quick else "cpu_product_plan"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(rows, args.out / f"{name}.png")
    print("\n".join(result["summary"]))


if __name__ == "__main__":
    main()
