"""Build a model from a ``module:attribute`` spec (like ``uvicorn app:app``) and load its weights.

Specs: ``torchvision:resnet18``, ``timm:efficientnet_b0`` (if timm is installed) or
``package.module:callable`` (called with no arguments; an ``nn.Module`` instance is used as is).
Models are built without pretrained weights: nothing is downloaded. Weights come from a file.

>>> type(load_model("torch.nn:Identity")).__name__
'Identity'
"""

from __future__ import annotations

import importlib
import inspect

from torch import nn

from sepconv.io import PathLike, load_state_dict

__all__ = ["load_model"]


def load_model(spec: str, *, weights: PathLike | None = None) -> nn.Module:
    """The model named by ``spec``, with ``weights`` (safetensors or weights-only torch file) loaded strictly."""
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise ValueError(
            f"model spec must look like 'torchvision:resnet18', 'timm:NAME' or 'package.module:callable'; got {spec!r}"
        )
    if source == "torchvision":
        model = _torchvision_model(name)
    elif source == "timm":
        model = _timm_model(name)
    else:
        model = _callable_model(source, name)
    if weights is not None:
        model.load_state_dict(load_state_dict(weights))
    return model


def _torchvision_model(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError as error:
        raise ValueError("torchvision models need torchvision: pip install 'sepconv[vision]'") from error
    available = torchvision.models.list_models()
    if name not in available:
        raise ValueError(f"unknown torchvision model {name!r}; e.g. {', '.join(available[:8])}, ...")
    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # detection/segmentation builders would download it otherwise
    return builder(**kwargs)


def _timm_model(name: str) -> nn.Module:
    try:
        import timm
    except ImportError as error:
        raise ValueError("timm models need timm: pip install timm") from error
    if name not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r}")
    return timm.create_model(name, pretrained=False)


def _callable_model(module_name: str, attribute: str) -> nn.Module:
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r}: {error}") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    model = target if isinstance(target, nn.Module) else target() if callable(target) else None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{module_name}:{attribute} is not an nn.Module nor a callable returning one")
    return model
