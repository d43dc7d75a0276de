"""What a module is, as :func:`sepconv.accelerate` reads it: a conv whose computation it knows (depthwise,
1x1), a norm it can fold or keep, a module that runs nothing.

>>> from torch import nn
>>> is_depthwise(nn.Conv2d(8, 16, 3, groups=8)), is_pointwise(nn.Conv2d(8, 4, 1), 8), conv_dims(nn.Conv3d(1, 1, 1))
(True, True, 3)
"""

from __future__ import annotations

from torch import nn

from sepconv._block_tables import MIXED_CONVS, SAME_PADDED_CONVS, TIMM_NORM_ACT, qualified_name
from sepconv.dispatch import batch_norm_2d
from sepconv.folding import foldable_norm
from sepconv.layers import (
    DepthwiseConv1d,
    DepthwiseConv2d,
    DepthwiseConv3d,
    PointwiseConv1d,
    PointwiseConv2d,
    PointwiseConv3d,
)


def is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def pads_same(module: nn.Module) -> bool:
    return qualified_name(module) in SAME_PADDED_CONVS


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # by spatial dimensions - 1, as the three below
DEPTHWISE = (DepthwiseConv1d, DepthwiseConv2d, DepthwiseConv3d)
_OURS = (*DEPTHWISE, PointwiseConv1d, PointwiseConv2d, PointwiseConv3d)


def conv_dims(conv: nn.Module) -> int:
    """The spatial dimensions of an ``nn.ConvNd`` (1, 2 or 3)."""
    return next(d for d, cls in enumerate(CONVS, 1) if isinstance(conv, cls))


def plain_conv(module: nn.Module) -> bool:
    """An ``nn.Conv1d/2d/3d`` whose computation we know: its own forward, one of our layers, or one of
    :data:`SAME_PADDED_CONVS` (its padding is :func:`conv_padding`). Other subclasses with a forward of their own
    are left alone. (Chains are fused in 2-d only; 1-d and 3-d convs have their norms folded.)"""
    return isinstance(module, CONVS) and (
        type(module).forward is CONVS[conv_dims(module) - 1].forward or isinstance(module, _OURS) or pads_same(module)
    )


def conv_padding(conv: nn.Conv2d) -> str | tuple[int, ...]:
    """The padding a :func:`plain_conv` computes with, as our layers and kernels take it."""
    return "same" if pads_same(conv) else conv.padding  # type: ignore[return-value]


def is_depthwise(module: nn.Module) -> bool:
    return (
        plain_conv(module)
        and module.groups == module.in_channels
        and module.out_channels % module.in_channels == 0
        and module.padding_mode == "zeros"
    )


def is_pointwise(module: nn.Module, channels: int) -> bool:
    return (
        plain_conv(module)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and conv_padding(module) in ((0, 0), "valid", "same")  # 'same' pads nothing for a 1x1 stride-1 conv
        and module.groups == 1
        and module.in_channels == channels
    )


def mixed_conv(module: nn.Module) -> bool:
    parts = list(module.children())
    return qualified_name(module) in MIXED_CONVS and bool(parts) and all(plain_conv(part) for part in parts)


def norm_and_activation(
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
    if dims != 2 or qualified_name(module) != TIMM_NORM_ACT or type(getattr(module, "drop", None)) is not nn.Identity:
        return None
    plain = not module.training and module.track_running_stats and module.running_mean is not None
    if not plain or module.num_features != channels:
        return None
    return module, None if type(module.act) is nn.Identity else module.act


def batch_statistics_norm(module: nn.Module | None, channels: int) -> tuple[nn.Module, nn.Module | None] | None:
    """(norm, the activation it applies or None) for a norm between the convs that :func:`norm_and_activation`
    could not fold but the fused kernel computes with each batch's statistics: a plain ``BatchNorm2d``, or timm's
    ``BatchNormAct2d`` (nn.BatchNorm2d's forward, then an identity dropout and its activation), either mode."""
    if module is None:
        return None
    if batch_norm_2d(module, channels):
        return module, None
    if qualified_name(module) != TIMM_NORM_ACT or type(getattr(module, "drop", None)) is not nn.Identity:
        return None
    if not isinstance(module, nn.BatchNorm2d) or module.num_features != channels:
        return None
    return module, None if type(module.act) is nn.Identity else module.act


def no_op(module: nn.Module | None) -> bool:
    """Absent, ``nn.Identity`` or a dropout of probability 0: nothing to run between the convs."""
    return module is None or type(module) is nn.Identity or (type(module) is nn.Dropout and module.p == 0)


def has_hooks(module: nn.Module | None) -> bool:
    """Whether ``module`` has forward, forward-pre or backward hooks of its own (global hooks see every call alike):
    replaced or absorbed, it would no longer be called and its hooks would never fire."""
    return module is not None and bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )
