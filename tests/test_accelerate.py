"""sepconv.accelerate: chains found in real models, outputs and gradients equal the original's."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from hypothesis import assume, given
from hypothesis import strategies as st
from tests.strategies import ConvConfig, conv_configs
from torch import nn

import sepconv
from sepconv.accelerate import FusedSeparableConv2d, accelerate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so folding is really tested."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def of_kind(changes: list, kind: str) -> list:
    return [change for change in changes if change.kind == kind]


def count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def shared_leaves(model: nn.Module) -> list[str]:
    """The types of the modules without children that ``model`` reaches more than once, sorted."""
    reached = {}
    for _, module in model.named_modules(remove_duplicate=False):
        if not module._modules:
            reached[id(module)] = (reached.get(id(module), (0, module))[0] + 1, module)
    return sorted(type(module).__name__ for times, module in reached.values() if times > 1)


def snapshot(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    return [type(m).__name__ for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def step_both(model: nn.Module, fast: nn.Module, x: torch.Tensor) -> None:
    """Forward both models from the same random state (the same dropout / stochastic-depth draws), check their
    outputs are equal, and backpropagate the same loss through each."""
    torch.manual_seed(4)
    expected = model(x)
    torch.manual_seed(4)
    got = fast(x)
    torch.testing.assert_close(got, expected)
    got.square().sum().backward()
    expected.square().sum().backward()


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.mobilenet_v2(width_mult=0.35)).eval().to(DEVICE)


def test_mobilenet_v2_eval_fuses_every_block_and_keeps_outputs(mobilenet):
    before = snapshot(mobilenet)
    fast, changes = accelerate(mobilenet)
    # 17 inverted residual blocks, each: dw conv, BN, ReLU6, 1x1 conv, BN
    fused = of_kind(changes, "fused separable")
    assert len(fused) == 17
    assert all(c.activation == "relu6" and len(c.replaced) == 5 and len(c.folded_norms) == 2 for c in fused)
    assert sum(isinstance(m, FusedSeparableConv2d) for m in fast.modules()) == 17
    # every other BatchNorm follows a standard conv (the stem, 16 expanding 1x1 convs, the last conv): folded too
    folded = of_kind(changes, "folded conv")
    assert len(folded) == count(mobilenet, nn.BatchNorm2d) - 2 * 17 == 18
    assert len(changes) == 17 + 18 and count(fast, nn.BatchNorm2d) == 0
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), mobilenet(x), atol=1e-5, rtol=1e-4)
    after = snapshot(mobilenet)  # the input model is left as it is
    assert before[0] == after[0]
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_mobilenet_v3_large_fuses_every_block_with_its_activation_and_squeeze_excitation():
    """mobilenet_v3_large: every inverted residual block (ReLU or Hardswish between the depthwise and the
    projecting 1x1 conv, a SqueezeExcitation after it in 8 of them) becomes a fused chain, in order, with that
    activation and its squeeze-excitation kept in the fused module. Outputs equal the original's in eval, on
    PyTorch's convs and on the Triton kernels (the interpreter on CPU: the two-pass inference path)."""
    from torchvision.ops import SqueezeExcitation

    torch.manual_seed(1)
    model = randomize_norms(torchvision.models.mobilenet_v3_large(width_mult=0.35)).eval().to(DEVICE)
    expected = []
    for index, block in enumerate(model.features):
        if not hasattr(block, "use_res_connect"):  # the first and last convs, not inverted residual blocks
            continue
        position = next(i for i, m in enumerate(block.block) if m[0].groups > 1)  # the dw Conv2dNormActivation
        activation = {nn.ReLU: "relu", nn.Hardswish: "hardswish"}[type(block.block[position][2])]
        has_se = isinstance(block.block[position + 1], SqueezeExcitation)
        se = f"features.{index}.block.{position + 1}" if has_se else None
        expected.append(("fused separable", activation, se))
    assert ("fused separable", "hardswish", None) in expected and sum(e[2] is not None for e in expected) == 8
    for backend in ("auto", "triton"):
        fast, changes = accelerate(model, backend=backend)
        fused = of_kind(changes, "fused separable")
        assert [(c.kind, c.activation, c.excitation) for c in fused] == expected
        # the other convs with a BatchNorm (stem, expanding 1x1s, the last) folded; none left
        assert len(of_kind(changes, "folded conv")) == len(changes) - len(fused) > 0
        assert count(fast, nn.BatchNorm2d) == 0
        x = torch.randn(1, 3, 32, 32, device=DEVICE)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-4)


def test_mobilenet_v2_on_the_triton_kernels(mobilenet):
    fast, _ = accelerate(mobilenet, backend="triton")  # on CPU: Triton's interpreter
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), mobilenet(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("backend", "ours"), [("auto", set()), ("triton", {"separable_conv2d", "depthwise_conv2d"})])
def test_an_accelerated_model_exports_and_compiles_whole(backend: str, ours: set[str]):
    """torch.export and torch.compile (fullgraph) take an accelerated model: a fused chain and a routed depthwise conv
    with its norm folded. On the CPU, auto's graph holds PyTorch's ops only; triton's holds our two custom ops. Both
    compute the original's outputs (float64 reference)."""
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16),
        nn.Conv2d(16, 32, 5, stride=2, padding=2, groups=16), nn.BatchNorm2d(32),
    )  # fmt: skip
    model = randomize_norms(model).eval().to(DEVICE)
    fast, changes = accelerate(model, backend=backend)
    assert [c.kind for c in changes] == ["fused separable", "depthwise"]
    x = torch.randn(2, 8, 13, 11, device=DEVICE)
    want = model.double()(x.double()).float()  # in place: `fast` is a copy
    exported = torch.export.export(fast, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {t.split(".")[1] for t in targets if t.startswith("sepconv.")} == ours
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), want, atol=1e-5, rtol=1e-4)
        compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), want, atol=1e-5, rtol=1e-4)


def test_efficientnet_b0_fuses_every_block_with_its_squeeze_excitation():
    """efficientnet_b0: a SqueezeExcitation sits between every depthwise and pointwise conv; each of the 16 blocks
    becomes a fused chain that keeps it (both BatchNorms folded, SiLU fused). Inference outputs equal the
    original's on PyTorch's convs, and on the Triton kernels for its first stages (the interpreter is slow); in
    eval mode with gradients too (the squeeze-excitation inside the fused kernel's op, differentiated there), and
    every gradient equals the original's."""
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.efficientnet_b0()).eval()
    fast, changes = accelerate(model)
    fused = of_kind(changes, "fused separable")
    assert len(fused) == 16
    assert all(len(c.folded_norms) == 2 and c.activation == "silu" and c.excitation for c in fused)
    # the stem, 15 expanding 1x1 convs and the last conv keep no BatchNorm either
    assert len(of_kind(changes, "folded conv")) == count(model, nn.BatchNorm2d) - 2 * 16 == 17
    assert count(fast, nn.BatchNorm2d) == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(fast(x), expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-4)
    stages = model.features[:3]  # the stem and 3 blocks
    fast, changes = accelerate(stages, backend="triton")
    fused = of_kind(changes, "fused separable")
    assert len(fused) == 3 and all(c.excitation for c in fused)
    expanding = [(f"2.{j}.block.0.0", f"2.{j}.block.0.1") for j in range(2)]  # the third stage's 2 blocks expand
    assert [c.replaced for c in of_kind(changes, "folded conv")] == [("0.0", "0.1"), *expanding]  # and the stem
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with torch.no_grad():
        expected = stages(x)
        torch.testing.assert_close(fast(x), expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-4)
    got, want = fast(x), stages(x)  # gradients needed: the squeeze-excitation's too
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)
    grad = torch.randn_like(want)
    first_se = stages[1][0].block[1]
    first_fused = next(m for m in fast.modules() if isinstance(m, FusedSeparableConv2d))
    got_grads = torch.autograd.grad(got, [x, *first_fused.excitation.parameters()], grad)
    want_grads = torch.autograd.grad(want, [x, *first_se.parameters()], grad)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)


