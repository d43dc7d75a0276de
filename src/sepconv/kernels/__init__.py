"""Triton GPU kernels behind the layers' ``backend="triton"``; reached through :mod:`sepconv.layers` dispatch.

Importing this package needs Triton (installed with PyTorch's CUDA builds on Linux).
``sepconv.kernels.available()`` says whether it can be used without importing it.
"""

from __future__ import annotations

import functools
import importlib.util

__all__ = [
    "BatchNormArgs",
    "ExcitationArgs",
    "available",
    "depthwise_conv2d",
    "separable_conv2d",
    "separable_conv2d_batch_norm",
]


@functools.cache
def available() -> bool:
    """True when Triton is installed, so ``sepconv.kernels`` can be imported (looked up once)."""
    return importlib.util.find_spec("triton") is not None


def __getattr__(name: str):  # lazy: `import sepconv` must not import Triton
    if name == "depthwise_conv2d":
        from sepconv.kernels.depthwise import depthwise_conv2d

        return depthwise_conv2d
    if name == "separable_conv2d":
        from sepconv.kernels.separable import separable_conv2d

        return separable_conv2d
    if name == "BatchNormArgs":
        from sepconv.kernels.output_norm import BatchNormArgs

        return BatchNormArgs
    if name == "ExcitationArgs":
        from sepconv.kernels.differentiable_excitation import ExcitationArgs

        return ExcitationArgs
    if name == "separable_conv2d_batch_norm":
        from sepconv.kernels.batch_norm import separable_conv2d_batch_norm

        return separable_conv2d_batch_norm
    raise AttributeError(f"module 'sepconv.kernels' has no attribute {name!r}")
