"""sepconv.accelerate: indexing and slicing Sequentials, frozen parameters, hooks, defaulted forward arguments,
modules held outside the module tree, strided 'same' padding in other padding modes, bad input: each checked
against the original model."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import timm
import torch
import torchvision
from torch import nn

import sepconv
from sepconv.accelerate import FusedSeparableConv2d, accelerate


def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so folding is really tested."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def kinds(changes: list) -> list[tuple[str, tuple[str, ...]]]:
    return [(c.kind, c.replaced) for c in changes]


def mobilenet_v2() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.mobilenet_v2(width_mult=0.35)).double().eval()


# ---- A: every Sequential keeps its length and indices ----------------------------------------------------------


class IndexedBody(nn.Module):
    """A forward that indexes its Sequential: flattened, ``body[1]`` would be another module."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=1, groups=8),
                nn.BatchNorm2d(8),
                nn.ReLU6(),
                nn.Conv2d(8, 16, 1),
                nn.BatchNorm2d(16),
            ),
        )

    def forward(self, x):
        return self.body[1](self.body[0](x))


def test_a_forward_that_indexes_its_sequentials_runs_as_before():
    torch.manual_seed(0)
    model = randomize_norms(IndexedBody()).double().eval()
    fast, changes = accelerate(model)
    assert {c.kind for c in changes} == {"folded conv", "fused separable"}
    assert [len(s) for s in fast.body] == [len(s) for s in model.body]
    assert isinstance(fast.body[1][0], FusedSeparableConv2d)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
        torch.testing.assert_close(fast.body[0](x), model.body[0](x))  # each part on its own, too


def test_mobilenet_v2_features_keep_their_length_and_slices():
    """Detection backbones slice ``features``: each slice of the accelerated model equals the original's, and every
    module path of the original is still one (indices kept), the absorbed modules being nn.Identity."""
    model = mobilenet_v2()
    fast, _ = accelerate(model)
    assert len(fast.features) == len(model.features)
    assert set(dict(model.named_modules())) <= set(dict(fast.named_modules()))
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        for stop in (2, 4, 7, 14, len(model.features)):
            torch.testing.assert_close(fast.features[:stop](x), model.features[:stop](x))
        y = model.features[:4](x)
        torch.testing.assert_close(fast.features[4:9](y), model.features[4:9](y))


def test_nested_names_that_would_collide_when_flattened_keep_every_module():
    """``a_0`` and ``a.0`` flattened to the same name: one module was dropped."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict([("a_0", nn.Conv2d(3, 3, 1)), ("a", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))])
    )
    model = randomize_norms(model).double().eval()
    fast, changes = accelerate(model)
    assert kinds(changes) == [("folded conv", ("a.0", "a.1"))]
    assert list(fast._modules) == ["a_0", "a"] and torch.equal(fast.a_0.weight, model.a_0.weight)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_a_separable_layer_inside_a_sequential_keeps_its_place():
    """Our SeparableConv2d with a part replaced becomes a Sequential of its parts, in its own place."""
    torch.manual_seed(0)
    layer = sepconv.SeparableConv2d(4, 6, 3, padding=1, mid_norm=nn.BatchNorm2d, mid_activation=nn.ReLU)
    model = randomize_norms(nn.Sequential(layer, nn.BatchNorm2d(6), nn.ReLU())).double().eval()
    fast, changes = accelerate(model)
    assert kinds(changes) == [
        ("fused separable", ("0.depthwise", "0.mid_norm", "0.mid_activation", "0.pointwise", "1"))
    ]
    assert len(fast) == 3 and list(fast[0]._modules) == ["depthwise", "mid_norm", "mid_activation", "pointwise"]
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


# ---- B: the traced path and other call paths --------------------------------------------------------------------


class FeaturesFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x, return_features=False):
        f = self.conv(x)
        return f if return_features else self.head(self.bn(f))


class OptionalMask(FeaturesFlag):
    def forward(self, x, mask=None):
        y = self.conv(x)
        return self.head(self.bn(y)) if mask is None else y * mask


@pytest.mark.parametrize(
    ("cls", "other_call"),
    [(FeaturesFlag, {"return_features": True}), (OptionalMask, {"mask": torch.full((1,), 2.0, dtype=torch.float64)})],
    ids=["branch-on-flag", "branch-on-none"],
)
def test_a_pair_the_defaulted_arguments_may_bypass_is_not_folded(cls, other_call):
    """The trace fixes defaulted arguments to their defaults; a call that gives them may take another path, where
    the conv's output is needed unnormalized: the pair is left, listed as skipped, and every path runs as before."""
    torch.manual_seed(0)
    model = randomize_norms(cls()).double().eval()
    fast, changes = accelerate(model)
    assert kinds(changes) == [("skipped", ("conv", "bn"))]
    assert "defaulted arguments" in changes[0].reason and next(iter(other_call)) in changes[0].reason
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
        torch.testing.assert_close(fast(x, **other_call), model(x, **other_call))