def test_training_mode_efficientnet_b0_on_triton_fuses_the_whole_block_and_trains_as_the_original():
    """Training mode, backend="triton": each MBConv block's chain (depthwise conv, BatchNorm with batch statistics,
    SiLU, squeeze-excitation, 1x1 conv, BatchNorm) is one fused module with both norms and the squeeze-excitation
    kept; outputs (same stochastic-depth draws), the gradients of every parameter of the chain (the
    squeeze-excitation's included) and of the stem (which the input gradient of every block reaches), both norms'
    running statistics and batch counts equal the original's; after .eval() the outputs too."""
    torch.manual_seed(3)
    model = randomize_norms(torchvision.models.efficientnet_b0()).features[:4].train().double()
    fast, changes = accelerate(model, backend="triton")  # on CPU: Triton's interpreter
    assert [c.kind for c in changes] == ["fused separable"] * 5
    assert all(len(c.batch_norms) == 2 and c.excitation and c.activation == "silu" for c in changes)
    fused = [m for m in fast.modules() if isinstance(m, FusedSeparableConv2d)]
    blocks = [block.block for stage in model[1:] for block in stage]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    step_both(model, fast, x)  # the same stochastic-depth draws
    for module, block in zip(fused, blocks, strict=True):
        chain = block[-3:]  # Conv2dNormActivation(dw conv, BN, SiLU), SqueezeExcitation, Conv2dNormActivation(1x1, BN)
        dw, norm, se, pw, out_norm = chain[0][0], chain[0][1], chain[1], chain[2][0], chain[2][1]
        torch.testing.assert_close(module.dw_weight.grad, dw.weight.grad)
        torch.testing.assert_close(module.pw_weight.grad, pw.weight.grad)
        for kept, original in ((module.mid_norm, norm), (module.out_norm, out_norm), (module.excitation, se)):
            for (name, a), b in zip(kept.named_parameters(), original.parameters(), strict=True):
                torch.testing.assert_close(a.grad, b.grad, msg=lambda m, n=name: f"{n}: {m}")
        for kept, original in ((module.mid_norm, norm), (module.out_norm, out_norm)):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(kept, name), getattr(original, name))
    torch.testing.assert_close(fast[0][0].weight.grad, model[0][0].weight.grad)  # the stem conv
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), model.eval()(x))


def test_a_hooked_squeeze_excitation_is_called_by_the_fused_module():
    """A forward hook on the kept squeeze-excitation (or one of its convs) must see its call: the fused module then
    runs it as a module (our depthwise kernel before it), with the same output; without hooks the fused op
    computes it and the module is not called."""
    from torchvision.ops import SqueezeExcitation

    torch.manual_seed(7)
    block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.SiLU(), SqueezeExcitation(8, 2, nn.SiLU),
                          nn.Conv2d(8, 6, 1)).double().eval()  # fmt: skip
    fast, changes = accelerate(block, backend="triton")
    assert changes[0].excitation == "2"
    fused = fast[0] if isinstance(fast, nn.Sequential) else fast
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    calls = []
    with torch.no_grad():
        expected = block(x)
        fused.excitation.forward = lambda _: pytest.fail("the unhooked squeeze-excitation ran as a module")
        torch.testing.assert_close(fast(x), expected)
        del fused.excitation.forward  # the class's again
        for hooked in (fused.excitation, fused.excitation.fc1):
            handle = hooked.register_forward_hook(lambda module, args, output: calls.append(type(module).__name__))
            torch.testing.assert_close(fast(x), expected)
            handle.remove()
    assert calls == ["SqueezeExcitation", "Conv2d"]


@pytest.mark.parametrize(
    ("factory", "gate"),
    [
        (torchvision.models.efficientnet_b0, ("silu", "sigmoid")),
        (torchvision.models.mobilenet_v3_large, ("relu", "hardsigmoid")),
        (lambda: timm.create_model("efficientnet_b0", pretrained=False), ("silu", "sigmoid")),
        (lambda: timm.create_model("mobilenetv3_large_100", pretrained=False), ("relu", "hardsigmoid")),
    ],
)
def test_every_squeeze_excitation_of_these_models_has_a_gate_the_fused_op_differentiates(factory, gate):
    """excitation_gate reads each model's squeeze-excitation: its convs' own tensors (not copies) and the names of
    its activation and gate; a gate it does not know (here Tanh) gives None (the inference-only path)."""
    from sepconv.squeeze_excitation import excitation_gate, is_excitation

    modules = [m for m in factory().modules() if type(m).__name__ in ("SqueezeExcitation", "SqueezeExcite")]
    assert modules
    for module in modules:
        fields = excitation_gate(module)
        reduce = getattr(module, "fc1", None) or module.conv_reduce
        assert is_excitation(module, reduce.in_channels) and fields[4:] == gate
        assert fields[0] is reduce.weight and fields[1] is reduce.bias
    module = modules[0]
    setattr(module, "scale_activation" if hasattr(module, "scale_activation") else "gate", nn.Tanh())
    assert excitation_gate(module) is None


def test_training_mode_norms_are_not_folded_and_gradients_match():
    torch.manual_seed(1)
    model = torchvision.models.mobilenet_v2(width_mult=0.35).train().double()
    fast, changes = accelerate(model)  # auto: not fused, the depthwise conv alone takes the measured choice
    assert [c.kind for c in changes] == ["depthwise"] * 17  # a training BatchNorm sits between the convs
    assert all(c.folded_norms == () for c in changes)
    assert fast.training and all(m.training for m in fast.modules())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    step_both(model, fast, x)  # the same dropout masks
    original_dw = model.features[2].conv[1][0].weight
    routed_dw = next(m for m in fast.features[2].modules() if type(m) is sepconv.DepthwiseConv2d).weight
    torch.testing.assert_close(routed_dw.grad, original_dw.grad)
    torch.testing.assert_close(fast.classifier[1].weight.grad, model.classifier[1].weight.grad)


