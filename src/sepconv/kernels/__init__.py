"""Triton GPU kernels behind the layers' ``backend="triton"``; reached through :mod:`sepconv.layers` dispatch.

Importing this package needs Triton (installed with PyTorch's CUDA builds on Linux).
``sepconv.kernels.available()`` says whether it can be used without importing it.
"""

from __future__ import annotations

import importlib.util

__all__ = [
    "BatchNormArgs",
    "ExcitationArgs",
    "available",
    "depthwise_conv2d",
    "separable_conv2d",
    "separable_conv2d_batch_norm",
]


# looked up once, at import (finds the package without importing it); a plain global, not a functools.cache: Dynamo
# traces through cache wrappers with a warning on every torch.compile of a model with our layers
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """True when Triton is installed, so ``sepconv.kernels`` can be imported."""
    return _TRITON_FOUND


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
