"""Our Triton launches replaced by stubs that do nothing but count themselves: what a call costs around its kernels
(allocations, autograd, host time), measured on a CPU. Shared by ``training_memory.py`` and ``block_host_path.py``.

    with stubbed_launches():
        ...  # every kernel[grid](...) of ours returns at once; StubLaunch.launches counts them
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

from sepconv.kernels import batch_norm as batch_norm_module
from sepconv.kernels import depthwise as depthwise_module
from sepconv.kernels import separable as separable_module

KERNELS = {  # the module globals our host code launches them through
    depthwise_module: ("depthwise_forward_kernel", "depthwise_grad_input_kernel", "depthwise_grad_weight_kernel"),
    separable_module: ("separable_forward_kernel", "finalize_moments_kernel"),
    batch_norm_module: ("depthwise_moments_kernel",),
}


class StubLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing but count itself."""

    launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            StubLaunch.launches += 1

        return launch


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """While active, every kernel of :data:`KERNELS` is a :class:`StubLaunch` (the custom ops still allocate their
    outputs, uninitialized)."""
    with contextlib.ExitStack() as stubs:
        for module, names in KERNELS.items():
            for name in names:
                stubs.enter_context(mock.patch.object(module, name, StubLaunch()))
        yield