def test_training_mode_mobilenet_v2_on_triton_fuses_with_its_norms_kept_and_trains_as_the_original():
    """Training mode: each block's BatchNorm between the convs is kept (batch statistics, folded per call on the
    Triton kernel), and the one after the 1x1 conv too (its statistics from the fused kernel's epilogue). Outputs,
    the gradients of the original's parameters, both norms' running statistics and batch counts equal the
    original's, then eval-mode outputs too."""
    torch.manual_seed(1)
    model = randomize_norms(torchvision.models.mobilenet_v2(width_mult=0.35)).train().double()
    fast, changes = accelerate(model, backend="triton")  # on CPU: Triton's interpreter
    assert [c.kind for c in changes] == ["fused separable"] * 17
    assert all(c.folded_norms == () and len(c.batch_norms) == 2 and c.activation == "relu6" for c in changes)
    assert fast.training and all(m.training for m in fast.modules())
    fused = [m for m in fast.modules() if isinstance(m, FusedSeparableConv2d)]
    originals = [block.conv[-3:] for block in model.features[1:18]]  # (dw conv, BN, ReLU6), 1x1 conv, BN
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    step_both(model, fast, x)  # the same dropout masks
    for module, original in zip(fused, originals, strict=True):
        dw, norm, pw = original[0][0], original[0][1], original[1]  # Conv2dNormActivation(dw, BN, ReLU6), 1x1 conv
        torch.testing.assert_close(module.dw_weight.grad, dw.weight.grad)
        torch.testing.assert_close(module.pw_weight.grad, pw.weight.grad)
        torch.testing.assert_close(module.mid_norm.weight.grad, norm.weight.grad)
        torch.testing.assert_close(module.mid_norm.bias.grad, norm.bias.grad)
        torch.testing.assert_close(module.mid_norm.running_var, norm.running_var)
        assert module.mid_norm.num_batches_tracked == norm.num_batches_tracked == 1
        out_norm = original[2]
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(module.out_norm, name).grad, getattr(out_norm, name).grad)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(module.out_norm, name), getattr(out_norm, name))
    torch.testing.assert_close(fast.classifier[1].weight.grad, model.classifier[1].weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), model.eval()(x))


def test_chain_without_mid_norm_trains_fused_with_its_output_norm_kept():
    """A training-mode BatchNorm after the 1x1 conv: kept in the fused module with backend="triton" (its batch
    statistics from the kernel's epilogue), left after the fused part otherwise. Gradients of every parameter and
    the running statistics equal the original's."""
    torch.manual_seed(2)
    block = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4, bias=True),  # depth multiplier 2
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        nn.BatchNorm2d(6),
    ).double()
    fast, changes = accelerate(block, backend="triton")
    assert [(c.kind, c.replaced, c.activation, c.batch_norms) for c in changes] == [
        ("fused separable", ("0", "1", "2", "3"), "relu", ("3",))
    ]
    assert isinstance(fast[0], FusedSeparableConv2d) and isinstance(fast[0].out_norm, nn.BatchNorm2d)
    assert [type(m) for m in fast[1:]] == [nn.Identity] * 3  # the Sequential keeps its length
    _, on_torch = accelerate(block, backend="auto")
    assert [c.replaced for c in on_torch] == [("0", "1", "2")]  # auto: the norm stays after the fused part
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    norm = block[3]
    leaves = [x, block[0].weight, block[0].bias, block[2].weight, block[2].bias, norm.weight, norm.bias]
    want = torch.autograd.grad(block(x), leaves, grad)
    fused = fast[0]
    leaves = [x, fused.dw_weight, fused.dw_bias, fused.pw_weight, fused.pw_bias, *fused.out_norm.parameters()]
    got = torch.autograd.grad(fast(x), leaves, grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused.out_norm, name), getattr(norm, name))


@pytest.mark.parametrize("activation", [nn.ReLU, nn.ReLU6])
def test_fused_chain_on_pytorch_convs_trains_with_the_activation_in_place(activation):
    """The torch path applies the activation in place on the depthwise conv's fresh output: outputs and every
    gradient equal the unfused chain's in float64, values past 6 included, and the caller's input is untouched."""
    torch.manual_seed(4)
    block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), activation(), nn.Conv2d(3, 5, 1)).double()
    with torch.no_grad():
        block[0].weight.mul_(8)  # depthwise outputs well past 6: both ReLU6 kinks are crossed
    fast, _ = accelerate(block, backend="torch")
    fused = fast[0] if isinstance(fast, nn.Sequential) else fast
    assert isinstance(fused, FusedSeparableConv2d)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    grad = torch.randn(2, 5, 7, 7, dtype=torch.float64)
    params = [block[0].weight, block[0].bias, block[2].weight, block[2].bias]
    out = fast(x)
    torch.testing.assert_close(out, block(x), rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(block(x), [x, *params], grad)
    got = torch.autograd.grad(out, [x, fused.dw_weight, fused.dw_bias, fused.pw_weight, fused.pw_bias], grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert torch.equal(x.detach(), before)
    if activation is nn.ReLU6:
        assert (block[0](x) > 6).any()


def test_our_separable_layer_with_mid_norm_is_fused_in_eval():
    torch.manual_seed(3)
    layer = sepconv.SeparableConv2d(6, 10, 3, padding="same", mid_norm=nn.BatchNorm2d, mid_activation=nn.ReLU6)
    model = nn.Sequential(randomize_norms(layer), nn.BatchNorm2d(10)).eval()
    randomize_norms(model)
    fast, changes = accelerate(model)
    assert [c.replaced for c in changes] == [("0.depthwise", "0.mid_norm", "0.mid_activation", "0.pointwise", "1")]
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect"), nn.Conv2d(4, 8, 1)),
        nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1)),  # not depthwise
        nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 1)),
    ],
    ids=["reflect-padding", "standard-conv", "pointwise-only"],
)
def test_what_is_not_a_chain_is_left_alone(model):
    fast, changes = accelerate(model.eval())
    assert changes == []
    assert [type(m) for m in fast.modules()] == [type(m) for m in model.modules()]


