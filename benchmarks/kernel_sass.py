"""Static instruction mix of our Triton kernels compiled for a GPU target, without a GPU.

A launch is recorded through the real host code (``sepconv.kernels.depthwise``: the same arguments, tiles and
constexprs a call would use), specialized as Triton's launcher would specialize it (integers equal to 1
become constants, multiples of 16 and tensor pointers get the divisibility hint), compiled with Triton's CUDA
backend and disassembled with the ``nvdisasm`` that ships with Triton. Printed per kernel: registers, stack
(spilled registers), spill instructions, the instruction count, the most frequent opcodes and every
innermost loop with its instructions per FFMA (a proxy for instructions per multiply-add in fp32
accumulation). The GPU then tells whether fewer instructions are faster (a static count misses latency,
occupancy and instruction-cache effects: ``KERNEL_NOTES.md`` has a case where it misled).

    python benchmarks/kernel_sass.py --shape 144,56,3 --layout nhwc
    python benchmarks/kernel_sass.py --shape 384,28,7 --kernels forward --tiles 16,128,4,rows,4 --json out.json
    python benchmarks/kernel_sass.py --shape 144,56,3 --kernels separable --out-channels 24
    python benchmarks/kernel_sass.py --shape 144,56,3 --kernels forward moments
    python benchmarks/kernel_sass.py --shape 144,56,3 --kernels separable separable_stats --out-channels 24
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not for the interpreter

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sepconv.kernels import batch_norm as bn
from sepconv.kernels import depthwise as dw
from sepconv.kernels import separable as sep

_TRITON_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int32: "i32",  # the in-launch combination's counters
}  # fmt: skip
_LAUNCHERS = {"forward": "depthwise_forward_kernel", "grad_input": "depthwise_grad_input_kernel",
              "grad_weight": "depthwise_grad_weight_kernel", "separable": "separable_forward_kernel",
              "moments": "depthwise_moments_kernel",
              "separable_stats": "separable_forward_kernel"}  # fmt: skip


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, kernel: Any) -> None:
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid: Any):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def record_launch(
    kernel: str, x: torch.Tensor, weight: torch.Tensor, stride: int, tiles: Any, out_channels: int | None = None
):
    """The (kernel, grid, args, kwargs) our host code launches for ``kernel`` on these CPU tensors (``separable``:
    the fused forward with a 1x1 conv to ``out_channels``; ``tiles`` a ``SeparableTiles`` then)."""
    name = _LAUNCHERS[kernel]
    if kernel in ("forward", "grad_weight") and tiles is not None and tiles.toeplitz:
        name = f"depthwise_{kernel}_toeplitz_kernel"  # when it applies (stride 1, dilation 1, ...)
    module = {"separable": sep, "separable_stats": sep, "moments": bn}.get(kernel, dw)
    recorder = _Recorder(getattr(module, name))
    k = weight.shape[-1]
    geometry = ((stride, stride), (k // 2,) * 4, (1, 1))
    setattr(module, name, recorder)
    finalize = sep.finalize_moments_kernel  # launched after the statistics' kernels: stubbed, not recorded
    sep.finalize_moments_kernel = _Recorder(finalize)
    try:
        if kernel in ("separable", "separable_stats"):  # _stats: with the output norm's statistics epilogue
            pw_weight = torch.empty(out_channels or weight.shape[0], weight.shape[0], 1, 1, dtype=x.dtype)
            sep._forward(x, weight, None, pw_weight, None, *geometry, 0, tiles=tiles, statistics=kernel != "separable")
        elif kernel == "forward":
            dw._forward(x, weight, None, *geometry, tiles=tiles)
        elif kernel == "moments":  # the batch statistics' pass (default tiles: the forward's)
            bn._moments(x, weight, None, *geometry)
        else:
            out = dw.output_size(x.shape[-2:], weight.shape[-2:], *geometry)
            grad = torch.empty(x.shape[0], weight.shape[0], *out, dtype=x.dtype).contiguous(
                memory_format=dw._memory_format(x)
            )
            launch = dw._grad_input if kernel == "grad_input" else dw._grad_weight
            launch(grad, x, weight, *geometry, tiles=tiles)
    finally:
        setattr(module, name, recorder.kernel)
        sep.finalize_moments_kernel = finalize
    (grid, args, kwargs), = recorder.calls  # fmt: skip
    return recorder.kernel, grid, args, kwargs


def specialize(fn: Any, args: tuple, kwargs: dict) -> tuple[ASTSource, dict[str, Any]]:
    """The ASTSource Triton's launcher would compile for this call, and the compile options."""
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
    signature, constexprs, attrs = {}, {}, {}
    values = dict(zip(fn.arg_names, args, strict=False)) | kwargs
    for index, name in enumerate(fn.arg_names):
        value = values.get(name, fn.params[index].default)
        if fn.params[index].is_constexpr:
            signature[name], constexprs[(index,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif value is None or isinstance(value, bool) or value == 1:  # None: an argument left at its default
            signature[name], constexprs[(index,)] = "constexpr", value
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), options


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def analyze(source: ASTSource, options: dict, capability: int = 90) -> dict[str, Any]:
    """Registers, spills, instruction counts and innermost loops of the compiled kernel."""
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin.name], capture_output=True, text=True, check=True)
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True)
    labels, code, pending = {}, [], []
    for line in sass.stdout.splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", line):
            pending.append(label.group(1))
        elif instruction := re.match(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line):
            address = int(instruction.group(1), 16)
            labels.update({name: address for name in pending})
            pending = []
            code.append((address, instruction.group(2).split(".")[0], instruction.group(3)))
    opcodes = collections.Counter(op for _, op, _ in code)
    loops = []
    for address, op, rest in code:
        target = re.search(r"\((\.L_x_\d+)\)", rest)
        if op == "BRA" and target and labels.get(target.group(1), address) < address:  # a backward branch
            start = labels[target.group(1)]
            body = [o for a, o, _ in code if start <= a <= address]
            loops.append({"start": start, "end": address, "instructions": len(body), "ffma": body.count("FFMA")})
    innermost = [
        loop for loop in loops
        if not any(o is not loop and loop["start"] <= o["start"] and o["end"] <= loop["end"] for o in loops)
    ]  # fmt: skip
    resources = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", usage.stdout))
    return {
        "registers": int(resources.get("REG", 0)),
        "stack_bytes": int(resources.get("STACK", 0)),
        "spill_instructions": opcodes["LDL"] + opcodes["STL"],
        "instructions": len(code),
        "ffma": opcodes["FFMA"],
        "mma": opcodes["HMMA"] + opcodes["HGMMA"],  # tensor-core instructions (the Toeplitz kernels)
        "top_opcodes": dict(opcodes.most_common(12)),
        "loops": loops,
        "innermost_loops": innermost,
    }


