"""Layers' ``backend=``: the Triton path equals the PyTorch path; ``auto`` keeps PyTorch where it must."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sepconv
from sepconv import dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def twins(factory, **kwargs):
    """The same layer (same weights) with backend='torch' and backend='triton', float64."""
    torch.manual_seed(0)
    plain = factory(backend="torch", dtype=torch.float64, device=DEVICE, **kwargs)
    fast = factory(backend="triton", dtype=torch.float64, device=DEVICE, **kwargs)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def assert_twins_agree(plain: nn.Module, fast: nn.Module, x: torch.Tensor, **tolerance) -> None:
    """Equal outputs, and equal gradients of the input and of every parameter (paired by name)."""
    y_plain, y_fast = plain(x), fast(x)
    torch.testing.assert_close(y_fast, y_plain, **tolerance)
    grad = torch.randn_like(y_plain)
    names = [n for n, _ in plain.named_parameters()]
    fast_params = dict(fast.named_parameters())
    want = torch.autograd.grad(y_plain, [x, *plain.parameters()], grad)
    got = torch.autograd.grad(y_fast, [x, *(fast_params[n] for n in names)], grad)
    for name, g, w in zip(["input", *names], got, want, strict=True):
        torch.testing.assert_close(g, w, **tolerance, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    ("factory", "kwargs", "shape"),
    [
        (sepconv.DepthwiseConv2d, {"in_channels": 5, "kernel_size": 3, "padding": 1, "bias": True}, (2, 5, 7, 6)),
        (sepconv.DepthwiseConv2d, {"in_channels": 3, "kernel_size": (4, 2), "depth_multiplier": 2}, (1, 3, 6, 6)),
        (sepconv.DepthwiseConv2d, {"in_channels": 4, "kernel_size": 5, "stride": 2, "padding": "same"}, (2, 4, 9, 8)),
        (
            sepconv.SeparableConv2d,
            {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "stride": 2, "padding": "same", "dilation": 2},
            (2, 4, 11, 10),
        ),
        (
            sepconv.SeparableConv2d,
            {
                "in_channels": 6,
                "out_channels": 4,
                "kernel_size": 5,
                "padding": "valid",
                "groups": 2,
                "depth_multiplier": 2,
            },
            (1, 6, 8, 9),
        ),
    ],
)
def test_triton_backend_equals_torch_backend_with_gradients(factory, kwargs, shape):
    plain, fast = twins(factory, **kwargs)
    x = torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert_twins_agree(plain, fast, x, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "norm",
    [
        nn.BatchNorm2d,
        lambda c: nn.BatchNorm2d(c, momentum=None),  # a cumulative average over num_batches_tracked
        lambda c: nn.BatchNorm2d(c, affine=False, track_running_stats=False),  # batch statistics in eval too
    ],
    ids=["momentum", "momentum-none", "untracked"],
)
def test_fused_layer_with_training_mode_norm_equals_torch(norm, monkeypatch):
    """A training-mode BatchNorm between the convs on the fused kernel (its batch statistics folded in): outputs,
    every gradient, running statistics and num_batches_tracked as PyTorch's modules, over steps; then eval."""
    fused = []
    real = dispatch.triton_separable_forward
    monkeypatch.setattr(sepconv.layers, "triton_separable_forward", lambda lr, x: fused.append(lr) or real(lr, x))
    geometry = {"in_channels": 3, "out_channels": 5, "kernel_size": 3, "padding": "same", "stride": 2}
    plain, fast = twins(sepconv.SeparableConv2d, **geometry, mid_norm=norm, mid_activation=nn.ReLU6)
    for step in range(3):
        x = (torch.randn(4, 3, 7, 7, dtype=torch.float64, device=DEVICE) * (step + 1) + step).requires_grad_()
        assert_twins_agree(plain, fast, x)
        for name, buffer in plain.mid_norm.named_buffers():
            torch.testing.assert_close(fast.mid_norm.get_buffer(name), buffer, msg=lambda m, n=name: f"{n}: {m}")
    plain.eval(), fast.eval()
    assert_twins_agree(plain, fast, torch.randn(2, 3, 7, 7, dtype=torch.float64, device=DEVICE, requires_grad=True))
    assert fused == [fast] * 4


def test_the_kernel_really_runs_for_triton_and_not_for_auto_on_cpu(monkeypatch):
    calls = []
    real = dispatch.triton_depthwise_forward

    def spy(layer, input):
        calls.append(layer.backend)
        return real(layer, input)

    monkeypatch.setattr(sepconv.layers, "triton_depthwise_forward", spy)
    x = torch.randn(1, 2, 5, 5, device=DEVICE)
    sepconv.DepthwiseConv2d(2, 3, device=DEVICE, backend="triton")(x)
    sepconv.DepthwiseConv2d(2, 3, device=DEVICE, backend="torch")(x)
    sepconv.DepthwiseConv2d(2, 3, device=DEVICE)(x.cpu() if DEVICE == "cuda" else x)
    assert calls == ["triton"]  # auto on a CPU tensor: PyTorch


