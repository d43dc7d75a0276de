"""Memory-format plumbing of the CPU strategy: run a function or a whole model in channels_last while the caller
keeps NCHW (:func:`run_channels_last`), gradients handed back in the layout each side gave.

>>> import torch
>>> x = torch.rand(2, 3, 8, 8, requires_grad=True)
>>> y = in_channels_last(lambda t: t * 2, x)
>>> y.is_contiguous(), torch.equal(y, x * 2)
(True, True)
>>> y.sum().backward()
>>> x.grad.is_contiguous()
True
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sepconv import cpu_conversions

__all__ = ["CHANNELS_LAST_FORMATS", "in_channels_last", "map_tensors", "run_channels_last"]

CHANNELS_LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}  # by tensor dimension


def in_channels_last(forward: Callable[[Tensor], Tensor], input: Tensor) -> Tensor:
    """``forward`` run in channels_last on a contiguous ``input``; contiguous out. The gradients cross each
    conversion in the layout on its side, so the caller sees contiguous gradients too (``x.grad`` included):
    a plain ``contiguous(memory_format=...)`` hands a channels_last gradient back, and PyTorch's elementwise
    backwards of mixed layouts are slow (ReLU's backward in small_resnet, profiled: 4 -> 15 ms per step)."""
    memory_format = CHANNELS_LAST_FORMATS[input.dim()]
    if not torch.is_grad_enabled():
        output = forward(cpu_conversions.to_memory_format(input, memory_format))
        return cpu_conversions.to_memory_format(output, torch.contiguous_format)
    return _Relayout.apply(forward(_Relayout.apply(input, memory_format)), torch.contiguous_format)


class _Relayout(torch.autograd.Function):
    """``t.contiguous(memory_format=...)`` whose backward returns the gradient in ``t``'s own layout."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, memory_format: torch.memory_format) -> Tensor:  # type: ignore[override]
        ctx.source_format = torch.contiguous_format if t.is_contiguous() else CHANNELS_LAST_FORMATS.get(t.dim())
        return cpu_conversions.to_memory_format(t, memory_format)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if ctx.source_format is None:
            return grad, None
        return cpu_conversions.to_memory_format(grad, ctx.source_format), None


def run_channels_last(model: nn.Module) -> nn.Module:
    """Run ``model`` in channels_last throughout while its callers keep NCHW in, NCHW out; returns it.

    A layer on its own must convert NCHW to channels_last and back on every call; a whole network
    converts once at its input and once at its output, and every conv, norm, activation and pool in
    between stays in channels_last. The convolutions' 4-d (5-d) parameters and buffers are stored
    channels_last (channels_last_3d) in place — other modules' tensors keep their layout, so code that views
    them still can; results are equal up to float rounding. Calling it again is a no-op.

    >>> import torch
    >>> from sepconv.nets import small_vgg
    >>> net = run_channels_last(small_vgg("separable")).eval()
    >>> net(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    if getattr(model, "_sepconv_channels_last", False):
        return model
    with torch.no_grad():
        for tensor in _conv_tensors(model):
            if tensor.dim() in CHANNELS_LAST_FORMATS:
                # channels_last strides also where a dimension of 1 makes them ambiguous: a conv
                # whose input has one channel (a stem) picks its output's layout by its weight's
                # strides; with `contiguous(memory_format=...)`'s, which keep them, the stem's
                # output, norm and activation stayed NCHW (small_vgg training step vs PyTorch
                # channels_last in the same run: 59.0 vs 54.1 ms before, 59.5 vs 59.5 after;
                # separable 42.9 vs 37.9 before, 38.1 vs 38.3 after)
                tensor.data = torch.empty_like(tensor, memory_format=CHANNELS_LAST_FORMATS[tensor.dim()]).copy_(tensor)
    for module in _layout_entries(model):
        module.register_forward_pre_hook(_channels_last_args)
    model.register_forward_hook(lambda module, args, output: map_tensors(output, _to_contiguous))
    model._sepconv_channels_last = True
    return model


def _conv_tensors(model: nn.Module) -> list[Tensor]:
    """The parameters and buffers of ``model``'s convolutions (``nn.ConvNd``, transposed ones, and every module
    of this package: fused and folded blocks), each once: the tensors whose layout decides the layout a conv runs
    in. A 4-d table or embedding elsewhere is left as it is (``.view`` on a channels_last copy would fail)."""
    tensors: dict[int, Tensor] = {}
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) or type(module).__module__.startswith("sepconv."):
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                tensors.setdefault(id(tensor), tensor)
    return list(tensors.values())


def _layout_entries(model: nn.Module) -> list[nn.Module]:
    """Where :func:`run_channels_last` makes inputs channels_last: at the model's input and at every conv, ours
    included (layouts propagate through norms, activations and pools) — but not at the parts inside our
    separable layers, which see the layer's input as it made it: a hook there would cost each part a slow
    ``nn.Module.__call__`` (small_vgg batch 1: 16 hooks, ~90 us of a 0.75 ms inference)."""
    from sepconv.layers import _SeparableConv  # layers import this module

    entries, covered = [model], {id(model)}
    for module in model.modules():
        if id(module) in covered:
            if isinstance(module, _SeparableConv):
                covered.update(id(part) for part in module.modules())
            continue
        if isinstance(module, (nn.modules.conv._ConvNd, _SeparableConv)):
            entries.append(module)
            if isinstance(module, _SeparableConv):
                covered.update(id(part) for part in module.modules())
    return entries


def _channels_last_args(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: ``args`` with their 4-d/5-d tensors channels_last; None (unchanged) when they are."""
    if len(args) == 1 and type(args[0]) is Tensor:  # the common case, usually channels_last already: no new tuple
        memory_format = CHANNELS_LAST_FORMATS.get(args[0].dim())
        if memory_format is None or args[0].is_contiguous(memory_format=memory_format):
            return None
    return map_tensors(args, _to_channels_last)  # type: ignore[return-value]


def _to_channels_last(t: Tensor) -> Tensor:
    memory_format = CHANNELS_LAST_FORMATS.get(t.dim())
    return t if memory_format is None else cpu_conversions.to_memory_format(t, memory_format)


def _to_contiguous(t: Tensor) -> Tensor:
    return cpu_conversions.to_memory_format(t, torch.contiguous_format) if t.dim() in CHANNELS_LAST_FORMATS else t


def map_tensors(value: object, fn: Callable[[Tensor], Tensor]) -> object:
    """``value`` with ``fn`` applied to every tensor inside tuples (named ones too: GoogLeNet's outputs in training),
    lists and dicts (of their own type: an ``OrderedDict`` stays one, a ``ModelOutput`` keeps its attributes).

    >>> from collections import namedtuple
    >>> Outputs = namedtuple("Outputs", "logits aux")
    >>> map_tensors({"a": Outputs(torch.ones(1), [torch.ones(2)])}, lambda t: t * 2)
    {'a': Outputs(logits=tensor([2.]), aux=[tensor([2., 2.])])}
    >>> from collections import OrderedDict
    >>> out = map_tensors(OrderedDict(b=torch.ones(1)), lambda t: t * 3)
    >>> type(out).__name__, out["b"]
    ('OrderedDict', tensor([3.]))
    """
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple: its fields positional
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if type(value) is dict:
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, dict):  # OrderedDict, defaultdict, a ModelOutput: a copy of its own type, items replaced
        mapped = copy.copy(value)
        for k, v in value.items():
            mapped[k] = map_tensors(v, fn)
        return mapped
    return value
