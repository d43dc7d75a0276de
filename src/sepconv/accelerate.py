"""``sepconv.accelerate``: route the depthwise separable blocks of an existing model through our kernels.

It finds ``depthwise conv -> (BatchNorm) -> (activation) -> (squeeze-excitation) -> 1x1 conv -> (BatchNorm)`` chains
wherever modules run one after the other (``nn.Sequential`` and its plain subclasses such as torchvision's
``Conv2dNormActivation``, nested at any depth; our ``SeparableConv2d``) and replaces each by a
:class:`FusedSeparableConv2d`: BatchNorms in eval mode are folded into the conv weights and the activation is fused:
with ``backend="triton"`` the whole chain is one Triton kernel (:func:`sepconv.kernels.separable_conv2d`; two where
:func:`sepconv.kernels.separable.fuses` says no). With ``backend="auto"`` (default) each module takes the path
:mod:`sepconv.dispatch` measured faster: PyTorch's convs (on the folded weights), and our depthwise kernel for large
kernels in channels_last on CUDA; auto never runs the fused kernel, which measured slower.

timm's blocks run their modules from their own forward: its efficientnet family (``DepthwiseSeparableConv``,
``InvertedResidual``: timm's mobilenetv1/v2/v3, mnasnet, efficientnet; MobileNetV4's ``UniversalInvertedResidual``, both
of its depthwise convs), ReXNet's and EfficientViT's (MIT) blocks, ``timm.layers``' ``SeparableConv2d`` /
``SeparableConvNormAct`` and xception_aligned's ``SeparableConv2d`` (the table
:data:`sepconv._block_tables.TIMM_BLOCKS`), recognised by qualified class name (timm is not a dependency). In eval mode,
the block's depthwise conv becomes the fused module of the conv, its norm (folded) and activation (fused), its
squeeze-excitation if any (kept), the 1x1 conv and that one's norm (folded; an activation that norm applies stays in its
place), and the absorbed modules ``nn.Identity``: the block's forward, shortcut included, runs as before. timm's
``Conv2dSame`` (the tf_ models' stride-2 convs: TensorFlow's 'same' padding, computed at run time) is taken as a conv
with ``padding="same"``, which our modules and kernels compute the same way; MixNet's ``MixedConv2d`` (channels split
over several convs) takes the norm after it folded into each of its convs.

A BatchNorm2d between the convs in training mode cannot be folded once (it normalizes with each batch's statistics).
With ``backend="triton"`` the fused module keeps it (``mid_norm``, a ``BatchNorm2d`` or in timm's blocks a
``BatchNormAct2d``, whose activation is fused; listed in :attr:`Acceleration.batch_norms`) and folds the batch's
statistics in on each call (a first pass over the input computes them:
:func:`sepconv.kernels.separable_conv2d_batch_norm`), updating its running statistics as BatchNorm2d does, so the
accelerated model trains as the original and switches to the running statistics in eval mode. Otherwise the chain is not
fused and only its depthwise conv is replaced, by a :class:`~sepconv.DepthwiseConv2d` (the measured choice: CPU layouts,
our depthwise kernel for large kernels on CUDA). A training-mode BatchNorm after the 1x1 conv (a ``BatchNorm2d``, or
timm's ``BatchNormAct2d`` without an activation) is kept the same way with ``backend="triton"`` (``out_norm``; its batch
statistics come from the fused kernel's statistics epilogue, so its input is read once, not twice); otherwise it stays
as it is and the part before it is fused. A squeeze-excitation between the activation and the 1x1 conv (torchvision's
``SqueezeExcitation``: MobileNetV3, EfficientNet; timm's ``SqueezeExcite``; :mod:`sepconv.squeeze_excitation`) is kept
in the fused module (``excitation``, listed in :attr:`Acceleration.excitation`): with ``backend="triton"`` the fused
kernel's op computes it, in training too, with gradients for its own convs
(:mod:`sepconv.kernels.differentiable_excitation`; EfficientNet's and MobileNetV3's whole blocks: both norms with batch
statistics, the activation and the squeeze-excitation in one op) where its activation and gate are ones the op knows
(:func:`~sepconv.squeeze_excitation.excitation_gate`), else for inference only (:mod:`sepconv.kernels.excitation`);
otherwise, and on other backends, the module runs it itself. Depthwise convs outside any chain are replaced by a
DepthwiseConv2d too, with a following eval-mode BatchNorm folded in (1-d and 3-d ones by our DepthwiseConv1d /
DepthwiseConv3d: chains are fused in 2-d only, norms folded in any). Modules of any other class with a forward of their
own (a user's blocks, which run their attributes as ``self.bn(self.conv(x))``) are traced with torch.fx, their
submodules as leaves: children the forward runs one after the other, each called once, each output used by the next
alone, are rewritten as a Sequential's are, in place (the first becomes the replacement, the others ``nn.Identity``); a
forward that cannot be traced (control flow on tensor values) is left to the other rules. A trace sees one call path:
where the forward has arguments with defaults, it is traced with them fixed and with them as inputs, and only what
runs one after the other in both traces is rewritten (a forward that branches on them, ``return f if features else
self.bn(f)``, cannot be traced with them as inputs: its runs are left, listed as skipped). Children that methods of
the class besides those forward ran use as values (``def features(self, x): return self.conv(x)``: a method with an
input) are kept as they are, listed as skipped. What is not seen: a module reached otherwise (``getattr(self,
name)``, a function outside the class, the caller's code: ``model.conv(x)``) runs as rewritten, here a conv with its
norm folded in; call such a model through its forward. Every other conv followed by
an eval-mode BatchNorm (in a Sequential, as the attributes the modules of :data:`sepconv._block_tables.CONV_NORMS` run:
timm's stems, expanding 1x1 convs, last convs and ResNet blocks, torchvision's ResNet, GoogLeNet and Inception blocks,
or in a traced forward) becomes one ``nn.Conv2d`` with that norm folded into its weights (kind ``"folded conv"``; a
``BatchNormAct2d`` leaves its activation behind): those norms read and wrote the largest activations (the CPU gain:
README, ``benchmarks/cpu_torchvision.py``). A module the model runs from more than one place (shared weights), or
holds outside its submodules (``self.ops = [self.conv]``: that reference would still call the old module), is left as
it is, and so are the norms after it. Modules with hooks of their own (forward, forward-pre, backward) are left as
they are, with the chain or norm they would have joined, and so are the runs across a hooked Sequential's edge (its
output or input would change); each is listed as a change of kind ``"skipped"`` with its ``reason``. New parameters
require grad where a parameter they are made of does (a frozen model stays frozen).

Every Sequential keeps its length and indices, so code that indexes or slices one at the edges of what was replaced
(``features[:4]``, torchvision's and timm's blocks) runs as before: a chain's replacement sits where its first module
was, ``nn.Identity`` where the others were, inside each nested Sequential (a part of a chain run alone, a slice that
ends inside it or a nested Sequential it runs out of, computes all of the chain or none of it); a ``SeparableConv2d``
with a part replaced becomes a Sequential of its parts (same names). The input model is not modified; the replacements'
parameters have names of their own (``FusedSeparableConv2d``'s ``dw_weight`` ...), so state_dict keys change: the result
is for running, keep checkpoints of the original.

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
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from sepconv._block_tables import CONV_NORMS, TIMM_BLOCKS, Chain, qualified_name
from sepconv._folded_modules import depthwise_replacement, folded_conv, folded_mixed_conv, folded_weights
from sepconv._module_kinds import (
    batch_statistics_norm,
    conv_dims,
    conv_padding,
    has_hooks,
    is_depthwise,
    is_plain_sequential,
    is_pointwise,
    mixed_conv,
    no_op,
    norm_and_activation,
    plain_conv,
)
from sepconv._traced_runs import called_elsewhere, defaulted_arguments, linear_runs, traced_graph
from sepconv.dispatch import backend_arg, batch_norm_2d, fused_activation
from sepconv.folding import foldable_norm
from sepconv.fused_separable import FusedSeparableConv2d
from sepconv.layers import SeparableConv2d
from sepconv.squeeze_excitation import is_excitation

__all__ = ["Acceleration", "FusedSeparableConv2d", "accelerate"]


@dataclass(frozen=True)
class Acceleration:
    """One change: the modules at ``replaced`` (paths in the input model) became one ``kind`` module."""

    # "fused separable" | "depthwise" | "folded conv" (another conv with the eval-mode BatchNorm after it) | "skipped"
    # (modules that would have been replaced, left as they are: ``reason`` says why)
    kind: str
    replaced: tuple[str, ...]
    folded_norms: tuple[str, ...]
    activation: str | None
    # norms between the convs kept as modules (training mode: their batch statistics are folded in on each call)
    batch_norms: tuple[str, ...] = ()
    excitation: str | None = None  # a squeeze-excitation between the activation and the 1x1 conv, kept as a module
    reason: str | None = None  # why a "skipped" change was not made


def accelerate(model: nn.Module, *, backend: str = "auto") -> tuple[nn.Module, list[Acceleration]]:
    """A copy of ``model`` whose separable chains run fused (see the module docstring), and the changes.

    Outputs equal the original's to float rounding (BatchNorm folding reorders a few products).
    ``backend`` is given to every module it creates: ``"auto"`` (our kernels only where they measured
    faster, see :mod:`sepconv.dispatch`), ``"triton"`` (always; fused chains) or ``"torch"``.
    A module the model runs from more than one place (shared weights) is left as it is.

    >>> accelerate(None)
    Traceback (most recent call last):
    TypeError: accelerate's model must be an nn.Module (a torch model), got None
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate's model must be an nn.Module (a torch model), got {model!r:.80}")
    backend_arg(backend, 2)
    model = copy.deepcopy(model)
    reached = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    shared = {key for key, times in reached.items() if times > 1} | _held_outside(model)
    surgery = _Surgery(backend, frozenset(shared))
    if has_hooks(model) and (isinstance(model, SeparableConv2d) or is_depthwise(model)):
        surgery.skip(("",), ("",))
        return model, surgery.changes
    if is_plain_sequential(model) or isinstance(model, SeparableConv2d):
        return _rewrite_sequence(model, "", surgery), surgery.changes
    if is_depthwise(model):
        surgery.changes.append(Acceleration("depthwise", ("",), (), None))
        return depthwise_replacement(model, None, backend), surgery.changes
    _rewrite_module(model, "", surgery)
    return model, surgery.changes


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

    def skip(self, paths: tuple[str, ...], hooked: tuple[str, ...]) -> None:
        """Record modules left as they are because those at ``hooked`` have hooks."""
        self.changes.append(Acceleration("skipped", paths, (), None, reason=f"has hooks: {', '.join(hooked)}"))


