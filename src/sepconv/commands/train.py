"""Train a small CNN on Fashion-MNIST: from scratch, or convert a trained one to separable and fine-tune it.

Writes into --out: checkpoint.pt after every epoch (atomically; --resume continues from it to the same
final weights as an uninterrupted run), metrics.json (per-epoch loss/accuracy, seconds, params, MACs)
and, at the end, model.safetensors. Only rank 0 writes under torchrun (DistributedDataParallel).
Examples:
  sepconv train --arch small_vgg --conv standard --epochs 10 --out runs/vgg
  sepconv train --arch small_vgg --from runs/vgg --convert rank --rank 1 --distill --epochs 2 --out runs/vgg_r1
  torchrun --nproc_per_node=2 -m sepconv train --arch small_resnet --epochs 5 --out runs/resnet
Training runs the whole model in channels_last (the fastest layout for these nets on CPU); inputs then
never reach the timing-based CPU strategy, which is turned off besides, so runs are deterministic.
The command owns its process, so it calls sepconv.keep_freed_memory() before its first tensor (glibc; the same
weights, less time faulting in fresh pages; --no-keep-freed-memory leaves the allocator alone).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from sepconv.analyze import analyze
from sepconv.bench import allocator_name, device_name, versions
from sepconv.cli import UsageError
from sepconv.convert import convert
from sepconv.cpu_allocator import keep_freed_memory
from sepconv.cpu_strategy import use_cpu_strategy
from sepconv.data import fashion_mnist
from sepconv.distributed import DistInfo, init_distributed, shutdown
from sepconv.io import atomic_write_text, load_state_dict, save_state_dict
from sepconv.nets import CONV_KINDS, small_resnet, small_vgg
from sepconv.train import MEMORY_FORMATS, OPTIMIZERS, SCHEDULES, Batches, evaluate, fit, load_checkpoint

HELP = "train a small CNN on Fashion-MNIST, or convert a trained one and fine-tune it (with distillation)"

ARCHS: dict[str, Callable[..., nn.Module]] = {"small_vgg": small_vgg, "small_resnet": small_resnet}
STEM = "0.*"  # the first conv sees one input channel: never converted (as in nets' separable twins)
CHECKPOINT, METRICS, WEIGHTS = "checkpoint.pt", "metrics.json", "model.safetensors"
INPUT_SHAPE = (1, 1, 28, 28)
EVAL_BATCH = 1000
LR_SCRATCH, LR_FINETUNE = 0.05, 0.01


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float | None, *, low_open: bool) -> Callable[[str], float]:
    bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{']' if high is not None else ')'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {bounds}, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a number in {bounds}, got {text}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--arch", required=True, choices=tuple(ARCHS), help="network (sepconv.nets)")
    parser.add_argument(
        "--conv", choices=CONV_KINDS, default="standard", help="3x3 convs (with --from: the original's)"
    )
    parser.add_argument("--width", type=_int_at_least(1), default=32, help="channels of the first stage (default 32)")
    parser.add_argument("--from", dest="from_", metavar="CHECKPOINT", help="trained weights: a run's --out or a file")
    parser.add_argument("--convert", choices=("rank", "energy"), help="with --from: convert by --rank or --energy")
    parser.add_argument("--rank", type=_int_at_least(1), metavar="R", help="depth multiplier of converted layers")
    parser.add_argument("--energy", type=_float_in(0, 1, low_open=True), metavar="E", help="kept share of σ², (0, 1]")
    parser.add_argument("--distill", action="store_true", help="with --from: distil from the original (teacher)")
    positive, unit = _float_in(0, None, low_open=True), _float_in(0, 1, low_open=False)
    parser.add_argument("--temperature", type=positive, default=4.0, help="KD temperature (default 4)")
    parser.add_argument("--alpha", type=unit, default=0.9, help="KD weight of the soft loss (default 0.9)")
    parser.add_argument("--epochs", type=_int_at_least(0), default=10, help="epochs (0: with --from, evaluate only)")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=128, help="per process (default 128)")
    parser.add_argument("--lr", type=_float_in(0, None, low_open=True), help="peak LR (default 0.05; --from: 0.01)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="SGD (momentum 0.9) or AdamW")
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="LR schedule, per step")
    parser.add_argument("--weight-decay", type=_float_in(0, None, low_open=False), default=5e-4, help="on weights")
    parser.add_argument("--seed", type=_int_at_least(0), default=0, help="model init and data order")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--memory-format", choices=MEMORY_FORMATS, default="channels_last", help="layout of the run")
    parser.add_argument("--data", metavar="DIR", help="folder of the Fashion-MNIST IDX .gz files (default: Debian's)")
    parser.add_argument("--limit-train", type=_int_at_least(1), metavar="N", help="use the first N training images")
    parser.add_argument("--limit-test", type=_int_at_least(1), metavar="N", help="use the first N test images")
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoint, metrics, weights")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--force", action="store_true", help="start over in an --out that holds a previous run")
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        help="sepconv.keep_freed_memory() before the first tensor (default: where glibc allows; same weights)",
    )


def run(args: argparse.Namespace) -> int:
    execute(args)
    return 0


def execute(args: argparse.Namespace) -> nn.Module:
    """Do what ``sepconv train`` does; return the trained model (for tests and scripts)."""
    _check_args(args)
    out = Path(args.out)
    device = _device(args.device)
    # before this process's first tensor, so that PyTorch's large tensors get the huge pages it asks for
    if args.keep_freed_memory is not False:  # None, the default: where glibc allows
        applied = keep_freed_memory()
        if args.keep_freed_memory and not applied:
            raise UsageError("--keep-freed-memory needs Linux with glibc (sepconv.keep_freed_memory() did not apply)")
    info = init_distributed(device.type)
    try:
        if device.type == "cuda" and info.world_size > 1:
            device = torch.device("cuda", info.local_rank)
        config = _config(args, device, info)
        previous = _check_out(out, args, config)
        return _train(args, config, previous, out, device, info)
    finally:
        shutdown()


def _check_args(args: argparse.Namespace) -> None:
    if args.from_ is None:
        for flag, value in (("--convert", args.convert), ("--distill", args.distill or None)):
            if value is not None:
                raise UsageError(f"{flag} needs --from CHECKPOINT (the trained model to convert)")
        if args.epochs == 0:
            raise UsageError("--epochs must be >= 1 when training from scratch (0 only with --from)")
    elif not Path(args.from_).exists():
        raise FileNotFoundError(f"--from {args.from_}: no such file or run folder")
    elif args.conv == "separable" and args.convert:
        raise UsageError("--convert needs a --conv standard model (a separable one has no KxK convs to convert)")
    if args.convert == "rank" and args.rank is None:
        raise UsageError("--convert rank needs --rank R")
    if args.convert == "energy" and args.energy is None:
        raise UsageError("--convert energy needs --energy E")
    for flag, value, kind in (("--rank", args.rank, "rank"), ("--energy", args.energy, "energy")):
        if value is not None and args.convert != kind:
            raise UsageError(f"{flag} needs --convert {kind}")
    if args.resume and args.force:
        raise UsageError("--resume and --force exclude each other (continue the run, or start over)")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def _config(args: argparse.Namespace, device: torch.device, info: DistInfo) -> dict[str, Any]:
    """The run's settings: all must match on --resume (any change would change the result)."""
    lr = args.lr if args.lr is not None else (LR_FINETUNE if args.from_ else LR_SCRATCH)
    return {
        "arch": args.arch,
        "conv": args.conv,
        "width": args.width,
        "from": str(Path(args.from_).resolve()) if args.from_ else None,
        "convert": args.convert,
        "rank": args.rank,
        "energy": args.energy,
        "distill": args.distill,
        "temperature": args.temperature if args.distill else None,
        "alpha": args.alpha if args.distill else None,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": lr,
        "optimizer": args.optimizer,
        "schedule": args.schedule,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "limit_train": args.limit_train,
        "limit_test": args.limit_test,
        "memory_format": args.memory_format,
        "device": device.type,
        "world_size": info.world_size,
    }