class Scaled(FeaturesFlag):
    def forward(self, x, scale: float = 1.0):
        return self.head(self.bn(self.conv(x))) * scale


def test_a_defaulted_argument_that_does_not_change_the_path_still_folds():
    torch.manual_seed(0)
    model = randomize_norms(Scaled()).double().eval()
    fast, changes = accelerate(model)
    assert kinds(changes) == [("folded conv", ("conv", "bn"))]
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, 0.5), model(x, 0.5))


class FeaturesMethod(FeaturesFlag):
    def forward(self, x):
        return self.head(self.bn(self.conv(x)))

    def features(self, x):  # a method besides forward that runs the conv alone
        return self.conv(x)

    def zero_init_last(self):  # set-up that reads a module's weights: calls nothing
        nn.init.ones_(self.bn.weight)


def test_a_conv_another_method_calls_keeps_its_norm():
    torch.manual_seed(0)
    model = randomize_norms(FeaturesMethod()).double().eval()
    fast, changes = accelerate(model)
    assert [(c.kind, c.replaced, c.reason) for c in changes] == [
        ("skipped", ("conv", "bn"), "methods besides forward call them (features)")
    ]
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
        torch.testing.assert_close(fast.features(x), model.features(x))


class HeldInList(FeaturesFlag):
    def __init__(self):
        super().__init__()
        self.ops = [self.conv]  # a plain list: not a submodule, still the same conv

    def forward(self, x):
        return self.head(self.bn(self.ops[0](x)))


class HeldInDict(FeaturesFlag):
    def __init__(self):
        super().__init__()
        self.table = {"stem": (self.conv, self.bn)}

    def forward(self, x):
        conv, norm = self.table["stem"]
        return self.head(norm(conv(x)))


@pytest.mark.parametrize("cls", [HeldInList, HeldInDict])
def test_modules_held_outside_the_module_tree_are_not_replaced(cls):
    """Replaced, the list or dict would still call the old conv (then an nn.Identity in the norm's place)."""
    torch.manual_seed(0)
    model = randomize_norms(cls()).double().eval()
    fast, changes = accelerate(model)
    assert changes == []
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


# ---- C: frozen parameters stay frozen ----------------------------------------------------------------------------


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "factory",
    [lambda: torchvision.models.mobilenet_v2(width_mult=0.35), lambda: timm.create_model("mobilenetv2_035")],
    ids=["torchvision", "timm"],
)
def test_a_frozen_model_stays_frozen_and_a_frozen_backbone_too(factory):
    torch.manual_seed(0)
    model = randomize_norms(factory()).eval().requires_grad_(False)
    fast, changes = accelerate(model)
    assert any(c.kind == "fused separable" for c in changes)
    assert trainable(fast) == 0
    x = torch.randn(1, 3, 32, 32)
    assert not fast(x).requires_grad
    head = model.classifier if isinstance(model.classifier, nn.Linear) else model.classifier[-1]
    head.requires_grad_(True)  # fine-tuning the head: the accelerated model trains exactly that
    fast, _ = accelerate(model)
    assert trainable(fast) == trainable(model) == sum(p.numel() for p in head.parameters())


