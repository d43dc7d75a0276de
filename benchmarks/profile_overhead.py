"""Where a small depthwise call spends its time on the host: our kernels vs PyTorch, batch 1 (GPU).

Prints, for the forward and the forward+backward of one small layer, the host microseconds per call (the
time to issue it, measured with the GPU idle between calls, then with a sync) and the torch.profiler table
of CPU time by op, so that launch and dispatch overheads can be told from kernel time; last, the issue time of
``block_host_path.py``'s blocks (MobileNetV2's and EfficientNet's training blocks), ours vs eager, forward+backward:
the GPU host's side of what that script counts on a CPU (KERNEL_NOTES item 16), and the training blocks with
the statistics combined in the launches computing them (``separable.FINALIZE_IN_LAUNCH``, item 18); last, one
depthwise launch alone through Triton's JIT and by the compiled kernel's launcher (:func:`bare_launches`).

    python benchmarks/profile_overhead.py > profile.txt
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from block_host_path import USED, block_tensors, blocks
from sepconv.kernels import depthwise as dw
from sepconv.kernels import separable
from sepconv.kernels.depthwise import depthwise_conv2d


def host_us(fn, repeats: int = 200) -> tuple[float, float]:
    """Median microseconds to issue ``fn`` (GPU idle before each call) and to finish it (issue + sync)."""
    issue, total = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        issued = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        issue.append((issued - start) * 1e6)
        total.append((done - start) * 1e6)
    return statistics.median(issue), statistics.median(total)


def bare_launches(x: torch.Tensor, w: torch.Tensor) -> dict:
    """The depthwise forward kernel's launch for ``x`` and ``w`` (stride 1, 'same' padding; recorded as
    ``kernel_sass.py`` records it), alone: through Triton's JIT (``kernel[grid](...)``: argument binding,
    specialization, cache lookup, then the launcher), and by the compiled kernel's launcher with the same
    arguments (``CompiledKernel.run``, what the JIT ends with): the JIT's own share of a launch, i.e. what caching
    the launch per configuration could save (KERNEL_NOTES items 9 and 18)."""
    import inspect

    from triton.runtime import driver

    from kernel_sass import record_launch

    kernel, grid, args, kwargs = record_launch("forward", x, w, 1, None)
    compiled = kernel[grid](*args, **kwargs)
    options = {"num_warps", "num_stages", "num_ctas", "maxnreg"}
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k not in options})
    bound.apply_defaults()
    values = tuple(bound.arguments.values())
    grid3 = (*grid, 1, 1)[:3]
    stream = driver.active.get_current_stream(driver.active.get_current_device())
    print(f"bare launch: {len(values)} arguments, grid {grid3}")
    return {
        "launch: Triton JIT": lambda: kernel[grid](*args, **kwargs),
        "launch: compiled.run": lambda: compiled.run(
            *grid3, stream, compiled.function, compiled.packed_metadata, None, None, None, *values
        ),
    }


def main() -> None:
    x = torch.randn(1, 144, 56, 56, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(144, 1, 3, 3, device="cuda", dtype=torch.bfloat16)
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    cases = {
        "ours forward": lambda: depthwise_conv2d(x, w, None, 1, 1),
        "eager forward": lambda: F.conv2d(x, w, None, 1, 1, 1, 144),
        "ours forward+backward": lambda: depthwise_conv2d(xg, wg, None, 1, 1).sum().backward(),
        "eager forward+backward": lambda: F.conv2d(xg, wg, None, 1, 1, 1, 144).sum().backward(),
    }
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        issue, total = host_us(fn)
        print(f"{name:24s} issue {issue:8.1f} us   issue+sync {total:8.1f} us")
    # the forward's host path in pieces: validation, then output allocation + launch, then the bare launch
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1])
    pieces = {
        "prepare_call": lambda: dw.prepare_call(x, (w, None), 1, 1, 1),
        "_forward (alloc+launch)": lambda: dw._forward(x, w, None, *geometry),
        "empty output": lambda: dw._empty_output(x, w, *geometry),
        "plain_eager check": lambda: dw.plain_eager((x, w, None)),
    }
    for name, fn in pieces.items():
        for _ in range(20):
            fn()
        issue, total = host_us(fn)
        print(f"{name:24s} issue {issue:8.1f} us   issue+sync {total:8.1f} us")
    for name in ("ours forward", "ours forward+backward"):
        profiler = cProfile.Profile()
        torch.cuda.synchronize()
        profiler.enable()
        for _ in range(200):
            cases[name]()
        profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        print(f"\n== cProfile, {name}: 200 calls (tottime order)\n" + text.getvalue()[-9000:])
    for name in ("ours forward", "ours forward+backward"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                cases[name]()
            torch.cuda.synchronize()
        print(f"\n== {name}: 20 calls")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
    print("\n== blocks, forward+backward, fp32, batch 1 (block_host_path.py's)")
    tensors = {name: t.detach().requires_grad_() for name, t in block_tensors("cuda").items()}
    for block, impls in blocks(tensors).items():
        inputs = [t for name, t in tensors.items() if name in USED[block]]
        # the training blocks also with the statistics combined in the launches computing them (7 -> 5 launches
        # for MobileNetV2's: KERNEL_NOTES item 18)
        variants = [(impl, fn, False) for impl, fn in impls.items()]
        variants += [("ours+in_launch", impls["ours"], True)] if block.endswith("_train") else []
        for impl, fn, in_launch in variants:
            separable.FINALIZE_IN_LAUNCH = in_launch
            step = lambda fn=fn, inputs=inputs: torch.autograd.grad(fn(tensors).sum(), inputs)  # noqa: E731
            for _ in range(5):
                step()
            issue, total = host_us(step, repeats=50)
            print(f"{block:20s} {impl:14s} issue {issue:8.1f} us   issue+sync {total:8.1f} us")
        separable.FINALIZE_IN_LAUNCH = False
    # last: a launch by Triton's internals could leave the CUDA context unusable for whatever came after it
    print("\n== one depthwise forward launch alone (the _forward above's)")
    try:
        launches = bare_launches(x, w)
        for name, fn in launches.items():
            for _ in range(20):
                fn()
            issue, total = host_us(fn)
            print(f"{name:24s} issue {issue:8.1f} us   issue+sync {total:8.1f} us")
    except Exception as error:  # Triton internals differ by version: report it
        print(f"bare launches: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
