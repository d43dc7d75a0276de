"""Peak bytes of the tensors a call allocates, on any device: what a training step's memory is made of.

``torch.cuda.max_memory_allocated`` answers this on a GPU only (and counts the caching allocator's blocks). This
watches the PyTorch operators a call runs (a ``TorchDispatchMode``): after each one it adds up the storages
allocated since the call began that are still alive — held by Python, by autograd's saved tensors or by the
graph — and keeps the maximum. Storages an operator allocates and frees inside itself (a custom op's scratch
buffers, a library's workspace) are not seen; tensors that existed before the call are not counted.

>>> import torch
>>> def step():
...     a = torch.ones(1000)      # 4000 bytes
...     b = a * 2                 # 8000 bytes live
...     del a
...     return b + 1              # b and the result: 8000 bytes live again
>>> peak_live_bytes(step)
8000
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveBytes", "peak_live_bytes"]


class LiveBytes(TorchDispatchMode):
    """While active, ``peak`` is the most bytes of storages allocated under it and alive at once, sampled after
    every operator; ``peak_sizes`` the sizes of those storages (largest first) and ``peak_after`` the operator
    after which the peak was reached: what the peak is made of; ``live`` the bytes alive now.

    >>> with LiveBytes() as tracker:
    ...     a, b = torch.ones(100), torch.ones(10)
    ...     del a
    ...     c = b * 2
    >>> tracker.peak, tracker.peak_sizes, tracker.peak_after
    (440, [400, 40], 'aten.ones.default')
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0
        self.peak_sizes: list[int] = []
        self.peak_after = ""
        self._storages: dict[int, tuple[weakref.ref, int]] = {}  # data pointer -> (storage, bytes)

    @property
    def live(self) -> int:
        return sum(size for ref, size in self._storages.values() if ref() is not None)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            known = self._storages.get(pointer)
            if pointer in inputs or (known is not None and known[0]() is storage):
                continue  # a view or an in-place result: its storage is counted already, or is not the call's
            self._storages[pointer] = (weakref.ref(storage), storage.nbytes())
        live = self.live
        if live > self.peak:
            self.peak, self.peak_after = live, str(func)
            self.peak_sizes = sorted((size for ref, size in self._storages.values() if ref() is not None), reverse=True)
        return out


def peak_live_bytes(fn: Callable[[], object]) -> int:
    """The most bytes of tensors allocated by ``fn()`` alive at once (see the module docstring); what ``fn``
    returns counts while ``fn`` runs."""
    with LiveBytes() as tracker:
        fn()
    return tracker.peak
