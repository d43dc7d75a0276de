"""CPU benchmark: separable layers in PyTorch NCHW, PyTorch channels_last, ours, and the standard conv.

Everything is measured side by side in one run, fp32, medians of per-call timings. Every variant of a row runs
once per round (in shuffled order), and ratios are medians of per-round ratios (``sepconv.bench.paired_ratio``):
this 2-core VM's bursts of load move whole rounds, which a ratio of two medians taken over different calls
reads as a difference between the variants (equal work came out up to 0.59x apart as a ratio of medians in a run
of the ninth session's code). A variant over ``ALONE_OVER`` times slower than a row's median one is timed on its
own after the rounds (its ratios: of medians), so that it does not take the rounds' time. Our layer is timed
settled: after its first call (the decision, timed as ``ours_decision_ms_*``) it runs through the call that
measures a close decision again (``settle``), as a user's loop would, before the rounds:

- layers: the shapes of DESIGN.md §2 plus a kernel-size sweep, batch 1 and 32, forward (no_grad) and
  forward+backward: a training step of the layer inside a network, whose input is the output of an op (a
  ReLU of a leaf) and whose input gradient that op's backward consumes in whatever layout it gets (grads of
  the leaf and the weights). With a leaf as the layer's input, a gradient handed back in channels_last costs
  nobody anything, which no layer inside a network sees (``cpu_gradient_layout.py``); the ReLU's own step
  is timed alongside (``upstream_relu_*``) so that its share of every training time can be read off;
  ``torch_nchw``/``torch_channels_last`` = ``Sequential(depthwise, pointwise)`` with NCHW / channels_last
  input (the caller owns the layout), ``torch_channels_last_converted`` = the channels_last block called
  with NCHW input, converted in and back out (what an NCHW caller pays for channels_last in plain
  PyTorch), ``ours`` = ``sepconv.SeparableConv2d`` with the CPU strategy on and an NCHW input (NCHW out),
  ``ours_channels_last_in`` = ours given channels_last input (it stays channels_last), ``standard_*`` = the
  ``nn.Conv2d`` it replaces in either layout, ``torch_nchw_again``/``torch_channels_last_again`` = controls:
  copies of the PyTorch blocks doing the same work as them in the same rounds (how far apart the benchmark puts
  equal work: its resolution on this machine), ``compiled_nchw``/``compiled_channels_last`` =
  ``torch.compile`` (default options, static shapes, compiled anew per row) of the PyTorch block in either
  layout; its first call per pass (the compile) is recorded as ``compiled_*_compile_ms_<pass>``, outside the
  timing;
- models: the small Fashion-MNIST CNNs (``sepconv.nets``), standard vs separable, training step and inference,
  eager and ``torch.compile``-d (channels_last; in training forward and backward compiled, the SGD step eager).

    python benchmarks/cpu.py                    # full run, writes benchmarks/results/cpu.{json,png}
    python benchmarks/cpu.py --quick --out /tmp  # a few shapes, to check the script
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import sepconv
from sepconv import cpu_strategy
from sepconv.bench import (
    Timing,
    allocator_name,
    device_name,
    interleaved_latencies,
    paired_ratio,
    paired_ratio_interval,
    versions,
)
from sepconv.commands.accelerate import max_relative_difference  # of outputs, or of gradient tuples
from sepconv.cpu_strategy import CHANNELS_LAST, CONTIGUOUS  # plan names
from sepconv.io import atomic_write_png, atomic_write_text
from sepconv.nets import small_resnet, small_vgg

# (C, H, O, K, stride): DESIGN.md §2, then a kernel sweep at C=O=128, 28x28.
SHAPES = [
    (32, 112, 16, 3, 1),
    (144, 56, 24, 3, 1),
    (576, 14, 96, 3, 1),
    (960, 7, 160, 3, 1),
    (96, 112, 24, 3, 2),
    (384, 28, 1536, 7, 1),
    (256, 28, 256, 31, 1),
    *[(128, 28, 128, k, 1) for k in (3, 5, 7, 15, 31)],
]
QUICK_SHAPES = [(32, 56, 16, 3, 1), (128, 14, 128, 7, 1)]
STANDARD_MAX_MACS = 40e9  # a standard conv above this takes minutes on 2 cores: recorded as skipped
SLOW_CALL_S = 3.0  # a call slower than this is timed once (runs=1 in the result)
# a variant slower than this many times a row's median one is timed after the paired rounds, on its own: in the rounds
# its calls (31x31 NCHW: seconds) took most of their time and left the others 3-5 rounds to be compared in
ALONE_OVER = 10.0
# paired rounds at least: the median of three rounds' ratios was one round's, and a burst of load on this VM moved
# the controls (equal work) to 0.74-0.87x in batch-32 training rows that got three
MIN_ROUNDS = 7
CL = torch.channels_last
# (baseline, ours) pairs whose per-round ratio a layer row keeps as "paired_<pass>"["<baseline>/<ours>"]
PAIRS = [
    ("torch_nchw", "ours"),
    ("torch_channels_last", "ours"),
    ("torch_channels_last_converted", "ours"),
    ("torch_channels_last", "ours_channels_last_in"),
    ("standard_nchw", "ours"),
    ("standard_channels_last", "ours"),
    ("standard_nchw", "ours_channels_last_in"),
    ("standard_channels_last", "ours_channels_last_in"),
    ("torch_nchw", "torch_nchw_again"),  # the controls
    ("torch_channels_last", "torch_channels_last_again"),
    ("compiled_nchw", "ours"),
    ("compiled_channels_last", "ours_channels_last_in"),
]
COMPILED = ("compiled_nchw", "compiled_channels_last")


def timed_side_by_side(fns: dict[str, Callable[[], object]], min_run_time: float) -> dict[str, Timing]:
    """Medians of ``fns`` timed in at least ``MIN_ROUNDS`` paired rounds (a call slower than ``SLOW_CALL_S`` is timed
    once, one slower than ``ALONE_OVER`` times the median one on its own, three times); two warm-up calls, so that
    the faster, free of first-call costs (oneDNN building its kernels), says which are slow."""
    return interleaved_latencies(
        fns,
        min_run_time=min_run_time,
        warmup=2,
        min_runs=3,
        slow_call_s=SLOW_CALL_S,
        paired=True,
        alone_over=ALONE_OVER,
        min_rounds=MIN_ROUNDS,
    )


def speedup(row: dict, pass_name: str, baseline: str, ours: str) -> float:
    """``baseline``'s time over ``ours``'s in a layer row: the median of their per-round ratios, or the ratio of
    their medians in a row without them (results from before the rounds were paired)."""
    paired = row.get(f"paired_{pass_name}", {}).get(f"{baseline}/{ours}")
    return paired if paired is not None else row[f"{baseline}_{pass_name}_ms"] / row[f"{ours}_{pass_name}_ms"]


def forward(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return module(x)

    return run


def forward_backward(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """A training step of ``module`` fed by an upstream op, ``relu(x)``: the gradient ``module`` hands back for
    its input is consumed by the ReLU's backward (in its layout), as inside a network."""
    x = x.detach().requires_grad_(True)
    params = list(module.parameters())

    def run() -> object:
        out = module(torch.relu(x))
        return torch.autograd.grad(out, [x, *params], torch.ones_like(out))

    return run


