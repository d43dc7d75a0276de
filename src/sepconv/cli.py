"""The ``sepconv`` command line: a thin shell over the Python API.

Each subcommand lives in ``sepconv.commands.<name>`` and exposes ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Errors a user can fix print one
line and exit with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import sepconv

COMMANDS = ("demo", "analyze", "convert", "train", "tune", "accelerate")


class UsageError(Exception):
    """A problem with what the user asked for, reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sepconv", description="Depthwise separable convolutions for PyTorch.")
    parser.add_argument("--version", action="version", version=f"sepconv {sepconv.__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        command = importlib.import_module(f"sepconv.commands.{name}")
        sub_parser = sub.add_parser(name, help=command.HELP, description=command.__doc__)
        command.add_arguments(sub_parser)
        sub_parser.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sepconv`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    # Only errors our code raises for what the user gave (a RuntimeError may be our bug: keep its traceback);
    # IsADirectoryError: sepconv.io.check_output refuses an output path naming a directory.
    except (UsageError, ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError) as error:
        if args.debug:
            raise
        print(f"sepconv {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
