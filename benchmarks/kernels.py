"""GPU kernel benchmark: our Triton kernels vs PyTorch eager vs torch.compile vs the floors; whole models.

Sections (side by side in one run, medians, plus the peak memory of each forward+backward):

- ``depthwise``: ``ours`` = ``sepconv.kernels.depthwise_conv2d``; ``eager`` = ``F.conv2d(groups=C)`` (cuDNN),
  no bias; ``compile`` = ``torch.compile`` of the same call — forward, and forward+backward (grads of x, w);
  depthwise rows with kernels of 5x5 and up also time ``ours_fft_grad_weight`` (the experimental FFT weight
  gradient, ``sepconv.kernels.depthwise.FFT_GRAD_WEIGHT_MIN_TAPS``), stride-1 rows from 9x9 also
  ``ours_fft_flipped`` (plus the input gradient by our forward kernel, ``FLIPPED_GRAD_INPUT_MIN_TAPS``);
  stride-1 rows from 7x7 ``ours_toeplitz`` (the experimental tensor-core forward, ``TOEPLITZ_FORWARD_MIN_TAPS``)
  and from 9x9 ``ours_toeplitz_all`` (that forward, the tensor-core weight gradient
  ``TOEPLITZ_GRAD_WEIGHT_MIN_TAPS`` and the flipped input gradient); each variant's output and gradient errors
  are recorded;
- ``kernel_sizes``: the depthwise comparison at 256x28, batch 32, for kernel sizes 9 to 27 (where ``auto``'s
  threshold lies), bf16 and fp32, without compile;
- ``separable``: DESIGN.md §2's blocks; ``ours`` = ``sepconv.kernels.separable_conv2d`` (fused, or our depthwise
  kernel + a matrix product where ``sepconv.kernels.separable.fuses`` says no: those rows also time the fused
  kernel as ``ours_fused``), ``eager`` = depthwise then 1x1 ``F.conv2d``, ``compile``, and ``standard`` = the
  KxK conv the block replaces;
- ``separable_bn``: MobileNetV2's block in training (dw -> BatchNorm -> ReLU6 -> 1x1 -> BatchNorm, batch
  statistics): ``sepconv.kernels.separable_conv2d_batch_norm`` with ``out_norm`` vs eager and compile, and
  ``ours_in_launch`` (the statistics combined by the launches computing them: ``separable.FINALIZE_IN_LAUNCH``);
- ``separable_se``: EfficientNet-B0's blocks for inference (dw -> SiLU -> squeeze-excitation -> 1x1): ours
  ``separable_conv2d(excitation=...)`` vs eager (torchvision's ``SqueezeExcitation``) and compile, forward only;
- ``separable_se_train``: the same EfficientNet-B0 blocks in training, dw -> BatchNorm -> SiLU -> squeeze-excitation
  -> 1x1 -> BatchNorm (batch statistics): ours ``separable_conv2d_batch_norm(excitation=ExcitationArgs(...),
  out_norm=...)`` (one op, one depthwise backward) vs eager and compile, forward and forward+backward, with every
  gradient's error, and ``ours_in_launch`` as in ``separable_bn``;
- ``models``: torchvision mobilenet_v2 and efficientnet_b0 eager, compiled and through ``sepconv.accelerate`` (also
  compiled: ``accelerate_compile``), and resnet18; inference (eval) and an SGD training step, bf16 channels_last,
  batch 64 and 1; on CUDA also as CUDA-graph replays (``*_graph_ms``; a training step's forward+backward);
- ``memory floor`` = bytes that must move / copy bandwidth measured in this run: forward reads x and
  writes y; forward+backward also reads x and grad-y and writes grad-x;
- ``FLOP floor`` (depthwise section) = MACs / the fp32 CUDA-core FMA rate measured in this run (depthwise
  has no tensor-core form here; bf16/fp16 accumulate in fp32 too); ``floor`` = max of the two.

A configuration that raises (code first run on this device) becomes a row with its ``error`` and ``traceback``;
after ``MAX_SECTION_ERRORS`` of them the section stops and the run goes on with the next.

CUDA timings use ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, median); ``ours`` and
``eager`` in the bf16 depthwise, kernel_sizes and separable rows are also timed as CUDA-graph replays
(``*_graph_*_ms``: the kernels' device time, without the host overhead that decides small rows). On a
machine without a GPU, ``--quick`` runs tiny configurations of every section through Triton's interpreter
to check the script (timings of the interpreter mean nothing and are labelled so).

    python benchmarks/kernels.py                      # full run, writes benchmarks/results/kernels.{json,png}
    python benchmarks/kernels.py --quick --out /tmp   # check the script
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # before sepconv.kernels is imported: the interpreter decides at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F
import torchvision
import triton
import triton.language as tl
from torch.utils._pytree import tree_leaves

import sepconv
from sepconv.bench import device_name, median_latency, peak_memory_bytes, versions
from sepconv.io import atomic_write_png, atomic_write_text
from sepconv.kernels import depthwise as depthwise_module
from sepconv.kernels import separable as separable_module
from sepconv.kernels.batch_norm import separable_conv2d_batch_norm
from sepconv.kernels.depthwise import depthwise_conv2d
from sepconv.kernels.differentiable_excitation import ExcitationArgs
from sepconv.kernels.output_norm import BatchNormArgs
from sepconv.kernels.separable import separable_conv2d
from sepconv.squeeze_excitation import excitation_gate, excitation_scale

# (name, C, H, K, stride, batch-64 batch): the depthwise issue's list.
SHAPES = [
    ("mbv2 144x56 k3", 144, 56, 3, 1, 64),
    ("mbv2 576x14 k3", 576, 14, 3, 1, 64),
    ("mbv2 96x112 k3 s2", 96, 112, 3, 2, 64),
    ("convnext 384x28 k7", 384, 28, 7, 1, 64),
    ("replknet 256x28 k31", 256, 28, 31, 1, 32),
]
# auto's threshold: the replknet row's shape with the kernel sizes between 7x7 and 31x31 (batch 32, no compile)
KERNEL_SIZE_SHAPES = [(f"256x28 k{k}", 256, 28, k, 1, 32) for k in (9, 13, 17, 21, 27)]
KERNEL_SIZE_COMBOS = [(None, "bf16", "nhwc"), (None, "bf16", "nchw"), (None, "fp32", "nhwc")]
QUICK_SHAPES = [("tiny 8x6 k3", 8, 6, 3, 1, 2), ("tiny 4x5 k5 s2", 4, 5, 5, 2, 2)]
QUICK_KERNEL_SIZE_SHAPES = [("tiny 4x6 k9", 4, 6, 9, 1, 2)]  # with both experimental backward variants
# (name, C, H, O, K, stride, batch-64 batch): DESIGN.md §2's separable blocks.
SEPARABLE_SHAPES = [
    ("mbv2 32x112->16", 32, 112, 16, 3, 1, 64),
    ("mbv2 144x56->24", 144, 56, 24, 3, 1, 64),
    ("mbv2 576x14->96", 576, 14, 96, 3, 1, 64),
    ("mbv2 960x7->160", 960, 7, 160, 3, 1, 64),
    ("mbv2 96x112->24 s2", 96, 112, 24, 3, 2, 64),
    ("convnext 384x28->1536 k7", 384, 28, 1536, 7, 1, 64),
    ("replknet 256x28->256 k31", 256, 28, 256, 31, 1, 32),
]
QUICK_SEPARABLE_SHAPES = [("tiny 4x6->260 k5", 4, 6, 260, 5, 1, 2)]  # unfused by default: ours_fused timed too
# MobileNetV2's blocks in training, a BatchNorm (batch statistics) and ReLU6 between the convs
SEPARABLE_BN_SHAPES = [shape for shape in SEPARABLE_SHAPES if shape[0].startswith("mbv2")]
QUICK_SEPARABLE_BN_SHAPES = [("tiny 8x6->16", 8, 6, 16, 3, 1, 2)]
# EfficientNet-B0's blocks at 224x224 (the depthwise conv's channels, after the expansion): dw -> SiLU ->
# squeeze-excitation (squeezed to a quarter of the block's input channels) -> 1x1, inference
SEPARABLE_SE_SHAPES = [
    ("effb0 144x56->24", 144, 56, 24, 3, 1, 64),
    ("effb0 240x28->40 k5", 240, 28, 40, 5, 1, 64),
    ("effb0 480x14->80", 480, 14, 80, 3, 1, 64),
    ("effb0 1152x7->192 k5", 1152, 7, 192, 5, 1, 64),
]
QUICK_SEPARABLE_SE_SHAPES = [("tiny 12x6->8", 12, 6, 8, 3, 1, 2)]
MODELS = [
    ("mobilenet_v2", torchvision.models.mobilenet_v2, 224),
    ("resnet18", torchvision.models.resnet18, 224),
    ("efficientnet_b0", torchvision.models.efficientnet_b0, 224),
]
QUICK_MODELS = [("mobilenet_v2 x0.35", functools.partial(torchvision.models.mobilenet_v2, width_mult=0.35), 32)]
SECTIONS = ("depthwise", "kernel_sizes", "separable", "separable_bn", "separable_se", "separable_se_train", "models")
# depthwise rows with kernels this size and up also time the experimental backward variants
EXPERIMENTAL_BACKWARD_MIN_KERNEL = 5  # FFT weight gradient
FLIPPED_GRAD_INPUT_MIN_KERNEL = 9  # + input gradient by our forward kernel (stride 1)
TOEPLITZ_MIN_KERNEL = 7  # stride-1 rows: the tensor-core forward (+ grad-weight and flipped grad-input from 9x9)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


@triton.jit
def _fma_kernel(out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = offs.to(tl.float32) * 1e-6
    b, c, d = a + 1.0, a + 2.0, a + 3.0
    for _ in range(ITERS):  # four independent FMA chains per lane
        a = a * 0.999 + 1e-3
        b = b * 0.999 + 1e-3
        c = c * 0.999 + 1e-3
        d = d * 0.999 + 1e-3
    tl.store(out_ptr + offs, a + b + c + d)


def measure(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds of ``fn()``."""
    if device == "cuda":
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    return median_latency(fn, min_run_time=0.01, warmup=1, min_runs=3).median_ms


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    numel = (1 << 28) if device == "cuda" else (1 << 20)
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (measure(lambda: dst.copy_(src), device) * 1e-3)


