"""What sepconv.accelerate(model) would change: every separable chain it fuses, every depthwise conv it routes and
every other conv whose eval-mode BatchNorm it folds.

Lists the changes (the modules each replaces, the BatchNorms folded into the weights and those kept for their
batch statistics, the fused activation, a kept squeeze-excitation) and the BatchNorms left to run on their own;
--check SHAPE runs the original and the accelerated model on one random input of that shape and prints the largest
difference of the outputs, relative to the largest output. Nothing is written. Example: sepconv accelerate
torchvision:efficientnet_b0 --check 1,3,64,64
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from sepconv.accelerate import Acceleration, accelerate
from sepconv.cli import UsageError
from sepconv.commands.analyze import parse_device, parse_shape
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
    parser.add_argument("--device", default="cpu", help="device for --check (default cpu; e.g. cuda)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format")


def run(args: argparse.Namespace) -> int:
    shape = None if args.check is None else parse_shape(args.check)
    if shape is not None and len(shape) != 4:
        raise UsageError(f"--check must be an image batch's shape N,C,H,W, e.g. 1,3,224,224; got {args.check!r}")
    device = parse_device(args.device)
    model = load_model(args.spec, weights=args.weights).train(args.train).to(device)
    fast, changes = accelerate(model, backend=args.backend)
    try:
        error = None if shape is None else relative_difference(model, fast, shape, seed=0)
    except RuntimeError as failure:  # e.g. --backend triton on a CPU without Triton's interpreter
        raise UsageError(f"--check failed: {str(failure).splitlines()[0]}") from failure
    left = norms_left(model, changes)
    if args.format == "json":
        rows = [change_record(change) for change in changes]
        print(json.dumps({"model": args.spec, "backend": args.backend, "training": args.train, "changes": rows,
                          "norms_left": left, "max_relative_difference": error}, indent=1))  # fmt: skip
        return 0
    console = Console() if Console().is_terminal else Console(width=140)  # piped: rich would assume 80 columns
    console.print(changes_table(changes, f"{args.spec} ({'training' if args.train else 'eval'}, {args.backend})"))
    shown = ", ".join(left[:NORMS_SHOWN]) + (
        f", ... ({len(left) - NORMS_SHOWN} more)" if len(left) > NORMS_SHOWN else ""
    )
    console.print(f"BatchNorms left to run on their own: {len(left)}" + (f" ({shown})" if left else ""))
    if error is not None:
        console.print(f"outputs on a random {tuple(shape)} input: largest difference / largest output = {error:.2e}")
    return 0


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
    }


def changes_table(changes: list[Acceleration], title: str) -> Table:
    kinds = Counter(change.kind for change in changes)
    table = Table(
        title=f"{title}: {kinds['fused separable']} chains fused, {kinds['depthwise']} depthwise convs routed, "
        f"{kinds['folded conv']} other convs with their norm folded"
    )
    for column in ("kind", "first module", "modules", "norms folded", "norms kept", "activation", "excitation"):
        table.add_column(column, justify="right" if column in ("modules", "norms folded", "norms kept") else "left")
    for change in changes:
        table.add_row(
            change.kind,
            change.replaced[0],
            str(len(change.replaced)),
            str(len(change.folded_norms)),
            str(len(change.batch_norms)),
            change.activation or "",
            "yes" if change.excitation else "",
        )
    return table


@torch.no_grad()
def relative_difference(model: nn.Module, fast: nn.Module, shape: tuple[int, ...], seed: int) -> float:
    """``max |fast(x) - model(x)| / max |model(x)|`` on one random ``x``; in training mode both run on copies of
    the same running statistics (each call updates them) and the same random numbers (dropout)."""
    device = next(model.parameters()).device
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    torch.manual_seed(seed)
    want = model(x)
    torch.manual_seed(seed)
    got = fast(x)
    return ((got - want).abs().max() / want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)).item()
