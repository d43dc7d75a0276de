"""Geometry helpers against PyTorch's own convolutions and TensorFlow's documented 'SAME' examples."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from sepconv.padding import conv_output_size, resolve_padding, same_padding

sizes, kernels, strides, dilations = st.integers(1, 40), st.integers(1, 9), st.integers(1, 4), st.integers(1, 3)


@given(sizes, kernels, strides, dilations, st.integers(0, 4), st.integers(0, 4))
def test_output_size_matches_torch(size, kernel, stride, dilation, lo, hi) -> None:
    x = torch.empty(1, 1, size + lo + hi, device="meta")
    w = torch.empty(1, 1, kernel, device="meta")
    if size + lo + hi < dilation * (kernel - 1) + 1:
        assert conv_output_size(size, kernel, stride, (lo, hi), dilation) < 1
        return
    expected = torch.nn.functional.conv1d(x, w, stride=stride, dilation=dilation).shape[-1]
    assert conv_output_size(size, kernel, stride, (lo, hi), dilation) == expected


@given(sizes, kernels, strides, dilations)
def test_same_padding_gives_ceil_outputs_with_the_extra_pad_last(size, kernel, stride, dilation) -> None:
    lo, hi = same_padding(size, kernel, stride, dilation)
    assert conv_output_size(size, kernel, stride, (lo, hi), dilation) == math.ceil(size / stride)
    assert hi - lo in (0, 1)
    if stride == 1:  # PyTorch's 'same' pads d·(k-1) in total, the odd one on the right
        assert lo + hi == dilation * (kernel - 1)


def test_tensorflow_documented_examples() -> None:
    # TF: in=13, k=6, s=5 -> out 3, pad total 3: 1 left, 2 right
    assert same_padding(13, 6, 5) == (1, 2)
    assert same_padding(5, 3, 2) == (1, 1)
    assert same_padding(6, 3, 2) == (0, 1)


def test_resolve_padding_forms() -> None:
    assert resolve_padding("valid", (9, 9), (3, 3), (1, 1), (1, 1)) == [(0, 0), (0, 0)]
    assert resolve_padding(2, (9,), (3,), (1,), (1,)) == [(2, 2)]
    assert resolve_padding("same", (8, 9), (4, 3), (1, 2), (1, 1)) == [(1, 2), (1, 1)]