# nn.Module's own bookkeeping (parameters, buffers, submodules, hooks): every other attribute is the model's own
_REGISTRIES = frozenset(vars(nn.Module()))


def _held_outside(model: nn.Module) -> set[int]:
    """Ids of the modules that ``model``'s modules hold outside their submodules (a plain attribute, or in a list,
    tuple, set or dict, up to three levels deep): replaced, the holder would still call the old module."""
    held: set[int] = set()

    def scan(value: object, depth: int) -> None:
        if isinstance(value, nn.Module):
            held.add(id(value))
        elif depth < 3 and isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                scan(item, depth + 1)
        elif depth < 3 and isinstance(value, dict):
            for item in value.values():
                scan(item, depth + 1)

    for module in model.modules():
        for name, value in vars(module).items():
            if name not in _REGISTRIES:
                scan(value, 0)
    return held


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _rewrite_module(module: nn.Module, path: str, surgery: _Surgery) -> None:
    """A module whose forward is its own: a timm block's chain rewritten in place, then its children."""
    if id(module) in surgery.visited:
        return
    surgery.visited.add(id(module))
    if qualified_name(module) in CONV_NORMS or qualified_name(module) in TIMM_BLOCKS:
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
        if is_plain_sequential(child):  # rewritten in place, shared or not (in a shared one nothing is replaceable)
            _rewrite_sequence(child, path, surgery)
            continue
        if not surgery.replaceable(child) or not (isinstance(child, SeparableConv2d) or is_depthwise(child)):
            _rewrite_module(child, path, surgery)
            continue
        if has_hooks(child):
            surgery.skip((path,), (path,))
            continue
        if isinstance(child, SeparableConv2d):
            replacement = _rewrite_sequence(child, path, surgery)
        else:
            replacement = depthwise_replacement(child, None, surgery.backend)
            surgery.changes.append(Acceleration("depthwise", (path,), (), None))
        setattr(module, name, replacement)


