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
import json
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from sepconv.io import PathLike, load_state_dict

__all__ = ["load_model"]


def load_model(
    spec: str, *, weights: PathLike | None = None, ranks: Mapping[str, int] | PathLike | None = None
) -> nn.Module:
    """The model named by ``spec``, with ``weights`` (safetensors or weights-only torch file) loaded strictly.

    ``ranks`` rebuilds a model converted by ``sepconv.convert`` before its weights are loaded: a
    ``{layer name: rank}`` mapping, or the JSON report that ``sepconv convert --report`` wrote.
    """
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
    if ranks is not None:
        from sepconv.convert import convert  # convert builds on layers; keep this module light

        model, _ = convert(model, rank=_read_ranks(ranks), init="random", inplace=True)
    if weights is not None:
        _load_weights(model, spec, weights, converted=ranks is not None)
    return model


def _load_weights(model: nn.Module, spec: str, weights: PathLike, *, converted: bool) -> None:
    """``model.load_state_dict`` strictly, with one line naming the file and what does not match."""
    state = load_state_dict(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        expected = model.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        shapes = [
            f"{k} is {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        found = [
            f"{len(names)} {label}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
            for label, names in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes differ", shapes))
            if names
        ]
        # load_state_dict's own message spans many lines; keep its first one if our comparison finds nothing
        detail = "; ".join(found) or str(error).strip().splitlines()[0]
        hint = (
            ""
            if converted
            else " (a converted model's weights need its `sepconv convert --report` as ranks=; analyze: --ranks)"
        )
        raise ValueError(f"weights {weights} do not match {spec}: {detail}{hint}") from error


def _read_ranks(ranks: Mapping[str, int] | PathLike) -> dict[str, int]:
    if isinstance(ranks, Mapping):
        return dict(ranks)
    path = Path(ranks)
    try:
        found = json.loads(path.read_text(encoding="utf-8")).get("ranks")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"cannot read ranks from {path}: {error}") from error
    if not isinstance(found, dict) or not all(isinstance(r, int) for r in found.values()):
        raise ValueError(f"{path} has no 'ranks' mapping of layer names to ints (a `sepconv convert --report` file)")
    return found


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
