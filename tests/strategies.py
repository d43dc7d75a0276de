"""Hypothesis strategies for random, always-legal convolution configurations."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class ConvConfig:
    ndim: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: int | tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    depth_multiplier: int
    input_shape: tuple[int, ...]

    @property
    def conv_kwargs(self) -> dict:
        return dict(
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
        )

    @property
    def strided_same(self) -> bool:
        return self.padding == "same" and any(s > 1 for s in self.stride)


@st.composite
def conv_configs(draw, ndims=(1, 2, 3), max_kernel=5) -> ConvConfig:
    ndim = draw(st.sampled_from(ndims))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    dims = st.tuples(*[st.integers(1, max_kernel)] * ndim)
    kernel = draw(dims)
    stride = draw(st.tuples(*[st.integers(1, 3)] * ndim))
    dilation = draw(st.tuples(*[st.integers(1, 2)] * ndim))
    padding = draw(
        st.one_of(st.sampled_from(["same", "valid"]), st.integers(0, 2), st.tuples(*[st.integers(0, 2)] * ndim))
    )
    # Big enough for every padding mode (reflect needs pad < size) and a non-empty output.
    sizes = [
        draw(st.integers(max(d * (k - 1) + 1, 3), d * (k - 1) + 6 if ndim < 3 else d * (k - 1) + 3))
        for k, d in zip(kernel, dilation, strict=True)
    ]
    batch = draw(st.integers(1, 2))
    return ConvConfig(
        ndim,
        in_channels,
        out_channels,
        kernel,
        stride,
        padding,
        dilation,
        groups,
        draw(st.sampled_from(PADDING_MODES)),
        draw(st.integers(1, 2)),
        (batch, in_channels, *sizes),
    )
