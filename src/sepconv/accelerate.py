"""``sepconv.accelerate``: route the depthwise separable blocks of an existing model through our kernels.

It finds ``depthwise conv -> (BatchNorm) -> (activation) -> (squeeze-excitation) -> 1x1 conv -> (BatchNorm)``
chains wherever modules run one after the other (``nn.Sequential`` and its plain subclasses such as torchvision's
``Conv2dNormActivation``, nested at any depth; our ``SeparableConv2d``) and replaces each by a
:class:`FusedSeparableConv2d`: BatchNorms in eval mode are folded into the conv weights and the
activation is fused: with ``backend="triton"`` the whole chain is one Triton kernel
(:func:`sepconv.kernels.separable_conv2d`; two where :func:`sepconv.kernels.separable.fuses` says no). With
``backend="auto"`` (default) each module takes the path :mod:`sepconv.dispatch` measured faster: PyTorch's
convs (on the folded weights), and our depthwise kernel for large kernels in channels_last on CUDA; auto never
runs the fused kernel, which measured slower.

timm's blocks run their modules from their own forward: its efficientnet family (``DepthwiseSeparableConv``,
``InvertedResidual``: timm's mobilenetv1/v2/v3, mnasnet, efficientnet; MobileNetV4's ``UniversalInvertedResidual``,
both of its depthwise convs), ReXNet's and EfficientViT's (MIT) blocks, ``timm.layers``' ``SeparableConv2d`` /
``SeparableConvNormAct`` and xception_aligned's ``SeparableConv2d`` (the table :data:`_TIMM_BLOCKS`), recognised
by qualified class name (timm is not a dependency). In eval mode, the block's depthwise conv becomes the fused
module of the conv, its norm (folded) and activation (fused), its squeeze-excitation if any (kept), the 1x1 conv
and that one's norm (folded; an activation that norm applies stays in its place), and the absorbed modules
``nn.Identity``: the block's forward, shortcut included, runs as before. timm's ``Conv2dSame`` (the tf_ models'
stride-2 convs: TensorFlow's 'same' padding, computed at run time) is taken as a conv with ``padding="same"``,
which our modules and kernels compute the same way; MixNet's ``MixedConv2d`` (channels split over several convs)
takes the norm after it folded into each of its convs.

A BatchNorm2d between the convs in training mode cannot be folded once (it normalizes with each batch's
statistics). With ``backend="triton"`` the fused module keeps it (``mid_norm``, a ``BatchNorm2d`` or in timm's
blocks a ``BatchNormAct2d``, whose activation is fused; listed in :attr:`Acceleration.batch_norms`) and folds
the batch's statistics in on each call (a first pass over the input
computes them: :func:`sepconv.kernels.separable_conv2d_batch_norm`), updating its running statistics as
BatchNorm2d does, so the accelerated model trains as the original and switches to the running statistics in
eval mode. Otherwise the chain is not fused and only its depthwise conv is replaced, by a
:class:`~sepconv.DepthwiseConv2d` (the measured choice: CPU layouts, our depthwise kernel for large kernels on
CUDA). A training-mode BatchNorm after the 1x1 conv (a ``BatchNorm2d``, or timm's ``BatchNormAct2d`` without an
activation) is kept the same way with ``backend="triton"`` (``out_norm``; its batch statistics come from the fused
kernel's statistics epilogue, so its input is read once, not twice); otherwise it stays as it is and the part
before it is fused. A squeeze-excitation between the activation and the 1x1 conv (torchvision's
``SqueezeExcitation``: MobileNetV3, EfficientNet; timm's ``SqueezeExcite``; :mod:`sepconv.squeeze_excitation`)
is kept in the fused module (``excitation``, listed in :attr:`Acceleration.excitation`): with
``backend="triton"`` the fused kernel's op computes it, in training too, with gradients for its own convs
(:mod:`sepconv.kernels.differentiable_excitation`; EfficientNet's and MobileNetV3's whole blocks: both norms
with batch statistics, the activation and the squeeze-excitation in one op) where its activation and gate are
ones the op knows (:func:`~sepconv.squeeze_excitation.excitation_gate`), else for inference only
(:mod:`sepconv.kernels.excitation`); otherwise, and on other backends, the module runs it itself. Depthwise
convs outside any chain are replaced by a DepthwiseConv2d too, with a following eval-mode BatchNorm folded in
(1-d and 3-d ones by our DepthwiseConv1d / DepthwiseConv3d: chains are fused in 2-d only, norms folded in any).
Modules of any other class with a forward of their own (a user's blocks, which run their attributes as
``self.bn(self.conv(x))``) are traced with torch.fx, their submodules as leaves: children the forward runs one
after the other, each called once, each output used by the next alone, are rewritten as a Sequential's are, in
place (the first becomes the replacement, the others ``nn.Identity``); a forward that cannot be traced (control
flow on tensor values) is left to the other rules.
Every other conv followed by an eval-mode BatchNorm (in a Sequential, as the attributes the modules of
:data:`_CONV_NORMS` run: timm's stems, expanding 1x1 convs, last convs and ResNet blocks, torchvision's ResNet,
GoogLeNet and Inception blocks, or in a traced forward) becomes one ``nn.Conv2d`` with that norm folded into its
weights (kind ``"folded conv"``; a ``BatchNormAct2d`` leaves its activation behind): those norms read and wrote
the largest activations (the CPU gain: README, ``benchmarks/cpu_torchvision.py``). A module the model runs from
more than one place (shared weights) is left as it is, and so are the norms after it. The input model is not
modified; a Sequential that is rewritten comes back flat, so its state_dict keys change (``conv.1.0.weight`` ->
``conv.1_0.weight``): the result is for running, keep checkpoints of the original.

>>> import torch
>>> from torch import nn
>>> block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 16, 1))
>>> fast, changes = accelerate(block.eval())
>>> [(c.kind, c.replaced) for c in changes]
[('fused separable', ('0', '1', '2', '3'))]
>>> x = torch.randn(2, 8, 10, 10)
>>> torch.allclose(fast(x), block(x), atol=1e-5)
True
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepconv.dispatch import backend_arg, batch_norm_2d, batch_norm_separable_forward, fused_activation, use_triton
from sepconv.folding import fold_batch_norm, foldable_norm
from sepconv.layers import (
    DepthwiseConv1d,
    DepthwiseConv2d,
    DepthwiseConv3d,
    PointwiseConv1d,
    PointwiseConv2d,
    PointwiseConv3d,
    SeparableConv2d,
    _unhooked,
    pad_same,
)
from sepconv.squeeze_excitation import excitation_gate, excitation_scale, is_excitation

__all__ = ["Acceleration", "FusedSeparableConv2d", "accelerate"]

_ACTIVATIONS = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish, "silu": F.silu}
_ACTIVATIONS["gelu"] = F.gelu
# relu and relu6 in place on the depthwise conv's fresh output, as torchvision's ReLU6(inplace=True) (the conv's
# backward does not need its output; theirs needs only theirs): one activation-sized allocation less per block.
# The others' backward needs their input, which autograd would clone before an in-place call: out of place.
_ACTIVATIONS_IN_PLACE = _ACTIVATIONS | {"relu": F.relu_, "relu6": lambda t: F.relu6(t, inplace=True)}


@dataclass(frozen=True)
class Acceleration:
    """One change: the modules at ``replaced`` (paths in the input model) became one ``kind`` module."""

    kind: str  # "fused separable" | "depthwise" | "folded conv" (another conv with the eval-mode BatchNorm after it)
    replaced: tuple[str, ...]
    folded_norms: tuple[str, ...]
    activation: str | None
    # norms between the convs kept as modules (training mode: their batch statistics are folded in on each call)
    batch_norms: tuple[str, ...] = ()
    excitation: str | None = None  # a squeeze-excitation between the activation and the 1x1 conv, kept as a module


class FusedSeparableConv2d(nn.Module):
    """depthwise conv (+ bias) -> (training-mode BatchNorm) -> relu | relu6 | hardswish | silu | gelu | nothing
    -> (squeeze-excitation) -> 1x1 conv (+ bias) -> (training-mode BatchNorm), as one module.

    ``backend="triton"``: one fused Triton kernel; ``"auto"``: PyTorch's two convs, the depthwise one on our
    kernel where :mod:`sepconv.dispatch` measured it faster; ``"torch"``: PyTorch's two convs. Built by
    :func:`accelerate`; parameters ``dw_weight``, ``dw_bias``, ``pw_weight``, ``pw_bias``, and ``mid_norm``: a
    BatchNorm2d between the convs that could not be folded (training mode), run by
    :func:`sepconv.dispatch.batch_norm_separable_forward` on the fused kernel (batch statistics folded per call);
    ``out_norm``: one after the 1x1 conv (training mode: its batch statistics from the fused kernel's epilogue);
    ``excitation``: a squeeze-excitation module between the activation and the 1x1 conv (torchvision's
    ``SqueezeExcitation``, timm's ``SqueezeExcite``), computed by the fused kernel's op with its gradients
    (:mod:`sepconv.kernels.differentiable_excitation`) where its activation and gate are ones the op knows
    (:func:`~sepconv.squeeze_excitation.excitation_gate`), else by the inference path
    (:mod:`sepconv.kernels.excitation`) when no gradient is needed and no norm uses batch statistics, else by the
    module itself.
    """

    _ndim = 2
    padding_mode = "zeros"

    def __init__(
        self,
        in_channels: int,
        dw_weight: Tensor,
        dw_bias: Tensor | None,
        pw_weight: Tensor,
        pw_bias: Tensor | None,
        stride: Sequence[int],
        padding: str | Sequence[int],
        dilation: Sequence[int],
        mid_activation: str | None = None,
        backend: str = "auto",
        mid_norm: nn.BatchNorm2d | None = None,
        out_norm: nn.BatchNorm2d | None = None,
        excitation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.dw_weight = nn.Parameter(dw_weight.detach().clone())
        self.dw_bias = None if dw_bias is None else nn.Parameter(dw_bias.detach().clone())
        self.pw_weight = nn.Parameter(pw_weight.detach().clone())
        self.pw_bias = None if pw_bias is None else nn.Parameter(pw_bias.detach().clone())
        self.stride, self.padding, self.dilation = tuple(stride), padding, tuple(dilation)
        self.mid_activation = mid_activation
        self.backend = backend_arg(backend, 2)
        self.mid_norm = mid_norm
        self.out_norm = out_norm
        self.excitation = excitation

    @property
    def depth_multiplier(self) -> int:
        return self.dw_weight.shape[0] // self.in_channels

    def forward(self, input: Tensor) -> Tensor:
        on_triton = use_triton(self, input)  # auto: only where our depthwise kernel measured faster
        # auto never fuses: the fused kernel measured slower
        fused, excitation = self._kernel_excitation(input) if on_triton and self.backend == "triton" else (False, None)
        if fused:
            weights = (self.dw_weight, self.dw_bias, self.pw_weight, self.pw_bias)
            geometry = (self.stride, self.padding, self.dilation)
            norms = (self.mid_norm, self.mid_activation, self.out_norm)
            return batch_norm_separable_forward(input, *weights, *geometry, *norms, excitation)
        if on_triton:
            from sepconv.kernels.depthwise import depthwise_conv2d

            mid = depthwise_conv2d(input, self.dw_weight, self.dw_bias, self.stride, self.padding, self.dilation)
            activations = _ACTIVATIONS  # not in place on our kernel's output (a custom op's)
        else:
            geometry = (self.stride, self.padding, self.dilation, self.in_channels)
            mid = _depthwise_torch(input, self.dw_weight, self.dw_bias, *geometry)
            activations = _ACTIVATIONS_IN_PLACE
        if self.mid_norm is not None:  # BatchNorm2d's forward only: timm's BatchNormAct2d's activation is ours
            mid, activations = nn.BatchNorm2d.forward(self.mid_norm, mid), _ACTIVATIONS_IN_PLACE  # a fresh output
        mid = activations[self.mid_activation](mid)
        if self.excitation is not None:
            mid = self.excitation(mid)
        out = F.conv2d(mid, self.pw_weight, self.pw_bias)
        return out if self.out_norm is None else nn.BatchNorm2d.forward(self.out_norm, out)

    def _kernel_excitation(self, input: Tensor) -> tuple[bool, object]:
        """Whether the fused kernel computes this call, and its squeeze-excitation (if any) as the kernel takes it:
        its gate as tensors (differentiable) where its activation and gate are ones the kernel's backward knows
        (:func:`~sepconv.squeeze_excitation.excitation_gate`), else a callable on the channel means, for inference
        only (no gradient needed) with no norm normalizing with batch statistics; not where a hook on it or its
        parts would miss its call. Where the kernel does not compute it, PyTorch's modules run the chain."""
        if self.excitation is None:
            return True, None
        if not _unhooked(*self.excitation.modules()):  # a hook on it or its parts must see their calls
            return False, None
        fields = excitation_gate(self.excitation)
        if fields is not None:
            from sepconv.kernels.differentiable_excitation import ExcitationArgs

            return True, ExcitationArgs(*fields)
        tensors = (input, *self.parameters())
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return False, None
        inference = all(norm is None or not norm.training for norm in (self.mid_norm, self.out_norm))
        return inference, functools.partial(excitation_scale, self.excitation) if inference else None

    def extra_repr(self) -> str:
        mid, out = self.dw_weight.shape[0], self.pw_weight.shape[0]
        return (
            f"{self.in_channels} -> {mid} -> {out}, kernel_size={tuple(self.dw_weight.shape[-2:])}, "
            f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, "
            f"mid_activation={self.mid_activation!r}, backend={self.backend!r}"
        )


def _depthwise_torch(x: Tensor, weight, bias, stride, padding, dilation, groups: int) -> Tensor:
    if isinstance(padding, str) and padding == "same" and any(s > 1 for s in stride):  # TF 'same', as our layers
        x, padding = pad_same(x, tuple(weight.shape[-2:]), stride, dilation), 0
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def accelerate(model: nn.Module, *, backend: str = "auto") -> tuple[nn.Module, list[Acceleration]]:
    """A copy of ``model`` whose separable chains run fused (see the module docstring), and the changes.

    Outputs equal the original's to float rounding (BatchNorm folding reorders a few products).
    ``backend`` is given to every module it creates: ``"auto"`` (our kernels only where they measured
    faster, see :mod:`sepconv.dispatch`), ``"triton"`` (always; fused chains) or ``"torch"``.
    A module the model runs from more than one place (shared weights) is left as it is.
    """
    backend_arg(backend, 2)
    model = copy.deepcopy(model)
    reached = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    surgery = _Surgery(backend, frozenset(key for key, times in reached.items() if times > 1))
    if _is_plain_sequential(model) or isinstance(model, SeparableConv2d):
        return _rewrite_sequence(model, "", surgery), surgery.changes
    if _is_depthwise(model):
        surgery.changes.append(Acceleration("depthwise", ("",), (), None))
        return _depthwise_replacement(model, None, backend), surgery.changes
    _rewrite_module(model, "", surgery)
    return model, surgery.changes


# ---- model surgery ----------------------------------------------------------------------------------------


@dataclass
class _Surgery:
    """One :func:`accelerate` call's state: the backend, the ids of the modules the model reaches more than once
    (never replaced: a replacement in one place would break the sharing; recursed into once), the changes made
    and the modules already recursed into."""

    backend: str
    shared: frozenset[int]
    changes: list[Acceleration] = field(default_factory=list)
    visited: set[int] = field(default_factory=set)
    created: set[int] = field(default_factory=set)  # what _rewrite_traced put in place: not rewritten again

    def replaceable(self, *modules: nn.Module | None) -> bool:
        return not any(id(module) in self.shared for module in modules if module is not None)


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _rewrite_module(module: nn.Module, path: str, surgery: _Surgery) -> None:
    """A module whose forward is its own: a timm block's chain rewritten in place, then its children."""
    if id(module) in surgery.visited:
        return
    surgery.visited.add(id(module))
    if _qualified_name(module) in _CONV_NORMS or _qualified_name(module) in _TIMM_BLOCKS:
        _rewrite_timm_block(module, path, surgery)  # first: the pairs below fold what no chain took
        _fold_attribute_convs(module, path, surgery)
    else:
        _rewrite_traced(module, path, surgery)
    _rewrite_children(module, path, surgery)


def _rewrite_children(module: nn.Module, prefix: str, surgery: _Surgery) -> None:
    for name, child in list(module._modules.items()):  # every name, a module registered twice included
        if child is None:
            continue
        path = _join(prefix, name)
        if id(child) in surgery.created:
            continue
        if not surgery.replaceable(child):
            _rewrite_module(child, path, surgery)
            continue
        if _is_plain_sequential(child) or isinstance(child, SeparableConv2d):
            replacement = _rewrite_sequence(child, path, surgery)
        elif _is_depthwise(child):
            replacement = _depthwise_replacement(child, None, surgery.backend)
            surgery.changes.append(Acceleration("depthwise", (path,), (), None))
        else:
            _rewrite_module(child, path, surgery)
            continue
        setattr(module, name, replacement)


class _LeafTracer(torch.fx.Tracer):
    """torch.fx's tracer with every submodule a leaf: a module's forward as calls of its submodules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _traced_graph(module: nn.Module) -> torch.fx.Graph | None:
    """The graph of ``module``'s own forward (torch.fx, submodules as leaves; arguments with defaults fixed to them),
    or None where it cannot be traced (control flow on tensor values, anything else that raises). Traced on a
    shallow copy, so attributes its forward sets stay there (a proxy cannot be set as a parameter, buffer or
    module: that raises)."""
    try:
        probe = copy.copy(module)  # its own __dict__: attributes the forward sets land there
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(type(module).forward).parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
        return _LeafTracer().trace(probe, concrete_args=defaults or None)
    except Exception:  # any failure to trace leaves the module to the other rules
        return None


def _linear_runs(graph: torch.fx.Graph, module: nn.Module) -> list[list[str]]:
    """Names of ``module``'s children (or of modules in its ``nn.ModuleList`` / ``nn.ModuleDict`` children, which run
    nothing themselves: dotted) that its forward runs one after the other: each called once, on one argument, its
    output used by the next one alone (the last one's by anything); none whose attributes the forward reads."""
    calls = [node for node in graph.nodes if node.op == "call_module"]
    times = Counter(node.target for node in calls)
    read = [str(node.target) for node in graph.nodes if node.op == "get_attr"]

    def usable(node: torch.fx.Node) -> bool:
        target = str(node.target)
        return (
            _own_module(module, target)
            and times[target] == 1
            and not any(attribute == target or attribute.startswith(f"{target}.") for attribute in read)
            and len(node.args) == 1
            and not node.kwargs
        )

    following: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in calls:
        users = list(node.users)
        # its one user a module whose one argument is this output itself (not a tuple holding it)
        chained = len(users) == 1 and users[0].op == "call_module" and usable(users[0]) and users[0].args[0] is node
        if chained and usable(node):
            following[node] = users[0]
    followed = set(following.values())
    runs = []
    for node in calls:
        if usable(node) and node not in followed:
            run = [node]
            while run[-1] in following:
                run.append(following[run[-1]])
            runs.append([str(n.target) for n in run])
    return runs


def _own_module(module: nn.Module, target: str) -> bool:
    """Whether ``target`` names a child of ``module``, or a module inside its containers (ModuleList, ModuleDict)."""
    *containers, name = target.split(".")
    for container in containers:
        module = module._modules.get(container)  # type: ignore[assignment]
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            return False
    return module._modules.get(name) is not None


def _rewrite_traced(module: nn.Module, path: str, surgery: _Surgery) -> None:
    """A module with a forward of its own, not torch's and not in our tables, with a conv among its children: the
    runs of children its forward calls one after the other (:func:`_linear_runs`, from a torch.fx trace) are
    rewritten as a Sequential's are (fused chains, routed depthwise convs, convs with their eval-mode norm folded),
    in place: the run's first child becomes the replacement, the others ``nn.Identity``."""
    containers = [c for c in module.children() if isinstance(c, (nn.ModuleList, nn.ModuleDict))]
    children = [*module.children(), *(m for container in containers for m in container.children())]
    if type(module).__module__.split(".")[0] == "torch" or not any(_plain_conv(c) for c in children):
        return
    graph = _traced_graph(module)
    if graph is None:
        return
    for run in _linear_runs(graph, module):
        leaves = [(_join(path, name), module.get_submodule(name)) for name in run]
        for start, count, replacements in _replacements(leaves, surgery):
            for k, name in enumerate(run[start : start + count] if replacements is not None else ()):
                replacement = replacements[k] if k < len(replacements) else nn.Identity()
                _set_part(module, name, replacement)
                surgery.created.add(id(replacement))


def _leaves(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    """The modules a plain Sequential (or our SeparableConv2d) runs, in order, nested ones flattened."""
    if isinstance(module, SeparableConv2d):
        for name in ("depthwise", "mid_norm", "mid_activation", "pointwise"):
            part = getattr(module, name)
            if part is not None:
                yield _join(path, name), part
        return
    for name, child in module._modules.items():  # as Sequential.forward runs them: a module twice included
        if child is None:
            continue
        if _is_plain_sequential(child) or isinstance(child, SeparableConv2d):
            yield from _leaves(child, _join(path, name))
        else:
            yield _join(path, name), child


def _rewrite_sequence(module: nn.Module, path: str, surgery: _Surgery) -> nn.Module:
    leaves = list(_leaves(module, path))
    rebuilt: list[tuple[str, nn.Module]] = []
    changed = False
    for start, _, replacements in _replacements(leaves, surgery):
        if replacements is None:
            leaf_path, leaf = leaves[start]
            _rewrite_module(leaf, leaf_path, surgery)
            rebuilt.append((leaf_path, leaf))
            continue
        changed = True
        rebuilt += [(leaves[start + k][0], replacement) for k, replacement in enumerate(replacements)]
    if not changed:
        return module
    sequence = nn.Sequential(OrderedDict((p[len(path) :].lstrip(".").replace(".", "_"), m) for p, m in rebuilt))
    sequence.training = module.training  # this module's flag only: the children keep theirs
    return sequence


def _replacements(
    leaves: list[tuple[str, nn.Module]], surgery: _Surgery
) -> Iterator[tuple[int, int, list[nn.Module] | None]]:
    """What modules run one after the other (``leaves``: paths and modules, in order) become: (start, count,
    replacements) for each run of ``count`` leaves from ``start`` replaced by the modules ``replacements`` (at most
    ``count``, in the places of the first ones: a fused chain; a routed depthwise conv with the eval-mode norm after
    it folded in; another conv with its norm folded; a timm ``BatchNormAct2d`` folded leaves its activation in its
    place; each change recorded in ``surgery``), and (start, 1, None) for a leaf left as it is."""
    i = 0
    while i < len(leaves):
        chain = _match_chain(leaves, i, surgery.backend)
        if chain is not None and surgery.replaceable(*(module for _, module in leaves[i : chain[0]])):
            end, fused, change = chain
            fused.backend = surgery.backend
            surgery.changes.append(change)
            yield i, end - i, [fused]
            i = end
            continue
        leaf_path, leaf = leaves[i]
        follower = leaves[i + 1] if i + 1 < len(leaves) else None
        dims = _dims(leaf) if _plain_conv(leaf) else 2
        folds = None if follower is None else _norm_and_activation(follower[1], getattr(leaf, "out_channels", 0), dims)
        if folds is None or folds[0] is None or not surgery.replaceable(follower[1], folds[1]):
            folds = None
        norm = None if folds is None else folds[0]
        after = [] if folds is None or folds[1] is None else [folds[1]]  # a BatchNormAct2d's activation
        folded = () if folds is None else (follower[0],)
        if _is_depthwise(leaf) and surgery.replaceable(leaf):
            surgery.changes.append(Acceleration("depthwise", (leaf_path, *folded), folded, None))
            yield i, 1 + len(folded), [_depthwise_replacement(leaf, norm, surgery.backend), *after]
            i += 1 + len(folded)
            continue
        if _plain_conv(leaf) and norm is not None and surgery.replaceable(leaf):
            surgery.changes.append(Acceleration("folded conv", (leaf_path, *folded), folded, None))
            yield i, 2, [_folded_conv(leaf, norm), *after]
            i += 2
            continue
        yield i, 1, None
        i += 1


# nn.Conv2d subclasses whose forward pads for TensorFlow's 'same' at run time (any stride; the odd pixel last) and
# ignores their padding attributes: what our layers and kernels compute for padding="same" (timm 0.4-1.0)
_SAME_PADDED_CONVS = frozenset({"timm.layers.conv2d_same.Conv2dSame"})


def _pads_same(module: nn.Module) -> bool:
    return _qualified_name(module) in _SAME_PADDED_CONVS


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # by spatial dimensions - 1, as the three below
_DEPTHWISE = (DepthwiseConv1d, DepthwiseConv2d, DepthwiseConv3d)
_OURS = (*_DEPTHWISE, PointwiseConv1d, PointwiseConv2d, PointwiseConv3d)


def _dims(conv: nn.Module) -> int:
    """The spatial dimensions of an ``nn.ConvNd`` (1, 2 or 3)."""
    return next(d for d, cls in enumerate(_CONVS, 1) if isinstance(conv, cls))


def _plain_conv(module: nn.Module) -> bool:
    """An ``nn.Conv1d/2d/3d`` whose computation we know: its own forward, one of our layers, or one of
    :data:`_SAME_PADDED_CONVS` (its padding is :func:`_conv_padding`). Other subclasses with a forward of their own
    are left alone. (Chains are fused in 2-d only; 1-d and 3-d convs have their norms folded.)"""
    return isinstance(module, _CONVS) and (
        type(module).forward is _CONVS[_dims(module) - 1].forward or isinstance(module, _OURS) or _pads_same(module)
    )


def _conv_padding(conv: nn.Conv2d) -> str | tuple[int, ...]:
    """The padding a :func:`_plain_conv` computes with, as our layers and kernels take it."""
    return "same" if _pads_same(conv) else conv.padding  # type: ignore[return-value]


def _is_depthwise(module: nn.Module) -> bool:
    return (
        _plain_conv(module)
        and module.groups == module.in_channels
        and module.out_channels % module.in_channels == 0
        and module.padding_mode == "zeros"
    )


def _is_pointwise(module: nn.Module, channels: int) -> bool:
    return (
        _plain_conv(module)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and _conv_padding(module) in ((0, 0), "valid", "same")  # 'same' pads nothing for a 1x1 stride-1 conv
        and module.groups == 1
        and module.in_channels == channels
    )


def _match_chain(leaves: list[tuple[str, nn.Module]], start: int, backend: str):
    """(end, FusedSeparableConv2d, Acceleration) for a chain starting at ``start``, or None. A training-mode
    BatchNorm between the convs is kept in the fused module for ``backend="triton"`` only: elsewhere that module
    would run PyTorch's ops as the original does, and a :class:`~sepconv.DepthwiseConv2d` for the depthwise conv
    alone runs the measured choice (CPU layouts, our kernel for large kernels on CUDA)."""
    dw = leaves[start][1]
    if not _is_depthwise(dw) or _dims(dw) != 2:  # the fused module and kernel are 2-d
        return None
    i, mid = start + 1, dw.out_channels
    norm1 = activation = norm2 = kept = None
    if i < len(leaves) and isinstance(leaves[i][1], nn.BatchNorm2d):
        if foldable_norm(leaves[i][1], mid):
            norm1 = leaves[i]
        elif backend == "triton" and batch_norm_2d(leaves[i][1], mid):
            kept = leaves[i]  # training mode: kept, its batch statistics folded in on each call (fused kernel)
        else:
            return None
        i += 1
    if i < len(leaves) and fused_activation(leaves[i][1]) is not None:
        activation, i = leaves[i], i + 1
    excitation = None
    if i < len(leaves) and is_excitation(leaves[i][1], mid):
        excitation, i = leaves[i], i + 1  # squeeze-excitation: kept, run in the fused module
    if i >= len(leaves) or not _is_pointwise(leaves[i][1], mid):
        return None
    pw = leaves[i][1]
    i += 1
    kept_out = None
    if i < len(leaves) and foldable_norm(leaves[i][1], pw.out_channels):
        norm2, i = leaves[i], i + 1
    elif i < len(leaves) and backend == "triton" and batch_norm_2d(leaves[i][1], pw.out_channels):
        kept_out, i = leaves[i], i + 1  # training mode: kept, its statistics from the fused kernel's epilogue
    dw_weight, dw_bias = _fold(dw.weight, dw.bias, None if norm1 is None else norm1[1])
    pw_weight, pw_bias = _fold(pw.weight, pw.bias, None if norm2 is None else norm2[1])
    act_name = None if activation is None else fused_activation(activation[1])
    geometry = (dw.stride, _conv_padding(dw), dw.dilation)
    mid_norm, out_norm, se = (None if k is None else k[1] for k in (kept, kept_out, excitation))
    weights = (dw_weight, dw_bias, pw_weight, pw_bias)
    norms = {"mid_norm": mid_norm, "out_norm": out_norm, "excitation": se}
    fused = FusedSeparableConv2d(dw.in_channels, *weights, *geometry, act_name, **norms)
    fused.training = dw.training
    replaced = tuple(p for p, _ in leaves[start:i])
    folded = tuple(n[0] for n in (norm1, norm2) if n is not None)
    kept_paths = tuple(k[0] for k in (kept, kept_out) if k is not None)
    se_path = None if excitation is None else excitation[0]
    return i, fused, Acceleration("fused separable", replaced, folded, act_name, kept_paths, se_path)


class _Chain(NamedTuple):
    """A separable chain a block runs from its own forward: the attributes it runs, in order (dotted: a
    submodule's, e.g. the conv of a ConvNormAct whose forward runs conv -> bn -> aa)."""

    dw: str  # the depthwise conv
    norm1: str | None  # its norm (a BatchNorm2d or timm's BatchNormAct2d), None: none
    act1: str | None  # its activation module, None: none (or inside the BatchNormAct2d)
    pw: str  # the 1x1 conv
    norm2: str | None  # its norm, None: none
    identities: tuple[str, ...] = ()  # run between the convs: each must be nn.Identity, a Dropout(p=0) or absent
    excitation: str | None = None  # a squeeze-excitation between the activation and the 1x1 conv: kept, fused


_EFFICIENTVIT_CHAIN = _Chain(
    "depth_conv.conv",
    "depth_conv.norm",
    "depth_conv.act",
    "point_conv.conv",
    "point_conv.norm",
    ("point_conv.dropout",),
)
# timm's blocks that run separable chains from their own forward, recognised by qualified class name (timm is not
# a dependency; classes of the same name elsewhere may differ), and their chains (timm 1.0). What runs after a
# chain (an activation, the shortcut) stays.
_TIMM_BLOCKS = {
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv": (
        _Chain("conv_dw", "bn1", None, "conv_pw", "bn2", ("aa",), "se"),
    ),
    "timm.models._efficientnet_blocks.InvertedResidual": (
        _Chain("conv_dw", "bn2", None, "conv_pwl", "bn3", ("aa",), "se"),
    ),
    # MobileNetV4: an optional depthwise conv before the expansion, and the usual one after it
    "timm.models._efficientnet_blocks.UniversalInvertedResidual": (
        _Chain("dw_start.conv", "dw_start.bn", None, "pw_exp.conv", "pw_exp.bn", ("dw_start.aa", "pw_exp.aa")),
        _Chain("dw_mid.conv", "dw_mid.bn", None, "pw_proj.conv", "pw_proj.bn", ("dw_mid.aa", "pw_proj.aa"), "se"),
    ),
    # ReXNet: its squeeze-excitation runs before the activation, so only blocks without one
    "timm.models.rexnet.LinearBottleneck": (
        _Chain("conv_dw.conv", "conv_dw.bn", "act_dw", "conv_pwl.conv", "conv_pwl.bn", ("conv_dw.aa", "se")),
    ),
    # EfficientViT (MIT): ConvNormActs whose forward runs dropout -> conv -> norm -> act
    "timm.models.efficientvit_mit.DSConv": (_EFFICIENTVIT_CHAIN,),
    "timm.models.efficientvit_mit.MBConv": (_EFFICIENTVIT_CHAIN,),
    "timm.layers.separable_conv.SeparableConvNormAct": (_Chain("conv_dw", None, None, "conv_pw", "bn"),),
    "timm.layers.separable_conv.SeparableConv2d": (_Chain("conv_dw", None, None, "conv_pw", None),),
    "timm.models.xception_aligned.SeparableConv2d": (_Chain("conv_dw", "bn_dw", "act_dw", "conv_pw", "bn_pw"),),
}
_TIMM_NORM_ACT = "timm.layers.norm_act.BatchNormAct2d"  # batch norm, dropout, activation

# modules whose own forward runs a conv and then its norm (a BatchNorm2d, or timm's BatchNormAct2d) as attributes:
# (conv, norm) pairs, in forward order, besides the separable chains of _TIMM_BLOCKS (torchvision 0.2x, timm 1.0)
_CONV_NORMS = {
    "torchvision.models.resnet.ResNet": (("conv1", "bn1"),),
    "torchvision.models.resnet.BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "torchvision.models.resnet.Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    "torchvision.models.googlenet.BasicConv2d": (("conv", "bn"),),
    "torchvision.models.inception.BasicConv2d": (("conv", "bn"),),
    "timm.models.resnet.ResNet": (("conv1", "bn1"),),
    "timm.models.resnet.BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "timm.models.resnet.Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    "timm.models._efficientnet_blocks.InvertedResidual": (
        ("conv_s2d", "bn_s2d"),
        ("conv_pw", "bn1"),
        ("conv_dw", "bn2"),  # where the chain was not fused (MixNet's grouped projection, an unknown excitation)
        ("conv_pwl", "bn3"),
    ),
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "timm.models._efficientnet_blocks.ConvBnAct": (("conv", "bn1"),),
    "timm.models._efficientnet_blocks.EdgeResidual": (("conv_exp", "bn1"), ("conv_pwl", "bn2")),
    "timm.models.efficientnet.EfficientNet": (("conv_stem", "bn1"), ("conv_head", "bn2")),
    "timm.models.mobilenetv3.MobileNetV3": (("conv_stem", "bn1"), ("conv_head", "norm_head")),  # norm_head: v4
    "timm.models.ghostnet.GhostNet": (("conv_stem", "bn1"),),
    "timm.models.ghostnet.GhostBottleneck": (("conv_dw", "bn_dw"),),
    "timm.models.efficientvit_mit.ConvNormAct": (("conv", "norm"),),
    "timm.layers.conv_bn_act.ConvNormAct": (("conv", "bn"),),
}


def _qualified_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _norm_and_activation(
    module: nn.Module | None, channels: int, dims: int = 2
) -> tuple[nn.Module | None, nn.Module | None] | None:
    """(norm to fold or None, activation it applies or None) of what follows a ``dims``-d conv of ``channels``
    outputs: nothing or ``nn.Identity`` (None, None); an eval-mode ``BatchNorm{dims}d`` (it, None); after a 2-d
    conv an eval-mode timm ``BatchNormAct2d`` with an identity dropout (it, its activation or None); anything else
    None (no fold)."""
    if module is None or type(module) is nn.Identity or (type(module) is nn.Sequential and not module._modules):
        return None, None
    if foldable_norm(module, channels, dims):
        return module, None
    if dims != 2 or _qualified_name(module) != _TIMM_NORM_ACT or type(getattr(module, "drop", None)) is not nn.Identity:
        return None
    plain = not module.training and module.track_running_stats and module.running_mean is not None
    if not plain or module.num_features != channels:
        return None
    return module, None if type(module.act) is nn.Identity else module.act


def _batch_statistics_norm(module: nn.Module | None, channels: int) -> tuple[nn.Module, nn.Module | None] | None:
    """(norm, the activation it applies or None) for a norm between the convs that :func:`_norm_and_activation`
    could not fold but the fused kernel computes with each batch's statistics: a plain ``BatchNorm2d``, or timm's
    ``BatchNormAct2d`` (nn.BatchNorm2d's forward, then an identity dropout and its activation), either mode."""
    if module is None:
        return None
    if batch_norm_2d(module, channels):
        return module, None
    if _qualified_name(module) != _TIMM_NORM_ACT or type(getattr(module, "drop", None)) is not nn.Identity:
        return None
    if not isinstance(module, nn.BatchNorm2d) or module.num_features != channels:
        return None
    return module, None if type(module.act) is nn.Identity else module.act


def _fold_attribute_convs(module: nn.Module, path: str, surgery: _Surgery) -> None:
    """A module of :data:`_CONV_NORMS` (its table names the classes) in eval mode: each plain conv whose norm folds
    (an eval-mode ``BatchNorm2d``, or ``BatchNormAct2d`` with an identity dropout) becomes one conv with that norm
    folded in, the norm's attribute its activation (or ``nn.Identity``), so the module's own forward runs as
    before. A plain Sequential in the conv's place (timm's deep stems: conv, norm, act, conv, norm, act, conv) has
    its last conv folded."""
    for conv_name, norm_name in _CONV_NORMS.get(_qualified_name(module), ()):
        conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
        sequence = conv if isinstance(conv, nn.Module) and _is_plain_sequential(conv) and len(conv) else None
        if sequence is not None:  # the Sequential's last module runs right before the norm
            conv_name, conv = f"{conv_name}.{len(sequence) - 1}", sequence[-1]
        if not (isinstance(conv, nn.Module) and (_plain_conv(conv) or _mixed_conv(conv))):
            continue
        folds = _norm_and_activation(norm, conv.out_channels, _dims(conv) if _plain_conv(conv) else 2)
        if folds is None or folds[0] is None or not surgery.replaceable(module, sequence, conv, norm, folds[1]):
            continue
        if _mixed_conv(conv) and not surgery.replaceable(*conv.children()):
            continue
        folder = _folded_mixed_conv if _mixed_conv(conv) else _folded_conv
        _set_part(module, conv_name, folder(conv, folds[0]))
        setattr(module, norm_name, nn.Identity() if folds[1] is None else folds[1])
        norm_path = _join(path, norm_name)
        surgery.changes.append(Acceleration("folded conv", (_join(path, conv_name), norm_path), (norm_path,), None))


def _rewrite_timm_block(block: nn.Module, path: str, surgery: _Surgery) -> None:
    """A timm block of :data:`_TIMM_BLOCKS`: each of its chains that :func:`_rewrite_timm_chain` can fuse."""
    chains = _TIMM_BLOCKS.get(_qualified_name(block), ())
    if getattr(block, "conv_s2d", None) is not None:  # space-to-depth before the chain: its own forward
        return
    for chain in chains:
        _rewrite_timm_chain(block, path, chain, surgery)


def _part(block: nn.Module, name: str | None) -> nn.Module | None:
    """The module at attribute path ``name`` of ``block`` (dotted: a submodule's), None where absent."""
    module: nn.Module | None = block
    for attribute in [] if name is None else name.split("."):
        module = getattr(module, attribute, None)
        if not isinstance(module, nn.Module):
            return None
    return None if name is None else module


def _set_part(block: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(block.get_submodule(parent), attribute, module)


def _rewrite_timm_chain(block: nn.Module, path: str, chain: _Chain, surgery: _Surgery) -> None:
    """One chain of a timm block (a fusable activation, identity or absent anti-aliasing, a squeeze-excitation kept):
    its depthwise conv becomes a :class:`FusedSeparableConv2d` of the conv, its norm and activation, the 1x1 conv
    and that one's norm (eval mode: folded; a ``BatchNormAct2d``'s activation stays in its place); the other
    modules it absorbed become ``nn.Identity``, so the block's own forward (shortcut, drop-path) still runs. In
    training mode with ``backend="triton"`` the norms are kept in the fused module (batch statistics)."""
    dw_name, norm1_name, act1_name, pw_name, norm2_name, identities, se_name = chain
    backend = surgery.backend
    part = functools.partial(_part, block)
    dw, pw = part(dw_name), part(pw_name)
    if not (dw is not None and _is_depthwise(dw) and _dims(dw) == 2 and pw is not None):
        return
    norm1 = _norm_and_activation(part(norm1_name), dw.out_channels)
    kept = _batch_statistics_norm(part(norm1_name), dw.out_channels) if backend == "triton" and norm1 is None else None
    se = part(se_name)
    se = se if se is not None and is_excitation(se, dw.out_channels) else None  # kept, run fused
    names = (dw_name, pw_name, norm1_name, act1_name, norm2_name)
    parents = [part(name.rpartition(".")[0]) for name in names if name is not None and "." in name]
    if not surgery.replaceable(block, *parents, *(part(name) for name in names), se):
        return
    others = [part(n) for n in identities] + ([part(se_name)] if se is None and se_name is not None else [])
    if not _is_pointwise(pw, dw.out_channels) or not all(_no_op(module) for module in others):
        return
    if kept is not None:  # training mode: kept in the fused module, its batch statistics folded in per call
        norm1 = (None, kept[1])
    act1 = part(act1_name) if type(part(act1_name)) is not nn.Identity else None
    if norm1 is None or (norm1[1] is not None and act1 is not None):
        return
    activation = norm1[1] if norm1[1] is not None else act1
    if activation is not None and fused_activation(activation) is None:
        return
    # the 1x1 conv's norm: folded (eval) or kept (training, triton); the activation it applies stays in its place
    norm2 = _norm_and_activation(part(norm2_name), pw.out_channels)
    kept_out = None
    if norm2 is None and backend == "triton":
        kept_out = _batch_statistics_norm(part(norm2_name), pw.out_channels)
    after = (norm2 or kept_out or (None, None))[1]  # the activation left in the norm's place
    norm2_module = None if norm2 is None else norm2[0]
    dw_weight, dw_bias = _fold(dw.weight, dw.bias, norm1[0])
    pw_weight, pw_bias = _fold(pw.weight, pw.bias, norm2_module)
    act_name = None if activation is None else fused_activation(activation)
    geometry = (dw.stride, _conv_padding(dw), dw.dilation)
    weights, mid_norm = (dw_weight, dw_bias, pw_weight, pw_bias), None if kept is None else kept[0]
    out_norm = None if kept_out is None else kept_out[0]
    fused = FusedSeparableConv2d(dw.in_channels, *weights, *geometry, act_name, backend, mid_norm, out_norm, se)
    fused.training = dw.training
    folded = tuple(name for name, norm in ((norm1_name, norm1[0]), (norm2_name, norm2_module)) if norm is not None)
    norm1_module = norm1[0] if kept is None else kept[0]
    absorbed = [name for name, m in ((norm1_name, norm1_module), (act1_name, act1), (pw_name, pw)) if m is not None]
    absorbed += [se_name] if se is not None else []
    _set_part(block, dw_name, fused)
    for name in absorbed:
        _set_part(block, name, nn.Identity())
    if norm2_module is not None or out_norm is not None:
        absorbed.append(norm2_name)
        _set_part(block, norm2_name, nn.Identity() if after is None else after)
    replaced = tuple(_join(path, n) for n in (dw_name, *absorbed))
    batch_norms = tuple(_join(path, n) for n, k in ((norm1_name, kept), (norm2_name, kept_out)) if k is not None)
    folded_paths = tuple(_join(path, n) for n in folded)
    se_path = None if se is None else _join(path, se_name)
    surgery.changes.append(Acceleration("fused separable", replaced, folded_paths, act_name, batch_norms, se_path))


def _no_op(module: nn.Module | None) -> bool:
    """Absent, ``nn.Identity`` or a dropout of probability 0: nothing to run between the convs."""
    return module is None or type(module) is nn.Identity or (type(module) is nn.Dropout and module.p == 0)


@torch.no_grad()
def _fold(weight: Tensor, bias: Tensor | None, norm: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor | None]:
    """Weights and bias of ``norm(conv(x))`` as one conv, computed in float64, stored in ``weight``'s dtype."""
    if norm is None:
        return weight, bias
    folded, shift = fold_batch_norm(weight.double(), None if bias is None else bias.double(), norm)
    return folded.to(weight.dtype), shift.to(weight.dtype)


def _folded_conv(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """``norm(conv(x))`` as one ``nn.Conv2d`` (a new module: a conv shared elsewhere keeps its weights; a
    parametrized weight is taken as computed), for an eval-mode norm after the conv. A conv of
    :data:`_SAME_PADDED_CONVS` stays of its class (it pads at run time, which ``nn.Conv2d`` cannot for stride > 1)."""
    weight, bias = _fold(conv.weight, conv.bias, norm)
    geometry = {"stride": conv.stride, "dilation": conv.dilation, "groups": conv.groups, "bias": True}
    factory = {"device": weight.device, "dtype": weight.dtype}
    if _pads_same(conv):  # timm's constructor: nn.Conv2d's arguments without padding_mode
        folded = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, padding=0, **geometry, **factory)
    else:
        folded = _CONVS[_dims(conv) - 1](
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            padding=conv.padding,
            padding_mode=conv.padding_mode,
            **geometry,
            **factory,
        )
    with torch.no_grad():
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    folded.requires_grad_(conv.weight.requires_grad)
    folded.training = conv.training
    return folded


# nn.ModuleDict subclasses whose forward splits the input's channels, runs each part through its conv in order and
# concatenates the outputs (MixNet's several kernel sizes, grouped 1x1 convs; timm 0.4-1.0)
_MIXED_CONVS = frozenset({"timm.layers.mixed_conv2d.MixedConv2d"})


def _mixed_conv(module: nn.Module) -> bool:
    parts = list(module.children())
    return _qualified_name(module) in _MIXED_CONVS and bool(parts) and all(_plain_conv(part) for part in parts)


def _folded_mixed_conv(mixed: nn.Module, norm: nn.BatchNorm2d) -> nn.Module:
    """A :func:`_mixed_conv` with the eval-mode ``norm`` after it folded into its convs, each with its channels' slice
    of the norm (a copy: the input's convs keep their weights)."""
    folded = copy.copy(mixed)  # its own __dict__ and module table, sharing nothing it keeps
    folded._modules = OrderedDict()
    start = 0
    for name, conv in mixed.named_children():
        folded.add_module(name, _folded_conv(conv, _norm_slice(norm, start, start + conv.out_channels)))
        start += conv.out_channels
    return folded


def _norm_slice(norm: nn.BatchNorm2d, start: int, stop: int) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm2d of ``norm``'s channels ``start:stop`` (running statistics, affine parameters, eps)."""
    part = nn.BatchNorm2d(stop - start, eps=norm.eps, affine=norm.affine, device=norm.running_mean.device)
    part = part.to(norm.running_mean.dtype).eval()
    with torch.no_grad():
        part.running_mean.copy_(norm.running_mean[start:stop])
        part.running_var.copy_(norm.running_var[start:stop])
        if norm.affine:
            part.weight.copy_(norm.weight[start:stop])
            part.bias.copy_(norm.bias[start:stop])
    return part


def _depthwise_replacement(conv: nn.Conv2d, norm: nn.BatchNorm2d | None, backend: str) -> nn.Module:
    """Our ``DepthwiseConv1d/2d/3d`` for a depthwise conv, ``norm`` (eval mode) folded in; ``backend`` in 2-d (our
    kernels are 2-d: 1-d and 3-d layers take "auto" for "triton", the CPU strategy on CPU)."""
    weight, bias = _fold(conv.weight, conv.bias, norm)
    dims = _dims(conv)
    backend = backend if dims == 2 or backend != "triton" else "auto"
    layer = _DEPTHWISE[dims - 1](
        conv.in_channels,
        conv.kernel_size,
        conv.stride,
        _conv_padding(conv),
        conv.dilation,
        depth_multiplier=conv.out_channels // conv.in_channels,
        bias=bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
        backend=backend,
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.weight.requires_grad_(conv.weight.requires_grad)
    layer.training = conv.training
    return layer