def parse_tiles(text: str | None) -> dw.Tiles | None:
    if not text:
        return None
    fields = text.split(",")
    static = {"all": "all", "rows": "rows", "false": False, "0": False, "true": True}[fields[3].lower()]
    rest = [int(f) if f.isdigit() else f.lower() == "true" for f in fields[4:]]
    return dw.Tiles(int(fields[0]), int(fields[1]), int(fields[2]), static, *rest)


def parse_separable_tiles(text: str | None) -> sep.SeparableTiles | None:
    if not text:
        return None
    p, c, o, warps, stages, static = text.split(",")
    static_taps = {"all": "all", "rows": "rows", "false": False, "0": False, "true": True}[static.lower()]
    return sep.SeparableTiles(int(p), int(c), int(o), int(warps), int(stages), static_taps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="144,56,3", help="C,H,K (square input and kernel)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--layout", choices=("nchw", "nhwc"), default="nhwc")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--kernels", nargs="+", choices=tuple(_LAUNCHERS), default=list(_LAUNCHERS)[:3])
    parser.add_argument(
        "--tiles",
        help="block_p,block_c,warps,static(all|rows|false)[,tile_w[,loop_taps[,toeplitz]]]; for separable: "
        "block_p,block_c,block_o,warps,stages,static(all|rows|false)",
    )
    parser.add_argument("--out-channels", type=int, help="separable: the 1x1 conv's outputs (default: C)")
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    channels, size, kernel_size = (int(v) for v in args.shape.split(","))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    x = torch.empty(args.batch, channels, size, size, dtype=dtype)
    if args.layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.empty(channels, 1, kernel_size, kernel_size, dtype=dtype)
    results = {}
    for kernel in args.kernels:
        tiles = (parse_separable_tiles if kernel.startswith("separable") else parse_tiles)(args.tiles)
        fn, grid, launch_args, kwargs = record_launch(kernel, x, weight, args.stride, tiles, args.out_channels)
        source, options = specialize(fn, launch_args, kwargs)
        result = analyze(source, options, args.capability)
        result["launch"] = {"grid": list(grid), **{k: str(v) for k, v in kwargs.items()}, **options}
        results[kernel] = result
        loops = ", ".join(f"{loop['instructions']} instr / {loop['ffma']} FFMA" for loop in result["innermost_loops"])
        per_ffma = result["instructions"] / max(result["ffma"], 1)
        print(f"{kernel:12s} sm_{args.capability} regs {result['registers']:3d} stack {result['stack_bytes']:5d} B "
              f"spill instr {result['spill_instructions']:4d} | {result['instructions']} instr, {result['ffma']} FFMA "
              f"({per_ffma:.2f}/FFMA), {result['mma']} MMA | innermost loops: {loops or 'none'}")  # fmt: skip
        print(f"{'':12s} {result['top_opcodes']}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "kernels": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
