"""Depthwise, pointwise and depthwise separable convolutions with the ``nn.ConvNd`` interface.

A separable convolution is a depthwise KxK conv (``groups = in_channels``, ``depth_multiplier``
filters per channel) followed by a 1x1 pointwise conv. Both parts are ``nn.ConvNd`` subclasses,
so state_dicts, ``torch.compile``, ``torch.export`` and ONNX see ordinary convolutions.

>>> import torch
>>> layer = SeparableConv2d(10, 32, 3)
>>> layer(torch.rand(5, 10, 50, 50)).shape
torch.Size([5, 32, 48, 48])
>>> sum(p.numel() for p in layer.parameters())  # 10·9 depthwise + 10·32 + 32 pointwise
442
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from sepconv import cpu_backward, cpu_pointwise, cpu_strategy
from sepconv._args import divisible, int_tuple, padding_arg, padding_mode_arg, positive_int
from sepconv.dispatch import backend_arg, fusable, triton_depthwise_forward, triton_separable_forward, use_triton
from sepconv.padding import Padding, resolve_padding

__all__ = [
    "DepthwiseConv1d",
    "DepthwiseConv2d",
    "DepthwiseConv3d",
    "PointwiseConv1d",
    "PointwiseConv2d",
    "PointwiseConv3d",
    "SeparableConv1d",
    "SeparableConv2d",
    "SeparableConv3d",
]

ModuleFactory = Callable[..., nn.Module]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}
_PRODUCT_DTYPES = (torch.float32, torch.float64)  # the matrix product on the BLAS (sepconv.cpu_pointwise)
_SPATIAL_NAMES = {1: "L", 2: "H, W", 3: "D, H, W"}


def check_input(layer: str, input: Tensor, in_channels: int, ndim: int) -> None:
    """Raise a ValueError naming expected and actual shape unless ``input`` fits the layer."""
    if input.dim() not in (ndim + 1, ndim + 2) or input.shape[-ndim - 1] != in_channels:
        spatial = _SPATIAL_NAMES[ndim]
        raise ValueError(
            f"{layer} expected input of shape (N, {in_channels}, {spatial}) or ({in_channels}, {spatial}),"
            f" got {tuple(input.shape)}"
        )


class _Conv:
    """Mixin for an ``nn.ConvNd``: validated arguments, 'same' padding with any stride, input check."""

    _ndim: int

    def _init_conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: int,
        bias: bool,
        padding_mode: str,
        device: Any,
        dtype: Any,
    ) -> None:
        n = self._ndim
        kernel_size = int_tuple("kernel_size", kernel_size, n)
        stride = int_tuple("stride", stride, n)
        dilation = int_tuple("dilation", dilation, n)
        padding = padding_arg(padding, n)
        padding_mode = padding_mode_arg(padding_mode)
        strided_same = _strided_same(padding, stride)
        super().__init__(  # type: ignore[call-arg]
            in_channels,
            out_channels,
            kernel_size,
            stride,
            0 if strided_same else padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        if strided_same:
            self.padding = "same"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        if input.dim() == self._ndim + 1:  # unbatched (C, *spatial), as nn.ConvNd takes it: a batch of one
            return self._checked_forward(input.unsqueeze(0)).squeeze(0)
        return self._checked_forward(input)

    def _check_input(self, input: Tensor) -> None:
        check_input(type(self).__name__, input, self.in_channels, self._ndim)  # type: ignore[attr-defined]

    _measured_backward = False  # whether `_conv_forward` may run a backward the CPU strategy measured

    def _checked_forward(self, input: Tensor) -> Tensor:
        """``forward`` of an input already checked (a separable layer calls its parts this way)."""
        stride, padding = self.stride, self.padding  # type: ignore[attr-defined]
        if padding == "same" and max(stride) > 1:  # _strided_same, inline: the per-call path
            return self._strided_same_forward(input)
        parameters = self._parameters  # type: ignore[attr-defined]
        if (
            self.padding_mode == "zeros"  # type: ignore[attr-defined]
            and "weight" in parameters  # not parametrized (torch.nn.utils.parametrize)
            and "bias" in parameters
            and not (
                self._measured_backward
                and torch.is_grad_enabled()  # cpu_strategy.may_choose_depthwise_backward's first test
                and math.prod(self.kernel_size) >= cpu_strategy.MIN_KERNEL_AREA_FOR_BACKWARD  # type: ignore[attr-defined]
            )
        ):  # nn.ConvNd's own forward in this frame: calls on small inputs are mostly Python (cf. cpu_strategy.run)
            conv = _CONV[self._ndim]  # type: ignore[attr-defined]
            return conv(input, parameters["weight"], parameters["bias"], stride, padding, self.dilation, self.groups)  # type: ignore[attr-defined]
        return self._conv_forward(input, self.weight, self.bias)  # type: ignore[attr-defined]

    def _strided_same_forward(self, input: Tensor) -> Tensor:
        mode = _PAD_MODE[self.padding_mode]  # type: ignore[attr-defined]
        input = pad_same(input, self.kernel_size, self.stride, self.dilation, mode)  # type: ignore[attr-defined]
        return self._padded_conv(input, self.weight, self.bias)  # type: ignore[attr-defined]

    def _padded_conv(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The conv of an input already padded."""
        return _CONV[self._ndim](input, weight, bias, self.stride, 0, self.dilation, self.groups)  # type: ignore[attr-defined]


def pad_same(input: Tensor, kernel_size: Any, stride: Any, dilation: Any, mode: str = "constant") -> Tensor:
    """``input`` padded for TensorFlow-style 'same' with any stride (``ceil(size / stride)`` outputs)."""
    pads = resolve_padding("same", input.shape[-len(kernel_size) :], kernel_size, stride, dilation)
    return F.pad(input, _pad_argument(pads), mode=mode)


def _pad_argument(pads: list[tuple[int, int]]) -> list[int]:
    """``F.pad``'s argument for ``(lo, hi)`` pads per spatial dimension: last dimension first."""
    return [p for lo_hi in reversed(pads) for p in lo_hi]


class _DepthwiseConv(_Conv):
    def __init__(
        self,
        in_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: Padding = 0,
        dilation: int | tuple[int, ...] = 1,
        depth_multiplier: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        in_channels = positive_int("in_channels", in_channels)
        depth_multiplier = positive_int("depth_multiplier", depth_multiplier)
        backend = backend_arg(backend, self._ndim)
        self._init_conv(
            in_channels,
            in_channels * depth_multiplier,
            kernel_size,
            stride,
            padding,
            dilation,
            in_channels,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self.backend = backend

    @property
    def depth_multiplier(self) -> int:
        return self.out_channels // self.in_channels  # type: ignore[attr-defined]

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() == self._ndim + 1:  # unbatched: see _unbatched
            return _unbatched(self, input)
        if use_triton(self, input):  # type: ignore[arg-type]
            self._check_input(input)
            return triton_depthwise_forward(self, input)  # type: ignore[arg-type]
        checked = self._checked_forward
        return cpu_strategy.run(self, input, checked, checked, batch_independent=True, check=self._check_input)  # type: ignore[arg-type]

    _measured_backward = True

    def _checked_forward(self, input: Tensor) -> Tensor:
        if use_triton(self, input):  # type: ignore[arg-type]
            return triton_depthwise_forward(self, input)  # type: ignore[arg-type]
        return _Conv._checked_forward(self, input)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``nn.ConvNd``'s conv step; on CPU in training the backward may be one the CPU strategy measured faster."""
        if not self._may_choose_backward(input, weight):
            return super()._conv_forward(input, weight, bias)  # type: ignore[misc]
        n = self._ndim
        if self.padding_mode != "zeros":  # type: ignore[attr-defined]
            mode = _PAD_MODE[self.padding_mode]  # type: ignore[attr-defined]
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)  # type: ignore[attr-defined]
            return self._measured_conv(input, weight, bias, (0,) * n)
        pads = resolve_padding(self.padding, input.shape[-n:], self.kernel_size, self.stride, self.dilation)  # type: ignore[attr-defined]
        if any(lo != hi for lo, hi in pads):  # 'same' with an even kernel
            return self._measured_conv(F.pad(input, _pad_argument(pads)), weight, bias, (0,) * n)
        return self._measured_conv(input, weight, bias, tuple(lo for lo, _ in pads))

    def _padded_conv(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if not self._may_choose_backward(input, weight):
            return super()._padded_conv(input, weight, bias)
        return self._measured_conv(input, weight, bias, (0,) * self._ndim)

    def _may_choose_backward(self, input: Tensor, weight: Tensor) -> bool:
        """The kernel-size test first: it spares small kernels (most calls) the strategy's longer test."""
        return math.prod(self.kernel_size) >= cpu_strategy.MIN_KERNEL_AREA_FOR_BACKWARD and (  # type: ignore[attr-defined]
            cpu_strategy.may_choose_depthwise_backward(input, weight)
        )

    def _measured_conv(self, input: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, ...]) -> Tensor:
        """The conv with the backward the CPU strategy picks (callers checked ``may_choose_depthwise_backward``)."""
        stride, dilation = self.stride, self.dilation  # type: ignore[attr-defined]
        grad_input, grad_weight = cpu_strategy.depthwise_backward(input, weight, stride, padding, dilation)
        return cpu_backward.depthwise_conv(
            input, weight, bias, stride, padding, dilation, grad_input=grad_input, grad_weight=grad_weight
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"


class _PointwiseConv(_Conv):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        groups: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        in_channels = positive_int("in_channels", in_channels)
        out_channels = positive_int("out_channels", out_channels)
        groups = positive_int("groups", groups)
        divisible("in_channels", in_channels, groups)
        divisible("out_channels", out_channels, groups)
        self._init_conv(in_channels, out_channels, 1, 1, 0, 1, groups, bias, "zeros", device, dtype)

    def _checked_forward(self, input: Tensor) -> Tensor:
        """On CPU the conv may run as a matrix product, where the CPU strategy measured that faster."""
        parameters = self._parameters  # type: ignore[attr-defined]
        if (
            self._is_matrix_product()
            and input.is_contiguous()  # the product's (pointwise_matmul_applies): others skip the strategy's call
            and cpu_strategy.pointwise_as_matmul(self, input, parameters["weight"], parameters["bias"])
        ):
            return cpu_pointwise.pointwise_matmul(input, parameters["weight"], parameters["bias"])
        return _Conv._checked_forward(self, input)

    def _is_matrix_product(self) -> bool:
        """Whether this conv is :func:`sepconv.cpu_pointwise.pointwise_matmul` of its own weight and bias as they
        stand: groups 1, not parametrized (torch.nn.utils.parametrize), no padding, stride 1."""
        parameters = self._parameters  # type: ignore[attr-defined]
        return (
            self.groups == 1  # type: ignore[attr-defined]
            and parameters.get("weight") is not None
            and "bias" in parameters
            and self.padding_mode == "zeros"  # type: ignore[attr-defined]
            and not any(self.padding)  # type: ignore[attr-defined]  # a string ('same', 'valid') takes the conv
            and max(self.stride) == 1  # type: ignore[attr-defined]
        )


class DepthwiseConv1d(_DepthwiseConv, nn.Conv1d):
    """Depthwise 1-d conv: ``nn.Conv1d(C, C·m, k, groups=C)``; no bias by default.

    >>> DepthwiseConv1d(8, 5, padding="same")(torch.rand(2, 8, 30)).shape
    torch.Size([2, 8, 30])
    """

    _ndim = 1


class DepthwiseConv2d(_DepthwiseConv, nn.Conv2d):
    """Depthwise 2-d conv: ``nn.Conv2d(C, C·m, k, groups=C)``; no bias by default.

    Keyword ``backend``: ``"auto"`` (default), ``"torch"`` or ``"triton"`` (see :mod:`sepconv.dispatch`).

    >>> DepthwiseConv2d(16, 3, stride=2, padding="same", depth_multiplier=2)(torch.rand(1, 16, 7, 7)).shape
    torch.Size([1, 32, 4, 4])
    """

    _ndim = 2


class DepthwiseConv3d(_DepthwiseConv, nn.Conv3d):
    """Depthwise 3-d conv: ``nn.Conv3d(C, C·m, k, groups=C)``; no bias by default.

    >>> DepthwiseConv3d(4, (1, 3, 3), padding=(0, 1, 1))(torch.rand(1, 4, 5, 8, 8)).shape
    torch.Size([1, 4, 5, 8, 8])
    """

    _ndim = 3


class PointwiseConv1d(_PointwiseConv, nn.Conv1d):
    """1x1 conv mixing channels: ``nn.Conv1d(C, O, 1, groups=groups)``.

    >>> PointwiseConv1d(8, 3)(torch.rand(2, 8, 30)).shape
    torch.Size([2, 3, 30])
    """

    _ndim = 1


class PointwiseConv2d(_PointwiseConv, nn.Conv2d):
    """1x1 conv mixing channels: ``nn.Conv2d(C, O, 1, groups=groups)``.

    >>> PointwiseConv2d(8, 16, bias=False)(torch.rand(2, 8, 5, 5)).shape
    torch.Size([2, 16, 5, 5])
    """

    _ndim = 2


class PointwiseConv3d(_PointwiseConv, nn.Conv3d):
    """1x1x1 conv mixing channels: ``nn.Conv3d(C, O, 1, groups=groups)``.

    >>> PointwiseConv3d(4, 6)(torch.rand(1, 4, 3, 5, 5)).shape
    torch.Size([1, 6, 3, 5, 5])
    """

    _ndim = 3


def _mid_module(name: str, factory: Any, *args: int, device: Any, dtype: Any) -> nn.Module | None:
    """Build the optional norm/activation between the two convs from a class or factory."""
    if factory is None:
        return None
    if isinstance(factory, nn.Module):
        if args:  # a norm instance would silently carry its own channel count
            raise TypeError(f"{name} must be a module class or factory such as nn.BatchNorm2d, not an instance")
        module = factory
    elif callable(factory):
        module = factory(*args)
    else:
        raise TypeError(f"{name} must be None or a module class/factory, got {factory!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} must build an nn.Module, got {type(module).__name__}")
    to_kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    return module.to(**to_kwargs) if to_kwargs else module


DENSE_MAX_MAC_RATIO = 8.0  # a dense conv with more MACs than this times the separable block's is not timed
_PER_SAMPLE_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.Identity)
_ELEMENTWISE_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity,
)  # fmt: skip


def _unbatched(layer: nn.Module, input: Tensor) -> Tensor:
    """``layer``'s output for an unbatched (C, *spatial) ``input``, as ``nn.ConvNd`` takes it: the batched path on
    a batch of one, so that the CPU strategy, the measured backward and the Triton kernels (all written for
    (N, C, *spatial)) see the shape they expect — a (C, D, H, W) input to a 3-d layer is not read as a batch of 2-d
    ones."""
    layer._check_input(input)  # type: ignore[operator]
    return layer.forward(input.unsqueeze(0)).squeeze(0)


def _strided_same(padding: str | tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether a conv pads in its forward: PyTorch's 'same' is stride-1 only; with a stride > 1 our layers pad the
    input themselves, as TensorFlow does (:func:`pad_same`)."""
    return padding == "same" and max(stride) > 1


def _same_values(kept: tuple[Tensor | None, ...], parts: tuple[Tensor | None, ...]) -> bool:
    """Whether ``parts`` hold the values of ``kept`` (the same absent ones; dtype, device and shape included)."""
    for old, new in zip(kept, parts, strict=True):
        if old is None or new is None:
            if old is not new:
                return False
        elif old.dtype != new.dtype or old.device != new.device or old.shape != new.shape or not torch.equal(old, new):
            return False
    return True


def _unhooked(*parts: nn.Module) -> bool:
    """Whether nothing could notice ``parts`` being run without ``nn.Module.__call__``: no hooks on them or global,
    no JIT tracing (it records module scopes), none compiled on its own (saves ~5 us a part per call on CPU)."""
    if (
        _nn_module._global_forward_pre_hooks
        or _nn_module._global_forward_hooks
        or _nn_module._global_backward_pre_hooks
        or _nn_module._global_backward_hooks
    ):
        return False
    for part in parts:  # a loop, not any(<generator>): a frame less on the per-call path
        if (
            part._forward_hooks
            or part._forward_pre_hooks
            or part._backward_hooks
            or part._backward_pre_hooks
            or part._compiled_call_impl is not None
        ):
            return False
    return not torch.jit.is_tracing()


class _SeparableConv(nn.Module):
    _ndim: int
    _depthwise: type[_DepthwiseConv]
    _pointwise: type[_PointwiseConv]
    # whether the CPU strategy may time the CHANNELS_LAST_PRODUCT plan (see _product_forward); a subclass without it
    # is the baseline benchmarks/cpu_product_plan.py compares against (its own class name: its own decisions)
    _offers_product = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: Padding = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        depth_multiplier: int = 1,
        depthwise_bias: bool = False,
        mid_norm: ModuleFactory | None = None,
        mid_activation: ModuleFactory | nn.Module | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_channels = positive_int("in_channels", in_channels)
        groups = positive_int("groups", groups)
        divisible("in_channels", in_channels, groups)
        self.depthwise = self._depthwise(
            in_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            depth_multiplier,
            depthwise_bias,
            padding_mode,
            device,
            dtype,
            backend=backend,
        )
        mid = self.depthwise.out_channels  # type: ignore[attr-defined]
        self.mid_norm = _mid_module("mid_norm", mid_norm, mid, device=device, dtype=dtype)
        self.mid_activation = _mid_module("mid_activation", mid_activation, device=device, dtype=dtype)
        self.pointwise = self._pointwise(mid, out_channels, bias, groups, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() == self._ndim + 1:  # unbatched: see _unbatched
            return _unbatched(self, input)
        # auto never fuses (the fused kernel measured slower, see sepconv.dispatch); the cheap tests first
        depthwise = self._modules["depthwise"]  # the dict, not nn.Module.__getattr__: this is the per-call path
        if depthwise.backend == "triton":  # type: ignore[union-attr]
            self._check_input(input)
            if use_triton(depthwise, input) and fusable(self) and _unhooked(*self._chain()):  # type: ignore[arg-type]
                return triton_separable_forward(self, input)
        if self.mid_norm is None and self.mid_activation is None:  # instance attributes when None: no __getattr__
            dense_worth = self.__dict__.get("_sepconv_dense")  # _dense_worth_timing's cache, read here: per-call path
            if dense_worth is None:
                dense_worth = self._dense_worth_timing()
            dense, independent = (self._dense_forward if dense_worth else None), True
            pointwise_groups = self._modules["pointwise"].groups  # type: ignore[union-attr]
            product_applies = self._offers_product and pointwise_groups == 1 and input.dtype in _PRODUCT_DTYPES
            product = self._product_forward if product_applies else None
        else:
            dense, product, independent = None, None, self._batch_independent()
        return cpu_strategy.run(
            self,
            input,
            self._forward,
            self._convs,
            batch_independent=independent,
            check=self._check_input,
            dense=dense,
            product=product,
        )

    def _chain(self) -> list[nn.Module]:
        """The modules the fused kernel computes without calling them: a hook on one of them must see its call."""
        parts = (self.depthwise, self.mid_norm, self.mid_activation, self.pointwise)
        return [part for part in parts if part is not None]

    def _check_input(self, input: Tensor) -> None:
        check_input(type(self).__name__, input, self.in_channels, self._ndim)

    def _forward(self, input: Tensor) -> Tensor:
        depthwise, pointwise = self._parts()
        x = depthwise(input)
        norm, activation = self.mid_norm, self.mid_activation
        if norm is not None:
            x = norm(x)
        if activation is not None:
            x = activation(x)
        return pointwise(x)

    def _dense_worth_timing(self) -> bool:
        """Whether the CPU strategy should time this block as one dense conv (:meth:`_dense_forward`): where the
        composition applies and the dense conv has at most ``DENSE_MAX_MAC_RATIO`` times the MACs — narrow
        layers, whose depthwise conv PyTorch runs slower than a dense one ((32, 112, 16) 3x3 at 5.8x the MACs,
        batch 1 NCHW: forward 0.52 vs 1.23 ms, training step 1.36 vs 3.09 ms). Cached per layer."""
        worth = self.__dict__.get("_sepconv_dense")
        if worth is None:
            depthwise, pointwise = self._modules["depthwise"], self._modules["pointwise"]
            area = math.prod(depthwise.kernel_size)  # type: ignore[union-attr]
            multiplier, out_channels = depthwise.depth_multiplier, pointwise.out_channels  # type: ignore[union-attr]
            ratio = out_channels * area / (multiplier * (area + out_channels))  # dense / separable MACs per pixel
            worth = self.__dict__["_sepconv_dense"] = self._dense_applies() and ratio <= DENSE_MAX_MAC_RATIO
        return worth

    def _dense_applies(self) -> bool:
        """Whether the block equals one conv: no mid modules, pointwise groups 1, zero padding given to the conv."""
        depthwise, pointwise = self._modules["depthwise"], self._modules["pointwise"]
        strided_same = _strided_same(depthwise.padding, depthwise.stride)  # type: ignore[union-attr,arg-type]
        return (
            self.mid_norm is None
            and self.mid_activation is None
            and pointwise.groups == 1  # type: ignore[union-attr]
            and depthwise.padding_mode == "zeros"  # type: ignore[union-attr]
            and not strided_same
        )

    def _dense_forward(self, input: Tensor) -> Tensor:
        """The block as one conv of weight ``W[o, c] = sum_j pw[o, c*m + j] * dw[c*m + j]`` (depth multiplier m)
        and bias ``pw @ dw_bias + pw_bias``: the same map, its gradients reaching the parts' parameters through
        the composition. Called only where :meth:`_dense_worth_timing` held; falls back to :meth:`_forward` where
        something would notice the parts not being called (hooks on them, JIT tracing: :func:`_unhooked`) and
        where a part was changed since so that the composition no longer applies (its padding mode, say)."""
        depthwise, pointwise = self._modules["depthwise"], self._modules["pointwise"]
        if not _unhooked(depthwise, pointwise):  # type: ignore[arg-type]
            return self._forward(input)
        if not self._dense_applies():  # a few attribute tests: the dense plan runs on calls of 0.3 ms and more
            for cache in ("_sepconv_dense", "_sepconv_cpu_plans", "_sepconv_dense_weights"):  # plan again, no dense
                self.__dict__.pop(cache, None)
            return self._forward(input)
        parts = (depthwise.weight, pointwise.weight, depthwise.bias, pointwise.bias)  # type: ignore[union-attr]
        if torch.is_grad_enabled() and any(part is not None and part.requires_grad for part in parts):
            weight, bias = self._composed(*parts)  # in the graph: the gradients reach the parts
        else:
            weight, bias = self._composed_unchanged(parts)
        conv = _CONV[self._ndim]
        return conv(input, weight, bias, depthwise.stride, depthwise.padding, depthwise.dilation)  # type: ignore[union-attr]

    def _product_forward(self, input: Tensor, out: Tensor | None = None) -> Tensor:
        """The block with its pointwise conv as a matrix product (:func:`sepconv.cpu_pointwise.pointwise_matmul`),
        whose output is contiguous whatever the intermediate's layout: the CPU strategy's
        ``CHANNELS_LAST_PRODUCT`` plan runs it on an NCHW caller's input converted to channels_last, so that the
        depthwise conv runs in channels_last and the product reads its output transposed, with neither oneDNN's
        1x1 conv (~45 us a call on this project's Xeon, whatever the size) nor a conversion back: a (1, 128, 28, 28)
        15x15 forward 1.03 -> 0.90 ms (benchmarks/cpu_product_plan.py). Offered where the pointwise groups are 1 and
        there are no mid modules; the parts as modules where something would notice the product (hooks, tracing, a
        parametrized or changed pointwise conv). ``out`` (outside autograd): the output is written there, in its
        layout, and returned (the plan's batch chunks: each chunk's output straight into the batch's)."""
        depthwise, pointwise = self._modules["depthwise"], self._modules["pointwise"]
        if _unhooked(depthwise, pointwise) and pointwise._is_matrix_product():  # type: ignore[arg-type,union-attr,operator]
            parameters = pointwise._parameters  # type: ignore[union-attr]
            intermediate = depthwise._checked_forward(input)  # type: ignore[union-attr,operator]
            return cpu_pointwise.pointwise_matmul(intermediate, parameters["weight"], parameters["bias"], out=out)
        output = self._forward(input)
        return output if out is None else out.copy_(output)

    def _composed(
        self, dw_weight: Tensor, pw_weight: Tensor, dw_bias: Tensor | None, pw_bias: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The dense conv's weight and bias (see :meth:`_dense_forward`)."""
        depthwise, pointwise = self._modules["depthwise"], self._modules["pointwise"]
        channels, out_channels = depthwise.in_channels, pointwise.out_channels  # type: ignore[union-attr]
        kernel = dw_weight.shape[2:]
        multiplier = dw_weight.shape[0] // channels
        composed = pw_weight.reshape(out_channels, channels, multiplier, *(1,) * len(kernel)) * dw_weight.reshape(
            1, channels, multiplier, *kernel
        )
        bias = pw_bias
        if dw_bias is not None:
            through = pw_weight.reshape(out_channels, -1) @ dw_bias
            bias = through if bias is None else bias + through
        return composed.sum(2), bias

    def _composed_unchanged(self, parts: tuple[Tensor | None, ...]) -> tuple[Tensor, Tensor | None]:
        """:meth:`_composed` outside autograd, reused while the parts hold the values it was made of: composing
        afresh on each call made a (1, 32, 112, 112) -> 16 channels inference call 0.53 instead of 0.49 ms.
        Values are compared (``torch.equal``, ~2 us for the four), not versions: ``p.data.normal_()``, common in
        weight initialisations, changes a parameter without a new version."""
        cached = self.__dict__.get("_sepconv_dense_weights")
        if cached is None or not _same_values(cached[0], parts):
            # normal tensors also when made under torch.inference_mode: a later call in grad mode (an input
            # gradient of a frozen layer) saves the composed weight for its backward, which an inference tensor
            # refuses
            with torch.inference_mode(False), torch.no_grad():
                composed = self._composed(*parts)
                copies = tuple(None if part is None else part.detach().clone() for part in parts)
            cached = self.__dict__["_sepconv_dense_weights"] = (copies, composed)
        return cached[1]

    def _convs(self, input: Tensor) -> Tensor:
        """The stateless part the CPU strategy may time (a training-mode norm must not see extra batches)."""
        depthwise, pointwise = self._parts()
        return pointwise(depthwise(input))

    def _batch_independent(self) -> bool:
        """Whether each sample's output depends on that sample alone: no norm between the convs that mixes the
        batch (a BatchNorm in training mode, or a module this does not know) and a known elementwise activation."""
        norm, activation = self.mid_norm, self.mid_activation
        eval_batch_norm = isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training
        if norm is not None and not (isinstance(norm, _PER_SAMPLE_NORMS) or eval_batch_norm):
            return False
        return activation is None or isinstance(activation, _ELEMENTWISE_ACTIVATIONS)

    def _parts(self) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """The two convs as callables: their forward on an input this layer checked, skipping ``nn.Module.__call__``
        when nothing hooks them (:func:`_unhooked`), else the modules themselves."""
        depthwise, pointwise = self._modules["depthwise"], self._modules["pointwise"]
        if _unhooked(depthwise, pointwise):  # type: ignore[arg-type]
            return depthwise._checked_forward, pointwise._checked_forward  # type: ignore[union-attr]
        return depthwise, pointwise  # type: ignore[return-value]

    def reset_parameters(self) -> None:
        for module in (self.depthwise, self.mid_norm, self.mid_activation, self.pointwise):
            if module is not None and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    # The nn.ConvNd attributes, read from the parts, so there is one source of truth.
    in_channels = property(lambda self: self.depthwise.in_channels)
    out_channels = property(lambda self: self.pointwise.out_channels)
    kernel_size = property(lambda self: self.depthwise.kernel_size)
    stride = property(lambda self: self.depthwise.stride)
    padding = property(lambda self: self.depthwise.padding)
    dilation = property(lambda self: self.depthwise.dilation)
    groups = property(lambda self: self.pointwise.groups)
    padding_mode = property(lambda self: self.depthwise.padding_mode)
    depth_multiplier = property(lambda self: self.depthwise.depth_multiplier)
    backend = property(lambda self: self.depthwise.backend)

    def extra_repr(self) -> str:
        n = self._ndim
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"]
        if self.stride != (1,) * n:
            parts.append(f"stride={self.stride}")
        if self.padding != (0,) * n:
            parts.append(f"padding={self.padding!r}")
        if self.dilation != (1,) * n:
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.padding_mode != "zeros":
            parts.append(f"padding_mode={self.padding_mode!r}")
        if self.depth_multiplier != 1:
            parts.append(f"depth_multiplier={self.depth_multiplier}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


class SeparableConv1d(_SeparableConv):
    """Depthwise separable 1-d conv, a drop-in for ``nn.Conv1d``.

    >>> SeparableConv1d(8, 16, 5, padding="same", depth_multiplier=2)(torch.rand(2, 8, 30)).shape
    torch.Size([2, 16, 30])
    """

    _ndim, _depthwise, _pointwise = 1, DepthwiseConv1d, PointwiseConv1d


class SeparableConv2d(_SeparableConv):
    """Depthwise separable 2-d conv, a drop-in for ``nn.Conv2d``.

    Arguments are ``nn.Conv2d``'s (``groups`` applies to the pointwise part) plus, keyword-only,
    ``depth_multiplier``, ``depthwise_bias``, ``mid_norm``/``mid_activation`` (a module class
    or factory, called with the channel count for the norm, with nothing for the activation) and
    ``backend``: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`sepconv.dispatch`). The Triton path is the
    fused kernel when ``groups=1`` and between the convs there is at most a BatchNorm2d (eval mode: folded;
    training mode: folded with the batch's statistics, computed by a first pass over the input, running
    statistics updated as BatchNorm2d updates them) and a ReLU/ReLU6/Hardswish/SiLU/GELU, and no part has hooks;
    otherwise the depthwise conv runs on Triton and the rest in PyTorch.

    >>> layer = SeparableConv2d(32, 64, 3, stride=2, padding="same", mid_norm=nn.BatchNorm2d, mid_activation=nn.ReLU)
    >>> layer(torch.rand(1, 32, 15, 15)).shape  # 'same' with stride 2: ceil(15 / 2) = 8
    torch.Size([1, 64, 8, 8])
    """

    _ndim, _depthwise, _pointwise = 2, DepthwiseConv2d, PointwiseConv2d


class SeparableConv3d(_SeparableConv):
    """Depthwise separable 3-d conv, a drop-in for ``nn.Conv3d``.

    >>> SeparableConv3d(4, 8, 3, padding=1)(torch.rand(1, 4, 6, 10, 10)).shape
    torch.Size([1, 8, 6, 10, 10])
    """

    _ndim, _depthwise, _pointwise = 3, DepthwiseConv3d, PointwiseConv3d