def _rewrite_traced(module: nn.Module, path: str, surgery: _Surgery) -> None:
    """A module with a forward of its own, not torch's and not in our tables, with a conv among its children: the
    runs of children its forward calls one after the other (:func:`linear_runs`, from a torch.fx trace) are
    rewritten as a Sequential's are (fused chains, routed depthwise convs, convs with their eval-mode norm folded),
    in place: the run's first child becomes the replacement, the others ``nn.Identity``. A forward with defaulted
    arguments is traced twice (defaults fixed, and as inputs): only runs of both traces are rewritten; children that
    other methods call (:func:`called_elsewhere`) are kept; what is left so is listed as skipped."""
    containers = [c for c in module.children() if isinstance(c, (nn.ModuleList, nn.ModuleDict))]
    children = [*module.children(), *(m for container in containers for m in container.children())]
    if type(module).__module__.split(".")[0] == "torch" or not any(plain_conv(c) for c in children):
        return
    ran: set = set()
    graph = traced_graph(module, ran=ran)
    if graph is None:
        return
    defaulted = defaulted_arguments(module)
    general = traced_graph(module, fix_defaults=False, ran=ran) if defaulted else graph
    elsewhere = called_elsewhere(module, ran)  # children other methods call: kept as they are
    runs = [] if general is None else _split(linear_runs(graph, module, general), elsewhere)
    made = len(surgery.changes)
    for run in runs:
        _rewrite_run(module, path, run, surgery)
    if runs == linear_runs(graph, module):
        return
    # what the defaults' trace alone would have rewritten, listed as skipped with the reason
    done = {change.replaced for change in surgery.changes[made:]}
    dry = _Surgery(surgery.backend, surgery.shared)
    for run in linear_runs(graph, module):
        list(_replacements([(_join(path, name), module.get_submodule(name)) for name in run], dry))
    for change in dry.changes:
        if change.kind == "skipped" or change.replaced in done:
            continue
        names = {name[len(path) :].lstrip(".").split(".")[0] for name in change.replaced}
        methods = sorted({method for name in names for method in elsewhere.get(name, ())})
        if methods:
            reason = f"methods besides forward call them ({', '.join(methods)})"
        else:
            reason = (
                f"its forward may run these otherwise when its defaulted arguments ({', '.join(defaulted)}) are given"
            )
        surgery.changes.append(Acceleration("skipped", change.replaced, (), None, reason=reason))