@given(conv_configs(), st.booleans(), st.booleans())
def test_a_conv_and_the_eval_batch_norm_after_it_become_one_conv(cfg: ConvConfig, bias: bool, training: bool):
    """Any conv, 1-d, 2-d or 3-d (groups, stride, padding and its mode, dilation, bias) followed by an eval-mode
    BatchNorm of its dimensions: one conv whose output and input gradient equal the pair's in float64; the conv's
    own kind of change (a depthwise conv is routed to our DepthwiseConv1d/2d/3d, others folded). A training-mode
    norm is never folded (batch statistics)."""
    assume(not cfg.strided_same)
    torch.manual_seed(0)
    conv_class, norm_class = [(nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d)][
        cfg.ndim - 1
    ]
    conv = conv_class(cfg.in_channels, cfg.out_channels, cfg.kernel_size, bias=bias, **cfg.conv_kwargs)
    model = randomize_norms(nn.Sequential(conv, norm_class(cfg.out_channels), nn.ReLU())).double()
    model.train(training)
    fast, changes = accelerate(model)
    depthwise = cfg.groups == cfg.in_channels and cfg.padding_mode == "zeros"  # out_channels: a multiple of groups
    if training:
        assert [c.kind for c in changes] == (["depthwise"] if depthwise else [])
        assert count(fast, norm_class) == 1
    else:
        kind = "depthwise" if depthwise else "folded conv"
        assert [(c.kind, c.replaced, c.folded_norms) for c in changes] == [(kind, ("0", "1"), ("1",))]
        assert count(fast, norm_class) == 0 and fast[0].bias.requires_grad
        assert [type(m) for m in fast[1:]] == [nn.Identity, nn.ReLU]  # the Sequential keeps its length
    routed = (sepconv.DepthwiseConv1d, sepconv.DepthwiseConv2d, sepconv.DepthwiseConv3d)[cfg.ndim - 1]
    assert (type(fast[0]) is routed) == depthwise
    shape = (2, *cfg.input_shape[1:])  # a training-mode norm needs two values per channel
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    want = model(x)
    got = fast(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(want)
    torch.testing.assert_close(*(torch.autograd.grad(y, x, grad) for y in (got, want)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [False, True])
def test_modules_run_from_two_places_stay_shared_and_whole(training):
    """A module a Sequential runs twice (or two Sequentials share) is neither dropped nor replaced: replacing it
    in one place would untie weights the original trains together. Outputs and parameter gradients match."""
    torch.manual_seed(2)
    dw, conv = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1)
    shared_tail = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4))
    model = nn.Sequential(
        nn.Sequential(dw, nn.ReLU(), dw, conv, nn.BatchNorm2d(4)),  # dw twice in one Sequential
        nn.Sequential(conv, nn.BatchNorm2d(4), shared_tail),
        shared_tail,  # registered in two Sequentials
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 8, 1)),
    )
    model = randomize_norms(model).double().train(training)
    fast, changes = accelerate(model)
    # eval: the last chain fused, the shared convs keep their norms; training: its depthwise conv routed
    assert [(c.kind, c.replaced[0]) for c in changes] == [("depthwise" if training else "fused separable", "3.0")]
    assert shared_leaves(fast) == shared_leaves(model) == ["BatchNorm2d", "Conv2d", "Conv2d", "Conv2d"]
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    want = model(x)
    got = fast(x)
    torch.testing.assert_close(got, want)
    # training: nothing folded, the same parameters in the same order (each once), the same gradients
    wrt = [lambda m: [x], lambda m: [x, *m.parameters()]][training]
    x.requires_grad_()
    grads = [torch.autograd.grad(m(x).square().sum(), wrt(m)) for m in (fast, model)]
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "factory",
    [
        torchvision.models.resnet18,
        torchvision.models.resnet50,
        lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False),
        lambda: timm.create_model("resnet18", pretrained=False),
        lambda: timm.create_model("resnet26d", pretrained=False),  # a deep stem: a Sequential before bn1
    ],
    ids=["resnet18", "resnet50", "googlenet", "timm-resnet18", "timm-resnet26d"],
)
def test_blocks_with_their_own_forward_fold_every_norm_in_eval_and_nothing_in_training(factory):
    """torchvision's ResNets and GoogLeNet and timm's ResNets run their convs and norms from their blocks' own
    forward: in eval mode each conv + BatchNorm pair the forward runs (stem, every block's, the downsampling
    Sequentials') becomes one conv, no norm left, outputs and input gradient equal in float64; in training mode
    nothing changes (batch statistics)."""
    torch.manual_seed(3)
    model = randomize_norms(factory()).double()
    fast, changes = accelerate(model.eval())
    assert [c.kind for c in changes] == ["folded conv"] * count(model, nn.BatchNorm2d)
    assert count(fast, nn.BatchNorm2d) == 0
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64, requires_grad=True)
    got, want = fast(x), model(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(*(torch.autograd.grad(y.sum(), x) for y in (got, want)))
    assert accelerate(model.train())[1] == []


class ConvSame(nn.Conv2d):
    """Like timm's Conv2dSame: pads at run time, so its padding attribute does not describe what it computes."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


class BatchNormAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm subclass that also applies an activation."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_subclasses_with_their_own_forward_are_not_folded_or_replaced():
    torch.manual_seed(5)
    model = nn.Sequential(
        ConvSame(4, 4, 3, groups=4),
        nn.Conv2d(4, 8, 1),  # not a plain depthwise conv: no chain
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        BatchNormAct(8),
        nn.Conv2d(8, 8, 1),  # BN+act: not foldable
    )
    model = randomize_norms(model).eval()
    fast, changes = accelerate(model)
    assert [(c.kind, c.replaced, c.folded_norms) for c in changes] == [("depthwise", ("2",), ())]
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_depthwise_conv_followed_by_pointwise_with_stride_is_routed_not_fused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1, stride=2)).eval()
    fast, changes = accelerate(model)
    assert [c.kind for c in changes] == ["depthwise"]
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        accelerate(nn.Conv2d(2, 2, 1), backend="cuda")


# ---- timm blocks (timm's own classes, recognised by name: timm is a test dependency, not a library one) --------


def _timm_blocks(model: nn.Module) -> list[tuple[str, bool, str]]:
    """(path, has squeeze-excitation, the activation after its depthwise conv) of every efficientnet-family block."""
    names = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu"}
    blocks = []
    for path, block in model.named_modules():
        kind = type(block).__name__
        if kind in ("DepthwiseSeparableConv", "InvertedResidual"):
            norm = block.bn1 if kind == "DepthwiseSeparableConv" else block.bn2  # after the depthwise conv
            blocks.append((path, not isinstance(block.se, nn.Identity), names[type(norm.act)]))
    return blocks


@pytest.mark.parametrize("name", ["mobilenetv2_035", "mobilenetv3_large_100"])
def test_timm_blocks_fuse_with_their_squeeze_excitation(name):
    """timm's efficientnet-family blocks: each DepthwiseSeparableConv / InvertedResidual becomes one fused chain
    (depthwise conv, its BatchNormAct2d with the activation, the squeeze-excitation if any, kept in the fused
    module, the 1x1 projection and its norm, both norms folded) with the block's activation. Outputs equal the
    original's in eval, on PyTorch's convs and on the Triton kernels."""
    torch.manual_seed(2)
    model = randomize_norms(timm.create_model(name, pretrained=False)).eval().to(DEVICE)
    blocks = _timm_blocks(model)
    for backend in ("auto", "triton"):
        fast, changes = accelerate(model, backend=backend)
        fused = of_kind(changes, "fused separable")
        assert all(len(c.folded_norms) == 2 for c in fused)
        expected = [(path, act, f"{path}.se" if se else None) for path, se, act in blocks]
        assert [(c.replaced[0].rsplit(".", 1)[0], c.activation, c.excitation) for c in fused] == expected
        # the stem's and the expanding convs' norms (BatchNormAct2d: its activation stays) folded too: none left
        folded = of_kind(changes, "folded conv")
        assert len(fused) + len(folded) == len(changes) and count(fast, nn.BatchNorm2d) == 0
        assert len(folded) == count(model, nn.BatchNorm2d) - 2 * len(fused)
        assert ("conv_stem", "bn1") in [c.replaced for c in folded]
        x = torch.randn(1, 3, 32, 32, device=DEVICE)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-4)
    if name == "mobilenetv3_large_100":  # the test means it: both kinds of block, a Hardswish chain
        assert any(se for _, se, _ in blocks) and not all(se for _, se, _ in blocks)
        assert ("blocks.3.0", True, "hardswish") not in blocks and ("blocks.3.0", False, "hardswish") in blocks


def test_timm_mobilenetv2_in_training_on_triton_keeps_its_norms_and_trains_as_the_original():
    """Training mode, backend="triton": each block's BatchNormAct2d between the convs is kept in the fused module
    (batch statistics folded per call, its ReLU6 fused), and the projection's (no activation; statistics from the
    fused kernel's epilogue). Outputs, every gradient of the original's parameters, running statistics and
    num_batches_tracked equal the original's; after .eval() the outputs too (the kept norms fold their running
    statistics)."""
    torch.manual_seed(5)
    model = randomize_norms(timm.create_model("mobilenetv2_035", pretrained=False)).train().double()
    blocks = _timm_blocks(model)
    fast, changes = accelerate(model, backend="triton")  # on CPU: Triton's interpreter
    fused = [c for c in changes if c.kind == "fused separable"]
    assert len(fused) == len(blocks) == 17 and all(len(c.batch_norms) == 2 and not c.folded_norms for c in fused)
    assert [c.activation for c in fused] == [act for _, _, act in blocks]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected, got = model(x), fast(x)
    torch.testing.assert_close(got, expected)
    expected.square().sum().backward()
    got.square().sum().backward()
    fast_parameters = dict(fast.named_parameters())
    for name, parameter in model.named_parameters():
        block, _, leaf = name.rpartition(".")
        absorbed = block.endswith(("conv_pw", "conv_pwl")) and type(fast.get_submodule(block)) is nn.Identity
        if leaf == "weight" and (block.endswith("conv_dw") or absorbed):  # now in the fused module
            fused_module = fast.get_submodule(block.rsplit(".", 1)[0] + ".conv_dw")
            name = "dw_weight" if block.endswith("conv_dw") else "pw_weight"
            torch.testing.assert_close(getattr(fused_module, name).grad, parameter.grad)
        elif any(block in c.batch_norms for c in fused):  # a kept norm: between the convs, or after them
            fused_module = fast.get_submodule(block.rsplit(".", 1)[0] + ".conv_dw")
            between = any(c.batch_norms[0] == block for c in fused)
            kept = fused_module.mid_norm if between else fused_module.out_norm
            torch.testing.assert_close(getattr(kept, leaf).grad, parameter.grad)
            torch.testing.assert_close(kept.running_var, model.get_submodule(block).running_var)
            assert kept.num_batches_tracked == 1
        else:
            torch.testing.assert_close(fast_parameters[name].grad, parameter.grad, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), model.eval()(x))


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_large_100"])
def test_timm_blocks_with_squeeze_excitation_train_on_triton_as_the_original(name):
    """timm's efficientnet_b0 (SiLU, sigmoid gate) and mobilenetv3_large_100 (ReLU / Hardswish, hard sigmoid gate)
    in training, backend="triton": each block with a squeeze-excitation is one fused module keeping its
    BatchNormAct2d (activation fused), the SqueezeExcite and the projection's norm; outputs and the gradients of
    every parameter of the original, running statistics and batch counts equal the original's."""
    torch.manual_seed(6)
    model = randomize_norms(timm.create_model(name, pretrained=False)).double().train()
    stem = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:3])  # blocks with and without SE
    fast, changes = accelerate(stem, backend="triton")  # on CPU: Triton's interpreter
    fused = [c for c in changes if c.kind == "fused separable"]
    with_se = [c for c in fused if c.excitation]
    assert with_se and all(len(c.batch_norms) == 2 for c in fused)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    step_both(stem, fast, x)
    fast_parameters = dict(fast.named_parameters())
    fused_modules = {path: m for path, m in fast.named_modules() if isinstance(m, FusedSeparableConv2d)}
    compared = 0
    for path, module in fused_modules.items():  # the kept squeeze-excitations: their convs' gradients
        block = path.rsplit(".", 1)[0]
        if module.excitation is not None:
            original = stem.get_submodule(f"{block}.se")
            for a, b in zip(module.excitation.parameters(), original.parameters(), strict=True):
                torch.testing.assert_close(a.grad, b.grad)
                compared += 1
        original_block = stem.get_submodule(block)
        mid_norm = (
            original_block.bn1 if type(original_block).__name__ == "DepthwiseSeparableConv" else original_block.bn2
        )
        torch.testing.assert_close(module.dw_weight.grad, original_block.conv_dw.weight.grad)
        for name_ in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(module.mid_norm, name_), getattr(mid_norm, name_))
        torch.testing.assert_close(module.mid_norm.weight.grad, mid_norm.weight.grad)
    assert compared == 4 * len(with_se)
    for name_, parameter in stem.named_parameters():  # what no fused module absorbed: as in the original
        if name_ in fast_parameters:
            torch.testing.assert_close(fast_parameters[name_].grad, parameter.grad, msg=name_)


