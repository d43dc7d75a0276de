"""Per-layer parameters, MACs, bias adds and bytes of any model; what it would cost with separable convs.

Counting runs on the meta device (nothing is computed, nothing downloaded); --measure times the model
and its separable twin on --device. Example: sepconv analyze torchvision:resnet18 --input 1,3,224,224 --what-if
"""

from __future__ import annotations

import argparse
import io
from dataclasses import replace

import torch
from rich.console import Console
from torch import nn

from sepconv.analyze import Report, analyze
from sepconv.cli import UsageError
from sepconv.io import atomic_write_text, check_output
from sepconv.models import load_model
from sepconv.render import to_csv, to_markdown, to_rich

HELP = "per-layer cost report of a model (params, MACs, bytes), what-if separable, measured latency"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="torchvision:NAME, timm:NAME or package.module:callable")
    parser.add_argument("--input", required=True, metavar="SHAPE", help="input shape, e.g. 1,3,224,224")
    parser.add_argument("--weights", metavar="FILE", help="safetensors or weights-only torch state_dict")
    parser.add_argument(
        "--ranks", metavar="REPORT", help="a `sepconv convert --report` JSON: analyze the converted model"
    )
    parser.add_argument("--what-if", action="store_true", help="cost of replacing standard convs by separable ones")
    parser.add_argument("--backward", action="store_true", help="also count the backward pass (training step)")
    parser.add_argument("--measure", action="store_true", help="time the model and its separable twin")
    parser.add_argument("--device", default="cpu", help="device for --measure (default cpu; e.g. cuda)")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per model (--measure)")
    parser.add_argument("--depth", type=int, metavar="K", help="sum rows per module-name prefix of K parts")
    parser.add_argument("--max-rows", type=int, metavar="N", help="table: show the first N rows only")
    parser.add_argument("--format", choices=("table", "json", "md", "csv"), default="table", help="output format")
    parser.add_argument("--out", metavar="FILE", help="write the output to FILE instead of the terminal")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def parse_shape(text: str, option: str = "--input") -> tuple[int, ...]:
    """``'1,3,224,224'`` or ``'1x3x224x224'`` as a tuple of positive ints (else a usage error naming ``option``).

    >>> parse_shape("1,3,224,224"), parse_shape("2x8")
    ((1, 3, 224, 224), (2, 8))
    """
    parts = text.replace("x", ",").replace("×", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise UsageError(f"{option} must be positive ints separated by commas, e.g. 1,3,224,224; got {text!r}")
    return shape


def run(args: argparse.Namespace) -> int:
    shape = parse_shape(args.input)
    if args.measure and args.min_run_time <= 0:
        raise UsageError(f"--min-run-time must be > 0 seconds, got {args.min_run_time}")
    for flag in ("depth", "max_rows"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    device = parse_device(args.device) if args.measure else "cpu"
    if args.out:
        check_output(args.out, overwrite=args.force)  # refuse a directory or an existing file before the work
    model = _build(args.spec, args.weights, args.ranks, real=args.measure or args.weights is not None)
    model.train(args.backward)
    report = analyze(
        model,
        shape,
        backward=args.backward,
        what_if=args.what_if,
        measure=args.measure,
        device=device,
        min_run_time=args.min_run_time,
    )
    if args.depth is not None:
        report = replace(report, rows=tuple(report.by_depth(args.depth)))
    if args.format == "table" and not args.out:
        console = Console()
        if not console.is_terminal:  # piped: rich would assume 80 columns
            console = Console(width=100)
        console.print(to_rich(report, max_rows=args.max_rows))
        return 0
    text = _render(report, args.format, args.max_rows)
    if args.out:
        atomic_write_text(args.out, text, overwrite=args.force)
    else:
        print(text, end="")
    return 0


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device {name!r} is not a device name (e.g. cpu, cuda, cuda:1)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def _build(spec: str, weights: str | None, ranks: str | None, *, real: bool) -> nn.Module:
    """The model; built on the meta device (instant, no memory) unless real weights are needed."""
    if not real:
        try:
            with torch.device("meta"):
                return load_model(spec, ranks=ranks)
        except (NotImplementedError, RuntimeError):  # a constructor that reads tensor values: build it for real
            pass
    return load_model(spec, weights=weights, ranks=ranks)


def _render(report: Report, fmt: str, max_rows: int | None) -> str:
    if fmt == "json":
        return report.to_json() + "\n"
    if fmt == "md":
        return to_markdown(report)
    if fmt == "csv":
        return to_csv(report)
    buffer = io.StringIO()
    Console(file=buffer, width=100, force_terminal=False).print(to_rich(report, max_rows=max_rows))
    return buffer.getvalue()