def _split(runs: list[list[str]], kept: dict[str, list[str]]) -> list[list[str]]:
    """``runs`` without the children named in ``kept`` (dotted names by their first part), cut where they were."""
    parts: list[list[str]] = []
    for run in runs:
        part: list[str] = []
        for name in run:
            if name.split(".")[0] in kept:
                parts, part = parts + ([part] if part else []), []
            else:
                part.append(name)
        parts += [part] if part else []
    return parts


def _rewrite_run(module: nn.Module, path: str, run: list[str], surgery: _Surgery) -> None:
    """The children at ``run`` (names in ``module``), which its forward runs one after the other, rewritten."""
    leaves = [(_join(path, name), module.get_submodule(name)) for name in run]
    for start, count, replacements in _replacements(leaves, surgery):
        for k, name in enumerate(run[start : start + count] if replacements is not None else ()):
            replacement = replacements[k] if k < len(replacements) else nn.Identity()
            _set_part(module, name, replacement)
            surgery.created.add(id(replacement))


# a leaf's place: (container, the name it holds the next one by, the container's path) from the rewritten one down
_Trail = tuple[tuple[nn.Module, str, str], ...]
_SEPARABLE_PARTS = ("depthwise", "mid_norm", "mid_activation", "pointwise")


def _leaves(
    module: nn.Module, path: str, surgery: _Surgery, trail: _Trail = ()
) -> Iterator[tuple[str, nn.Module, _Trail]]:
    """The modules a plain Sequential (or our SeparableConv2d) runs, in order, nested ones entered (a
    SeparableConv2d unless shared or hooked: one with a part replaced becomes a Sequential), each with its trail."""
    if isinstance(module, SeparableConv2d):
        names = [name for name in _SEPARABLE_PARTS if module._modules.get(name) is not None]
    else:  # as Sequential.forward runs them: a module twice included
        names = [name for name, child in module._modules.items() if child is not None]
    for name in names:
        child, child_path, step = module._modules[name], _join(path, name), (*trail, (module, name, path))
        separable = isinstance(child, SeparableConv2d) and surgery.replaceable(child)
        if separable and has_hooks(child):  # its parts replaced, it would be a Sequential without its hooks
            surgery.skip((child_path,), (child_path,))
        if is_plain_sequential(child) or (separable and not has_hooks(child)):
            yield from _leaves(child, child_path, surgery, step)
        else:
            yield child_path, child, step


