"""Make the CPU strategy's decisions for a model now, rather than in its first calls.

Each sepconv layer measures its plan on the first call of every configuration (:mod:`sepconv.cpu_strategy`),
which puts up to seconds into a model's first training step. :func:`tune_cpu_strategy` runs a copy of the
model once — an inference call and a training step — so that every layer decides then (twice where a close
decision is owed its second measurement, see :mod:`sepconv.cpu_strategy`); the model itself,
its weights, gradients and BatchNorm statistics are left as they are. Save the result with
:func:`sepconv.save_cpu_strategy_decisions` to skip the measurements in later processes too
(``sepconv tune`` does both from the command line).

>>> import torch, sepconv
>>> from sepconv.nets import small_vgg
>>> sepconv.clear_cpu_strategy_cache()
>>> made = tune_cpu_strategy(small_vgg("separable"), (4, 1, 28, 28), training=False)
>>> sorted({key[0] for key in made})  # the layers' plans, their pointwise convs' algorithms
['SeparableConv2d', 'pointwise']
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sepconv import cpu_layout, cpu_strategy
from sepconv.layers import _DepthwiseConv, _SeparableConv

__all__ = ["tune_cpu_strategy"]


def tune_cpu_strategy(
    model: nn.Module,
    input: Tensor | Sequence[int],
    *,
    training: bool = True,
    inference: bool = True,
) -> dict[tuple, str]:
    """Run a copy of ``model`` on ``input`` (a CPU tensor, or a shape for a random one) so that its sepconv
    layers make their CPU strategy decisions: an inference call (eval mode, no gradients) if ``inference``,
    a training step (train mode, forward and backward of the outputs' sum) if ``training``. Returns the
    decisions this made, as :func:`sepconv.cpu_strategy_decisions` lists them (none for configurations
    already decided, or under ``set_cpu_strategy("off")``)."""
    if not (training or inference):
        raise ValueError("tune_cpu_strategy needs training=True or inference=True (or both)")
    if not any(isinstance(m, (_DepthwiseConv, _SeparableConv)) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no sepconv depthwise or separable layer: nothing to decide "
            "(sepconv.convert makes one)"
        )
    example = _example_input(model, input)
    twin = copy.deepcopy(model)
    before = cpu_strategy.cpu_strategy_decisions()
    _run(twin, example, training=training, inference=inference)
    if cpu_strategy._recheck_on_next_call():  # close decisions owe a second measurement: take it now, too
        _run(twin, example, training=training, inference=inference)
    after = cpu_strategy.cpu_strategy_decisions()
    return {key: plan for key, plan in after.items() if before.get(key) != plan}


def _run(twin: nn.Module, example: Tensor, *, training: bool, inference: bool) -> None:
    """An inference call and/or a training step of ``twin`` (a copy: its weights and statistics may change)."""
    if inference:
        with torch.no_grad():
            twin.eval()(example)
    if training:
        outputs: list[Tensor] = []
        cpu_layout.map_tensors(twin.train()(example), lambda t: outputs.append(t) or t)  # tuples, lists, dicts
        total = sum(t.float().sum() for t in outputs if t.requires_grad)
        if not isinstance(total, Tensor):
            raise ValueError(f"{type(twin).__name__}'s outputs need no gradient: no training step to tune")
        total.backward()


def _example_input(model: nn.Module, input: Tensor | Sequence[int]) -> Tensor:
    if isinstance(input, Tensor):
        if not input.is_cpu:
            raise ValueError(f"input must be a CPU tensor (the CPU strategy's decisions), got one on {input.device}")
        return input.detach()
    shape = tuple(input)
    if not shape or not all(isinstance(size, int) and size >= 1 for size in shape):
        raise ValueError(f"input must be a tensor or a shape of positive ints such as (8, 3, 224, 224), got {input!r}")
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    return torch.randn(shape, dtype=torch.float32 if parameter is None else parameter.dtype)