def fma_rate(device: str) -> float | None:
    """fp32 FMAs per second on CUDA cores (None without a GPU: the interpreter's rate means nothing)."""
    if device != "cuda":
        return None
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    programs, block, iters = 64 * sms, 256, 4096
    out = torch.empty(programs * block, device=device)
    ms = measure(lambda: _fma_kernel[(programs,)](out, ITERS=iters, BLOCK=block), device)
    return programs * block * iters * 4 / (ms * 1e-3)


def graph_replay(fn: Callable[[], object]) -> tuple[Callable[[], None], float]:
    """``fn`` captured in a CUDA graph (after three warm-up calls on a side stream, which also compile any
    Triton kernel): the graph's replay (``fn``'s device work without its host-side Python and launch overhead),
    and the largest difference between a replay's results and an eager call's (the capture's correctness)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    graph.replay()
    pairs = zip(tree_leaves(captured), tree_leaves(fn()), strict=True)
    error = max(((a.float() - b.float()).abs().max().item() for a, b in pairs), default=0.0)
    return graph.replay, error


def record_graphs(row: dict[str, Any], impl: str, passes: dict[str, Callable[[], object]], device: str) -> None:
    """Each of ``passes`` (pass name -> call) captured in a CUDA graph and its replay timed into ``row`` as
    ``{impl}_graph_{pass}_ms`` (``{impl}_graph_ms`` for the pass name ""), with the replays' largest difference
    from eager calls; a capture that fails is a finding for the row (``{impl}_graph_error``), not the end of the
    run."""
    try:
        errors = []
        for name, fn in passes.items():
            replay, error = graph_replay(fn)
            row[f"{impl}_graph{'_' * bool(name)}{name}_ms"] = measure(replay, device)
            errors.append(error)
        row[f"max_abs_error_{impl}_graph_vs_eager_call"] = max(errors)
    except Exception as error:
        row[f"{impl}_graph_error"] = f"{type(error).__name__}: {error}"[:300]


MAX_SECTION_ERRORS = 2  # configurations of a section that may raise before the run moves to the next section
GRAPHED = ("ours", "eager")  # impls also timed as CUDA-graph replays (``*_graph_*_ms``): device time only


def time_passes(
    row: dict[str, Any],
    impls: dict[str, Callable],
    inputs: tuple,
    wrt: dict[str, tuple],
    grad,
    device: str,
    graphs: bool = True,
    backward: bool = True,
):
    """``row[impl_forward_ms]``, ``row[impl_forward_backward_ms]`` and the training peak memory per impl
    (gradients of ``wrt[impl]``); ``ours`` is timed again after the others (``ours_*_repeat_ms``): the
    spread between the two bounds the run's noise for that row. With ``graphs``, on CUDA the :data:`GRAPHED`
    impls are also timed as CUDA-graph replays (``*_graph_forward_ms``, ``*_graph_forward_backward_ms``): where a
    call is host-bound the eager timings measure the host, these the kernels (a failed capture is recorded as
    ``*_graph_error``; a replay's results against an eager call's as ``max_abs_error_*_graph_vs_eager_call``).
    Without ``backward``: the forward (inference) only."""
    with torch.no_grad():
        for impl, fn in impls.items():
            row[f"{impl}_forward_ms"] = measure(lambda fn=fn: fn(*inputs), device)
        row["ours_forward_repeat_ms"] = measure(lambda: impls["ours"](*inputs), device)
    if not backward:
        for impl in GRAPHED if graphs and device == "cuda" else ():
            with torch.no_grad():
                record_graphs(row, impl, {"forward": lambda fn=impls[impl]: fn(*inputs)}, device)
        return
    for impl, fn in impls.items():
        step = lambda fn=fn, impl=impl: torch.autograd.grad(fn(*inputs), wrt[impl], grad)  # noqa: E731
        row[f"{impl}_forward_backward_ms"] = measure(step, device)
        row[f"{impl}_training_peak_bytes"] = peak_memory_bytes(step, device)
    row["ours_forward_backward_repeat_ms"] = measure(
        lambda: torch.autograd.grad(impls["ours"](*inputs), wrt["ours"], grad), device
    )
    for impl in GRAPHED if graphs and device == "cuda" else ():
        fn = impls[impl]
        step = lambda fn=fn, impl=impl: torch.autograd.grad(fn(*inputs), wrt[impl], grad)  # noqa: E731
        record_graphs(
            row, impl, {"forward": torch.no_grad()(lambda fn=fn: fn(*inputs)), "forward_backward": step}, device
        )


def with_settings(module: Any, settings: dict[str, Any], fn: Callable) -> Callable:
    """``fn`` run with ``module``'s ``settings`` (module-level names read when a forward runs) set, then restored."""

    def run(*args):
        previous = {name: getattr(module, name) for name in settings}
        for name, value in settings.items():
            setattr(module, name, value)
        try:
            return fn(*args)
        finally:
            for name, value in previous.items():
                setattr(module, name, value)

    return run


