"""analyze() and cost() differ on activation bytes by exactly the padded copy of the input that PyTorch's path
writes before some convs (cost() leaves it out, as its docstring says): that copy's size, computed here."""

from __future__ import annotations

import math

import pytest
from torch import nn

import sepconv
from sepconv.analyze import analyze

FP32 = 4


def same_total(n: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n, 0)


@pytest.mark.parametrize(
    ("layer", "shape", "copy"),
    [
        # padding_mode other than zeros: F.pad into a new tensor, padded on both sides
        (nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), (1, 3, 8, 8), 3 * (8 + 2) ** 2),
        (nn.Conv2d(3, 8, 3, padding=0, padding_mode="replicate"), (2, 3, 8, 8), 2 * 3 * 8 * 8),
        (nn.Conv1d(4, 8, 5, padding=(2,), padding_mode="circular"), (2, 4, 9), 2 * 4 * (9 + 4)),
        (nn.Conv2d(3, 8, 4, padding="same", padding_mode="circular"), (1, 3, 8, 8), 3 * (8 + 3) ** 2),
        # 'same' at stride 1 with an odd total (even kernel): only the odd element goes into a copy
        (nn.Conv2d(3, 8, (4, 3), padding="same"), (1, 3, 8, 8), 3 * (8 + 1) * 8),
        (sepconv.DepthwiseConv2d(8, 4, padding="same"), (1, 8, 9, 9), 8 * (9 + 1) ** 2),
        # sepconv's strided 'same': the input padded for TF 'same', also where that padding is 0
        (
            sepconv.SeparableConv2d(8, 8, 3, stride=2, padding="same"),
            (1, 8, 9, 9),
            8 * (9 + same_total(9, 3, 2, 1)) ** 2,
        ),
        (
            sepconv.SeparableConv2d(8, 8, 2, stride=2, padding="same"),
            (1, 8, 10, 10),
            8 * (10 + same_total(10, 2, 2, 1)) ** 2,
        ),
        # no copy: zeros with symmetric padding
        (nn.Conv2d(3, 8, 3, padding="same"), (1, 3, 8, 8), 0),
        (sepconv.SeparableConv2d(8, 8, 3, padding=1), (1, 8, 9, 9), 0),
    ],
)
def test_activation_bytes_differ_by_the_pad_copy(layer: nn.Module, shape: tuple[int, ...], copy: int) -> None:
    counted, analytic = analyze(layer, shape).total.activation_bytes, sepconv.cost(layer, shape).activation_bytes
    assert counted - analytic == copy * FP32
