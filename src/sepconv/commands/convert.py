"""Convert a model's KxK convolutions into depthwise separable ones, keeping their trained weights.

Writes the converted state_dict (safetensors) and, with --report, a JSON report, both atomically.
Example: sepconv convert torchvision:resnet18 --weights r18.safetensors --energy 0.9 --input 1,3,224,224
--out r18_sep.safetensors --report r18_sep.json.
To load the result in Python: convert the same architecture with rank=report["ranks"], init="random",
then load_state_dict (see sepconv.convert).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console

from sepconv.cli import UsageError
from sepconv.commands.analyze import parse_shape
from sepconv.convert import convert
from sepconv.io import atomic_write_text, save_state_dict
from sepconv.models import load_model

HELP = "turn a model's KxK convs into separable ones by SVD, keeping its weights; save weights and report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="torchvision:NAME, timm:NAME or package.module:callable")
    parser.add_argument("--weights", metavar="FILE", help="safetensors or weights-only torch state_dict to convert")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--rank", type=int, metavar="R", help="depth multiplier of every converted layer (>= 1)")
    choice.add_argument("--energy", type=float, metavar="E", help="per layer, keep this share of σ² (0 < E <= 1)")
    choice.add_argument("--budget", type=float, metavar="B", help="converted layers cost <= B x their original cost")
    parser.add_argument("--budget-on", choices=("params", "macs"), default="params", help="what --budget counts")
    parser.add_argument("--include", nargs="+", action="extend", metavar="PAT", help="convert only matching names")
    parser.add_argument("--exclude", nargs="+", action="extend", metavar="PAT", help="never convert matching names")
    parser.add_argument("--min-kernel-size", type=int, default=2, metavar="K", help="skip kernels smaller (default 2)")
    parser.add_argument("--init", choices=("decompose", "random"), default="decompose", help="weights of new layers")
    parser.add_argument("--input", metavar="SHAPE", help="example input shape, e.g. 1,3,224,224: MACs, output error")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors", help="converted state_dict")
    parser.add_argument("--report", metavar="FILE.json", help="write the per-layer report as JSON")
    parser.add_argument("--force", action="store_true", help="overwrite --out and --report if they exist")


def run(args: argparse.Namespace) -> int:
    out, report_path = Path(args.out), Path(args.report) if args.report else None
    _check_outputs(out, report_path, args.force)
    if args.budget is not None and args.budget_on == "macs" and args.input is None:
        raise UsageError("--budget-on macs needs --input (the example input shape)")
    example = None
    if args.input is not None:
        example = torch.randn(parse_shape(args.input), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # without --weights the model's random init is reproducible
    model = load_model(args.spec, weights=args.weights).eval()
    converted, report = convert(
        model,
        rank=args.rank,
        energy=args.energy,
        budget=args.budget,
        budget_on=args.budget_on,
        include=args.include,
        exclude=args.exclude,
        min_kernel_size=args.min_kernel_size,
        init=args.init,
        inplace=True,
        example_inputs=example,
    )
    save_state_dict(converted.state_dict(), out, overwrite=args.force)
    if report_path is not None:
        data = {"spec": args.spec, "weights": args.weights, **report.to_dict()}
        atomic_write_text(report_path, json.dumps(data, indent=2) + "\n", overwrite=args.force)
    console = Console()
    if not console.is_terminal:  # piped: rich would assume 80 columns
        console = Console(width=120)
    console.print(report.table())
    written = f"wrote {out}" + (f" and {report_path}" if report_path else "")
    console.print(f"{written}. Reload: convert(architecture, rank=<report ranks>, init='random').", highlight=False)
    return 0


def _check_outputs(out: Path, report: Path | None, force: bool) -> None:
    """Refuse before any work (so that no output is written when another would fail): wrong suffix, the
    same file twice, a directory (even with --force), or existing files without --force."""
    if out.suffix != ".safetensors":
        raise UsageError(f"--out must be a .safetensors file, got {str(out)!r}")
    if report is not None and report.resolve() == out.resolve():
        raise UsageError("--out and --report must be different files")
    for option, path in (("--out", out), ("--report", report)):
        if path is not None and path.is_dir():
            raise UsageError(f"{option} {path} is a directory; give a file path")
        if path is not None and path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass --force to replace it")