def _rewrite_sequence(module: nn.Module, path: str, surgery: _Surgery) -> nn.Module:
    """A plain Sequential (or our SeparableConv2d) and those nested in it rewritten in place, each keeping its
    length and indices: a run's replacements where its first modules were, ``nn.Identity`` where the others were.
    Returns ``module``, or for a SeparableConv2d with a part replaced the Sequential of its parts to put there."""
    if id(module) in surgery.visited:
        return module
    surgery.visited.add(id(module))
    found = list(_leaves(module, path, surgery))
    leaves, trails = [(p, m) for p, m, _ in found], [t for _, _, t in found]
    sequences: dict[int, nn.Module] = {}  # SeparableConv2d -> the Sequential of its parts now in its place
    for start, count, replacements in _replacements(leaves, surgery, trails):
        if replacements is None:
            _rewrite_module(leaves[start][1], leaves[start][0], surgery)
            continue
        for k in range(count):
            trail = trails[start + k]
            replacement = replacements[k] if k < len(replacements) else nn.Identity()
            _container(trail, len(trail) - 1, sequences)._modules[trail[-1][1]] = replacement
    return sequences.get(id(module), module)


def _container(trail: _Trail, depth: int, sequences: dict[int, nn.Module]) -> nn.Module:
    """The container at ``depth`` of ``trail``, to put a replacement in: a SeparableConv2d becomes (once) a plain
    Sequential of its parts, put in its own container's place (its forward would call the parts' own methods)."""
    container = trail[depth][0]
    if not isinstance(container, SeparableConv2d):
        return container
    if id(container) not in sequences:
        parts = ((name, container._modules.get(name)) for name in _SEPARABLE_PARTS)
        sequence = nn.Sequential(OrderedDict((name, part) for name, part in parts if part is not None))
        sequence.training = container.training  # this module's flag only: the parts keep theirs
        sequences[id(container)] = sequence
        if depth:
            _container(trail, depth - 1, sequences)._modules[trail[depth - 1][1]] = sequence
    return sequences[id(container)]