def _check_out(out: Path, args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint to resume (None: start afresh); refuses to mix runs or overwrite one unasked."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; it must be a folder (created if missing)")
    checkpoint = out / CHECKPOINT
    if args.resume:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out} to continue from")
        previous = load_checkpoint(checkpoint)
        saved = previous["extra"].get("config", {})
        diffs = [f"{key} {saved.get(key)!r} -> {config[key]!r}" for key in config if saved.get(key) != config[key]]
        if diffs:
            raise UsageError(f"--resume: settings differ from the run in {out}: {'; '.join(diffs)}")
        return previous
    existing = [name for name in (CHECKPOINT, METRICS, WEIGHTS) if (out / name).exists()]
    if existing and not args.force:
        raise FileExistsError(f"{out} holds a previous run ({', '.join(existing)}); pass --resume or --force")
    return None


def _load_original(args: argparse.Namespace, model: nn.Module) -> None:
    path = Path(args.from_)
    if path.is_dir():
        path = path / WEIGHTS
    try:
        model.load_state_dict(load_state_dict(path))
    except RuntimeError as error:  # key or shape mismatch: name what was expected
        lines = str(error).splitlines()
        first = (lines[1] if len(lines) > 1 else lines[0]).strip()
        first = first if len(first) <= 160 else first[:157] + "..."
        raise UsageError(
            f"--from {args.from_} does not hold --arch {args.arch} --conv {args.conv} --width {args.width} "
            f"weights: {first}"
        ) from None


