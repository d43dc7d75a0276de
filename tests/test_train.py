"""Training API: learns real Fashion-MNIST, KD loss = its formula, distillation pulls, resume is exact."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

import sepconv
from sepconv.data import fashion_mnist
from sepconv.nets import small_vgg
from sepconv.train import (
    Batches,
    distillation_loss,
    evaluate,
    finetune,
    fit,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
)


def test_smoke_training_on_real_fashion_mnist_is_far_above_chance() -> None:
    torch.manual_seed(0)
    train, test = fashion_mnist("train"), fashion_mnist("test")
    model = small_vgg("separable", width=16)
    # 6,000 images x 3 epochs / batch 64: 282 SGD steps
    history = fit(model, Batches(train, 64, shuffle=True, limit=6000), epochs=3, lr=0.05)
    accuracy = evaluate(model, Batches(test, 500, limit=1000)).accuracy
    assert accuracy > 0.75, accuracy  # chance: 0.10
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(h["train_samples"] == 6000 for h in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def kd_by_hand(s: list[list[float]], t: list[list[float]], y: list[int], temp: float, alpha: float) -> float:
    """Hinton's KD loss from its definition, in plain Python floats."""

    def log_softmax(row: list[float]) -> list[float]:
        peak = max(row)
        log_z = peak + math.log(sum(math.exp(v - peak) for v in row))
        return [v - log_z for v in row]

    kl = ce = 0.0
    for s_row, t_row, label in zip(s, t, y, strict=True):
        log_ps = log_softmax([v / temp for v in s_row])
        log_pt = log_softmax([v / temp for v in t_row])
        kl += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_pt, log_ps, strict=True))
        ce -= log_softmax(s_row)[label]
    n = len(y)
    return alpha * temp**2 * kl / n + (1 - alpha) * ce / n


@pytest.mark.parametrize(("temp", "alpha"), [(1.0, 0.0), (4.0, 0.9), (2.5, 1.0), (0.5, 0.3)])
def test_distillation_loss_is_the_kd_formula(temp: float, alpha: float) -> None:
    gen = torch.Generator().manual_seed(int(temp * 10 + alpha * 100))
    s = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (6,), generator=gen)
    got = distillation_loss(s, t, y, temperature=temp, alpha=alpha)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(kd_by_hand(s.tolist(), t.tolist(), y.tolist(), temp, alpha), rel=1e-12)


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))