def upstream_alone(x: torch.Tensor) -> Callable[[], object]:
    """The upstream ReLU's own forward+backward: the share of every ``forward_backward`` time that is not the layer."""
    x = x.detach().requires_grad_(True)

    def run() -> object:
        out = torch.relu(x)
        return torch.autograd.grad(out, [x], torch.ones_like(out))

    return run


def plain_block(ours: sepconv.SeparableConv2d) -> nn.Sequential:
    """PyTorch's separable block (depthwise conv, 1x1 conv) with ``ours``'s geometry and weights."""
    c, o, k, stride = ours.in_channels, ours.out_channels, ours.kernel_size[0], ours.stride[0]
    plain = nn.Sequential(nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False), nn.Conv2d(c, o, 1))
    plain.load_state_dict(
        {"0.weight": ours.depthwise.weight, "1.weight": ours.pointwise.weight, "1.bias": ours.pointwise.bias}
    )
    return plain


class ConvertAround(nn.Module):
    """What an NCHW caller pays to use a channels_last module in plain PyTorch: convert in, run, convert back."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=CL)).contiguous()


def layer_row(c: int, h: int, o: int, k: int, stride: int, batch: int, min_run_time: float) -> dict:
    torch._dynamo.reset()  # compiled anew for this row: static shapes, no cache limit reached over the rows
    torch.manual_seed(0)
    x = torch.randn(batch, c, h, h)
    ours = sepconv.SeparableConv2d(c, o, k, stride=stride, padding=k // 2)
    plain = plain_block(ours)
    plain_cl = copy.deepcopy(plain).to(memory_format=CL)  # a copy: .to() would change `plain` too
    standard = nn.Conv2d(c, o, k, stride, k // 2)
    standard_cl = copy.deepcopy(standard).to(memory_format=CL)
    separable_macs = sepconv.cost(ours, x.shape).macs
    standard_macs = sepconv.cost(standard, x.shape).macs
    row: dict = {
        "C": c,
        "H": h,
        "O": o,
        "K": k,
        "stride": stride,
        "batch": batch,
        "separable_macs": separable_macs,
        "standard_macs": standard_macs,
    }
    # The strategy's one-time decision (measurement) per pass, then the steady state.
    sepconv.clear_cpu_strategy_cache()
    for name, make in (("forward", forward), ("forward_backward", forward_backward)):
        start = time.perf_counter()
        make(ours, x)()
        row[f"ours_decision_ms_{name}"] = (time.perf_counter() - start) * 1e3
    row["ours_first_layout"] = plans_for(sepconv.cpu_strategy_decisions(), "contiguous")
    settle(ours, x)
    variants = {
        "torch_nchw": (plain, x),
        "torch_channels_last": (plain_cl, x.contiguous(memory_format=CL)),
        "torch_channels_last_converted": (ConvertAround(plain_cl), x),
        "ours": (ours, x),
        "ours_channels_last_in": (ours, x.contiguous(memory_format=CL)),
        "standard_nchw": (standard, x),
        "standard_channels_last": (standard_cl, x.contiguous(memory_format=CL)),
        # controls: the same work as torch_nchw / torch_channels_last on copies (their own weights, inputs and
        # buffers), timed in the same rounds; their ratio is how far apart this benchmark puts equal work
        "torch_nchw_again": (copy.deepcopy(plain), x.clone()),
        "torch_channels_last_again": (copy.deepcopy(plain_cl), x.contiguous(memory_format=CL)),
        "compiled_nchw": (torch.compile(copy.deepcopy(plain), dynamic=False), x),
        "compiled_channels_last": (
            torch.compile(copy.deepcopy(plain_cl), dynamic=False),
            x.contiguous(memory_format=CL),
        ),
    }
    for pass_name, make in (("forward", forward), ("forward_backward", forward_backward)):
        fns = {}
        for name, (module, inp) in variants.items():
            if name.startswith("standard") and standard_macs > STANDARD_MAX_MACS:
                row[f"{name}_{pass_name}_ms"] = None
            else:
                fns[name] = make(module, inp)
        want = fns["torch_nchw"]()
        for name in COMPILED:  # the compile: the first call of this pass (grad mode is part of the compiled graph)
            start = time.perf_counter()
            got = fns[name]()
            row[f"{name}_compile_ms_{pass_name}"] = (time.perf_counter() - start) * 1e3
            row[f"{name}_max_relative_difference_{pass_name}"] = max_relative_difference(got, want)
        if make is forward_backward:
            fns["upstream_relu_nchw"] = upstream_alone(x)
            fns["upstream_relu_channels_last"] = upstream_alone(x.contiguous(memory_format=CL))
        timings = timed_side_by_side(fns, min_run_time)
        for name, timing in timings.items():
            row[f"{name}_{pass_name}_ms"] = timing.median_ms
            row[f"{name}_{pass_name}_runs"] = timing.runs
        # timed after the rounds (on its own, or once): compared as ratios of medians
        row[f"outside_rounds_{pass_name}"] = sorted(name for name, timing in timings.items() if not timing.paired)
        row[f"paired_{pass_name}"] = {
            f"{baseline}/{ours}": paired_ratio(timings[baseline], timings[ours])
            for baseline, ours in PAIRS
            if baseline in timings and ours in timings
        }
        # 95% interval of each paired ratio from its per-round ratios; None: unpaired, or too few rounds to bound it
        row[f"paired_interval_{pass_name}"] = {
            f"{baseline}/{ours}": _finite(paired_ratio_interval(timings[baseline], timings[ours]))
            for baseline, ours in PAIRS
            if baseline in timings and ours in timings
        }
    # the plans in force at the end: close decisions were measured again at their layer's 20th call
    decisions = sepconv.cpu_strategy_decisions()
    row["ours_layout"] = plans_for(decisions, "contiguous")
    row["ours_channels_last_in_layout"] = plans_for(decisions, "channels_last")
    # "<depthwise input's layout>, batch <n>" (a chunked plan's own batch) -> the gradient algorithms decided there
    row["ours_depthwise_backward"] = {
        f"{key[7]}, batch {key[5][0]}": choice for key, choice in decisions.items() if key[0] == "depthwise_backward"
    }
    # a cost on top of the first call's: close decisions measured again by a timed call
    row["ours_recheck_ms"] = [m.seconds * 1e3 for m in sepconv.cpu_strategy_measurements() if m.kind == "recheck"]
    return row


def settle(ours: nn.Module, x: torch.Tensor) -> None:
    """Run ``ours`` through the calls that settle its plans, for both callers and passes: a decision with another
    plan close to it is measured again at the layer's ``_RECHECK_AFTER_CALLS``-th call (its recheck), which a
    batch-32 row's 7-10 timed rounds never reached: the rounds timed first-call decisions, where users' loops run
    the settled plan. A method change, not a speed-up: in the twelfth session's kept-memory run the rechecks also
    moved two batch-32 forwards to slower plans."""
    for make in (forward, forward_backward):
        for inp in (x, x.contiguous(memory_format=CL)):
            run = make(ours, inp)
            run()  # the decision, if not taken yet
            for _ in range(cpu_strategy._RECHECK_AFTER_CALLS):
                if not cpu_strategy._rechecks:
                    break
                run()


def plans_for(decisions: dict[tuple, str], source: str) -> dict[str, str]:
    """Pass -> the layout plan decided for inputs in ``source``'s layout (a layout key ends with source,
    training, batch independence, threads); a pass with nothing to choose (a channels_last input without
    chunks or a dense plan to time) has none."""
    return {
        "forward_backward" if key[-3] else "forward": plan
        for key, plan in decisions.items()
        if key[0] != "depthwise_backward" and key[-4] == source
    }


MODEL_VARIANTS = {
    # name: (CPU strategy, model/input layout, wrap with run_channels_last, torch.compile)
    "pytorch_nchw": ("off", "nchw", False, False),
    "pytorch_channels_last": ("off", "channels_last", False, False),
    "pytorch_compiled_channels_last": ("off", "channels_last", False, True),
    "ours_per_layer": ("auto", "nchw", False, False),
    "ours_run_channels_last": ("auto", "nchw", True, False),
}


ARCHS = {"small_vgg": small_vgg, "small_resnet": small_resnet}


def model_rows(min_run_time: float, archs: tuple[str, ...] = tuple(ARCHS)) -> list[dict]:
    rows = []
    for arch_name in archs:
        build = ARCHS[arch_name]
        for conv in ("standard", "separable"):
            # no sepconv layer inside a standard net: ours_per_layer would be pytorch_nchw again
            variants = [v for v in MODEL_VARIANTS if not (conv == "standard" and v == "ours_per_layer")]
            rows += model_variant_rows(arch_name, build, conv, variants, min_run_time)
    return rows


def model_variant_rows(arch: str, build: Callable, conv: str, variants: list[str], min_run_time: float) -> list[dict]:
    """One row per variant of ``build(conv)``: training step, inference at batch 64 and 1, each timed with the
    variants side by side."""
    torch.manual_seed(0)
    x64 = torch.randn(64, 1, 28, 28)
    y64 = torch.randint(0, 10, (64,))
    torch._dynamo.reset()  # this net's compiled variant compiled anew: static shapes
    setups = {variant: model_setup(build(conv), variant, x64, y64) for variant in variants}
    rows = {v: {"arch": arch, "conv": conv, "variant": v, "params": setups[v]["params"]} for v in variants}
    sepconv.clear_cpu_strategy_cache()
    for column in ("train_step_b64_ms", "inference_b64_ms", "inference_b1_ms"):
        fns = {v: setups[v][column] for v in variants}
        for variant in variants:  # a compiled variant's first call of each column is its compile: not timed
            if MODEL_VARIANTS[variant][3]:
                start = time.perf_counter()
                fns[variant]()
                rows[variant][column.replace("_ms", "_compile_ms")] = (time.perf_counter() - start) * 1e3
        for variant, timing in timed_side_by_side(fns, min_run_time).items():
            rows[variant][column] = timing.median_ms
    return list(rows.values())


def model_setup(model: nn.Module, variant: str, x64: torch.Tensor, y64: torch.Tensor) -> dict:
    """The variant's model (same initial weights for all) and its three timed calls, each under its CPU strategy."""
    strategy, layout, wrap, compiled = MODEL_VARIANTS[variant]
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    model = copy.deepcopy(model).to(memory_format=fmt)
    if wrap:
        sepconv.run_channels_last(model)
    if compiled:
        model = torch.compile(model, dynamic=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x64, x1 = x64.contiguous(memory_format=fmt), x64[:1].contiguous(memory_format=fmt)

    def train_step() -> None:
        with sepconv.use_cpu_strategy(strategy):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x64), y64).backward()
            optimizer.step()

    def inference(x: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            with sepconv.use_cpu_strategy(strategy), torch.no_grad():
                return model.eval()(x)

        return run

    return {
        "params": sum(p.numel() for p in model.parameters()),
        "train_step_b64_ms": train_step,
        "inference_b64_ms": inference(x64),
        "inference_b1_ms": inference(x1),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({row["batch"] for row in result["layers"]})
    passes = ("forward", "forward_backward")
    fig, axes = plt.subplots(len(passes), len(batches), figsize=(7 * len(batches), 8), squeeze=False)
    variants = [
        ("torch_nchw", "PyTorch NCHW"),
        ("torch_channels_last", "PyTorch channels_last"),
        ("ours", "sepconv (NCHW in/out)"),
        ("standard_best", "standard conv (best layout)"),
        ("compiled_best", "torch.compile of PyTorch's block (best layout)"),
    ]
    for i, pass_name in enumerate(passes):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            rows = [row for row in result["layers"] if row["batch"] == batch]
            labels = [
                f"{r['C']},{r['H']},{r['O']},k{r['K']}" + (f",s{r['stride']}" if r["stride"] > 1 else "") for r in rows
            ]
            width = 0.8 / len(variants)
            for v, (key, label) in enumerate(variants):
                values = []
                for r in rows:
                    base = r[f"torch_nchw_{pass_name}_ms"]
                    if key.endswith("_best"):  # the faster layout; nan where skipped or not measured
                        prefix = key.removesuffix("_best")
                        both = [r.get(f"{prefix}_{lay}_{pass_name}_ms") for lay in ("nchw", "channels_last")]
                        t = min(both) if None not in both else float("nan")
                    else:
                        t = r[f"{key}_{pass_name}_ms"]
                    values.append(base / t)
                offsets = [p + (v - (len(variants) - 1) / 2) * width for p in range(len(rows))]
                ax.bar(offsets, values, width, label=label)
            ax.set_yscale("log")
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel("speed vs PyTorch NCHW separable (higher is faster)")
            ax.set_title(f"{pass_name.replace('_', '+')}, batch {batch}")
            ax.legend(fontsize=7)
    fig.suptitle(
        f"Separable conv on CPU: {result['device']}, {result['threads']} threads, fp32, "
        f"allocator: {result['allocator']}"
    )
    atomic_write_png(fig, path, overwrite=True)


def layer_ratio(ratio: float, baseline_ms: float, ours_ms: float, upstream_ms: float | None) -> str:
    """``ratio`` (baseline over ours), and for a training step the ratio of the medians with the upstream ReLU's own
    time taken out of both (the layer's share; a gradient layout that slows the ReLU's backward stays with the
    layer that caused it)."""
    text = f"{ratio:.2f}x"
    if upstream_ms is None:
        return text
    return f"{text} ({(baseline_ms - upstream_ms) / (ours_ms - upstream_ms):.2f}x)"


def control_ratios(row: dict, pass_name: str) -> list[float]:
    """PyTorch NCHW and channels_last over their copies: equal work, 1.0 but for the benchmark's noise."""
    return [speedup(row, pass_name, f"torch_{layout}", f"torch_{layout}_again") for layout in ("nchw", "channels_last")]


def best_speedup(row: dict, pass_name: str, baselines: tuple[str, ...], ours: str) -> float:
    """The fastest of ``baselines`` over ``ours``: the smallest of their :func:`speedup` (per round, the closest)."""
    return min(speedup(row, pass_name, baseline, ours) for baseline in baselines)


def _finite(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None or math.isinf(interval[0]) else list(interval)


def speedup_interval(row: dict, pass_name: str, baselines: tuple[str, ...], ours: str) -> list[float] | None:
    """The 95% interval (from the per-round ratios) of :func:`best_speedup`'s ratio: that of the baseline it took;
    None in results without intervals, or where the rounds cannot bound the ratio."""
    baseline = min(baselines, key=lambda b: speedup(row, pass_name, b, ours))
    return row.get(f"paired_interval_{pass_name}", {}).get(f"{baseline}/{ours}")


def target_counts(result: dict) -> list[str]:
    """How many rows meet ``ours >= 0.95x`` the best PyTorch option of each caller (#7's first target); how often
    the controls (equal work timed twice) came out as far apart; how many misses ran the plan of the option
    they are compared with (ours' plan: contiguous = PyTorch NCHW, channels_last = PyTorch CL, with
    conversions for an NCHW caller; in training a depthwise backward of 25+ taps may still differ: FFT, flipped
    conv), where only the process state and our per-call Python separate the two; and (#7's second target) how
    often ours beat the standard conv in the caller's layout where that has at least 4x the MACs."""
    met = {"NCHW": 0, "channels_last": 0}
    misses: list[bool] = []  # per miss: whether ours ran the same convs
    sure_misses = 0  # misses whose ratio's 95% interval lies wholly below 0.95
    controls: list[float] = []
    control_intervals: list[list[float] | None] = []
    has_intervals = any("paired_interval_forward" in r for r in result["layers"])
    vs_standard: list[float] = []  # #7's second target: the standard conv over ours, each caller in its layout
    for r in result["layers"]:
        for p in ("forward", "forward_backward"):
            nchw, converted = r[f"torch_nchw_{p}_ms"], r[f"torch_channels_last_converted_{p}_ms"]
            same_plan = CONTIGUOUS if nchw <= converted else CHANNELS_LAST
            nchw_caller = best_speedup(r, p, ("torch_nchw", "torch_channels_last_converted"), "ours")
            compared = {
                "NCHW": (
                    nchw_caller,
                    r["ours_layout"][p] == same_plan,
                    speedup_interval(r, p, ("torch_nchw", "torch_channels_last_converted"), "ours"),
                ),
                "channels_last": (
                    speedup(r, p, "torch_channels_last", "ours_channels_last_in"),
                    r["ours_channels_last_in_layout"].get(p, CHANNELS_LAST) == CHANNELS_LAST,  # none: as given
                    speedup_interval(r, p, ("torch_channels_last",), "ours_channels_last_in"),
                ),
            }
            for caller, (ratio, same, interval) in compared.items():
                met[caller] += ratio >= 0.95
                misses += [same] if ratio < 0.95 else []
                sure_misses += ratio < 0.95 and interval is not None and interval[1] < 0.95
            controls += [min(c, 1 / c) for c in control_ratios(r, p)]
            control_intervals += [
                speedup_interval(r, p, (f"torch_{layout}",), f"torch_{layout}_again")
                for layout in ("nchw", "channels_last")
            ]
            if r[f"standard_nchw_{p}_ms"] is not None and r["standard_macs"] >= 4 * r["separable_macs"]:
                vs_standard += [speedup(r, p, "standard_nchw", "ours")]
                vs_standard += [speedup(r, p, "standard_channels_last", "ours_channels_last_in")]
    rows = len(controls) // 2
    doubt = ""
    if has_intervals:  # results from before the intervals were kept have none
        apart = sum(i is not None and not i[0] <= 1.0 <= i[1] for i in control_intervals)
        doubt = (
            f" Beyond the rounds' doubt (the 95% interval of the per-round ratios): {sure_misses} of the "
            f"{len(misses)} misses lie wholly below 0.95x; {apart} of the {len(controls)} controls exclude 1.0 "
            "(about 5% would, were rounds independent draws)."
        )
    return [
        f"Ours >= 0.95x the best PyTorch option: NCHW caller {met['NCHW']}/{rows} rows, channels_last caller "
        f"{met['channels_last']}/{rows}; {sum(misses)} of the {len(misses)} misses ran the same plan as the "
        f"PyTorch option they are compared with. Equal work timed twice (controls): {sum(c >= 0.95 for c in controls)}"
        f" of {len(controls)} within 0.95-1.05x of each other, the farthest {min(controls, default=1.0):.2f}x." + doubt,
        f"Ours faster than the standard conv in the caller's layout where it has >= 4x fewer MACs: "
        f"{sum(v > 1 for v in vs_standard)} of {len(vs_standard)}.",
    ]


def compiled_cells(row: dict, pass_name: str) -> str:
    """The table's torch.compile cells: its times in either layout, and ours (NCHW caller, channels_last caller)
    over them as paired ratios; dashes in results from before the compiled variants."""
    if f"compiled_nchw_{pass_name}_ms" not in row:
        return "- | -"
    times = " / ".join(f"{row[f'{name}_{pass_name}_ms']:.3f}" for name in COMPILED)
    ratios = " / ".join(
        f"{speedup(row, pass_name, name, ours):.2f}x"
        for name, ours in zip(COMPILED, ("ours", "ours_channels_last_in"), strict=True)
    )
    return f"{times} | {ratios}"


def compiled_counts(result: dict) -> list[str]:
    """How often ours came out at least 0.95x ``torch.compile`` of the PyTorch block, each caller in its layout;
    nothing for results from before the compiled variants."""
    passes = [(r, p) for r in result["layers"] for p in ("forward", "forward_backward")]
    if not passes or "compiled_nchw_forward_ms" not in passes[0][0]:
        return []
    nchw = [speedup(r, p, "compiled_nchw", "ours") for r, p in passes]
    cl = [speedup(r, p, "compiled_channels_last", "ours_channels_last_in") for r, p in passes]
    return [
        f"Ours >= 0.95x torch.compile of PyTorch's block in the caller's layout: NCHW caller "
        f"{sum(v >= 0.95 for v in nchw)}/{len(nchw)} rows (median {statistics.median(nchw):.2f}x), channels_last "
        f"caller {sum(v >= 0.95 for v in cl)}/{len(cl)} (median {statistics.median(cl):.2f}x)."
    ]


def markdown(result: dict) -> str:
    lines = [
        "| C,H,O,K,s | batch | pass | PyTorch NCHW ms | PyTorch CL ms | PyTorch CL+conversions ms | upstream ReLU ms "
        "| ours ms | ours / best PyTorch | ours / best for an NCHW caller | ours CL-in / PyTorch CL "
        "| standard best ms | ours vs standard | same work twice NCHW / CL | torch.compile NCHW / CL ms "
        "| ours / torch.compile NCHW / CL caller |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["layers"]:
        for p in ("forward", "forward_backward"):
            nchw, cl, cl_conv, ours, ours_cl = (
                r[f"{k}_{p}_ms"]
                for k in (
                    "torch_nchw",
                    "torch_channels_last",
                    "torch_channels_last_converted",
                    "ours",
                    "ours_channels_last_in",
                )
            )
            relu_nchw, relu_cl = (r.get(f"upstream_relu_{lay}_{p}_ms") for lay in ("nchw", "channels_last"))
            std = [r[f"standard_{lay}_{p}_ms"] for lay in ("nchw", "channels_last")]
            std_best = None if None in std else min(std)
            vs_standard = (
                None if std_best is None else best_speedup(r, p, ("standard_nchw", "standard_channels_last"), "ours")
            )
            best_pytorch = best_speedup(r, p, ("torch_nchw", "torch_channels_last"), "ours")
            nchw_caller = best_speedup(r, p, ("torch_nchw", "torch_channels_last_converted"), "ours")
            lines.append(
                f"| {r['C']},{r['H']},{r['O']},{r['K']},{r['stride']} | {r['batch']} | {p.replace('_', '+')} "
                f"| {nchw:.3f} | {cl:.3f} | {cl_conv:.3f} "
                f"| {'-' if relu_nchw is None else f'{relu_nchw:.3f} / {relu_cl:.3f}'} | {ours:.3f} "
                f"| {best_pytorch:.2f}x | {layer_ratio(nchw_caller, min(nchw, cl_conv), ours, relu_nchw)} "
                f"| {layer_ratio(speedup(r, p, 'torch_channels_last', 'ours_channels_last_in'), cl, ours_cl, relu_cl)} "
                f"| {'skipped' if std_best is None else f'{std_best:.3f}'} "
                f"| {'-' if vs_standard is None else f'{vs_standard:.2f}x'} "
                f"| {' / '.join(f'{ratio:.2f}x' for ratio in control_ratios(r, p))} | {compiled_cells(r, p)} |"
            )
    for verdict in target_counts(result) + compiled_counts(result):
        lines += ["", verdict]
    lines += [
        "",
        "| model | conv | variant | params | train step b64 ms | inference b64 ms | b1 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        lines.append(
            f"| {r['arch']} | {r['conv']} | {r['variant']} | {r['params']:,} "
            f"| {r['train_step_b64_ms']:.2f} | {r['inference_b64_ms']:.2f} | {r['inference_b1_ms']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, batch 1 and 4, small_vgg only")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    parser.add_argument("--keep-freed-memory", action="store_true", help="sepconv.keep_freed_memory() first")
    args = parser.parse_args()
    # before this process's first tensor: keep_freed_memory() asks PyTorch for huge pages, which it fixes then
    if args.keep_freed_memory and not sepconv.keep_freed_memory():
        parser.error("--keep-freed-memory needs Linux with glibc")
    stem = "cpu_keep_freed_memory" if args.keep_freed_memory else "cpu"
    shapes, batches = (QUICK_SHAPES, (1, 4)) if args.quick else (SHAPES, (1, 32))
    result = {
        "benchmark": "cpu",
        "device": device_name("cpu"),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "versions": versions(),
        "allocator": allocator_name(),
        "min_run_time_s": args.min_run_time,
        "layers": [],
        "models": [],
    }
    start = time.perf_counter()
    # Process warm-up, discarded: in a fresh process the first row ran PyTorch's own NCHW separable block at
    # 1.6-1.9 ms, the same row measured again at 0.6-0.8 ms (growing the heap, first kernel calls); a decision
    # made in that state can be the wrong one for the rest of the run.
    layer_row(*shapes[0], batches[0], min(args.min_run_time, 0.1))
    for batch in batches:
        for shape in shapes:
            row = layer_row(*shape, batch, args.min_run_time)
            print(json.dumps(row), flush=True)
            result["layers"].append(row)
    for row in model_rows(args.min_run_time, ("small_vgg",) if args.quick else tuple(ARCHS)):
        print(json.dumps(row), flush=True)
        result["models"].append(row)
    result["total_seconds"] = time.perf_counter() - start
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n", overwrite=True)
    plot(result, args.out / f"{stem}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
