"""What sepconv.accelerate(model) would change: every separable chain it fuses, every depthwise conv it routes and
every other conv whose eval-mode BatchNorm it folds.

Lists the changes (the modules each replaces, the BatchNorms folded into the weights and those kept for their
batch statistics, the fused activation, a kept squeeze-excitation) and the BatchNorms left to run on their own;
--check SHAPE runs the original and the accelerated model on one random input of that shape and prints the largest
difference of the outputs, relative to the largest output; --measure SHAPE times the original and the accelerated
model side by side on this machine, each also run in channels_last (``sepconv.run_channels_last``: NCHW in and out),
and prints the medians and each variant's speedup over the original, paired round by round, with its 95% interval;
--with-compile adds torch.compile of both models, as built and in channels_last (their compile, the first call, is
reported and not timed).
Nothing is written. Example: sepconv accelerate torchvision:efficientnet_b0 --check 1,3,64,64 --measure 8,3,224,224
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from sepconv.accelerate import Acceleration, accelerate
from sepconv.bench import Timing, device_name, interleaved_latencies, paired_ratio, paired_ratio_interval, versions
from sepconv.cli import UsageError
from sepconv.commands.analyze import parse_device, parse_shape
from sepconv.cpu_layout import map_tensors, run_channels_last
from sepconv.models import load_model

HELP = "list the separable chains sepconv.accelerate would fuse in a model, and check the outputs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="torchvision:NAME, timm:NAME or package.module:callable")
    parser.add_argument("--weights", metavar="FILE", help="safetensors or weights-only torch state_dict")
    parser.add_argument(
        "--backend", choices=("auto", "torch", "triton"), default="auto", help="the modules' backend (default auto)"
    )
    parser.add_argument(
        "--train", action="store_true", help="the model in training mode (BatchNorms use batch statistics)"
    )
    parser.add_argument("--check", metavar="SHAPE", help="compare outputs on a random input, e.g. 1,3,224,224")
    parser.add_argument(
        "--measure", metavar="SHAPE", help="time original vs accelerated on a random input, e.g. 8,3,224,224"
    )
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per variant (--measure)")
    parser.add_argument(
        "--with-compile",
        action="store_true",
        help="--measure: also torch.compile of both models, as built and channels_last inside (compiles first)",
    )
    parser.add_argument("--device", default="cpu", help="device for --check and --measure (default cpu; e.g. cuda)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format")


def run(args: argparse.Namespace) -> int:
    shape, timed_shape = (
        _image_shape(text, option) for text, option in ((args.check, "--check"), (args.measure, "--measure"))
    )
    if not (math.isfinite(args.min_run_time) and args.min_run_time > 0):
        raise UsageError(f"--min-run-time must be a positive number of seconds, e.g. 1.0; got {args.min_run_time}")
    if args.with_compile and timed_shape is None:
        raise UsageError("--with-compile times torch.compile beside the other variants: it needs --measure SHAPE")
    device = parse_device(args.device)
    model = load_model(args.spec, weights=args.weights).train(args.train).to(device)
    fast, changes = accelerate(model, backend=args.backend)
    try:
        error = None if shape is None else relative_difference(model, fast, shape, seed=0)
    except RuntimeError as failure:  # e.g. --backend triton on a CPU without Triton's interpreter
        raise UsageError(f"--check failed: {str(failure).splitlines()[0]}") from failure
    try:
        measurement = (
            None
            if timed_shape is None
            else measure(model, fast, timed_shape, min_run_time=args.min_run_time, compiled=args.with_compile)
        )
    except RuntimeError as failure:
        raise UsageError(f"--measure failed: {str(failure).splitlines()[0]}") from failure
    left = norms_left(model, changes)
    measured = None if measurement is None else timing_record(measurement, timed_shape, device, args.train)
    if args.format == "json":
        rows = [change_record(change) for change in changes]
        record = {"model": args.spec, "backend": args.backend, "training": args.train, "changes": rows}
        record |= {"norms_left": left, "max_relative_difference": error, "measured": measured}
        print(json.dumps(record, indent=1))
        return 0
    console = Console() if Console().is_terminal else Console(width=140)  # piped: rich would assume 80 columns
    console.print(changes_table(changes, f"{args.spec} ({'training' if args.train else 'eval'}, {args.backend})"))
    shown = ", ".join(left[:NORMS_SHOWN]) + (
        f", ... ({len(left) - NORMS_SHOWN} more)" if len(left) > NORMS_SHOWN else ""
    )
    console.print(f"BatchNorms left to run on their own: {len(left)}" + (f" ({shown})" if left else ""))
    if error is not None:
        console.print(f"outputs on a random {tuple(shape)} input: largest difference / largest output = {error:.2e}")
    if measured is not None:
        console.print(timings_table(measured))
    return 0


def _image_shape(text: str | None, option: str) -> tuple[int, ...] | None:
    shape = None if text is None else parse_shape(text, option)
    if shape is not None and len(shape) != 4:
        raise UsageError(f"{option} must be an image batch's shape N,C,H,W, e.g. 1,3,224,224; got {text!r}")
    return shape


# the variants --measure times: each a model, and how it runs (as built; channels_last inside, NCHW in and out;
# compiled by torch.compile as built or channels_last inside, --with-compile only: on CPU, compiled channels_last
# models were the fastest, and the layout must be equal on both sides to read what accelerating adds)
VARIANTS = {
    "original": ("original", "as built"),
    "accelerated": ("accelerated", "as built"),
    "original, channels_last": ("original", "channels_last"),
    "accelerated, channels_last": ("accelerated", "channels_last"),
}
COMPILED_VARIANTS = {
    "original, torch.compile": ("original", "compiled"),
    "accelerated, torch.compile": ("accelerated", "compiled"),
    "original, channels_last, torch.compile": ("original", "channels_last, compiled"),
    "accelerated, channels_last, torch.compile": ("accelerated", "channels_last, compiled"),
}


@dataclass(frozen=True)
class Measured:
    """What :func:`measure` timed: each variant's :class:`~sepconv.bench.Timing`, and the seconds each compiled
    variant's first call took (the compile, outside the timing)."""

    timings: dict[str, Timing]
    compile_seconds: dict[str, float]


