"""Measure the CPU strategy's decisions for a model now and save them, so that later runs skip the measuring.

Runs a copy of the model once on a random input of --input's shape (an inference call and a training step)
and writes the decisions of its sepconv layers to --out; load them with SEPCONV_CPU_STRATEGY_FILE=FILE or
sepconv.load_cpu_strategy_decisions(FILE). Decide in the allocator regime the model will run in: with
--keep-freed-memory where the process calls sepconv.keep_freed_memory() (the regimes rank plans differently).
Example: sepconv tune mypackage.models:build --input 64,3,224,224 --out cpu_strategy.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sepconv.commands.analyze import parse_shape
from sepconv.cpu_allocator import keep_freed_memory
from sepconv.cpu_layout import run_channels_last
from sepconv.cpu_strategy import cpu_strategy_measurements, describe_decision
from sepconv.cpu_strategy_file import save_cpu_strategy_decisions
from sepconv.cpu_tune import tune_cpu_strategy
from sepconv.models import load_model

HELP = "measure a model's CPU strategy decisions (layouts, backward and pointwise algorithms) now and save them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="torchvision:NAME, timm:NAME or package.module:callable")
    parser.add_argument("--input", required=True, metavar="SHAPE", help="input shape, e.g. 64,3,224,224")
    parser.add_argument("--out", required=True, metavar="FILE", help="JSON file of the decisions")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--weights", metavar="FILE", help="safetensors or weights-only torch state_dict")
    parser.add_argument("--only", choices=("training", "inference"), help="decide for one mode only (default: both)")
    parser.add_argument(
        "--channels-last", action="store_true", help="tune the model as sepconv.run_channels_last(model) runs it"
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="decide with sepconv.keep_freed_memory() in force, as a process that calls it will run (glibc only)",
    )


def run(args: argparse.Namespace) -> int:
    shape = parse_shape(args.input)
    # before the model's tensors: PyTorch takes the huge-page setting it brings at its first CPU allocation
    if args.keep_freed_memory and not keep_freed_memory():
        raise ValueError("--keep-freed-memory needs Linux with glibc (sepconv.keep_freed_memory() did not apply)")
    model = load_model(args.spec, weights=args.weights)
    if args.channels_last:
        run_channels_last(model)
    if Path(args.out).exists() and not args.force:  # before minutes of measuring, not after
        raise FileExistsError(f"{args.out} exists; pass --force to replace it")
    start, measured_before = time.perf_counter(), len(cpu_strategy_measurements())
    made = tune_cpu_strategy(model, shape, training=args.only != "inference", inference=args.only != "training")
    seconds = time.perf_counter() - start
    # per decision: its measurement and recheck (a layout's includes its depthwise backward's and pointwise convs')
    spent: dict[tuple, float] = {}
    for measurement in cpu_strategy_measurements()[measured_before:]:
        spent[measurement.key] = spent.get(measurement.key, 0.0) + measurement.seconds
    saved = save_cpu_strategy_decisions(args.out, overwrite=args.force)
    table = Table(title=f"{len(made)} decisions made in {seconds:.1f} s; {saved} saved to {args.out}")
    table.add_column("layer")
    table.add_column("input")
    for column in ("mode", "decision"):  # whole: one line each, however long the layer's name
        table.add_column(column, no_wrap=True)
    table.add_column("measured s", justify="right")
    for key, decision in made.items():
        table.add_row(*describe_decision(key), decision, f"{spent.get(key, 0.0):.2f}")
    Console(width=120).print(table)
    return 0