def test_timm_block_whose_projection_norm_has_an_activation_folds_it_and_keeps_the_activation():
    """DepthwiseSeparableConv(pw_act=True) (timm's MobileNetV1 block): the activation after the 1x1 conv's
    BatchNormAct2d cannot be fused, so the fused module takes both norms (folded in eval, kept with their batch
    statistics in training on the Triton kernels) and that activation stays in the norm's place. Outputs (and in
    training every gradient, the running statistics) equal the original's. Training on PyTorch's convs: nothing
    folds, the depthwise conv alone is routed."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv

    torch.manual_seed(3)
    block = randomize_norms(DepthwiseSeparableConv(8, 16, dw_kernel_size=5, pw_act=True)).eval().double()
    fast, changes = accelerate(block)
    assert [(c.kind, c.replaced, c.folded_norms, c.activation) for c in changes] == [
        ("fused separable", ("conv_dw", "bn1", "conv_pw", "bn2"), ("bn1", "bn2"), "relu")
    ]
    assert type(fast.bn2) is nn.ReLU and isinstance(fast.conv_dw, FusedSeparableConv2d)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), block(x))
    training, changes = accelerate(block.train())
    assert [c.kind for c in changes] == ["depthwise"] and type(training.bn1).__name__ == "BatchNormAct2d"
    fast, changes = accelerate(block, backend="triton")  # on CPU: Triton's interpreter
    assert [(c.replaced, c.folded_norms, c.batch_norms) for c in changes] == [
        (("conv_dw", "bn1", "conv_pw", "bn2"), (), ("bn1", "bn2"))
    ]
    assert type(fast.bn2) is nn.ReLU and type(fast.conv_dw.out_norm).__name__ == "BatchNormAct2d"
    step_both(block, fast, x)
    torch.testing.assert_close(fast.conv_dw.pw_weight.grad, block.conv_pw.weight.grad)
    torch.testing.assert_close(fast.conv_dw.out_norm.weight.grad, block.bn2.weight.grad)
    torch.testing.assert_close(fast.conv_dw.out_norm.running_var, block.bn2.running_var)


@pytest.mark.parametrize(
    ("factory", "folded"),
    [
        (lambda: timm.layers.SeparableConv2d(6, 10, 5, stride=2, channel_multiplier=2.0), ()),
        (lambda: timm.layers.SeparableConvNormAct(6, 10, 3, dilation=2, apply_act=False), ("bn",)),
        (lambda: timm.layers.SeparableConvNormAct(6, 10, 3), ("bn",)),  # its ReLU stays in the norm's place
    ],
    ids=["separable", "norm", "norm-act"],
)
def test_timm_separable_layers_fuse(factory, folded):
    """timm's SeparableConv2d / SeparableConvNormAct (depthwise conv, 1x1 conv, optional trailing BatchNormAct2d):
    one fused module with no activation between; the trailing norm folded, the activation it applied (if any) left
    in its place. Outputs equal the original's, on PyTorch's convs and on the Triton kernels."""
    torch.manual_seed(4)
    layer = randomize_norms(factory()).eval()
    for backend in ("auto", "triton"):
        fast, changes = accelerate(layer, backend=backend)
        assert [(c.kind, c.replaced, c.folded_norms, c.activation) for c in changes] == [
            ("fused separable", ("conv_dw", "conv_pw", *folded), folded, None)
        ]
        if folded:  # the norm's activation (a ReLU, or none) in its place
            assert type(fast.bn) is type(getattr(layer.bn, "act", nn.Identity()))
        x = torch.randn(2, 6, 11, 11)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), layer(x), atol=1e-5, rtol=1e-4)


def test_xception_separable_conv_fuses_with_its_norms_and_keeps_its_trailing_activation():
    """xception_aligned's own SeparableConv2d (conv_dw, bn_dw, act_dw, conv_pw, bn_pw, act_pw, plain BatchNorms):
    one fused module of the first five, both norms folded, ReLU fused; act_pw still runs after it. (A match by
    bare class name once fused it as timm.layers' SeparableConv2d, dropping the norm between the convs.)"""
    from timm.models.xception_aligned import SeparableConv2d as XceptionSeparableConv2d

    torch.manual_seed(5)
    layer = randomize_norms(XceptionSeparableConv2d(6, 10, dilation=2)).eval()
    fast, changes = accelerate(layer)
    assert [(c.kind, c.replaced, c.folded_norms, c.activation) for c in changes] == [
        ("fused separable", ("conv_dw", "bn_dw", "act_dw", "conv_pw", "bn_pw"), ("bn_dw", "bn_pw"), "relu")
    ]
    assert isinstance(fast.act_pw, nn.ReLU)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x), atol=1e-5, rtol=1e-4)