def _train(
    args: argparse.Namespace,
    config: dict[str, Any],
    previous: dict[str, Any] | None,
    out: Path,
    device: torch.device,
    info: DistInfo,
) -> nn.Module:
    torch.manual_seed(config["seed"])
    train_set = fashion_mnist("train", root=args.data)
    test_set = fashion_mnist("test", root=args.data)
    model = ARCHS[args.arch](args.conv, width=args.width)
    teacher, conversion = None, None
    if args.from_:
        _load_original(args, model)
        if args.distill:
            teacher = copy.deepcopy(model).eval().to(device)
        if args.convert:
            example = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
            model, report = convert(
                model.eval(), rank=args.rank, energy=args.energy, exclude=STEM, example_inputs=example
            )
            conversion = {"ranks": report.ranks, "output_error": report.output_error, **report.totals}
    params = sum(p.numel() for p in model.parameters())
    macs = analyze(model.eval(), INPUT_SHAPE).total.macs
    model.to(device)
    if info.is_main and previous is None:
        for name in (CHECKPOINT, METRICS, WEIGHTS):  # --force: no stale file of the old run may survive
            (out / name).unlink(missing_ok=True)

    shard = {"seed": config["seed"], "rank": info.rank, "world_size": info.world_size}
    train_batches = Batches(train_set, args.batch_size, shuffle=True, limit=args.limit_train, **shard)
    test_batches = Batches(test_set, EVAL_BATCH, limit=args.limit_test, **shard)
    layout = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    model.to(memory_format=layout)
    if teacher is not None:
        teacher.to(memory_format=layout)
    with use_cpu_strategy("off"):
        if previous is not None:
            initial = previous["extra"].get("initial")
        elif args.from_:
            stats = evaluate(model, test_batches, memory_format=args.memory_format)
            initial = {"test_loss": stats.loss, "test_accuracy": stats.accuracy}
        else:
            initial = None
        if info.world_size > 1:
            trained: nn.Module = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        else:
            trained = model
        metrics = {
            "command": "sepconv train",
            "config": config,
            "device": device_name(device),
            "dtype": "float32",
            "threads": torch.get_num_threads(),
            "allocator": allocator_name(),  # the regime the seconds were measured in
            "versions": versions(),
            "params": params,
            "macs_per_image": macs,
            "conversion": conversion,
            "initial": initial,
        }
        display = _Display(info.is_main, args.epochs)

        def on_epoch(history: list[dict[str, Any]]) -> None:
            if info.is_main:
                _write_metrics(out, metrics, history, args.epochs)
                display.epoch_done(history[-1])

        with display.progress:
            history = fit(
                trained,
                train_batches,
                epochs=args.epochs,
                lr=config["lr"],
                optimizer=args.optimizer,
                schedule=args.schedule,
                weight_decay=args.weight_decay,
                teacher=teacher,
                temperature=args.temperature,
                alpha=args.alpha,
                test_loader=test_batches,
                memory_format=args.memory_format,
                checkpoint=out / CHECKPOINT if args.epochs else None,
                resume=previous is not None,
                extra={"config": config, "initial": initial},
                is_main=info.is_main,
                on_step=display.step,
                on_epoch=on_epoch,
            )
    if info.is_main:
        save_state_dict(model.state_dict(), out / WEIGHTS, overwrite=True)
        _write_metrics(out, metrics, history, args.epochs)
        display.finish(out, history, initial)
    return model


def _write_metrics(out: Path, metrics: dict[str, Any], history: list[dict[str, Any]], epochs: int) -> None:
    seconds = [h["train_seconds"] for h in history]
    data = {
        **metrics,
        "epochs": history,
        "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else None,
        "final_test_accuracy": history[-1]["test_accuracy"]
        if history
        else (metrics["initial"] or {}).get("test_accuracy"),
        "complete": len(history) == epochs,
    }
    atomic_write_text(out / METRICS, json.dumps(data, indent=2) + "\n", overwrite=True)


class _Display:
    """Rich progress bars (a terminal on rank 0 only) and one summary line per epoch."""

    def __init__(self, enabled: bool, epochs: int) -> None:
        self.console = Console()
        if not self.console.is_terminal:
            self.console = Console(width=120)
        self.enabled, self.epochs, self.tasks = enabled, epochs, {}
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}/" + str(epochs)),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:6.2%}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not (enabled and self.console.is_terminal),
            transient=True,
        )

    def step(self, epoch: int, step: int, steps: int, running: Any) -> None:
        if self.progress.disable:
            return
        if epoch not in self.tasks:
            self.tasks[epoch] = self.progress.add_task("train", total=steps, epoch=epoch, loss=0.0, acc=0.0)
        self.progress.update(self.tasks[epoch], completed=step, loss=running.loss, acc=running.accuracy)

    def epoch_done(self, record: dict[str, Any]) -> None:
        self.console.print(
            f"epoch {record['epoch']}/{self.epochs}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.2%} ({record['train_seconds']:.1f} s), "
            f"test acc {record['test_accuracy']:.2%}",
            highlight=False,
        )

    def finish(self, out: Path, history: list[dict[str, Any]], initial: dict[str, Any] | None) -> None:
        if initial is not None:
            self.console.print(
                f"before training (right after conversion): test acc {initial['test_accuracy']:.2%}", highlight=False
            )
        final = f"final test acc {history[-1]['test_accuracy']:.2%}; " if history else ""
        self.console.print(f"{final}wrote {out / WEIGHTS} and {out / METRICS}", highlight=False)