def measure(
    model: nn.Module, fast: nn.Module, shape: tuple[int, ...], *, min_run_time: float, compiled: bool = False
) -> Measured:
    """Call times of the :data:`VARIANTS` (and with ``compiled`` the :data:`COMPILED_VARIANTS`) on one random input
    of ``shape``, in paired rounds (:func:`sepconv.bench.interleaved_latencies`): a forward without gradients in eval
    mode, a forward and backward (of the outputs' sum) in training mode. The channels_last and compiled variants run
    on copies of the models (run_channels_last converts in place)."""
    device = next(model.parameters()).device
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    models = {"original": model, "accelerated": fast}
    prepare = {"as built": lambda m: m, "channels_last": lambda m: run_channels_last(copy.deepcopy(m))}
    prepare["compiled"] = lambda m: torch.compile(copy.deepcopy(m))
    prepare["channels_last, compiled"] = lambda m: torch.compile(run_channels_last(copy.deepcopy(m)))
    variants = VARIANTS | (COMPILED_VARIANTS if compiled else {})
    calls = {name: _step(prepare[how](models[which]), x, model.training) for name, (which, how) in variants.items()}
    compile_seconds = {}
    for name in (name for name in variants if name in COMPILED_VARIANTS):
        start = time.perf_counter()
        calls[name]()
        compile_seconds[name] = time.perf_counter() - start
    timings = interleaved_latencies(calls, min_run_time=min_run_time, warmup=3, paired=True, min_rounds=15)
    return Measured(timings, compile_seconds)


def _step(model: nn.Module, x: torch.Tensor, training: bool) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            model(x)

    def training_step() -> None:
        sum(t.sum() for t in output_tensors(model(x))).backward()
        model.zero_grad(set_to_none=True)

    return training_step if training else forward


def timing_record(measured: Measured, shape: tuple[int, ...], device: torch.device, training: bool) -> dict:
    """:func:`measure`'s timings as JSON-ready fields: each variant's median, interquartile range and rounds, its
    speedup over the original (the median over rounds of the original's time over its own) with a 95% interval, a
    compiled variant's compile time, and where they were measured."""
    original = measured.timings["original"]
    return {
        "input_shape": list(shape),
        "step": "forward and backward (training mode)" if training else "forward (eval mode, no gradients)",
        "device": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "versions": versions(),
        "variants": {
            name: {
                "median_ms": timing.median_ms,
                "iqr_ms": timing.iqr_ms,
                "rounds": timing.runs,
                "samples_ms": list(timing.samples_ms),  # one per round, in the order the rounds ran
                "speedup": paired_ratio(original, timing),
                "speedup_interval": paired_ratio_interval(original, timing),
            }
            | ({"compile_seconds": measured.compile_seconds[name]} if name in measured.compile_seconds else {})
            for name, timing in measured.timings.items()
        },
    }


