"""Operator-level cost counting: a ``TorchDispatchMode`` that sees every aten op a model runs.

Each op is charged to the innermost ``nn.Module`` call running it, so functional calls (``F.conv2d``)
and a module called twice are counted, and a container's own ops (a residual add) land on its own
call. Conventions, the same as :func:`sepconv.cost`:

- ``macs``: multiply-adds of convolutions (forward, transposed, grouped, depthwise) and matrix
  products (``mm``, ``addmm``, ``bmm``, ``baddbmm``, fused attention); ``flops = 2 * macs``;
- ``bias_adds``: the bias additions of those ops (conv bias, ``addmm``/``baddbmm``'s added term);
- ``other_ops``: elements written by every other op that is not a view (norms, activations,
  pooling, softmax, adds, copies): a size of the memory-bound work, not FLOPs, and never in ``macs``;
- ``activation_bytes``: bytes of every new tensor written in the forward pass (in-place ops and
  views write none; an output sharing an input's storage is a view, whatever its schema says), at the
  tensors' own dtype; a padded copy of a conv's input counts (``sepconv.cost`` leaves it out);
- backward (on request): ``backward_macs`` = grad-input MACs + grad-weight MACs. For a convolution
  each equals the forward MACs, whatever ``groups`` is (``torch.utils.flop_counter`` multiplies
  grad-weight by ``groups``); grad-bias reductions and everything else go to ``backward_other_ops``.

>>> import torch
>>> from torch import nn
>>> calls = count_calls(nn.Sequential(nn.Conv2d(10, 32, 3), nn.ReLU()), (torch.empty(5, 10, 50, 50, device="meta"),))
>>> [(c.name, c.type, c.macs, c.bias_adds, c.other_ops) for c in calls if c.did_work]
[('0', 'Conv2d', 33177600, 368640, 0), ('1', 'ReLU', 0, 0, 368640)]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Call", "conv_macs", "count_calls"]

aten = torch.ops.aten
_TAG = "sepconv_call"  # key in an autograd node's metadata: index of the module call that created it
_NO_WORK = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default, aten.lift_fresh.default}


@dataclass
class Call:
    """What one call of one module did itself (its children's work excluded)."""

    name: str
    type: str
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None = None
    params: int = 0
    macs: int = 0
    bias_adds: int = 0
    other_ops: int = 0
    activation_bytes: int = 0
    backward_macs: int = 0
    backward_other_ops: int = 0
    module: nn.Module | None = field(default=None, repr=False)
    started_at: int = field(default=0, repr=False)  # forward ops run before the call started
    first_work_at: int | None = field(default=None, repr=False)  # ... before its own first op that did work

    @property
    def order(self) -> int:
        """Execution-order position: when the call's own work began (a residual add sorts after its block's convs)."""
        return self.started_at if self.first_work_at is None else self.first_work_at

    @property
    def did_work(self) -> bool:
        return bool(self.params or self.macs or self.bias_adds or self.other_ops or self.backward_macs)


def conv_macs(weight_shape: Sequence[int], x_shape: Sequence[int], out_shape: Sequence[int], transposed: bool) -> int:
    """MACs of one convolution from its shapes: every weight meets every output (input if transposed) position.

    ``weight_shape`` is ``(O, C/g, *K)`` (transposed: ``(C, O/g, *K)``), so ``prod(weight_shape)`` is
    ``O·(C/g)·K^d`` and groups need no special case.

    >>> conv_macs((32, 10, 3, 3), (5, 10, 50, 50), (5, 32, 48, 48), transposed=False)
    33177600
    """
    positions = x_shape if transposed else out_shape
    batch = positions[0] if len(positions) == len(weight_shape) else 1
    return math.prod(weight_shape) * batch * math.prod(positions[-(len(weight_shape) - 2) :])


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _conv_forward(args: Sequence[Any], out: Tensor) -> tuple[int, int]:
    x, weight, bias, transposed = args[0], args[1], args[2], bool(args[6])
    macs = conv_macs(_shape(weight), _shape(x), _shape(out), transposed)
    return macs, (out.numel() if bias is not None else 0)


def _conv_backward(args: Sequence[Any], outs: Sequence[Any]) -> tuple[int, int]:
    """(MACs, other elements) of ``convolution_backward``: grad-input and grad-weight each cost the forward."""
    grad_out, x, weight, transposed, mask = args[0], args[1], args[2], bool(args[7]), args[10]
    forward = conv_macs(_shape(weight), _shape(x), _shape(grad_out), transposed)
    grad_bias = outs[2].numel() if mask[2] and outs[2] is not None else 0
    return forward * (int(bool(mask[0])) + int(bool(mask[1]))), grad_bias


def _matmul(func: Any, args: Sequence[Any], out: Tensor) -> tuple[int, int] | None:
    """(MACs, bias adds) of a matrix product, or None if ``func`` is not one."""
    if func in (aten.mm.default, aten.bmm.default):
        a = _shape(args[0])
        return math.prod(a) * _shape(args[1])[-1], 0
    if func in (aten.addmm.default, aten.baddbmm.default):
        a = _shape(args[1])
        return math.prod(a) * _shape(args[2])[-1], out.numel()
    if func in (aten.mv.default, aten.dot.default):
        return math.prod(_shape(args[0])), 0
    return None


_ATTENTION = {
    getattr(aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(aten, name)
}


def _attention_macs(args: Sequence[Any]) -> int:
    """softmax(Q·Kᵀ)·V: B·H·L·S·E for the scores plus B·H·L·S·Ev for the weighted sum."""
    q, k, v = _shape(args[0]), _shape(args[1]), _shape(args[2])
    batch_heads = math.prod(q[:-2])
    return batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])


