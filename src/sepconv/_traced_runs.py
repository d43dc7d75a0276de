"""Which of a module's children its own forward runs one after the other, read from a torch.fx trace (every
submodule a leaf), for :func:`sepconv.accelerate` to rewrite them as a Sequential's.

>>> from torch import nn
>>> class Block(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv, self.bn, self.act = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.ReLU()
...     def forward(self, x):
...         return self.act(self.bn(self.conv(x))) + 1
>>> block = Block()
>>> linear_runs(traced_graph(block), block)
[['conv', 'bn', 'act']]
"""

from __future__ import annotations

import copy
import dis
import inspect
import sys
from collections import Counter
from types import CodeType

import torch
from torch import nn


class _LeafTracer(torch.fx.Tracer):
    """torch.fx's tracer with every submodule a leaf: a module's forward as calls of its submodules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def defaulted_arguments(module: nn.Module) -> list[str]:
    """The names of the arguments of ``module``'s forward that have defaults."""
    parameters = inspect.signature(type(module).forward).parameters.values()
    return [parameter.name for parameter in parameters if parameter.default is not inspect.Parameter.empty]


def traced_graph(
    module: nn.Module, *, fix_defaults: bool = True, ran: set[CodeType] | None = None
) -> torch.fx.Graph | None:
    """The graph of ``module``'s own forward (torch.fx, submodules as leaves), or None where it cannot be traced
    (control flow on tensor values, anything else that raises). With ``fix_defaults`` the arguments with defaults
    are fixed to them (the path of a call that leaves them out), else they are traced as inputs like the others
    (a forward that branches on their values cannot be traced then). ``ran`` collects the code of the Python
    functions the trace called (:func:`called_elsewhere`). Traced on a shallow copy, so attributes its forward sets
    stay there (a proxy cannot be set as a parameter, buffer or module: that raises)."""
    previous = sys.getprofile()
    try:
        probe = copy.copy(module)  # its own __dict__: attributes the forward sets land there
        defaults = {}
        if fix_defaults:
            parameters = inspect.signature(type(module).forward).parameters
            defaults = {name: parameters[name].default for name in defaulted_arguments(module)}
        if ran is not None and previous is None:
            sys.setprofile(lambda frame, event, _: ran.add(frame.f_code) if event == "call" else None)
        elif ran is not None:  # a profiler runs (not to be displaced): forward alone counts as run, others do not
            ran.add(getattr(inspect.unwrap(type(module).forward), "__code__", None))
        return _LeafTracer().trace(probe, concrete_args=defaults or None)
    except Exception:  # any failure to trace leaves the module to the other rules
        return None
    finally:
        if previous is None:
            sys.setprofile(None)


def called_elsewhere(module: nn.Module, ran: set[CodeType]) -> dict[str, list[str]]:
    """The attributes of ``module`` that methods of its class which the traces did not run (``ran``; nor
    ``__init__``) use as values (``self.conv(x)``; not ``self.conv.weight``): a method like ``features(self, x)``
    would call them beside forward. Each attribute name with those methods' names."""
    used: dict[str, list[str]] = {}
    seen: set[str] = set()  # a method a subclass overrides is not the module's
    for cls in type(module).__mro__:
        if cls is object or cls.__module__.split(".")[0] == "torch":
            continue
        for name, value in vars(cls).items():
            if name in seen:
                continue
            seen.add(name)
            wrapped = [getattr(value, "__func__", value), getattr(value, "fget", None), getattr(value, "fset", None)]
            for function in (inspect.unwrap(f) for f in wrapped if callable(f)):  # methods, static, class, property
                code = getattr(function, "__code__", None)
                if code is None or name == "__init__" or code in ran or not _takes_input(function):
                    continue
                for attribute in _attributes_used(code):
                    used.setdefault(attribute, []).append(name)
    return used


def _takes_input(function: object) -> bool:
    """Whether a method has a positional argument without default besides ``self``: one that may run the modules on
    an input (``features(self, x)``), not one that sets them up (``zero_init_last(self)``)."""
    code = function.__code__  # type: ignore[attr-defined]
    return code.co_argcount - len(getattr(function, "__defaults__", None) or ()) > 1


def _attributes_used(code: CodeType) -> set[str]:
    """Names loaded as attributes in ``code`` (and the functions it defines) whose value is used as it is: not
    only to read an attribute of theirs (``self.conv.weight``) or call a method of theirs."""
    instructions = list(dis.get_instructions(code))
    used = set()
    for instruction, following in zip(instructions, [*instructions[1:], None], strict=True):
        attribute = instruction.opname in ("LOAD_ATTR", "LOAD_METHOD")
        through = following is not None and following.opname in ("LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR")
        if attribute and not through:
            used.add(instruction.argval)
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            used |= _attributes_used(constant)
    return used


def linear_runs(graph: torch.fx.Graph, module: nn.Module, *others: torch.fx.Graph) -> list[list[str]]:
    """Names of ``module``'s children (or of modules in its ``nn.ModuleList`` / ``nn.ModuleDict`` children, which run
    nothing themselves: dotted) that its forward runs one after the other: each called once, on one argument, its
    output used by the next one alone (the last one's by anything); none whose attributes the forward reads. With
    ``others`` (traces of other call paths of the same forward), only what runs so in every graph, in ``graph``'s
    order."""
    links = set.intersection(*(_links(g, module) for g in (graph, *others)))
    following = dict(links)  # one user each: one link from each module
    starts = _usable_targets(graph, module)
    for other in others:
        starts &= _usable_targets(other, module)
    followed = set(following.values())
    runs = []
    for node in graph.nodes:
        target = str(node.target)
        if node.op == "call_module" and target in starts and target not in followed:
            run = [target]
            while run[-1] in following:
                run.append(following[run[-1]])
            runs.append(run)
    return runs


def _usable_targets(graph: torch.fx.Graph, module: nn.Module) -> set[str]:
    """The modules ``graph`` calls that may join a run: :func:`linear_runs`' conditions on each."""
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

    return {str(node.target) for node in calls if usable(node)}


def _links(graph: torch.fx.Graph, module: nn.Module) -> set[tuple[str, str]]:
    """(a, b) for each usable module ``a`` whose one user is the usable module ``b``, on ``a``'s output itself."""
    usable = _usable_targets(graph, module)
    links = set()
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) not in usable:
            continue
        users = list(node.users)
        # its one user a module whose one argument is this output itself (not a tuple holding it)
        user = users[0] if len(users) == 1 else None
        if user is not None and user.op == "call_module" and str(user.target) in usable and user.args[0] is node:
            links.add((str(node.target), str(user.target)))
    return links


def _own_module(module: nn.Module, target: str) -> bool:
    """Whether ``target`` names a child of ``module``, or a module inside its containers (ModuleList, ModuleDict)."""
    *containers, name = target.split(".")
    for container in containers:
        module = module._modules.get(container)  # type: ignore[assignment]
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            return False
    return module._modules.get(name) is not None