class SeparableConv2d(nn.Module):
    """Named like timm's and built like it, but not timm's: its forward normalizes between the convs."""

    def __init__(self):
        super().__init__()
        self.conv_dw, self.bn, self.conv_pw = nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1)

    def forward(self, x):
        return self.conv_pw(self.bn(self.conv_dw(x)))


def test_a_class_of_a_timm_name_elsewhere_is_not_taken_for_timms():
    """Its chain is found from its own forward (a trace), the norm between the convs included."""
    torch.manual_seed(6)
    layer = randomize_norms(SeparableConv2d()).eval()
    fast, changes = accelerate(layer)
    assert [(c.kind, c.replaced, c.folded_norms) for c in changes] == [
        ("fused separable", ("conv_dw", "bn", "conv_pw"), ("bn",))
    ]
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x))


# ---- timm's Conv2dSame (TensorFlow 'same' padding at run time: the tf_ models) -----------------------------------


@given(
    channels=st.integers(1, 5),
    multiplier=st.integers(1, 2),
    kernel=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    size=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    activation=st.sampled_from([nn.ReLU6, nn.SiLU]),
)
def test_conv2d_same_chains_fuse_and_keep_their_run_time_padding(
    channels, multiplier, kernel, stride, dilation, size, activation
):
    """timm's Conv2dSame pads at run time for TensorFlow's 'same' (any stride, the odd pixel last) and ignores its
    padding attribute. A depthwise Conv2dSame -> BN -> act -> 1x1 Conv2dSame -> BN chain is fused with padding
    'same'; a standard Conv2dSame's norm is folded into a Conv2dSame. Outputs equal in float64 on any input size
    (odd and even, smaller than the kernel), on PyTorch's convs and on the Triton kernels."""
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    mid = channels * multiplier
    model = nn.Sequential(
        Conv2dSame(3, channels, 3, stride=stride, bias=False),  # three inputs: not a depthwise conv
        nn.BatchNorm2d(channels),
        Conv2dSame(channels, mid, kernel, stride=stride, dilation=dilation, groups=channels, bias=False),
        nn.BatchNorm2d(mid),
        activation(),
        Conv2dSame(mid, 3, 1, bias=False),
        nn.BatchNorm2d(3),
    )
    model = randomize_norms(model).double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    for backend in ("torch", "triton"):  # triton on CPU: the interpreter
        fast, changes = accelerate(model, backend=backend)
        assert [(c.kind, c.replaced) for c in changes] == [
            ("folded conv", ("0", "1")),
            ("fused separable", ("2", "3", "4", "5", "6")),
        ]
        assert type(fast[0]) is Conv2dSame and fast[2].padding == "same"  # indices kept: identities in between
        with torch.no_grad():
            torch.testing.assert_close(fast(x), want)