def tiny_data(n: int = 128, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def kl_to_teacher(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return distillation_loss(student(x), teacher(x), torch.zeros(len(x), dtype=torch.long), alpha=1.0).item()


def test_finetune_distils_from_the_teacher() -> None:
    torch.manual_seed(0)
    teacher = tiny_net()
    with torch.no_grad():
        teacher[4].weight.mul_(10)  # confident teacher: outputs far from uniform
    data = tiny_data()
    student, _ = sepconv.convert(teacher, rank=1)
    x = data.tensors[0]
    before = kl_to_teacher(student, teacher, x)
    distilled, plain = copy.deepcopy(student), copy.deepcopy(student)
    options = {"epochs": 10, "lr": 0.05, "weight_decay": 0}
    finetune(distilled, Batches(data, 32, shuffle=True), teacher=teacher, alpha=1.0, **options)
    finetune(plain, Batches(data, 32, shuffle=True), **options)  # the random labels only
    assert kl_to_teacher(distilled, teacher, x) < 0.3 * before < 0.5 * kl_to_teacher(plain, teacher, x)
    # with alpha=1 only the teacher speaks: other labels, the very same weights; with alpha<1 they count
    relabelled = TensorDataset(x, (data.tensors[1] + 1) % 3)
    for alpha, same in ((1.0, True), (0.5, False)):
        a, b = copy.deepcopy(student), copy.deepcopy(student)
        finetune(a, Batches(data, 32, shuffle=True), teacher=teacher, epochs=1, alpha=alpha)
        finetune(b, Batches(relabelled, 32, shuffle=True), teacher=teacher, epochs=1, alpha=alpha)
        assert torch.equal(a[0].pointwise.weight, b[0].pointwise.weight) is same


class Crash(Exception):
    pass


def test_resume_from_a_checkpoint_ends_with_the_same_weights(tmp_path: Path) -> None:
    data, test = tiny_data(96), tiny_data(32, seed=1)
    options: dict = {"epochs": 3, "lr": 0.1, "optimizer": "adamw", "schedule": "step", "test_loader": Batches(test, 16)}
    torch.manual_seed(0)
    straight = nn.Sequential(tiny_net(), nn.BatchNorm1d(3))
    expected = fit(straight, Batches(data, 20, shuffle=True, seed=5), checkpoint=tmp_path / "a.pt", **options)

    def crash_after_first(history: list[dict]) -> None:
        if len(history) == 1:
            raise Crash

    options["checkpoint"] = tmp_path / "b.pt"
    torch.manual_seed(0)
    model = nn.Sequential(tiny_net(), nn.BatchNorm1d(3))
    with pytest.raises(Crash):
        fit(model, Batches(data, 20, shuffle=True, seed=5), on_epoch=crash_after_first, **options)
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 1
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = nn.Sequential(tiny_net(), nn.BatchNorm1d(3))
    history = fit(resumed, Batches(data, 20, shuffle=True, seed=5), resume=True, **options)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    drop = ("train_seconds", "test_seconds")
    assert [{k: v for k, v in h.items() if k not in drop} for h in history] == [
        {k: v for k, v in h.items() if k not in drop} for h in expected
    ]
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 3
    with pytest.raises(FileExistsError, match=r"b\.pt exists; pass resume=True"):
        fit(resumed, Batches(data, 20), **options)  # a new run never replaces another run's checkpoint


def test_batches_follow_distributed_sampler_and_split_evaluation_exactly() -> None:
    data = TensorDataset(torch.arange(11.0), torch.arange(11))
    for epoch in (0, 1):
        shards = []
        for rank in (0, 1):
            batches = Batches(data, 4, shuffle=True, seed=3, rank=rank, world_size=2)
            batches.set_epoch(epoch)
            reference = DistributedSampler(range(11), num_replicas=2, rank=rank, shuffle=True, seed=3)
            reference.set_epoch(epoch)
            labels = [y for _, ys in batches for y in ys.tolist()]
            assert labels == list(reference) and len(batches) == 2
            shards.append(labels)
        assert len(shards[0]) == len(shards[1]) == 6 and set(shards[0] + shards[1]) == set(range(11))
    orders = []
    for epoch in (0, 1):
        single = Batches(data, 4, shuffle=True, seed=3)
        single.set_epoch(epoch)
        orders.append([y for _, ys in single for y in ys.tolist()])
    assert sorted(orders[0]) == list(range(11)) and orders[0] != orders[1]
    evaluation = [[y for _, ys in Batches(data, 4, rank=r, world_size=3) for y in ys.tolist()] for r in range(3)]
    assert sorted(y for shard in evaluation for y in shard) == list(range(11))  # every sample once, no padding
    assert [y for _, ys in Batches(data, 4, limit=5) for y in ys.tolist()] == [0, 1, 2, 3, 4]


def test_schedules_follow_their_closed_forms() -> None:
    def lrs(name: str, steps: int = 8) -> list[float]:
        opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=2.0)
        sched = make_scheduler(opt, name, total_steps=steps)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs("cosine") == pytest.approx([1 + math.cos(math.pi * i / 8) for i in range(8)])
    assert lrs("step") == pytest.approx([2.0] * 4 + [0.2] * 2 + [0.02] * 2)
    assert lrs("constant") == [2.0] * 8


def test_checkpoints_are_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "sepconv-checkpoint-1", "model": nn.Linear(1, 1)}, path)  # a pickled module inside
    with pytest.raises(ValueError, match="weights-only load"):
        load_checkpoint(path)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a sepconv training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, b: make_optimizer(m, "adam", lr=0.1), "optimizer must be one of 'sgd', 'adamw'; got 'adam'"),
        (lambda m, b: make_optimizer(m, lr=0.0), "lr must be a finite number > 0, got 0.0"),
        (lambda m, b: make_optimizer(m, lr=0.1, weight_decay=-1), "weight_decay must be >= 0"),
        (lambda m, b: fit(m, b, epochs=1, lr=0.1, schedule="linear"), "schedule must be one of 'cosine'"),
        (lambda m, b: fit(m, b, epochs=-1, lr=0.1), "epochs must be an int >= 0, got -1"),
        (lambda m, b: fit(m, b, epochs=1, lr=0.1, memory_format="nhwc"), "memory_format must be one of"),
        (lambda m, b: fit(m, b, epochs=1, lr=0.1, resume=True), "resume=True needs checkpoint="),
        (lambda m, b: Batches(tiny_data(), 0), "batch_size must be an int >= 1, got 0"),
        (lambda m, b: Batches(tiny_data(), 8, rank=2, world_size=2), r"rank must be in \[0, world_size=2\)"),
        (lambda m, b: Batches(tiny_data(), 8, limit=0), "limit must be >= 1"),
        (lambda m, b: distillation_loss(*[torch.zeros(1, 2)] * 2, torch.tensor([0]), temperature=0), "temperature"),
        (lambda m, b: distillation_loss(*[torch.zeros(1, 2)] * 2, torch.tensor([0]), alpha=1.5), r"alpha must be in"),
    ],
)
def test_bad_arguments_name_the_argument(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(tiny_net(), Batches(tiny_data(), 32))