# batch-norm ops whose outputs after the first are the saved batch statistics (and cuDNN's reserve): written in
# training only; eval mode returns empty tensors on CPU and CUDA, but (C,)-shaped ones on the meta device
_BATCH_NORMS = {
    getattr(aten, name)
    for name in (
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "_batch_norm_no_update",
        "cudnn_batch_norm",
        "miopen_batch_norm",
    )
    if hasattr(aten, name)
}


def _storage_id(t: Tensor) -> int | None:
    """Identity of ``t``'s storage, None for a tensor without one (sparse, some subclasses)."""
    if t.layout is not torch.strided:
        return None
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _new_outputs(func: Any, args: Sequence[Any], kwargs: Any, outputs: list[tuple[int, Tensor]]) -> list[Tensor]:
    """The outputs that are new tensors: not views, in-place or out= results, nor unwritten batch statistics.

    The schema's alias annotations say most of it, but a few view ops carry none (``aten._unsafe_view``,
    which ``mm``/``bmm`` results go through to get their batch dims back), so an output sharing an input's
    storage is a view too, whatever its schema says.
    """
    returns = func._schema.returns
    candidates = [(i, t) for i, t in outputs if i >= len(returns) or returns[i].alias_info is None]
    if func.overloadpacket in _BATCH_NORMS and not _training(func, args, kwargs):
        candidates = [(i, t) for i, t in candidates if i == 0]
    if not candidates:
        return []
    inputs = {_storage_id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)} - {None}
    return [t for _, t in candidates if _storage_id(t) not in inputs]


def _training(func: Any, args: Sequence[Any], kwargs: Any) -> bool:
    """A batch-norm op's ``training`` argument (False for the ``_no_training``/``_no_update`` variants)."""
    names = [a.name for a in func._schema.arguments]
    if "training" not in names:
        return False
    index = names.index("training")
    return bool(args[index] if index < len(args) else (kwargs or {}).get("training", False))


class _Counter(TorchDispatchMode):
    """Charges each op to the call on top of ``stack`` (forward) or to the call that built its autograd node."""

    def __init__(self, calls: list[Call], stack: list[int]) -> None:
        super().__init__()
        self.calls, self.stack = calls, stack
        self.ticks = 0  # forward ops seen so far

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        node = torch._C._current_autograd_node()
        backward = node is not None
        if backward:
            index = node.metadata.get(_TAG)
            if index is None:  # e.g. AccumulateGrad: gradient bookkeeping, not layer work
                return out
        elif self.stack:
            index = self.stack[-1]
        else:  # outside the model's call: inputs, the backward seed
            return out
        self._charge(self.calls[index], func, args, kwargs, out, backward)
        return out

    def _charge(self, call: Call, func: Any, args: Sequence[Any], kwargs: Any, out: Any, backward: bool) -> None:
        if func in _NO_WORK:
            return
        packet = func.overloadpacket
        if packet is aten.convolution_backward:
            macs, other = _conv_backward(args, out)
            call.backward_macs += macs
            call.backward_other_ops += other
            return
        macs, bias_adds = 0, 0
        if packet in (aten.convolution, aten._convolution, aten.convolution_overrideable):
            macs, bias_adds = _conv_forward(args, out)
        elif func in _ATTENTION:
            macs = _attention_macs(args)
        else:
            counted = _matmul(func, args, out)
            if counted is not None:
                macs, bias_adds = counted
        outputs = [(i, t) for i, t in enumerate(tree_flatten(out)[0]) if isinstance(t, Tensor)]
        new = _new_outputs(func, args, kwargs, outputs)
        if backward:
            call.backward_macs += macs
            if not macs:
                call.backward_other_ops += sum(t.numel() for t in new)
            return
        self.ticks += 1
        # in place: writes its outputs' elements, unless it only changes their shape (squeeze_, t_: a view)
        in_place = func._schema.is_mutable and torch.Tag.inplace_view not in func.tags
        if call.first_work_at is None and (macs or new or in_place):
            call.first_work_at = self.ticks
        call.macs += macs
        call.bias_adds += bias_adds
        call.activation_bytes += sum(t.numel() * t.element_size() for t in new)
        if not macs and (new or in_place):
            call.other_ops += sum(t.numel() for t in (new or [t for _, t in outputs]))