def _hooked(
    leaves: list[tuple[str, nn.Module]], trails: list[_Trail] | None, start: int, end: int, kept: str | None = None
) -> tuple[str, ...]:
    """Paths of the modules with hooks that replacing ``leaves[start:end]`` would no longer call, or would call on
    other values: those leaves (not ``kept``: a squeeze-excitation the fused module calls) and the containers (of
    ``trails``) holding some of them but not all; a container holding them all computes as before."""
    hooked = [leaf_path for leaf_path, leaf in leaves[start:end] if leaf_path != kept and has_hooks(leaf)]
    if trails is not None:
        run = trails[start:end]
        common = 0
        while all(len(t) > common and t[common][0] is run[0][common][0] for t in run):
            common += 1
        containers = {t[d][2]: t[d][0] for t in run for d in range(common, len(t))}
        hooked += [container_path for container_path, container in containers.items() if has_hooks(container)]
    return tuple(hooked)


def _replacements(
    leaves: list[tuple[str, nn.Module]], surgery: _Surgery, trails: list[_Trail] | None = None
) -> Iterator[tuple[int, int, list[nn.Module] | None]]:
    """What modules run one after the other (``leaves``: paths and modules, in order; ``trails``: their containers,
    for :func:`_hooked`) become: (start, count, replacements) for each run of ``count`` leaves from ``start``
    replaced by the modules ``replacements`` (at most ``count``, in the places of the first ones: a fused chain; a
    routed depthwise conv with the eval-mode norm after it folded in; another conv with its norm folded; a timm
    ``BatchNormAct2d`` folded leaves its activation in its place; each change recorded in ``surgery``), and
    (start, 1, None) for a leaf left as it is. Where hooks stop the largest change from a leaf, a smaller one is
    tried and the largest is recorded as skipped."""
    i = 0
    while i < len(leaves):
        blocked = None  # (paths, hooked paths) of the largest change that hooks stopped here
        chain = _match_chain(leaves, i, surgery.backend)
        if chain is not None and surgery.replaceable(*(module for _, module in leaves[i : chain[0]])):
            end, fused, change = chain
            hooked = _hooked(leaves, trails, i, end, change.excitation)
            if not hooked:
                fused.backend = surgery.backend
                surgery.changes.append(change)
                yield i, end - i, [fused]
                i = end
                continue
            blocked = (change.replaced, hooked)
        leaf_path, leaf = leaves[i]
        follower = leaves[i + 1] if i + 1 < len(leaves) else None
        dims = conv_dims(leaf) if plain_conv(leaf) else 2
        folds = None if follower is None else norm_and_activation(follower[1], getattr(leaf, "out_channels", 0), dims)
        if folds is None or folds[0] is None or not surgery.replaceable(follower[1], folds[1]):
            folds = None
        if folds is not None and (plain_conv(leaf) and surgery.replaceable(leaf)):
            hooked = _hooked(leaves, trails, i, i + 2)
            if hooked:
                blocked, folds = blocked or ((leaf_path, follower[0]), hooked), None
        norm = None if folds is None else folds[0]
        after = [] if folds is None or folds[1] is None else [folds[1]]  # a BatchNormAct2d's activation
        folded = () if folds is None else (follower[0],)
        changed = None
        if is_depthwise(leaf) and surgery.replaceable(leaf):
            hooked = _hooked(leaves, trails, i, i + 1)
            if hooked:
                blocked = blocked or ((leaf_path,), hooked)
            else:
                changed = Acceleration("depthwise", (leaf_path, *folded), folded, None)
                replacements = [depthwise_replacement(leaf, norm, surgery.backend), *after]
        elif plain_conv(leaf) and norm is not None and surgery.replaceable(leaf):
            changed = Acceleration("folded conv", (leaf_path, *folded), folded, None)
            replacements = [folded_conv(leaf, norm), *after]
        if blocked is not None:
            surgery.skip(*blocked)
        if changed is None:
            yield i, 1, None
            i += 1
            continue
        surgery.changes.append(changed)
        yield i, len(changed.replaced), replacements
        i += len(changed.replaced)