def _gradient_errors(ours: Callable, eager: Callable, x: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    """Ours' input and weight gradients against eager's (same grad-output): max error relative to the largest
    eager gradient entry, so that a GPU-only miscompile of a backward kernel shows in the row."""
    grads = {}
    for name, fn in (("ours", ours), ("eager", eager)):
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        torch.manual_seed(1)
        out = fn(xg, wg)
        grads[name] = torch.autograd.grad(out, (xg, wg), torch.randn_like(out))
    errors = {}
    for key, mine, theirs in zip(("grad_input", "grad_weight"), grads["ours"], grads["eager"], strict=True):
        scale = theirs.float().abs().max().clamp_min(1e-30)
        errors[f"max_rel_error_{key}_vs_eager"] = ((mine.float() - theirs.float()).abs().max() / scale).item()
    return errors


def depthwise_row(name, channels, size, kernel, stride, batch, dtype_name, layout_name, *, device, compile_):
    dtype, fmt = DTYPES[dtype_name], LAYOUTS[layout_name]
    pad = kernel // 2
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
    w = (torch.randn(channels, 1, kernel, kernel, device=device) / kernel).to(dtype)

    def ours(x, w):
        return depthwise_conv2d(x, w, None, stride, pad)

    def eager(x, w):
        return F.conv2d(x, w, None, stride, pad, 1, channels)

    def experimental(*settings: str) -> Callable:
        """``ours`` with the experimental settings on (read when the forward runs)."""
        return with_settings(depthwise_module, dict.fromkeys(settings, 1), ours)

    impls: dict[str, Callable] = {"ours": ours, "eager": eager}
    if compile_:
        torch._dynamo.reset()  # one code object per row: past its recompile limit dynamo would run eager
        impls["compile"] = torch.compile(eager, dynamic=False)
    variants = {}
    if kernel >= EXPERIMENTAL_BACKWARD_MIN_KERNEL:
        variants["fft"] = ("ours_fft_grad_weight", experimental("FFT_GRAD_WEIGHT_MIN_TAPS"))
        if stride == 1 and kernel >= FLIPPED_GRAD_INPUT_MIN_KERNEL:
            both = experimental("FFT_GRAD_WEIGHT_MIN_TAPS", "FLIPPED_GRAD_INPUT_MIN_TAPS")
            variants["fft_flipped"] = ("ours_fft_flipped", both)
    if stride == 1 and kernel >= TOEPLITZ_MIN_KERNEL:
        variants["toeplitz"] = ("ours_toeplitz", experimental("TOEPLITZ_FORWARD_MIN_TAPS"))
        if kernel >= FLIPPED_GRAD_INPUT_MIN_KERNEL:  # every pass on tensor cores
            every = ("TOEPLITZ_FORWARD_MIN_TAPS", "TOEPLITZ_GRAD_WEIGHT_MIN_TAPS", "FLIPPED_GRAD_INPUT_MIN_TAPS")
            variants["toeplitz_all"] = ("ours_toeplitz_all", experimental(*every))
    y = eager(x, w)
    variant_errors = {}
    for suffix, (impl, fn) in variants.items():
        impls[impl] = fn
        errors = _gradient_errors(fn, eager, x, w)
        variant_errors[f"max_abs_error_{suffix}_vs_eager"] = (fn(x, w).float() - y.float()).abs().max().item()
        variant_errors |= {f"{key[: -len('_vs_eager')]}_{suffix}_vs_eager": value for key, value in errors.items()}
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    row: dict[str, Any] = {
        "section": "depthwise",
        "shape": name,
        "C": channels,
        "H": size,
        "K": kernel,
        "stride": stride,
        "batch": batch,
        "dtype": dtype_name,
        "layout": layout_name,
        "max_abs_error_vs_eager": (ours(x, w).float() - y.float()).abs().max().item(),
        **_gradient_errors(ours, eager, x, w),
        **variant_errors,
        "macs": y.numel() * kernel * kernel,
        "bytes_forward": (x.numel() + y.numel()) * x.element_size(),
        "bytes_forward_backward": (3 * x.numel() + 2 * y.numel()) * x.element_size(),
    }
    grad = torch.randn_like(y)
    time_passes(row, impls, (xg, wg), dict.fromkeys(impls, (xg, wg)), grad, device, graphs=dtype_name == "bf16")
    return row


def _block_row(section: str, shape: tuple, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """A separable block row's configuration (``shape``: name, C, H, O, K, stride, batch, dtype, layout), MACs,
    and the bytes a forward and a forward+backward must move at least."""
    name, channels, size, out, kernel, stride, batch, dtype_name, layout_name = shape
    return {
        "section": section,
        "shape": name,
        "C": channels,
        "H": size,
        "O": out,
        "K": kernel,
        "stride": stride,
        "batch": batch,
        "dtype": dtype_name,
        "layout": layout_name,
        "macs": y.numel() // out * channels * (kernel * kernel + out),
        "bytes_forward": (x.numel() + y.numel()) * x.element_size(),
        "bytes_forward_backward": (3 * x.numel() + 2 * y.numel()) * x.element_size(),
    }


def separable_row(name, channels, size, out, kernel, stride, batch, dtype_name, layout_name, *, device, compile_):
    """The separable block (no bias between, as PyTorch's best configuration) and the standard conv."""
    dtype, fmt = DTYPES[dtype_name], LAYOUTS[layout_name]
    pad = kernel // 2
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
    dw = (torch.randn(channels, 1, kernel, kernel, device=device) / kernel).to(dtype)
    pw = (torch.randn(out, channels, 1, 1, device=device) / channels**0.5).to(dtype)
    std = (torch.randn(out, channels, kernel, kernel, device=device) / (kernel * channels**0.5)).to(dtype)

    def ours(x, dw, pw, std):
        return separable_conv2d(x, dw, pw, None, stride, pad)

    def eager(x, dw, pw, std):
        return F.conv2d(F.conv2d(x, dw, None, stride, pad, 1, channels), pw)

    def standard(x, dw, pw, std):
        return F.conv2d(x, std, None, stride, pad)

    impls: dict[str, Callable] = {"ours": ours, "eager": eager}
    if compile_:
        torch._dynamo.reset()  # one code object per row: past its recompile limit dynamo would run eager
        impls["compile"] = torch.compile(eager, dynamic=False)
    impls["standard"] = standard
    if not separable_module.fuses(out, (kernel, kernel)):  # ours runs unfused here: time the fused kernel too
        impls["ours_fused"] = with_settings(separable_module, {"MAX_REPEATED_TAPS": kernel * kernel * out}, ours)
    y = eager(x, dw, pw, std)
    error = lambda fn: (fn(x, dw, pw, std).float() - y.float()).abs().max().item()  # noqa: E731
    inputs = tuple(t.detach().requires_grad_() for t in (x, dw, pw, std))
    ours_impls = [impl for impl in impls if "ours" in impl]
    errors = {f"max_abs_error{impl.removeprefix('ours')}_vs_eager": error(impls[impl]) for impl in ours_impls}
    shape = (name, channels, size, out, kernel, stride, batch, dtype_name, layout_name)
    row = _block_row("separable", shape, x, y) | errors
    wrt = {impl: (inputs[0], inputs[3]) if impl == "standard" else inputs[:3] for impl in impls}
    time_passes(row, impls, inputs, wrt, torch.randn_like(y), device, graphs=dtype_name == "bf16")
    return row


IMPLS = ("ours", "eager")  # each with running statistics of its own (compile shares eager's)


def gradient_errors(names, ours: torch.Tensor, eager: torch.Tensor, inputs, grad) -> dict[str, float]:
    """``max_rel_error_grad_{name}_vs_eager`` for each input: the largest difference of our gradient from eager's,
    relative to eager's largest entry (a GPU-only error in a backward path shows here)."""
    got, want = torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(eager, inputs, grad)
    return {
        f"max_rel_error_grad_{name}_vs_eager": ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        for name, a, b in zip(names, got, want, strict=True)
    }


def _training_block(channels, size, out, kernel, batch, dtype_name, layout_name, device):
    """A training block row's tensors: x, the depthwise and 1x1 weights, the two norms' float32 affine parameters
    (gamma, out_gamma, beta, out_beta) and each implementation's running statistics (float32, as under autocast)."""
    dtype, fmt = DTYPES[dtype_name], LAYOUTS[layout_name]
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
    dw = (torch.randn(channels, 1, kernel, kernel, device=device) / kernel).to(dtype)
    pw = (torch.randn(out, channels, 1, 1, device=device) / channels**0.5).to(dtype)
    affine = [torch.rand(n, device=device) + 0.5 for n in (channels, out)]
    affine += [torch.randn(n, device=device) / 10 for n in (channels, out)]
    stats = {
        impl: [(torch.zeros(n, device=device), torch.ones(n, device=device)) for n in (channels, out)] for impl in IMPLS
    }
    return x, dw, pw, affine, stats


def _training_row(section, shape, impls, tensors, names, device, compile_) -> dict[str, Any]:
    """A training block row: ``impls["ours"]`` and ``impls["eager"]`` (and compile) on ``tensors`` (x first), the
    gradients' errors against eager's for ``names``, the output's, forward and forward+backward timed."""
    if compile_:
        torch._dynamo.reset()
        impls["compile"] = torch.compile(impls["eager"], dynamic=False)
    inputs = tuple(t.detach().requires_grad_() for t in tensors)
    y = impls["eager"](*inputs)
    grad = torch.randn_like(y)
    row = _block_row(section, shape, tensors[0], y) | gradient_errors(names, impls["ours"](*inputs), y, inputs, grad)
    for impl in (impl for impl in impls if impl.startswith("ours")):
        error = (impls[impl](*inputs).float() - y.float()).abs().max().item()
        row[f"max_abs_error{impl.removeprefix('ours')}_vs_eager"] = error
    time_passes(row, impls, inputs, dict.fromkeys(impls, inputs), grad, device, graphs=shape[7] == "bf16")
    return row


def separable_bn_row(name, channels, size, out, kernel, stride, batch, dtype_name, layout_name, *, device, compile_):
    """MobileNetV2's block in training: depthwise -> BatchNorm -> ReLU6 -> 1x1 -> BatchNorm, both norms with
    batch statistics (float32 parameters and running statistics, as under autocast). Ours:
    ``separable_conv2d_batch_norm`` with ``out_norm`` (the first norm's statistics from a pass over x, the second's
    from the fused kernel's epilogue); eager: torchvision's order (``F.batch_norm``, then ReLU6 in place)."""
    pad = kernel // 2
    x, dw, pw, affine, stats = _training_block(channels, size, out, kernel, batch, dtype_name, layout_name, device)

    def ours(x, dw, pw, gamma, out_gamma, beta, out_beta):
        mid, after = stats["ours"]
        return separable_conv2d_batch_norm(
            x, dw, pw, None, stride, pad, 1, None, "relu6", running_mean=mid[0], running_var=mid[1],
            norm_weight=gamma, norm_bias=beta, training=True,
            out_norm=BatchNormArgs(*after, out_gamma, out_beta, training=True),
        )  # fmt: skip

    def eager(x, dw, pw, gamma, out_gamma, beta, out_beta):
        mid, after = stats["eager"]
        normalized = F.batch_norm(F.conv2d(x, dw, None, stride, pad, 1, channels), *mid, gamma, beta, True)
        return F.batch_norm(F.conv2d(F.relu6(normalized, inplace=True), pw), *after, out_gamma, out_beta, True)

    shape = (name, channels, size, out, kernel, stride, batch, dtype_name, layout_name)
    names = ("x", "dw", "pw", "gamma", "out_gamma", "beta", "out_beta")
    # ours_in_launch: the statistics combined by the launches computing them (5 launches instead of 7, item 18)
    in_launch = with_settings(separable_module, {"FINALIZE_IN_LAUNCH": True}, ours)
    impls = {"ours": ours, "ours_in_launch": in_launch, "eager": eager}
    return _training_row("separable_bn", shape, impls, (x, dw, pw, *affine), names, device, compile_)


def separable_se_row(name, channels, size, out, kernel, stride, batch, dtype_name, layout_name, *, device, compile_):
    """EfficientNet's / MobileNetV3's block, inference: depthwise -> SiLU -> squeeze-excitation -> 1x1. Ours:
    ``separable_conv2d(excitation=ExcitationArgs(...))``, what ``accelerate`` runs (the activation's channel means by
    a pass over x, the gate, then the fused kernel scaling its tiles); ``ours_callable`` the same with the module's
    gate as a callable (``sepconv.kernels.excitation``); eager: torchvision's ``SqueezeExcitation`` between
    PyTorch's two convs."""
    from torchvision.ops import SqueezeExcitation

    dtype, fmt = DTYPES[dtype_name], LAYOUTS[layout_name]
    pad = kernel // 2
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
    dw = (torch.randn(channels, 1, kernel, kernel, device=device) / kernel).to(dtype)
    pw = (torch.randn(out, channels, 1, 1, device=device) / channels**0.5).to(dtype)
    se = SqueezeExcitation(channels, max(1, channels // 24), torch.nn.SiLU).to(device=device, dtype=dtype).eval()
    gates = {"ours": ExcitationArgs(*excitation_gate(se)), "ours_callable": functools.partial(excitation_scale, se)}

    def fused(gate):
        return lambda x, dw, pw: separable_conv2d(x, dw, pw, None, stride, pad, mid_activation="silu", excitation=gate)

    def eager(x, dw, pw):
        return F.conv2d(se(F.silu(F.conv2d(x, dw, None, stride, pad, 1, channels))), pw)

    impls: dict[str, Callable] = {impl: fused(gate) for impl, gate in gates.items()} | {"eager": eager}
    if compile_:
        torch._dynamo.reset()
        impls["compile"] = torch.compile(eager, dynamic=False)
    with torch.no_grad():
        y = eager(x, dw, pw)
        error = lambda impl: (impls[impl](x, dw, pw).float() - y.float()).abs().max().item()  # noqa: E731
        errors = {f"max_abs_error{impl.removeprefix('ours')}_vs_eager": error(impl) for impl in gates}
    shape = (name, channels, size, out, kernel, stride, batch, dtype_name, layout_name)
    row = _block_row("separable_se", shape, x, y) | errors
    time_passes(row, impls, (x, dw, pw), {}, None, device, graphs=dtype_name == "bf16", backward=False)
    return row


def separable_se_train_row(
    name, channels, size, out, kernel, stride, batch, dtype_name, layout_name, *, device, compile_
):
    """EfficientNet-B0's block in training: depthwise -> BatchNorm -> SiLU -> squeeze-excitation -> 1x1 ->
    BatchNorm, both norms with batch statistics (float32 parameters and running statistics, as under autocast).
    Ours: ``separable_conv2d_batch_norm`` with ``excitation=ExcitationArgs(...)`` and ``out_norm`` (three passes
    over x forward; backward recomputes the depthwise output once, one depthwise backward); eager: torchvision's
    order (``F.batch_norm``, SiLU in place, ``SqueezeExcitation``'s ops)."""
    dtype, pad, squeezed = DTYPES[dtype_name], kernel // 2, max(1, channels // 24)
    x, dw, pw, affine, stats = _training_block(channels, size, out, kernel, batch, dtype_name, layout_name, device)
    reduce = (torch.randn(squeezed, channels, 1, 1, device=device) / channels**0.5).to(dtype)
    expand = (torch.randn(channels, squeezed, 1, 1, device=device) / squeezed**0.5).to(dtype)
    se_biases = [torch.zeros(n, device=device, dtype=dtype) for n in (squeezed, channels)]

    def ours(x, dw, pw, gamma, out_gamma, beta, out_beta, reduce, reduce_bias, expand, expand_bias):
        mid, after = stats["ours"]
        return separable_conv2d_batch_norm(
            x, dw, pw, None, stride, pad, 1, None, "silu", running_mean=mid[0], running_var=mid[1],
            norm_weight=gamma, norm_bias=beta, training=True,
            out_norm=BatchNormArgs(*after, out_gamma, out_beta, training=True),
            excitation=ExcitationArgs(reduce, reduce_bias, expand, expand_bias, "silu", "sigmoid"),
        )  # fmt: skip

    def eager(x, dw, pw, gamma, out_gamma, beta, out_beta, reduce, reduce_bias, expand, expand_bias):
        mid, after = stats["eager"]
        normalized = F.batch_norm(F.conv2d(x, dw, None, stride, pad, 1, channels), *mid, gamma, beta, True)
        a = F.silu(normalized, inplace=True)
        scale = torch.sigmoid(F.conv2d(F.silu(F.conv2d(a.mean((2, 3), keepdim=True), reduce, reduce_bias)), expand,
                                       expand_bias))  # fmt: skip
        return F.batch_norm(F.conv2d(a * scale, pw), *after, out_gamma, out_beta, True)

    shape = (name, channels, size, out, kernel, stride, batch, dtype_name, layout_name)
    names = ("x", "dw", "pw", "gamma", "out_gamma", "beta", "out_beta", "reduce", "reduce_bias", "expand",
             "expand_bias")  # fmt: skip
    tensors = (x, dw, pw, *affine, reduce, se_biases[0], expand, se_biases[1])
    in_launch = with_settings(separable_module, {"FINALIZE_IN_LAUNCH": True}, ours)  # as separable_bn's rows
    impls = {"ours": ours, "ours_in_launch": in_launch, "eager": eager}
    return _training_row("separable_se_train", shape, impls, tensors, names, device, compile_)


def model_rows(
    name: str, factory: Callable, batch: int, size: int, *, device: str, dtype, compile_: set[str]
) -> Iterator[dict[str, Any]]:
    """Inference (eval, no_grad) and a training step (SGD) of a torchvision model: eager, accelerate, and compile
    (of the model and of the accelerated one: ``accelerate_compile``) for the modes in ``compile_``; on CUDA also
    ``accelerate_triton`` (``backend="triton"``: every chain on the fused kernel, training-mode BatchNorms and
    squeeze-excitations included), with its output's error against eager's (inference). On CUDA each variant's
    inference, or its training step's forward+backward (the optimizer left out), is also timed as a CUDA-graph
    replay (``{variant}_graph_ms``: device time; where it is far below ``{variant}_ms`` the model is host-bound, and
    graphs are what a user would reach for)."""
    for mode in ("inference", "training"):
        torch._dynamo.reset()
        base = factory().to(device=device, dtype=dtype, memory_format=torch.channels_last)
        base.train(mode == "training")
        accelerated, changes = sepconv.accelerate(base)
        variants = {"eager": base}
        if mode in compile_:
            variants["compile"] = torch.compile(base)
        if changes:
            variants["accelerate"] = accelerated
        if changes and mode in compile_:  # what a user would try next: our modules inside the compiled graph
            variants["accelerate_compile"] = torch.compile(accelerated)
        if changes and device == "cuda":  # the interpreter would take minutes on a CPU
            variants["accelerate_triton"], triton_changes = sepconv.accelerate(base, backend="triton")
        x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        row: dict[str, Any] = {
            "section": "models",
            "model": name,
            "mode": mode,
            "batch": batch,
            "input": size,
            "dtype": str(dtype).removeprefix("torch."),
            "layout": "nhwc",
            "accelerate_changes": [f"{c.kind}: {c.replaced[0]}" for c in changes],
        }
        if "accelerate_triton" in variants:
            row["accelerate_triton_fused"] = sum(c.kind == "fused separable" for c in triton_changes)
            if mode == "inference":
                with torch.no_grad():
                    got, want = variants["accelerate_triton"](x).float(), base(x).float()
                row["max_rel_error_accelerate_triton_vs_eager"] = ((got - want).abs().max() / want.abs().max()).item()
        for variant, model in variants.items():
            if mode == "inference":
                with torch.no_grad():
                    row[f"{variant}_ms"] = measure(lambda model=model, x=x: model(x), device)
                    if device == "cuda":  # device time: whether the model is host-bound, and what graphs give
                        record_graphs(row, variant, {"": lambda model=model, x=x: model(x)}, device)
            else:
                optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

                def step(model=model, optimizer=optimizer, x=x):
                    optimizer.zero_grad(set_to_none=True)
                    model(x).float().square().mean().backward()
                    optimizer.step()

                row[f"{variant}_ms"] = measure(step, device)
                row[f"{variant}_training_peak_bytes"] = peak_memory_bytes(step, device)
                if device == "cuda":  # the step's forward+backward (not the optimizer) as a graph replay
                    params = [p for p in model.parameters() if p.requires_grad]
                    loss = lambda model=model, x=x: model(x).float().square().mean()  # noqa: E731
                    record_graphs(
                        row, variant, {"": lambda loss=loss, p=params: torch.autograd.grad(loss(), p)}, device
                    )
        yield row  # as it comes: a run cut by its timeout keeps the inference row


def add_floors(row: dict[str, Any], bandwidth: float, fmas: float | None) -> None:
    for pass_, macs in (("forward", row["macs"]), ("forward_backward", 3 * row["macs"])):
        if f"ours_{pass_}_ms" not in row:  # an inference-only row
            continue
        memory = row[f"bytes_{pass_}"] / bandwidth * 1e3
        flops = None if fmas is None or row["section"].startswith("separable") else macs / fmas * 1e3
        row[f"memory_floor_{pass_}_ms"] = memory
        row[f"flop_floor_{pass_}_ms"] = flops
        row[f"floor_{pass_}_ms"] = max(memory, flops or 0.0)
        row[f"ours_vs_floor_{pass_}"] = row[f"ours_{pass_}_ms"] / row[f"floor_{pass_}_ms"]
        best = min(row[f"{impl}_{pass_}_ms"] for impl in ("eager", "compile") if f"{impl}_{pass_}_ms" in row)
        row[f"speedup_vs_best_torch_{pass_}"] = best / row[f"ours_{pass_}_ms"]
        if "standard_forward_ms" in row:
            row[f"speedup_vs_standard_{pass_}"] = row[f"standard_{pass_}_ms"] / row[f"ours_{pass_}_ms"]
        for variant in ("fft_grad_weight", "fft_flipped", "toeplitz", "toeplitz_all", "fused"):
            if f"ours_{variant}_{pass_}_ms" in row:
                row[f"speedup_{variant}_vs_best_torch_{pass_}"] = best / row[f"ours_{variant}_{pass_}_ms"]
        if f"ours_graph_{pass_}_ms" in row and f"eager_graph_{pass_}_ms" in row:  # device time against device time
            row[f"speedup_graph_vs_eager_graph_{pass_}"] = (
                row[f"eager_graph_{pass_}_ms"] / row[f"ours_graph_{pass_}_ms"]
            )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["section"] != "models" and "error" not in r]
    labels = [f"{r['section'][:3]} {r['shape']} b{r['batch']} {r['dtype']} {r['layout']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.25 * len(rows) + 2), sharey=True)
    for ax, pass_ in zip(axes, ("forward", "forward_backward"), strict=True):
        speedups = [r.get(f"speedup_vs_best_torch_{pass_}", float("nan")) for r in rows]  # nan: not timed
        ax.barh(labels, speedups, color=["C2" if s >= 1 else "C3" for s in speedups])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"{pass_.replace('_', '+')}: speedup of ours over the faster of eager / compile")
        ax.grid(alpha=0.3, axis="x")
        ax.tick_params(axis="y", labelsize=6)
    fig.suptitle(f"{result['device']}; {result['versions']}", fontsize=8)
    atomic_write_png(fig, path, dpi=100, overwrite=True)


def _section_seconds(text: str) -> tuple[str, float]:
    section, _, seconds = text.partition("=")
    if section not in SECTIONS or not seconds:
        raise argparse.ArgumentTypeError(f"expected SECTION=SECONDS with SECTION in {SECTIONS}, got {text!r}")
    return section, float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configurations: checks the script")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves compile time)")
    parser.add_argument(
        "--compile-where",
        choices=("all", "big-bf16"),
        default="all",
        help="big-bf16: torch.compile only in the batch-64 bf16 rows (and model inference): saves compile time",
    )
    parser.add_argument(
        "--section-seconds",
        type=_section_seconds,
        nargs="*",
        default=[],
        help="SECTION=SECONDS: start no new row of SECTION after this long in it (rows run most important first)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        parser.error("the full benchmark needs a CUDA GPU; use --quick to check the script on CPU")
    compile_ = not args.no_compile and device == "cuda"
    budgets = dict(args.section_seconds)
    start = time.perf_counter()
    bandwidth, fmas = copy_bandwidth(device), fma_rate(device)
    dtypes = [d for d in DTYPES if device == "cuda" or d == "fp32"]  # the interpreter has no fast bf16
    # Most important first (a section's budget may cut the rest): big batch bf16 channels_last (where the issue's
    # large-kernel targets lie), big batch bf16 NCHW, then the other combinations.
    combos = sorted(
        itertools.product((None, 1), dtypes, LAYOUTS), key=lambda c: (c[1] != "bf16", c[0] == 1, c[2] != "nhwc")
    )
    result: dict[str, Any] = {
        "benchmark": "kernels",
        "device": device_name(device) + ("" if device == "cuda" else " (Triton interpreter: timings meaningless)"),
        "versions": versions(),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "fp32_fma_per_s": fmas,
        "timer": "triton.testing.do_bench median" if device == "cuda" else "sepconv.bench.median_latency",
        "compile_where": "none" if not compile_ else args.compile_where,
        "section_seconds": budgets,
        "rows": [],
    }
    stem = "kernels_quick" if args.quick else "kernels"

    def emit(row: dict[str, Any]) -> None:  # written as it comes: a cut run keeps its rows
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        result["total_seconds"] = time.perf_counter() - start
        atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n", overwrite=True)

    errors: dict[str, int] = {}

    def failed(section: str, describe: dict[str, Any], error: Exception) -> bool:
        """Emits an error row for a configuration that raised (code never run on this device must not take the
        rest of the run with it); whether the section has failed :data:`MAX_SECTION_ERRORS` times (then it stops:
        a broken CUDA context fails every later call alike)."""
        emit({"section": section, **describe, "error": f"{type(error).__name__}: {error}"[:500],
              "traceback": traceback.format_exc()[-3000:]})  # fmt: skip
        errors[section] = errors.get(section, 0) + 1
        return errors[section] >= MAX_SECTION_ERRORS

    def compiled(batch: int | None, dtype: str) -> bool:
        return compile_ and (args.compile_where == "all" or (batch is None and dtype == "bf16"))

    for section in args.sections:
        deadline = time.perf_counter() + budgets.get(section, float("inf"))
        if section in ("depthwise", "kernel_sizes"):
            if section == "depthwise":  # largest kernels first: the large-kernel targets and tensor-core variants
                shapes = sorted(QUICK_SHAPES if args.quick else SHAPES, key=lambda shape: -shape[3])
                chosen = combos
            else:
                shapes = QUICK_KERNEL_SIZE_SHAPES if args.quick else KERNEL_SIZE_SHAPES
                chosen = [c for c in KERNEL_SIZE_COMBOS if c[1] in dtypes]
            for (batch, dtype, layout), (name, c, h, k, s, big) in itertools.product(chosen, shapes):
                if time.perf_counter() > deadline:
                    break
                compile_row = compiled(batch, dtype) and section == "depthwise"
                try:
                    row = depthwise_row(
                        name, c, h, k, s, batch or big, dtype, layout, device=device, compile_=compile_row
                    )
                except Exception as error:
                    if failed(section, {"shape": name, "batch": batch or big, "dtype": dtype, "layout": layout}, error):
                        break
                    continue
                row["section"] = section
                add_floors(row, bandwidth, fmas)
                emit(row)
        elif section in ("separable", "separable_bn", "separable_se", "separable_se_train"):
            shapes, make_row = {
                "separable": (QUICK_SEPARABLE_SHAPES if args.quick else SEPARABLE_SHAPES, separable_row),
                "separable_bn": (QUICK_SEPARABLE_BN_SHAPES if args.quick else SEPARABLE_BN_SHAPES, separable_bn_row),
                "separable_se": (QUICK_SEPARABLE_SE_SHAPES if args.quick else SEPARABLE_SE_SHAPES, separable_se_row),
                "separable_se_train": (
                    QUICK_SEPARABLE_SE_SHAPES if args.quick else SEPARABLE_SE_SHAPES,
                    separable_se_train_row,
                ),
            }[section]
            for (batch, dtype, layout), (name, c, h, o, k, s, big) in itertools.product(combos, shapes):
                if time.perf_counter() > deadline:
                    break
                try:
                    row = make_row(
                        name, c, h, o, k, s, batch or big, dtype, layout, device=device, compile_=compiled(batch, dtype)
                    )
                except Exception as error:
                    if failed(section, {"shape": name, "batch": batch or big, "dtype": dtype, "layout": layout}, error):
                        break
                    continue
                add_floors(row, bandwidth, fmas)
                emit(row)
        else:
            models = QUICK_MODELS if args.quick else MODELS
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            for batch, (name, factory, size) in itertools.product((2,) if args.quick else (64, 1), models):
                if time.perf_counter() > deadline:
                    break
                modes = {"inference", "training"} if args.compile_where == "all" else {"inference"}
                try:
                    for row in model_rows(
                        name,
                        factory,
                        batch,
                        size,
                        device=device,
                        dtype=dtype,
                        compile_=modes if compile_ and (args.compile_where == "all" or batch != 1) else set(),
                    ):
                        emit(row)
                except Exception as error:
                    if failed(section, {"model": name, "batch": batch}, error):
                        break
    plot(result, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