@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "tf_mobilenetv3_large_100"])
def test_tf_models_fuse_their_stride_two_blocks_too(name):
    """timm's tf_ models pad their stride-2 convs at run time (Conv2dSame): every block is fused, the stem's norm
    folded, no BatchNorm left, outputs equal in float64 on an input whose 'same' pads are uneven."""
    from timm.layers import Conv2dSame

    torch.manual_seed(7)
    model = randomize_norms(timm.create_model(name, pretrained=False)).double().eval()
    fast, changes = accelerate(model)
    same_padded = [path for path, m in model.named_modules() if type(m) is Conv2dSame and m.groups > 1]
    fused = {c.replaced[0] for c in of_kind(changes, "fused separable")}
    assert len(fused) == len(_timm_blocks(model)) and same_padded and set(same_padded) <= fused
    assert count(fast, nn.BatchNorm2d) == 0 and type(fast.conv_stem) is Conv2dSame
    x = torch.randn(1, 3, 45, 50, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


# ---- timm's UniversalInvertedResidual (MobileNetV4) ---------------------------------------------------------------


def _universal_blocks(model: nn.Module) -> list[str]:
    """The depthwise convs of MobileNetV4's blocks that start a chain: dw_start (before the expansion) and dw_mid."""
    convs = []
    for path, block in model.named_modules():
        if type(block).__name__ == "UniversalInvertedResidual":
            names = [name for name in ("dw_start", "dw_mid") if hasattr(block.get_submodule(name), "conv")]
            convs += [f"{path}.{name}.conv" for name in names]
    return convs


def test_mobilenetv4_fuses_both_depthwise_convs_of_its_blocks():
    """MobileNetV4's UniversalInvertedResidual runs ConvNormActs from its own forward: dw_start -> pw_exp (norm ->
    1x1 -> norm + ReLU: the ReLU stays) and dw_mid (norm + ReLU) -> pw_proj become fused modules; with the stem,
    the ConvBnAct blocks and the head's conv + norm folded, no BatchNorm is left. Outputs equal in float64."""
    torch.manual_seed(8)
    model = randomize_norms(timm.create_model("mobilenetv4_conv_small", pretrained=False)).double().eval()
    chains = _universal_blocks(model)
    fast, changes = accelerate(model)
    fused = of_kind(changes, "fused separable")
    assert sorted(c.replaced[0] for c in fused) == sorted(chains)
    assert any(c.endswith("dw_start.conv") for c in chains) and any(c.endswith("dw_mid.conv") for c in chains)
    assert all(len(c.folded_norms) == 2 for c in fused) and count(fast, nn.BatchNorm2d) == 0
    for c in fused:
        if c.replaced[0].endswith("dw_start.conv"):
            assert c.activation is None and type(fast.get_submodule(c.replaced[-1])) is nn.ReLU  # pw_exp.bn
        else:
            assert c.activation == "relu" and type(fast.get_submodule(c.replaced[-1])) is nn.Identity
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_mobilenetv4_blocks_train_on_triton_as_the_original():
    """Training mode, backend="triton": both chains of each UniversalInvertedResidual keep their norms (batch
    statistics), pw_exp's ReLU in its norm's place; outputs, the gradients of every parameter and the running
    statistics equal the original's."""
    torch.manual_seed(9)
    model = randomize_norms(timm.create_model("mobilenetv4_conv_small", pretrained=False)).double().train()
    part = nn.Sequential(model.conv_stem, model.bn1, model.blocks[0], model.blocks[1], model.blocks[2][0])
    fast, changes = accelerate(part, backend="triton")  # on CPU: Triton's interpreter
    fused = of_kind(changes, "fused separable")
    assert sorted(c.replaced[0] for c in fused) == sorted(_universal_blocks(part)) and len(fused) == 2
    assert all(len(c.batch_norms) == 2 and not c.folded_norms for c in fused)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    step_both(part, fast, x)
    for c in fused:
        module, block = fast.get_submodule(c.replaced[0]), c.replaced[0].rsplit(".", 2)[0]
        original = part.get_submodule(block)
        dw, pw = ("dw_start", "pw_exp") if c.replaced[0].endswith("dw_start.conv") else ("dw_mid", "pw_proj")
        torch.testing.assert_close(module.dw_weight.grad, getattr(original, dw).conv.weight.grad)
        torch.testing.assert_close(module.pw_weight.grad, getattr(original, pw).conv.weight.grad)
        for kept, norm in ((module.mid_norm, getattr(original, dw).bn), (module.out_norm, getattr(original, pw).bn)):
            torch.testing.assert_close(kept.weight.grad, norm.weight.grad)
            torch.testing.assert_close(kept.running_mean, norm.running_mean)


def _expected_chains(model: nn.Module) -> list[str]:
    """The depthwise convs that start a fusable chain, from the model's structure: ReXNet's blocks without a
    squeeze-excitation (theirs runs before the activation), EfficientViT's DSConv and MBConv, GhostNet's downsampling
    shortcuts (a Sequential: depthwise conv, norm, 1x1 conv, norm), MixNet's blocks whose convs are all plain ones
    (its MixedConv2d splits the channels over several kernel sizes, or over grouped 1x1 convs)."""
    chains = []
    for path, block in model.named_modules():
        kind = type(block).__name__
        if kind == "LinearBottleneck" and block.se is None:
            chains.append(f"{path}.conv_dw.conv")
        elif kind in ("DSConv", "MBConv"):
            chains.append(f"{path}.depth_conv.conv")
        elif kind == "GhostBottleneck" and len(block.shortcut):
            chains.append(f"{path}.shortcut.0")
        elif kind in ("DepthwiseSeparableConv", "InvertedResidual"):  # MixNet's: where both convs are plain
            projection = block.conv_pw if kind == "DepthwiseSeparableConv" else block.conv_pwl
            if type(block.conv_dw) is nn.Conv2d and type(projection) is nn.Conv2d:
                chains.append(f"{path}.conv_dw")
    return chains


@pytest.mark.parametrize("name", ["rexnet_100", "efficientvit_b0", "ghostnet_100", "res2net50_26w_4s", "mixnet_s"])
def test_more_timm_families_fuse_their_chains_and_fold_their_norms(name):
    """ReXNet (ConvNormAct depthwise -> ReLU6 -> ConvNormAct 1x1), EfficientViT (its own ConvNormAct: dropout ->
    conv -> norm -> act), GhostNet (its depthwise conv + norm, stem), Res2Net (a forward looping over ModuleLists of
    convs and norms, traced) and MixNet (norms after a MixedConv2d folded into each of its convs, its channels'
    slice): every chain the structure allows is fused, every norm folded; outputs equal in float64."""
    torch.manual_seed(10)
    model = randomize_norms(timm.create_model(name, pretrained=False)).double().eval()
    fast, changes = accelerate(model)
    assert sorted(c.replaced[0] for c in of_kind(changes, "fused separable")) == sorted(_expected_chains(model))
    norms = {path for path, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    # ReXNet's SEWithNorm's conv + norm (on (N, C, 1, 1) means) folded too: found by tracing its forward
    assert {p for c in changes for p in c.folded_norms} == norms and count(fast, nn.BatchNorm2d) == 0
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


# ---- modules with a forward of their own, found by tracing it (torch.fx) ----------------------------------------


class HandWrittenBlock(nn.Module):
    """What users write: attributes run from a forward of their own, a ReLU module called twice, an argument."""

    def __init__(self, channels: int = 6):
        super().__init__()
        self.conv1, self.bn1, self.relu = (
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.dw, self.bn2 = (
            nn.Conv2d(channels, 2 * channels, 5, padding=2, groups=channels),
            nn.BatchNorm2d(2 * channels),
        )
        self.act, self.pw, self.bn3 = nn.ReLU6(), nn.Conv2d(2 * channels, channels, 1), nn.BatchNorm2d(channels)

    def forward(self, x, scale: float = 1.0):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.pw(self.act(self.bn2(self.dw(y)))))
        self.last_shape = y.shape  # an attribute set in forward: tracing must not leave a proxy behind
        return self.relu(y + x) * scale


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = HandWrittenBlock(), HandWrittenBlock()

    def forward(self, x, scale: float = 1.0):
        return self.second(self.first(x, scale), scale)


def test_hand_written_blocks_are_traced_and_rewritten_in_place():
    """A module class of no table: its forward, traced, runs conv1 -> bn1 (folded) and dw -> bn2 -> ReLU6 -> 1x1 ->
    bn3 (fused, both norms folded); the absorbed attributes become nn.Identity and the forward runs as before.
    Eval outputs equal in float64; in training mode on the Triton kernels the chain keeps both norms and outputs,
    gradients and running statistics equal the original's; on PyTorch's convs only the depthwise conv is routed."""
    torch.manual_seed(11)
    model = randomize_norms(TwoBlocks()).double()
    fast, changes = accelerate(model.eval())
    assert [(c.kind, c.replaced, c.folded_norms) for c in changes] == [
        (kind, tuple(f"{block}.{name}" for name in names), tuple(f"{block}.{name}" for name in folded))
        for block in ("first", "second")
        for kind, names, folded in (
            ("folded conv", ("conv1", "bn1"), ("bn1",)),
            ("fused separable", ("dw", "bn2", "act", "pw", "bn3"), ("bn2", "bn3")),
        )
    ]
    assert count(fast, nn.BatchNorm2d) == 0 and isinstance(fast.first.relu, nn.ReLU)
    assert not any(isinstance(v, torch.fx.Proxy) for m in fast.modules() for v in vars(m).values())
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, 0.5), model(x, 0.5))
    _, changes = accelerate(model.train())
    assert [(c.kind, c.replaced) for c in changes] == [("depthwise", (f"{b}.dw",)) for b in ("first", "second")]
    fast, changes = accelerate(model, backend="triton")  # on CPU: Triton's interpreter
    assert [c.batch_norms for c in changes] == [(f"{b}.bn2", f"{b}.bn3") for b in ("first", "second")]
    torch.manual_seed(4)
    expected = model(x, 0.5)
    got = fast(x, 0.5)
    torch.testing.assert_close(got, expected)
    got.square().sum().backward()
    expected.square().sum().backward()
    for block in ("first", "second"):
        fused, original = fast.get_submodule(f"{block}.dw"), model.get_submodule(block)
        torch.testing.assert_close(fused.dw_weight.grad, original.dw.weight.grad)
        torch.testing.assert_close(fused.out_norm.running_var, original.bn3.running_var)
        torch.testing.assert_close(fast.get_submodule(f"{block}.conv1").weight.grad, original.conv1.weight.grad)


class ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output is needed unnormalized too


class NormCalledTwice(ConvUsedTwice):
    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(x)


class WeightRead(ConvUsedTwice):
    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.mean()  # the forward reads the conv's own weight


class FunctionBetween(ConvUsedTwice):
    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class DataDependent(ConvUsedTwice):
    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y  # control flow on a tensor's value: not traceable


@pytest.mark.parametrize("cls", [ConvUsedTwice, NormCalledTwice, WeightRead, FunctionBetween, DataDependent])
def test_traced_forwards_that_need_their_modules_as_they_are_keep_them(cls):
    """A norm is folded into the conv before it only where the forward runs nothing else on that path: not where
    the conv's output is used twice, the norm is called twice, the forward reads the conv's weight, a function runs
    between them, or the forward cannot be traced."""
    torch.manual_seed(12)
    model = randomize_norms(cls()).double().eval()
    fast, changes = accelerate(model)
    assert changes == [] and [type(m) for m in fast.modules()] == [type(m) for m in model.modules()]
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


class ConvNormActBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 6, 3, padding=1), timm.layers.BatchNormAct2d(6, act_layer=nn.SiLU)
        self.conv2, self.norm2 = nn.Conv2d(6, 6, 3, padding=1, groups=6), timm.layers.BatchNormAct2d(6)

    def forward(self, x):
        return self.norm2(self.conv2(self.norm1(self.conv1(x))))


def test_batch_norm_act_after_a_conv_is_folded_and_leaves_its_activation():
    """timm's BatchNormAct2d (norm, identity dropout, activation) after a conv, in a Sequential or a traced forward:
    the norm folded into the conv (a depthwise conv routed with it), its activation left in its place. Outputs equal
    in float64; in training mode nothing folds."""
    torch.manual_seed(13)
    block = randomize_norms(ConvNormActBlock()).double().eval()
    sequence = randomize_norms(nn.Sequential(block.conv1, block.norm1, block.conv2, block.norm2)).double().eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    for model, names in ((block, ("conv1", "norm1", "conv2", "norm2")), (sequence, ("0", "1", "2", "3"))):
        fast, changes = accelerate(model)
        assert [(c.kind, c.replaced, c.folded_norms) for c in changes] == [
            ("folded conv", names[:2], names[1:2]),
            ("depthwise", names[2:], names[3:]),
        ]
        assert count(fast, nn.BatchNorm2d) == 0 and [type(m) for m in fast.children()][1::2] == [nn.SiLU, nn.ReLU]
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x))
        assert [c.kind for c in accelerate(model.train())[1]] == ["depthwise"]
        model.eval()


class ConformerConvolution(nn.Module):
    """Conformer's convolution module (1-d): 1x1 conv -> GLU -> depthwise conv -> BatchNorm1d -> SiLU -> 1x1 conv."""

    def __init__(self, channels: int = 6, kernel: int = 7):
        super().__init__()
        self.pointwise1, self.glu = nn.Conv1d(channels, 2 * channels, 1), nn.GLU(dim=1)
        self.depthwise = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)
        self.norm, self.act, self.pointwise2 = nn.BatchNorm1d(channels), nn.SiLU(), nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        return self.pointwise2(self.act(self.norm(self.depthwise(self.glu(self.pointwise1(x))))))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_one_dimensional_depthwise_conv_takes_its_norm_and_is_routed(backend):
    """1-d (and 3-d) chains are not fused (the fused kernel is 2-d), but a depthwise Conv1d and the eval-mode
    BatchNorm1d after it become our DepthwiseConv1d with the norm folded in, on the CPU strategy even for
    backend="triton" (the kernels are 2-d). Outputs equal in float64; in training mode the norm stays."""
    torch.manual_seed(14)
    model = randomize_norms(ConformerConvolution()).double().eval()
    fast, changes = accelerate(model, backend=backend)
    assert [(c.kind, c.replaced, c.folded_norms) for c in changes] == [("depthwise", ("depthwise", "norm"), ("norm",))]
    assert type(fast.depthwise) is sepconv.DepthwiseConv1d and fast.depthwise.backend == "auto"
    assert type(fast.norm) is nn.Identity
    x = torch.randn(2, 6, 19, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
    fast, changes = accelerate(model.train(), backend=backend)
    assert [(c.kind, c.replaced) for c in changes] == [("depthwise", ("depthwise",))]
    assert type(fast.norm) is nn.BatchNorm1d


def test_video_resnet_folds_every_batch_norm_3d():
    """torchvision's r3d_18 (3-d convs and BatchNorm3d in Sequentials): every norm folded into its conv; outputs
    equal in float64."""
    torch.manual_seed(15)
    model = randomize_norms(torchvision.models.video.r3d_18()).double().eval()
    fast, changes = accelerate(model)
    assert [c.kind for c in changes] == ["folded conv"] * count(model, nn.BatchNorm3d) == ["folded conv"] * 20
    assert count(fast, nn.BatchNorm3d) == 0
    x = torch.randn(1, 3, 4, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))
