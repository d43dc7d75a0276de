"""Other libraries' modules that :func:`sepconv.accelerate` reads by qualified class name (timm is not a
dependency; a class of the same name elsewhere may differ): the separable chains and conv + norm pairs their own
forwards run, and their convs that compute differently from ``nn.Conv2d``'s attributes.

>>> TIMM_BLOCKS["timm.models._efficientnet_blocks.InvertedResidual"][0].pw
'conv_pwl'
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

# nn.Conv2d subclasses whose forward pads for TensorFlow's 'same' at run time (any stride; the odd pixel last) and
# ignores their padding attributes: what our layers and kernels compute for padding="same" (timm 0.4-1.0)
SAME_PADDED_CONVS = frozenset({"timm.layers.conv2d_same.Conv2dSame"})


class Chain(NamedTuple):
    """A separable chain a block runs from its own forward: the attributes it runs, in order (dotted: a
    submodule's, e.g. the conv of a ConvNormAct whose forward runs conv -> bn -> aa)."""

    dw: str  # the depthwise conv
    norm1: str | None  # its norm (a BatchNorm2d or timm's BatchNormAct2d), None: none
    act1: str | None  # its activation module, None: none (or inside the BatchNormAct2d)
    pw: str  # the 1x1 conv
    norm2: str | None  # its norm, None: none
    identities: tuple[str, ...] = ()  # run between the convs: each must be nn.Identity, a Dropout(p=0) or absent
    excitation: str | None = None  # a squeeze-excitation between the activation and the 1x1 conv: kept, fused


_EFFICIENTVIT_CHAIN = Chain(
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
TIMM_BLOCKS = {
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv": (
        Chain("conv_dw", "bn1", None, "conv_pw", "bn2", ("aa",), "se"),
    ),
    "timm.models._efficientnet_blocks.InvertedResidual": (
        Chain("conv_dw", "bn2", None, "conv_pwl", "bn3", ("aa",), "se"),
    ),
    # MobileNetV4: an optional depthwise conv before the expansion, and the usual one after it
    "timm.models._efficientnet_blocks.UniversalInvertedResidual": (
        Chain("dw_start.conv", "dw_start.bn", None, "pw_exp.conv", "pw_exp.bn", ("dw_start.aa", "pw_exp.aa")),
        Chain("dw_mid.conv", "dw_mid.bn", None, "pw_proj.conv", "pw_proj.bn", ("dw_mid.aa", "pw_proj.aa"), "se"),
    ),
    # ReXNet: its squeeze-excitation runs before the activation, so only blocks without one
    "timm.models.rexnet.LinearBottleneck": (
        Chain("conv_dw.conv", "conv_dw.bn", "act_dw", "conv_pwl.conv", "conv_pwl.bn", ("conv_dw.aa", "se")),
    ),
    # EfficientViT (MIT): ConvNormActs whose forward runs dropout -> conv -> norm -> act
    "timm.models.efficientvit_mit.DSConv": (_EFFICIENTVIT_CHAIN,),
    "timm.models.efficientvit_mit.MBConv": (_EFFICIENTVIT_CHAIN,),
    "timm.layers.separable_conv.SeparableConvNormAct": (Chain("conv_dw", None, None, "conv_pw", "bn"),),
    "timm.layers.separable_conv.SeparableConv2d": (Chain("conv_dw", None, None, "conv_pw", None),),
    "timm.models.xception_aligned.SeparableConv2d": (Chain("conv_dw", "bn_dw", "act_dw", "conv_pw", "bn_pw"),),
}


TIMM_NORM_ACT = "timm.layers.norm_act.BatchNormAct2d"  # batch norm, dropout, activation


# modules whose own forward runs a conv and then its norm (a BatchNorm2d, or timm's BatchNormAct2d) as attributes:
# (conv, norm) pairs, in forward order, besides the separable chains of TIMM_BLOCKS (torchvision 0.2x, timm 1.0)
CONV_NORMS = {
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


# nn.ModuleDict subclasses whose forward splits the input's channels, runs each part through its conv in order and
# concatenates the outputs (MixNet's several kernel sizes, grouped 1x1 convs; timm 0.4-1.0)
MIXED_CONVS = frozenset({"timm.layers.mixed_conv2d.MixedConv2d"})


def qualified_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"
