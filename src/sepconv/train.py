"""Training and fine-tuning: seeded mini-batches, SGD/AdamW, cosine or step LR, distillation, checkpoints.

:func:`fit` trains any classifier epoch by epoch; :func:`finetune` is the step after
:func:`sepconv.convert`: fine-tune the converted (student) model, optionally distilling from the
original (teacher). Everything is deterministic on CPU for a given seed and thread count: the data
order depends only on ``(seed, epoch)`` and the learning rate only on the step count, and a checkpoint
holds model, optimizer, scheduler, RNG state and history, so a resumed run ends with the same weights
as an uninterrupted one. Under ``torchrun`` (see :mod:`sepconv.distributed`) pass a
``DistributedDataParallel`` model and :class:`Batches` with ``rank``/``world_size``: losses and
accuracies are summed over the processes and only rank 0 writes the checkpoint.

>>> import torch
>>> from torch import nn
>>> from torch.utils.data import TensorDataset
>>> _ = torch.manual_seed(0)
>>> x = torch.randn(256, 1, 4, 4)
>>> data = TensorDataset(x, (x.mean((1, 2, 3)) > 0).long())  # learnable: the sign of the mean
>>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
>>> history = fit(model, Batches(data, 32, shuffle=True), epochs=3, lr=0.1, test_loader=Batches(data, 256))
>>> [round(h["test_accuracy"], 1) >= 0.9 for h in history]
[True, True, True]
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Dataset, DistributedSampler, Subset, TensorDataset

from sepconv.distributed import all_reduce_sums, broadcast_buffers
from sepconv.io import PathLike, atomic_write

__all__ = [
    "MEMORY_FORMATS",
    "OPTIMIZERS",
    "SCHEDULES",
    "Batches",
    "EpochStats",
    "distillation_loss",
    "evaluate",
    "finetune",
    "fit",
    "load_checkpoint",
    "make_optimizer",
    "make_scheduler",
    "save_checkpoint",
    "train_epoch",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
MEMORY_FORMATS = ("channels_last", "contiguous")
STEP_MILESTONES, STEP_GAMMA = (0.5, 0.75), 0.1  # "step": LR x0.1 at 50 % and 75 % of the steps
StepCallback = Callable[[int, int, "EpochStats"], None]  # (step, steps, running stats)


class Batches:
    """Mini-batches ``(inputs, labels)`` of an in-memory dataset, in an order fixed by ``(seed, epoch)``.

    With ``shuffle`` the order is ``DistributedSampler(seed=seed)``'s after ``set_epoch(epoch)``: each
    of ``world_size`` processes gets every ``world_size``-th index of one seeded permutation (padded
    so all get the same number of batches, as DistributedDataParallel needs). Without ``shuffle`` the
    data is split in order without padding (for evaluation: every sample counted once). ``limit``
    keeps the first ``limit`` samples. Batches are sliced from tensors, so they are cheap.

    >>> from torch.utils.data import TensorDataset
    >>> b = Batches(TensorDataset(torch.arange(10.0), torch.arange(10)), 4, shuffle=True, seed=1)
    >>> [y.tolist() for _, y in b] == [y.tolist() for _, y in b], len(b)  # same epoch: same order
    (True, 3)
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        limit: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.inputs, self.labels = _tensors(dataset)
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1 samples, got {limit}")
            self.inputs, self.labels = self.inputs[:limit], self.labels[:limit]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (each epoch its own permutation)."""
        self.epoch = epoch

    def indices(self) -> list[int]:
        """This process's sample indices for the current epoch, in order."""
        n = len(self.labels)
        if not self.shuffle:
            return list(range(self.rank, n, self.world_size))
        sampler = DistributedSampler(
            range(n), num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.seed
        )
        sampler.set_epoch(self.epoch)
        return list(sampler)

    def __len__(self) -> int:
        n = len(self.labels)
        per_rank = math.ceil(n / self.world_size) if self.shuffle else len(range(self.rank, n, self.world_size))
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.tensor(self.indices(), dtype=torch.long)
        for batch in order.split(self.batch_size):
            yield self.inputs[batch], self.labels[batch]


def _tensors(dataset: Dataset[Any]) -> tuple[Tensor, Tensor]:
    """(inputs, labels) of a dataset: its ``images``/``labels``, a TensorDataset's, or stacked items."""
    if isinstance(dataset, Subset):
        inputs, labels = _tensors(dataset.dataset)
        index = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return inputs[index], labels[index]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1].long()
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if isinstance(images, Tensor) and isinstance(labels, Tensor):
        return images, labels.long()
    if not isinstance(dataset, Sized):
        raise TypeError(f"dataset must have a length, got {type(dataset).__name__}")
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


@dataclass(frozen=True)
class EpochStats:
    """Mean loss and accuracy (0-1) over ``samples`` samples (all processes), and wall-clock ``seconds``."""

    loss: float
    accuracy: float
    samples: int
    seconds: float


def make_optimizer(
    model: nn.Module, name: str = "sgd", *, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4
) -> Optimizer:
    """SGD with (non-Nesterov) ``momentum`` or AdamW; weight decay on weights, not on biases/norms.

    >>> make_optimizer(nn.Linear(2, 2), "adamw", lr=1e-3).__class__.__name__
    'AdamW'
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}; got {name!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def make_scheduler(optimizer: Optimizer, name: str = "cosine", *, total_steps: int) -> LambdaLR:
    """Per-step LR factor: ``"cosine"`` decays to 0 over ``total_steps``; ``"step"`` multiplies by 0.1 at
    50 % and 75 % of them; ``"constant"`` keeps it. A closed form of the step count, so resuming is exact.

    >>> opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    >>> sched = make_scheduler(opt, "step", total_steps=4)
    >>> lrs = []
    >>> for _ in range(4):
    ...     lrs.append(sched.get_last_lr()[0]); opt.step(); sched.step()
    >>> lrs
    [1.0, 1.0, 0.1, 0.010000000000000002]
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}; got {name!r}")
    total = max(int(total_steps), 1)

    def factor(step: int) -> float:
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        if name == "step":
            return STEP_GAMMA ** sum(step >= m * total for m in STEP_MILESTONES)
        return 1.0

    return LambdaLR(optimizer, factor)


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float = 4.0, alpha: float = 0.9
) -> Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``alpha·T²·KL(p_t ‖ p_s) + (1-alpha)·CE(student, labels)``.

    ``p_t``, ``p_s`` are the softmaxes of teacher and student logits divided by ``T``; the KL term is
    summed over classes and averaged over the batch; ``T²`` keeps its gradients' scale independent of T.

    >>> s = torch.tensor([[2.0, 0.0]])
    >>> float(distillation_loss(s, s, torch.tensor([0]), alpha=1.0))  # the student already agrees
    0.0
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def _to(x: Tensor, device: torch.device | None, memory_format: str) -> Tensor:
    x = x.to(device) if device is not None else x
    if memory_format == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: Optimizer,
    *,
    scheduler: LambdaLR | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    memory_format: str = "channels_last",
    on_step: StepCallback | None = None,
) -> EpochStats:
    """One pass over ``batches`` in train mode: cross-entropy (or :func:`distillation_loss` from ``teacher``,
    run in eval mode), one optimizer and scheduler step per batch. Inputs go to the model's device."""
    device = _device_of(model)
    model.train()
    if teacher is not None:
        teacher.eval()
    steps = len(batches) if isinstance(batches, Sized) else 0
    loss_sum, correct, count, start = 0.0, 0, 0, time.perf_counter()
    for step, (inputs, labels) in enumerate(batches, 1):
        inputs, labels = _to(inputs, device, memory_format), labels.to(device)
        logits = model(inputs)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(inputs)
            loss = distillation_loss(logits, teacher_logits, labels, temperature=temperature, alpha=alpha)
        else:
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += float(loss.detach()) * len(labels)
        correct += int((logits.detach().argmax(1) == labels).sum())
        count += len(labels)
        if on_step is not None:
            on_step(step, steps, EpochStats(loss_sum / count, correct / count, count, time.perf_counter() - start))
    broadcast_buffers(model)
    return _reduced(loss_sum, correct, count, start, device)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, memory_format: str = "channels_last"
) -> EpochStats:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) over ``batches`` (summed over processes).

    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.eye(3), torch.tensor([0, 1, 1]))
    >>> evaluate(nn.Identity(), Batches(data, 2)).accuracy  # argmax of row i is i: 2 of 3 right
    0.6666666666666666
    """
    device = _device_of(model) if next(iter(model.parameters()), None) is not None else None
    was_training = model.training
    model.eval()
    loss_sum, correct, count, start = 0.0, 0, 0, time.perf_counter()
    for inputs, labels in batches:
        inputs, labels = _to(inputs, device, memory_format), labels.to(device) if device else labels
        logits = model(inputs)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    model.train(was_training)
    return _reduced(loss_sum, correct, count, start, device or torch.device("cpu"))


def _reduced(loss_sum: float, correct: int, count: int, start: float, device: torch.device) -> EpochStats:
    loss_sum, correct_f, count_f = all_reduce_sums([loss_sum, correct, count], device)
    count = int(count_f)
    if count == 0:
        raise ValueError("no batches: the data loader is empty")
    return EpochStats(loss_sum / count, correct_f / count, count, time.perf_counter() - start)


def save_checkpoint(
    path: PathLike,
    *,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LambdaLR | None,
    epoch: int,
    history: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write model, optimizer, scheduler and RNG state, ``epoch`` (completed), history and ``extra`` (JSON)
    atomically (overwriting): a run killed at any moment leaves the previous or the new checkpoint whole.

    Only tensors, numbers and strings are stored, so :func:`load_checkpoint` reads it with
    ``torch.load(weights_only=True)``.
    """
    state = {
        "format": "sepconv-checkpoint-1",
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history_json": json.dumps(history),
        "extra_json": json.dumps(extra or {}),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True)


