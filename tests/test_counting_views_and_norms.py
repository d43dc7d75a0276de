"""Regression tests for what the counter charges as new tensors: views without alias annotations
(``aten._unsafe_view`` after ``mm``/``bmm``) write nothing, and eval-mode batch norm writes only its output.
Expected numbers are the elements each layer writes, computed here from the shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import sepconv
from sepconv.analyze import analyze
from sepconv.counting import count_calls

FP32 = 4


class MatMulTransposed(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x @ x.transpose(-1, -2)


class HandAttention(nn.Module):
    """softmax(Q·Kᵀ)·V with the batch dims in front: two bmm's whose results are reshaped back."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return (q @ k.transpose(-1, -2)).softmax(-1) @ v


@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 2, 4, 7), (7,), (4, 7)])
def test_linear_with_batch_dims_writes_only_its_output(shape: tuple[int, ...]) -> None:
    # 3-d and more go through mm + aten._unsafe_view, 1-d through mm + squeeze_ (an in-place view): neither
    # writes an element
    layer = nn.Linear(7, 11, bias=False)
    (row,) = analyze(layer, shape).rows
    rows = math.prod(shape[:-1])
    assert row.macs == rows * 7 * 11
    assert row.other_ops == 0
    assert row.activation_bytes == rows * 11 * FP32 == sepconv.cost(layer, shape).activation_bytes


def test_batched_matmul_writes_only_its_product() -> None:
    b, h, n, d = 2, 3, 5, 7
    total = analyze(MatMulTransposed(), (b, h, n, d)).total
    assert total.macs == b * h * n * n * d
    assert total.other_ops == 0  # no non-MAC op runs: transpose, expand and the views write nothing
    assert total.activation_bytes == b * h * n * n * FP32


def test_hand_written_attention_counts_scores_softmax_and_output_once() -> None:
    b, h, length, source, e, ev = 2, 3, 5, 6, 8, 4
    q, k, v = (torch.empty(b, h, n, c) for n, c in ((length, e), (source, e), (source, ev)))
    total = analyze(HandAttention(), (q, k, v)).total
    scores, out = b * h * length * source, b * h * length * ev
    assert total.macs == scores * e + out * source
    assert total.other_ops == scores  # the softmax
    assert total.activation_bytes == (2 * scores + out) * FP32  # scores, softmax, output


def test_in_place_and_real_copies_still_count() -> None:
    # the storage test must not hide what is written: a reshape of a transposed tensor copies it, once
    class CopyThenRelu(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.relu_(x.transpose(1, 2).reshape(x.shape[0], -1))

    total = analyze(CopyThenRelu(), (2, 3, 4)).total
    assert total.activation_bytes == 2 * 3 * 4 * FP32  # the copy; the in-place relu writes no new tensor
    assert total.other_ops == 2 * (2 * 3 * 4)  # elements written: the copy, then relu_ over it


@pytest.mark.parametrize(
    ("norm", "shape"),
    [(nn.BatchNorm1d(64), (1, 64)), (nn.BatchNorm1d(6), (3, 6, 5)), (nn.BatchNorm2d(8), (2, 8, 5, 3))],
)
def test_eval_batch_norm_writes_only_its_output(norm: nn.Module, shape: tuple[int, ...]) -> None:
    (row,) = analyze(norm.eval(), shape).rows
    assert row.other_ops == math.prod(shape)
    assert row.activation_bytes == math.prod(shape) * FP32


def test_eval_batch_norm_on_meta_matches_a_real_cpu_run() -> None:
    # on a real CPU eval-mode native_batch_norm returns empty saved statistics: the meta count must agree
    norm = nn.BatchNorm2d(8).eval()
    (real,) = [c for c in count_calls(norm, (torch.rand(2, 8, 5, 3),)) if c.did_work]
    (meta,) = analyze(norm, (2, 8, 5, 3)).rows
    assert (meta.other_ops, meta.activation_bytes) == (real.other_ops, real.activation_bytes) == (240, 240 * FP32)


def test_training_batch_norm_still_writes_its_batch_statistics() -> None:
    n, c, hw = 2, 8, 15
    norm = nn.BatchNorm2d(c).train()
    (row,) = analyze(norm, (n, c, 3, 5)).rows
    # the output, and the batch mean and inverse std it saves for backward (other_ops counts an op's new
    # tensors, so not the running stats it updates in place), then num_batches_tracked += 1 (in place)
    assert row.other_ops == n * c * hw + 2 * c + 1
    assert row.activation_bytes == (n * c * hw + 2 * c) * FP32
    (real,) = [x for x in count_calls(norm, (torch.rand(n, c, 3, 5),)) if x.did_work]
    assert real.activation_bytes == row.activation_bytes
