"""Model specs: torchvision, module:callable, weights from files, and clear errors."""

import re

import pytest
import torch
from torch import nn

from sepconv.io import save_state_dict
from sepconv.models import load_model


def test_torchvision_and_callable_specs() -> None:
    model = load_model("torchvision:resnet18")
    assert type(model).__name__ == "ResNet" and sum(p.numel() for p in model.parameters()) == 11_689_512
    assert isinstance(load_model("torch.nn:Identity"), nn.Identity)


def test_weights_are_loaded_strictly(tmp_path) -> None:
    source = load_model("torchvision:squeezenet1_0")
    save_state_dict(source.state_dict(), tmp_path / "w.safetensors")
    loaded = load_model("torchvision:squeezenet1_0", weights=tmp_path / "w.safetensors")
    assert all(
        torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match=r"w\.safetensors do not match torchvision:resnet18: ") as info:
        load_model("torchvision:resnet18", weights=tmp_path / "w.safetensors")
    resnet_keys = load_model("torchvision:resnet18").state_dict().keys()
    missing, unexpected = resnet_keys - source.state_dict().keys(), source.state_dict().keys() - resnet_keys
    assert f"{len(missing)} missing keys: " in str(info.value) and f"{len(unexpected)} unexpected keys: " in str(
        info.value
    )
    assert "\n" not in str(info.value) and "--ranks" in str(info.value)  # one line, with the hint for converted


def test_weights_of_other_shapes_name_the_tensors(tmp_path) -> None:
    from sepconv.nets import small_vgg

    wide, narrow = small_vgg(width=48).state_dict(), small_vgg().state_dict()  # load_model builds width 32
    save_state_dict(wide, tmp_path / "wide.safetensors")
    differing = [k for k, v in narrow.items() if v.shape != wide[k].shape]
    assert narrow.keys() == wide.keys() and len(differing) > 3
    first = differing[0]
    with pytest.raises(ValueError, match=re.escape(f"{len(differing)} shapes differ: {first} is")) as info:
        load_model("sepconv.nets:small_vgg", weights=tmp_path / "wide.safetensors")
    shapes = f"{first} is {tuple(wide[first].shape)} in the file, {tuple(narrow[first].shape)} in the model"
    assert shapes in str(info.value) and "missing" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resnet18", "model spec must look like"),
        ("torchvision:resnet9000", "unknown torchvision model 'resnet9000'"),
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        ("torch.nn:NoSuchThing", "has no attribute 'NoSuchThing'"),
        ("math:pi", "is not an nn.Module"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_model(spec)


def test_segmentation_models_build_without_downloading_a_backbone(monkeypatch) -> None:
    import torchvision.models._api as torchvision_api

    def no_download(*args, **kwargs):
        raise AssertionError("load_model tried to download weights")

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", no_download)
    model = load_model("torchvision:lraspp_mobilenet_v3_large")
    assert type(model).__name__ == "LRASPP"
