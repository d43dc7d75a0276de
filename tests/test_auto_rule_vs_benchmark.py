"""``auto``'s rule against the committed GPU benchmark: wherever it picks our kernel, ours measured faster.

Issue #5's rule: never slower than PyTorch on a benchmarked configuration, else ``auto`` must not pick it.
The truth is ``benchmarks/results/kernels.json`` (an H200 run of ``benchmarks/kernels.py``); the rule is
:func:`sepconv.dispatch.slower_than_pytorch`, applied to each measured depthwise row's shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sepconv import dispatch

RESULTS = Path(__file__).parent.parent / "benchmarks" / "results" / "kernels.json"
ROWS = [
    r
    for r in json.loads(RESULTS.read_text())["rows"]
    if r["section"] in ("depthwise", "kernel_sizes") and "error" not in r  # an error row: a configuration that raised
]


def _decision(row: dict, needs_grad: bool) -> str | None:
    x = torch.empty(row["batch"], row["C"], row["H"], row["H"], device="meta")
    if row["layout"] == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    stride = (row["stride"], row["stride"])
    return dispatch.slower_than_pytorch(x, (row["K"], row["K"]), row["C"], stride, needs_grad)


@pytest.mark.parametrize("needs_grad", [False, True], ids=["inference", "training"])
def test_auto_picks_our_kernel_only_where_it_measured_faster(needs_grad):
    timing = "forward_backward_ms" if needs_grad else "forward_ms"
    picked = [r for r in ROWS if _decision(r, needs_grad) is None]
    slower = [
        (r["shape"], r["batch"], r["dtype"], r["layout"], r[f"ours_{timing}"], r[f"eager_{timing}"])
        for r in picked
        if r[f"ours_{timing}"] >= r[f"eager_{timing}"]
    ]
    assert not slower, f"auto would pick our kernel where it measured slower than PyTorch eager: {slower}"
    assert len(picked) >= 10  # the rule is not vacuous: the large-kernel channels_last rows


def test_the_benchmark_covers_the_issue_shapes():
    shapes = {(r["C"], r["H"], r["K"], r["stride"]) for r in ROWS}
    assert {(144, 56, 3, 1), (576, 14, 3, 1), (96, 112, 3, 2), (384, 28, 7, 1), (256, 28, 31, 1)} <= shapes
    assert {r["dtype"] for r in ROWS} == {"bf16", "fp32"} and {r["layout"] for r in ROWS} == {"nchw", "nhwc"}
    assert {r["batch"] for r in ROWS} >= {1, 32, 64}
