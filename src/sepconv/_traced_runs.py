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
import inspect
from collections import Counter

import torch
from torch import nn


class _LeafTracer(torch.fx.Tracer):
    """torch.fx's tracer with every submodule a leaf: a module's forward as calls of its submodules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def traced_graph(module: nn.Module) -> torch.fx.Graph | None:
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


def linear_runs(graph: torch.fx.Graph, module: nn.Module) -> list[list[str]]:
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