def test_auto_reasons():
    layer = sepconv.DepthwiseConv2d(2, 3)
    x = torch.randn(1, 2, 5, 5)
    assert dispatch.triton_blocker(layer, x, auto=True) == "the input is on cpu, not CUDA"
    assert dispatch.triton_blocker(layer, x, auto=False) is None
    reflect = sepconv.DepthwiseConv2d(2, 3, padding=1, padding_mode="reflect")
    assert "padding_mode='reflect'" in dispatch.triton_blocker(reflect, x, auto=True)
    assert "3-d" in dispatch.triton_blocker(sepconv.DepthwiseConv3d(2, 3), x.unsqueeze(2), auto=True)


@pytest.mark.parametrize("side", [3, 7, 8, 9, 13, 31])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("needs_grad", [True, False])
@pytest.mark.parametrize(("batch", "channels", "size", "stride"), [(1, 8, 12, 1), (32, 256, 28, 1), (64, 96, 112, 2)])
def test_auto_uses_the_kernel_only_where_it_measured_faster(
    side, channels_last, needs_grad, batch, channels, size, stride
):
    x = torch.empty(batch, channels, size, size, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    reason = dispatch.slower_than_pytorch(x, (side, side), channels, (stride, stride), needs_grad)
    out = -(-size // stride)
    macs = batch * channels * out * out * side * side
    floor = dispatch.AUTO_MIN_MACS_WITH_GRAD if needs_grad else dispatch.AUTO_MIN_MACS
    if channels_last:
        expect_kernel = side * side >= dispatch.AUTO_MIN_KERNEL_AREA and macs >= floor
    else:
        expect_kernel = side * side <= dispatch.AUTO_MAX_KERNEL_AREA_NCHW and macs >= dispatch.AUTO_MIN_MACS_NCHW
    assert (reason is None) == expect_kernel, reason
    if expect_kernel:
        return
    if not channels_last:
        assert "NCHW input" in reason
        if side * side > dispatch.AUTO_MAX_KERNEL_AREA_NCHW:
            assert f"kernel {side}x{side}" in reason
        else:
            assert f"{macs:,} MACs" in reason
    elif side * side < dispatch.AUTO_MIN_KERNEL_AREA:
        assert f"kernel {side}x{side}" in reason
    elif not expect_kernel:
        assert f"{macs:,} MACs" in reason


def test_auto_thresholds_match_the_measured_crossover():
    """The rule's constants against the benchmark's measured crossover (H200): channels_last 7x7 was slower
    than PyTorch and 9x9 faster; the replknet shape (32x256x28x28, 31x31) faster with gradients."""
    assert 7 * 7 < dispatch.AUTO_MIN_KERNEL_AREA <= 9 * 9
    assert 32 * 256 * 28 * 28 * 31 * 31 >= dispatch.AUTO_MIN_MACS_WITH_GRAD >= dispatch.AUTO_MIN_MACS
    # NCHW: 9x9 faster, 13x13 slower (32x256x28x28); 576x14 3x3 (batch 64) lost its forward+backward, 96x112
    # 3x3 stride 2 (batch 64) won both
    assert 9 * 9 <= dispatch.AUTO_MAX_KERNEL_AREA_NCHW < 13 * 13
    assert 64 * 576 * 14 * 14 * 9 < dispatch.AUTO_MIN_MACS_NCHW <= 64 * 96 * 56 * 56 * 9


def test_auto_never_fuses_a_separable_layer(monkeypatch):
    """Where auto takes our kernels at all, a separable layer runs our depthwise kernel and PyTorch's 1x1 conv."""
    fused, depthwise = [], []
    monkeypatch.setattr(sepconv.layers, "use_triton", lambda layer, x: True)  # as on CUDA with a winning shape
    monkeypatch.setattr(sepconv.layers, "triton_separable_forward", lambda *args: fused.append(1))
    real = dispatch.triton_depthwise_forward
    monkeypatch.setattr(sepconv.layers, "triton_depthwise_forward", lambda *a: depthwise.append(1) or real(*a))
    torch.manual_seed(0)
    layer = sepconv.SeparableConv2d(4, 6, 3, padding=1, device=DEVICE, dtype=torch.float64)
    x = torch.randn(1, 4, 6, 6, device=DEVICE, dtype=torch.float64)
    with sepconv.use_cpu_strategy("off"):  # on CPU, auto would also time the layer's parts
        y = layer(x)
    torch.testing.assert_close(
        y,
        layer.pointwise(nn.functional.conv2d(x, layer.depthwise.weight, layer.depthwise.bias, padding=1, groups=4)),
    )
    assert (fused, depthwise) == ([], [1])


def test_auto_keeps_pytorch_while_exporting(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    reason = dispatch.triton_blocker(sepconv.DepthwiseConv2d(2, 3), torch.randn(1, 2, 5, 5, device=DEVICE), auto=True)
    assert reason == "tracing or exporting: the graph keeps PyTorch's conv"


def test_explicit_triton_that_cannot_run_says_why():
    layer = sepconv.DepthwiseConv2d(2, 3, padding=1, padding_mode="circular", backend="triton", device=DEVICE)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run this layer: padding_mode='circular'"):
        layer(torch.randn(1, 2, 5, 5, device=DEVICE))


def test_wrong_input_channels_error_comes_from_the_layer():
    layer = sepconv.DepthwiseConv2d(2, 3, backend="triton", device=DEVICE)
    with pytest.raises(ValueError, match=r"DepthwiseConv2d expected input of shape \(N, 2, H, W\)"):
        layer(torch.randn(1, 3, 5, 5, device=DEVICE))


@pytest.mark.parametrize(
    ("factory", "backend", "match"),
    [
        (sepconv.DepthwiseConv2d, "cuda", "backend must be one of 'auto', 'torch', 'triton'; got 'cuda'"),
        (sepconv.DepthwiseConv1d, "triton", "backend='triton' supports 2-d layers only"),
        (sepconv.DepthwiseConv3d, "triton", "backend='triton' supports 2-d layers only"),
    ],
)
def test_bad_backend_argument(factory, backend, match):
    with pytest.raises(ValueError, match=match):
        factory(4, 3, backend=backend)


def test_backend_is_not_state_and_shows_in_repr():
    fast = sepconv.SeparableConv2d(4, 8, 3, backend="triton")
    plain = sepconv.SeparableConv2d(4, 8, 3)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert fast.backend == fast.depthwise.backend == "triton"
    assert "backend='triton'" in repr(fast)
    assert "backend" not in repr(plain)


def test_separable_layer_takes_the_fused_kernel_only_when_fusable(monkeypatch):
    fused, depthwise_only = [], []
    real_fused, real_dw = dispatch.triton_separable_forward, dispatch.triton_depthwise_forward
    monkeypatch.setattr(
        sepconv.layers, "triton_separable_forward", lambda layer, x: fused.append(layer) or real_fused(layer, x)
    )
    monkeypatch.setattr(
        sepconv.layers, "triton_depthwise_forward", lambda layer, x: depthwise_only.append(layer) or real_dw(layer, x)
    )
    x = torch.randn(2, 4, 6, 6, device=DEVICE)

    def make(**kwargs):
        return sepconv.SeparableConv2d(4, 8, 3, backend="triton", device=DEVICE, **kwargs)

    plain, relu6, silu = make(), make(mid_activation=nn.ReLU6), make(mid_activation=nn.SiLU)
    eval_norm = make(mid_norm=nn.BatchNorm2d, mid_activation=nn.Hardswish).eval()
    grouped, train_norm = make(groups=2), make(mid_norm=nn.BatchNorm2d)
    tanh_gelu, mish = make(mid_activation=nn.GELU(approximate="tanh")), make(mid_activation=nn.Mish)
    group_norm = make(mid_norm=lambda c: nn.GroupNorm(2, c))
    hooked, seen = make(mid_norm=nn.BatchNorm2d, mid_activation=nn.ReLU), []  # a hook must see its module's call
    hooked.mid_norm.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with sepconv.use_cpu_strategy("off"):  # on CPU, "auto" would also time the layers' parts
        for layer in (plain, relu6, silu, eval_norm, train_norm, grouped, tanh_gelu, mish, group_norm, hooked):
            layer(x)
    assert fused == [plain, relu6, silu, eval_norm, train_norm]
    unfused = [grouped, tanh_gelu, mish, group_norm, hooked]
    assert depthwise_only == [layer.depthwise for layer in unfused]
    assert seen == [(2, 4, 4, 4)]


def test_fused_layer_with_eval_norm_equals_torch_including_norm_parameter_gradients():
    plain, fast = twins(
        sepconv.SeparableConv2d,
        in_channels=3,
        out_channels=5,
        kernel_size=3,
        padding=1,
        stride=2,
        mid_norm=nn.BatchNorm2d,
        mid_activation=nn.ReLU6,
    )
    with torch.no_grad():
        for layer in (plain, fast):
            layer.mid_norm.running_mean.copy_(torch.linspace(-0.5, 0.5, 3))
            layer.mid_norm.running_var.copy_(torch.linspace(0.5, 2.0, 3))
            layer.mid_norm.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
    plain.eval(), fast.eval()
    assert dispatch.fusable(fast)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert_twins_agree(plain, fast, x)


def test_meta_tensors_take_the_pytorch_path_so_analyze_counts_them():
    model = nn.Sequential(sepconv.SeparableConv2d(8, 16, 3, padding=1, backend="triton"))
    plain = nn.Sequential(sepconv.SeparableConv2d(8, 16, 3, padding=1, backend="torch"))
    ours, reference = sepconv.analyze(model, (2, 8, 10, 10)), sepconv.analyze(plain, (2, 8, 10, 10))
    assert ours.total.macs == reference.total.macs == 2 * 100 * (8 * 9 + 8 * 16)
    assert ours.total.params == reference.total.params