def _match_chain(leaves: list[tuple[str, nn.Module]], start: int, backend: str):
    """(end, FusedSeparableConv2d, Acceleration) for a chain starting at ``start``, or None. A training-mode
    BatchNorm between the convs is kept in the fused module for ``backend="triton"`` only: elsewhere that module
    would run PyTorch's ops as the original does, and a :class:`~sepconv.DepthwiseConv2d` for the depthwise conv
    alone runs the measured choice (CPU layouts, our kernel for large kernels on CUDA)."""
    dw = leaves[start][1]
    if not is_depthwise(dw) or conv_dims(dw) != 2:  # the fused module and kernel are 2-d
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
    if i >= len(leaves) or not is_pointwise(leaves[i][1], mid):
        return None
    pw = leaves[i][1]
    i += 1
    kept_out = None
    if i < len(leaves) and foldable_norm(leaves[i][1], pw.out_channels):
        norm2, i = leaves[i], i + 1
    elif i < len(leaves) and backend == "triton" and batch_norm_2d(leaves[i][1], pw.out_channels):
        kept_out, i = leaves[i], i + 1  # training mode: kept, its statistics from the fused kernel's epilogue
    dw_weight, dw_bias = folded_weights(dw.weight, dw.bias, None if norm1 is None else norm1[1])
    pw_weight, pw_bias = folded_weights(pw.weight, pw.bias, None if norm2 is None else norm2[1])
    act_name = None if activation is None else fused_activation(activation[1])
    geometry = (dw.stride, conv_padding(dw), dw.dilation)
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


def _fold_attribute_convs(module: nn.Module, path: str, surgery: _Surgery) -> None:
    """A module of :data:`CONV_NORMS` (its table names the classes) in eval mode: each plain conv whose norm folds
    (an eval-mode ``BatchNorm2d``, or ``BatchNormAct2d`` with an identity dropout) becomes one conv with that norm
    folded in, the norm's attribute its activation (or ``nn.Identity``), so the module's own forward runs as
    before. A plain Sequential in the conv's place (timm's deep stems: conv, norm, act, conv, norm, act, conv) has
    its last conv folded."""
    for conv_name, norm_name in CONV_NORMS.get(qualified_name(module), ()):
        conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
        sequence = conv if isinstance(conv, nn.Module) and is_plain_sequential(conv) and len(conv) else None
        if sequence is not None:  # the Sequential's last module runs right before the norm
            conv_name, conv = f"{conv_name}.{len(sequence) - 1}", sequence[-1]
        if not (isinstance(conv, nn.Module) and (plain_conv(conv) or mixed_conv(conv))):
            continue
        folds = norm_and_activation(norm, conv.out_channels, conv_dims(conv) if plain_conv(conv) else 2)
        if folds is None or folds[0] is None or not surgery.replaceable(module, sequence, conv, norm, folds[1]):
            continue
        if mixed_conv(conv) and not surgery.replaceable(*conv.children()):
            continue
        conv_path, norm_path = _join(path, conv_name), _join(path, norm_name)
        parts = [(conv_path, conv), (norm_path, norm), (_join(path, conv_name.rpartition(".")[0]), sequence)]
        parts += [(_join(conv_path, name), part) for name, part in conv.named_children()]  # a MixedConv2d's convs
        hooked = tuple(part_path for part_path, part in parts if has_hooks(part))
        if hooked:
            surgery.skip((conv_path, norm_path), hooked)
            continue
        folder = folded_mixed_conv if mixed_conv(conv) else folded_conv
        _set_part(module, conv_name, folder(conv, folds[0]))
        setattr(module, norm_name, nn.Identity() if folds[1] is None else folds[1])
        surgery.changes.append(Acceleration("folded conv", (conv_path, norm_path), (norm_path,), None))