def _first_shape(value: Any) -> tuple[int, ...] | None:
    return next((_shape(t) for t in tree_flatten(value)[0] if isinstance(t, Tensor)), None)


def _grad_fns(value: Any) -> list[Any]:
    return [t.grad_fn for t in tree_flatten(value)[0] if isinstance(t, Tensor) and t.grad_fn is not None]


def _tag_graph(outputs: Any, index: int, boundary: set[Any]) -> None:
    """Tag the autograd nodes a call created (reachable from its outputs, not past its inputs) with ``index``."""
    todo = _grad_fns(outputs)
    while todo:
        node = todo.pop()
        if node is None or node in boundary or _TAG in node.metadata or not node.next_functions:
            continue
        node.metadata[_TAG] = index
        todo.extend(next_node for next_node, _ in node.next_functions)


def count_calls(
    model: nn.Module, args: Sequence[Any], *, state: dict[str, Tensor] | None = None, backward: bool = False
) -> list[Call]:
    """Run ``model(*args)`` under the counter and return one :class:`Call` per module call, in call order.

    Run it on meta tensors (nothing is computed); ``state`` replaces the model's parameters and
    buffers for the call (``torch.func.functional_call``), so the model itself is left as it is.
    With ``backward=True`` the output is back-propagated (gradient of ones) and the backward work is
    charged to the calls that built it.
    """
    named = list(model.named_modules(remove_duplicate=False))
    names = {id(m): n for n, m in reversed(named)}
    first_call: dict[int, int] = {}
    calls: list[Call] = []
    stack: list[int] = []
    boundaries: list[set[Any]] = []
    seen_params: set[int] = set()
    times_called: Counter[str] = Counter()

    def pre_hook(module: nn.Module, inputs: Any) -> None:
        parent = calls[stack[-1]].name if stack else ""
        name = names.get(id(module), f"{parent}.<{type(module).__name__}>".lstrip("."))
        times_called[name] += 1
        repeat = times_called[name] - 1
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen_params]
        seen_params.update(id(p) for p in own)
        calls.append(
            Call(
                name=f"{name}#{repeat + 1}" if repeat else name,
                type=type(module).__name__,
                input_shape=_first_shape(inputs),
                params=sum(p.numel() for p in own),
                module=module,
                started_at=counter.ticks,
            )
        )
        stack.append(len(calls) - 1)
        first_call.setdefault(id(module), len(calls) - 1)
        boundaries.append(set(_grad_fns(inputs)))

    def post_hook(module: nn.Module, inputs: Any, output: Any) -> None:
        index = stack.pop()
        boundary = boundaries.pop()
        calls[index].output_shape = _first_shape(output)
        if backward:
            _tag_graph(output, index, boundary)
        if not stack:  # the model's call ends: parameters of modules never called go to their nearest called parent
            for name, module in named:
                if id(module) in first_call:
                    continue
                own = [p for p in module.parameters(recurse=False) if id(p) not in seen_params]
                seen_params.update(id(p) for p in own)
                parent = _called_parent(name, dict(named), first_call)
                if parent is not None:
                    calls[parent].params += sum(p.numel() for p in own)

    counter = _Counter(calls, stack)
    handles = [register_module_forward_pre_hook(pre_hook), register_module_forward_hook(post_hook)]
    try:
        with counter, torch.set_grad_enabled(backward):
            output = model(*args) if state is None else torch.func.functional_call(model, state, tuple(args))
            if backward:
                _backward(output)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _called_parent(name: str, modules: dict[str, nn.Module], first_call: dict[int, int]) -> int | None:
    """Index of the first call of the closest ancestor of module ``name`` that was called."""
    parts = name.split(".")
    while parts:
        parts.pop()
        index = first_call.get(id(modules.get(".".join(parts))))
        if index is not None:
            return index
    return None


def _backward(output: Any) -> None:
    tensors = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.requires_grad]
    if not tensors:
        raise ValueError("backward=True needs a model output that requires grad (no trainable parameters used?)")
    torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