def test_a_folded_parameter_is_trainable_where_a_part_of_it_is():
    """Frozen norms under trainable convs: the folded weights train, and their gradients are the original convs'
    scaled by the norms; a bias made of the frozen norm alone stays frozen. Frozen convs under trainable norms:
    the folded weights are trainable (they carry the norm's scale)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU6(),
        nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6), nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5),
    )  # fmt: skip
    model = randomize_norms(model).double().eval()
    for norm in (model[1], model[4], model[6]):
        norm.requires_grad_(False)
    fast, _ = accelerate(model)
    fused, conv = fast[0], fast[5]
    assert [p.requires_grad for p in (fused.dw_weight, fused.dw_bias, fused.pw_weight, fused.pw_bias)] == [
        True, False, True, False
    ]  # fmt: skip
    assert conv.weight.requires_grad and conv.bias.requires_grad  # the conv's own bias is trainable
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    fast(x).sum().backward()
    model(x).sum().backward()
    norm = model[6]
    scale = (norm.weight / (norm.running_var + norm.eps).sqrt()).view(-1, 1, 1, 1)
    torch.testing.assert_close(conv.weight.grad * scale, model[5].weight.grad)  # d/dW of W * scale
    for module in model:
        module.requires_grad_(isinstance(module, nn.BatchNorm2d))  # now the norms train, the convs are frozen
    fast, _ = accelerate(model)
    assert all(p.requires_grad for p in fast.parameters())


# ---- D: hooks see their module's calls ---------------------------------------------------------------------------


def recorder(into: list):
    return lambda module, args, output: into.append(output.detach().clone())


def run_both(fast: nn.Module, model: nn.Module, x: torch.Tensor, calls: list) -> None:
    """Outputs equal, and the hook the accelerated model copied fired there as on the original: ``calls`` holds its
    records of ``fast``'s call, then the original's."""
    with torch.no_grad():
        got = fast(x)
        assert len(calls) == 1, "the hook did not fire on the accelerated model"
        torch.testing.assert_close(got, model(x))
    assert len(calls) == 2
    torch.testing.assert_close(calls[0], calls[1])


def test_a_hook_on_a_sequential_holding_a_whole_change_fires_with_the_same_values():
    """Grad-CAM hooks mobilenet_v2's last ``features`` block (conv, norm, ReLU6): its conv and norm fold inside
    it, it is still called, and its hook sees the original's output."""
    model = mobilenet_v2()
    calls = []
    model.features[-1].register_forward_hook(recorder(calls))
    fast, changes = accelerate(model)
    assert not [c for c in changes if c.kind == "skipped"]
    assert [c.replaced for c in changes if c.kind == "folded conv"][-1] == ("features.18.0", "features.18.1")
    run_both(fast, model, torch.randn(1, 3, 32, 32, dtype=torch.float64), calls)


@pytest.mark.parametrize(
    ("hooked", "skipped"),
    [
        ("features.1.conv.1", ("features.1.conv.0.0", "features.1.conv.0.1", "features.1.conv.0.2")),  # pointwise
        ("features.2.conv.3", ("features.2.conv.1.0", "features.2.conv.1.1", "features.2.conv.1.2")),  # its norm
        ("features.3.conv.1.1", ("features.3.conv.1.0", "features.3.conv.1.1", "features.3.conv.1.2")),  # mid norm
        ("features.4.conv.1", ("features.4.conv.1.0", "features.4.conv.1.1", "features.4.conv.1.2")),  # crossed
    ],
    ids=["pointwise", "output-norm", "mid-norm", "crossed-sequential"],
)
def test_a_hooked_module_in_a_chain_is_left_and_its_hook_fires(hooked, skipped):
    """A hook on a chain's pointwise conv, on a norm, or on a Sequential the chain runs out of: the chain is not
    fused (listed as skipped, "has hooks"), the hook fires with the original's values, the rest is accelerated."""
    model = mobilenet_v2()
    fast, changes = accelerate(model)
    fused = sum(c.kind == "fused separable" for c in changes)
    calls = []
    model.get_submodule(hooked).register_forward_hook(recorder(calls))
    fast, changes = accelerate(model)
    skips = [c for c in changes if c.kind == "skipped"]  # the chain, and a fold of the hooked module if any
    assert skips and skips[0].replaced[: len(skipped)] == skipped
    assert all(c.reason == f"has hooks: {hooked}" for c in skips)
    assert sum(c.kind == "fused separable" for c in changes) == fused - 1
    run_both(fast, model, torch.randn(1, 3, 32, 32, dtype=torch.float64), calls)


def test_pre_and_backward_hooks_keep_their_modules_too():
    """A forward-pre hook on a depthwise conv, a backward hook on a folded norm, a hook on our SeparableConv2d:
    each module stays, its hook fires as on the original, gradients equal."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6),
        sepconv.SeparableConv2d(6, 6, 3, padding=1, mid_norm=nn.BatchNorm2d),
    )  # fmt: skip
    model = randomize_norms(model).double().eval()
    counts = {"pre": 0, "backward": 0, "separable": 0}

    def counter(key):
        def hook(*_):
            counts[key] += 1

        return hook

    model[0].register_forward_pre_hook(counter("pre"))
    model[2].register_full_backward_hook(counter("backward"))
    model[3].register_forward_hook(counter("separable"))
    fast, changes = accelerate(model)
    assert {(c.kind, c.replaced) for c in changes} == {
        ("skipped", ("0",)),
        ("skipped", ("1", "2")),
        ("skipped", ("3",)),
        ("depthwise", ("3.depthwise",)),  # inside the hooked layer, which still runs and calls it: routed
    }
    assert [type(m) for m in fast] == [type(m) for m in model]
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    fast(x).sum().backward()
    got = (x.grad.clone(), dict(counts))
    x.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(got[0], x.grad)
    assert got[1] == {"pre": 1, "backward": 1, "separable": 1} and counts == {"pre": 2, "backward": 2, "separable": 2}


def test_a_hooked_conv_of_a_block_with_its_own_forward_keeps_its_norm():
    """torchvision's ResNet runs conv1 -> bn1 from its own forward (folded by table): a hook on bn1 keeps both."""
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.resnet18(num_classes=10)).double().eval()
    calls = []
    model.bn1.register_forward_hook(recorder(calls))
    fast, changes = accelerate(model)
    assert [(c.replaced, c.reason) for c in changes if c.kind == "skipped"] == [(("conv1", "bn1"), "has hooks: bn1")]
    run_both(fast, model, torch.randn(1, 3, 32, 32, dtype=torch.float64), calls)


def test_a_hooked_part_of_a_timm_block_keeps_the_chain():
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("mobilenetv2_035")).double().eval()
    block = "blocks.1.0"
    calls = []
    model.get_submodule(f"{block}.conv_pwl").register_forward_hook(recorder(calls))
    fast, changes = accelerate(model)
    skips = [c for c in changes if c.kind == "skipped"]
    assert [c.replaced[:2] for c in skips] == [  # the chain, then the 1x1 conv's own norm fold
        (f"{block}.conv_dw", f"{block}.conv_pwl"),
        (f"{block}.conv_pwl", f"{block}.bn3"),
    ]
    assert all(c.reason == f"has hooks: {block}.conv_pwl" for c in skips)
    assert not any(c.kind == "fused separable" and c.replaced[0].startswith(f"{block}.") for c in changes)
    run_both(fast, model, torch.randn(1, 3, 32, 32, dtype=torch.float64), calls)


# ---- E: strided 'same' padding in a padding mode other than zeros ------------------------------------------------


@pytest.mark.parametrize("size", [(9, 9), (8, 11)])
@pytest.mark.parametrize("separable", [False, True], ids=["depthwise", "separable"])
def test_strided_same_padding_in_reflect_mode_folds(separable, size):
    """``nn.Conv2d`` refuses padding='same' with stride 2: our layer's conv with its norm folded stays ours."""
    torch.manual_seed(0)
    if separable:
        layer = sepconv.SeparableConv2d(
            8, 12, 3, stride=2, padding="same", padding_mode="reflect", mid_norm=nn.BatchNorm2d
        )
        model = nn.Sequential(layer)
    else:
        layer = sepconv.DepthwiseConv2d(8, 3, stride=2, padding="same", padding_mode="reflect")
        model = nn.Sequential(layer, nn.BatchNorm2d(8))
    model = randomize_norms(model).double().eval()
    fast, changes = accelerate(model)
    assert [c.kind for c in changes] == ["folded conv"]
    conv = fast[0].depthwise if separable else fast[0]
    assert isinstance(conv, sepconv.DepthwiseConv2d) and conv.padding_mode == "reflect" and conv.padding == "same"
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


# ---- F: bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["x", None, nn.Conv2d, [nn.Conv2d(1, 1, 1)]])
def test_a_model_that_is_not_a_module_is_refused(model):
    with pytest.raises(TypeError, match=r"accelerate's model must be an nn\.Module"):
        accelerate(model)
