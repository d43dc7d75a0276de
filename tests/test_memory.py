"""sepconv.memory: peak bytes of live tensors, against sizes computed by hand."""

from __future__ import annotations

import torch

from sepconv.memory import LiveBytes, peak_live_bytes


def test_views_in_place_results_and_inputs_are_not_counted_again():
    x = torch.ones(100)  # exists before: not counted

    def step():
        a = x * 2  # 400 bytes
        b = a.view(10, 10).t()  # views of a: nothing new
        b.add_(1)  # in place: nothing new
        return torch.cat([a, x])  # 800 bytes more: 1200 live

    assert peak_live_bytes(step) == 1200


def test_tensors_saved_for_backward_stay_counted_until_the_graph_frees_them():
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)  # 8000 bytes, not counted
    with LiveBytes() as tracker:
        a = x.exp()  # 8000
        b = a.sin()  # sin saves a: 16000 live
        del a
        c = b * 1  # a still held by the graph: 24000 live
        assert tracker.live == 24000
        (grad,) = torch.autograd.grad(c.sum(), x)  # the graph and a go; grad arrives
        del b, c
        grad.neg()  # sampled after this operator: grad (8000) and its negation (8000, a temporary)
        assert tracker.live == 8000  # the temporary is gone by now
    assert tracker.peak >= 24000