def _rewrite_timm_block(block: nn.Module, path: str, surgery: _Surgery) -> None:
    """A timm block of :data:`TIMM_BLOCKS`: each of its chains that :func:`_rewrite_timm_chain` can fuse."""
    chains = TIMM_BLOCKS.get(qualified_name(block), ())
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


def _rewrite_timm_chain(block: nn.Module, path: str, chain: Chain, surgery: _Surgery) -> None:
    """One chain of a timm block (a fusable activation, identity or absent anti-aliasing, a squeeze-excitation kept):
    its depthwise conv becomes a :class:`FusedSeparableConv2d` of the conv, its norm and activation, the 1x1 conv
    and that one's norm (eval mode: folded; a ``BatchNormAct2d``'s activation stays in its place); the other
    modules it absorbed become ``nn.Identity``, so the block's own forward (shortcut, drop-path) still runs. In
    training mode with ``backend="triton"`` the norms are kept in the fused module (batch statistics)."""
    dw_name, norm1_name, act1_name, pw_name, norm2_name, identities, se_name = chain
    backend = surgery.backend
    part = functools.partial(_part, block)
    dw, pw = part(dw_name), part(pw_name)
    if not (dw is not None and is_depthwise(dw) and conv_dims(dw) == 2 and pw is not None):
        return
    norm1 = norm_and_activation(part(norm1_name), dw.out_channels)
    kept = batch_statistics_norm(part(norm1_name), dw.out_channels) if backend == "triton" and norm1 is None else None
    se = part(se_name)
    se = se if se is not None and is_excitation(se, dw.out_channels) else None  # kept, run fused
    names = (dw_name, pw_name, norm1_name, act1_name, norm2_name)
    parents = [part(name.rpartition(".")[0]) for name in names if name is not None and "." in name]
    if not surgery.replaceable(block, *parents, *(part(name) for name in names), se):
        return
    # the modules it would absorb, and those holding them (their output would change): a squeeze-excitation is kept
    hooked = tuple(
        _join(path, name)
        for name in {*(n for n in names if n is not None), *(n.rpartition(".")[0] for n in names if n and "." in n)}
        if has_hooks(part(name))
    )
    others = [part(n) for n in identities] + ([part(se_name)] if se is None and se_name is not None else [])
    if not is_pointwise(pw, dw.out_channels) or not all(no_op(module) for module in others):
        return
    if kept is not None:  # training mode: kept in the fused module, its batch statistics folded in per call
        norm1 = (None, kept[1])
    act1 = part(act1_name) if type(part(act1_name)) is not nn.Identity else None
    if norm1 is None or (norm1[1] is not None and act1 is not None):
        return
    activation = norm1[1] if norm1[1] is not None else act1
    if activation is not None and fused_activation(activation) is None:
        return
    if hooked:
        surgery.skip(tuple(_join(path, name) for name in names if name is not None), tuple(sorted(hooked)))
        return
    # the 1x1 conv's norm: folded (eval) or kept (training, triton); the activation it applies stays in its place
    norm2 = norm_and_activation(part(norm2_name), pw.out_channels)
    kept_out = None
    if norm2 is None and backend == "triton":
        kept_out = batch_statistics_norm(part(norm2_name), pw.out_channels)
    after = (norm2 or kept_out or (None, None))[1]  # the activation left in the norm's place
    norm2_module = None if norm2 is None else norm2[0]
    dw_weight, dw_bias = folded_weights(dw.weight, dw.bias, norm1[0])
    pw_weight, pw_bias = folded_weights(pw.weight, pw.bias, norm2_module)
    act_name = None if activation is None else fused_activation(activation)
    geometry = (dw.stride, conv_padding(dw), dw.dilation)
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