def timings_table(record: dict) -> Table:
    """:func:`timing_record`'s fields as a table, one row per variant."""
    threads = f", {record['threads']} threads" if record["threads"] else ""
    table = Table(
        title=f"{record['step']}, input {tuple(record['input_shape'])}, {record['device']}{threads}, "
        f"torch {record['versions']['torch']}: medians of {record['variants']['original']['rounds']} paired rounds"
    )
    for column in ("variant", "median ms", "IQR ms", "speedup over original", "95% interval"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    compiles = []
    for name, row in record["variants"].items():
        low, high = row["speedup_interval"] or (math.nan, math.nan)
        table.add_row(
            name, f"{row['median_ms']:.3f}", f"{row['iqr_ms']:.3f}", f"{row['speedup']:.2f}x", f"{low:.2f}-{high:.2f}x"
        )
        if "compile_seconds" in row:
            compiles.append(f"{name} {row['compile_seconds']:.1f} s")
    if compiles:
        table.caption = "first call (the compile), not timed: " + ", ".join(compiles)
    return table


NORMS_SHOWN = 5  # paths of the norms left that the table's footer names


def norms_left(model: nn.Module, changes: list[Acceleration]) -> list[str]:
    """Paths (in ``model``, as the changes name them) of the BatchNorms the accelerated model still runs as modules
    of their own: neither folded into a conv nor kept in a fused module (whose kernel computes them)."""
    handled = {path for change in changes for path in (*change.folded_norms, *change.batch_norms)}
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return [path for path, module in model.named_modules() if isinstance(module, norms) and path not in handled]


def change_record(change: Acceleration) -> dict:
    """One change as JSON-ready fields."""
    return {
        "kind": change.kind,
        "replaced": list(change.replaced),
        "folded_norms": list(change.folded_norms),
        "batch_norms": list(change.batch_norms),
        "activation": change.activation,
        "excitation": change.excitation,
        "reason": change.reason,  # why a "skipped" change was not made (hooks, call paths a trace cannot see)
    }


def changes_table(changes: list[Acceleration], title: str) -> Table:
    kinds = Counter(change.kind for change in changes)
    table = Table(
        title=f"{title}: {kinds['fused separable']} chains fused, {kinds['depthwise']} depthwise convs routed, "
        f"{kinds['folded conv']} other convs with their norm folded"
        + (f", {kinds['skipped']} skipped" if kinds["skipped"] else "")
    )
    columns = ["kind", "first module", "modules", "norms folded", "norms kept", "activation", "excitation"]
    reasons = any(change.reason for change in changes)
    for column in columns + ["reason"] * reasons:
        table.add_column(column, justify="right" if column in ("modules", "norms folded", "norms kept") else "left")
    for change in changes:
        cells = [
            change.kind,
            change.replaced[0],
            str(len(change.replaced)),
            str(len(change.folded_norms)),
            str(len(change.batch_norms)),
            change.activation or "",
            "yes" if change.excitation else "",
        ]
        table.add_row(*cells, *[change.reason or ""] * reasons)
    return table


@torch.no_grad()
def relative_difference(model: nn.Module, fast: nn.Module, shape: tuple[int, ...], seed: int) -> float:
    """``max |fast(x) - model(x)| / max |model(x)|`` on one random ``x``, the largest over the outputs where the
    model returns several (GoogLeNet's auxiliary logits in training); in training mode both run on copies of the same
    running statistics (each call updates them) and the same random numbers (dropout)."""
    device = next(model.parameters()).device
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    torch.manual_seed(seed)
    wanted = output_tensors(model(x))
    torch.manual_seed(seed)
    return max_relative_difference(fast(x), wanted)


def max_relative_difference(got: object, want: object) -> float:
    """``max |g - w| / max |w|`` for each pair of tensors of two outputs (a tensor, or the tensors in their tuples,
    lists and dicts, as :func:`output_tensors` finds them), the largest over the pairs.

    >>> max_relative_difference((torch.tensor([1.0, 2.0]), torch.tensor([4.0])), (torch.ones(2), torch.ones(1)))
    3.0
    """
    pairs = zip(output_tensors(got), output_tensors(want), strict=True)
    return max(((g - w).abs().max() / w.abs().max().clamp_min(torch.finfo(w.dtype).tiny)).item() for g, w in pairs)


def output_tensors(output: object) -> list[torch.Tensor]:
    """The tensors in a model's output: itself, or those in its tuples (named ones included), lists and dicts.

    >>> [t.shape for t in output_tensors({"out": torch.zeros(2), "aux": (torch.zeros(3), None)})]
    [torch.Size([2]), torch.Size([3])]
    """
    found: list[torch.Tensor] = []
    map_tensors(output, lambda t: found.append(t) or t)
    return found