def load_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read a :func:`save_checkpoint` file (weights only, never a pickle); ``history``/``extra`` decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise ValueError(f"cannot read checkpoint {path} (weights-only load): {error}") from error
    if not isinstance(state, dict) or state.get("format") != "sepconv-checkpoint-1":
        raise ValueError(f"{path} is not a sepconv training checkpoint")
    state["history"] = json.loads(state.pop("history_json"))
    state["extra"] = json.loads(state.pop("extra_json"))
    return state


def _restore(state: dict[str, Any], model: nn.Module, optimizer: Optimizer, scheduler: LambdaLR | None) -> None:
    _unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _set_epoch(loader: object, epoch: int) -> None:
    for target in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(target, "set_epoch"):
            target.set_epoch(epoch)  # type: ignore[union-attr]
            return


def fit(
    model: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    *,
    epochs: int,
    lr: float,
    optimizer: str = "sgd",
    schedule: str = "cosine",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    test_loader: Iterable[tuple[Tensor, Tensor]] | None = None,
    memory_format: str = "channels_last",
    checkpoint: PathLike | None = None,
    resume: bool = False,
    extra: dict[str, Any] | None = None,
    is_main: bool = True,
    on_step: Callable[[int, int, int, EpochStats], None] | None = None,
    on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` (on its device) for ``epochs``; return one record per epoch.

    Each record holds ``epoch``, ``lr`` (at the epoch's start), ``train_loss``, ``train_accuracy``,
    ``train_seconds`` and, with ``test_loader``, ``test_loss``, ``test_accuracy``, ``test_seconds``.
    ``train_loader`` yields ``(inputs, labels)``; its ``set_epoch(epoch)`` (or its sampler's) is called
    before each epoch. With ``checkpoint`` a checkpoint is written after every epoch (by ``is_main``
    only; an existing one is never replaced by a new run); ``resume=True`` continues from it
    (``FileNotFoundError`` if missing). ``extra`` (JSON data)
    is stored in the checkpoint. ``on_step(epoch, step, steps, running)`` and ``on_epoch(history)``
    report progress. ``memory_format="channels_last"`` feeds 4-d inputs (and expects the model) in
    channels_last. See the module docstring for an example.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {', '.join(map(repr, MEMORY_FORMATS))}; got {memory_format!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint= (the file to resume from)")
    if checkpoint is not None and not resume and is_main and Path(checkpoint).exists():
        raise FileExistsError(f"checkpoint {checkpoint} exists; pass resume=True to continue that run, or remove it")
    if memory_format == "channels_last":
        model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(train_loader) if isinstance(train_loader, Sized) else 0
    if steps_per_epoch == 0 and schedule != "constant":
        raise ValueError(f"schedule {schedule!r} needs a train_loader with a length (> 0 batches)")
    opt = make_optimizer(model, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = make_scheduler(opt, schedule, total_steps=epochs * steps_per_epoch)
    history: list[dict[str, Any]] = []
    if resume:
        state = load_checkpoint(checkpoint)  # type: ignore[arg-type]
        _restore(state, model, opt, scheduler)
        history = state["history"][: state["epoch"]]
    for epoch in range(len(history), epochs):
        _set_epoch(train_loader, epoch)
        lr_now = opt.param_groups[0]["lr"]
        step_cb = None if on_step is None else (lambda s, n, r, e=epoch: on_step(e + 1, s, n, r))
        stats = train_epoch(
            model,
            train_loader,
            opt,
            scheduler=scheduler,
            teacher=teacher,
            temperature=temperature,
            alpha=alpha,
            memory_format=memory_format,
            on_step=step_cb,
        )
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr_now}
        record.update({f"train_{k}": v for k, v in asdict(stats).items() if k != "samples"})
        record["train_samples"] = stats.samples
        if test_loader is not None:
            test = evaluate(_unwrap(model), test_loader, memory_format=memory_format)
            record.update(test_loss=test.loss, test_accuracy=test.accuracy, test_seconds=test.seconds)
        history.append(record)
        if checkpoint is not None and is_main:
            save_checkpoint(
                checkpoint,
                model=model,
                optimizer=opt,
                scheduler=scheduler,
                epoch=epoch + 1,
                history=history,
                extra=extra,
            )
        if on_epoch is not None:
            on_epoch(history)
    return history


def finetune(
    student: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    *,
    teacher: nn.Module | None = None,
    epochs: int,
    lr: float = 0.01,
    temperature: float = 4.0,
    alpha: float = 0.9,
    **options: Any,
) -> list[dict[str, Any]]:
    """Fine-tune a converted model — the step after :func:`sepconv.convert` — optionally distilling from
    ``teacher`` (the original model): the loss is :func:`distillation_loss` with ``temperature`` and
    ``alpha``, or plain cross-entropy without a teacher. A small ``lr`` (default 0.01, cosine decay)
    keeps the inherited weights; ``options`` go to :func:`fit` (``test_loader``, ``optimizer``, ...).
    The teacher is moved to the student's device (and memory format) in place.

    >>> from torch.utils.data import TensorDataset
    >>> teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    >>> import sepconv
    >>> student, _ = sepconv.convert(teacher, rank=1)
    >>> data = TensorDataset(torch.randn(64, 1, 3, 3), torch.randint(0, 2, (64,)))
    >>> history = finetune(student, Batches(data, 16, shuffle=True), teacher=teacher, epochs=1)
    >>> history[0]["train_samples"]
    64
    """
    if teacher is not None:
        teacher = teacher.to(_device_of(student))
        if options.get("memory_format", "channels_last") == "channels_last":
            teacher.to(memory_format=torch.channels_last)
    return fit(
        student, train_loader, epochs=epochs, lr=lr, teacher=teacher, temperature=temperature, alpha=alpha, **options
    )
