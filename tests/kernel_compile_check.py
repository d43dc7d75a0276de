"""Compile every Triton kernel ahead of time for a real GPU target, without a GPU (run as a subprocess).

Triton's interpreter, which the CPU tests use, accepts programs a GPU compile rejects (constexpr misuse,
``tl.dot`` shapes, dtypes); this lowers each kernel through Triton's CUDA backend down to a cubin (ptxas
ships with Triton) for every dtype we launch. Usage: ``python kernel_compile_check.py [capability ...]``;
prints one line per kernel and exits 1 if any fails.
"""

from __future__ import annotations

import os
import sys


def compile_one(fn, data: str, constexprs: dict, capability: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # constexpr parameters a launch leaves at their defaults are constants there too (not runtime integers)
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
    constexprs = defaults | constexprs
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in (
            "partial_ptr",
            "sum_ptr",
            "m2_ptr",
            "mean_ptr",
            "var_ptr",
            "gamma_ptr",
            "beta_ptr",
            "rm_ptr",
            "rv_ptr",
        ):
            signature[name] = "*fp64" if data == "fp64" else "*fp32"  # partial sums, statistics: accumulator dtype
        elif name == "counter_ptr":
            signature[name] = "*i32"
        elif name in ("eps", "momentum_hi", "momentum_lo"):
            signature[name] = "fp32"
        elif name.endswith("_ptr"):
            signature[name] = f"*{data}"
        else:
            signature[name] = "i32"
    keyed = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    source = ASTSource(fn=fn, signature=signature, constexprs=keyed)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
    if "cubin" not in compiled.asm:
        raise RuntimeError("no cubin produced")


def main() -> int:
    # Imports here, not at module level: pytest imports this file for doctests, and the interpreter
    # setting must stay as the test session has it.
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not for the interpreter
    import triton.language as tl

    from sepconv.kernels import _depthwise_triton as kernels

    dtypes = {"fp16": tl.float32, "bf16": tl.float32, "fp32": tl.float32, "fp64": tl.float64}  # data -> accumulator
    separable = {"HAS_DW_BIAS": True, "HAS_PW_BIAS": True, "MID_ACT": 2, "DOT_IN_FP32": False, "BLOCK_O": 64}
    toeplitz = {"HAS_BIAS": True, "DOT_IN_FP32": False, "BLOCK_R": 16, "BLOCK_I": 32, "BLOCK_J": 16}
    finalize = {"BLOCK_Q": 64, "BLOCK_T": 16, "HAS_BETA": True, "PART_PIXELS": 64}
    ones = {"MULT": 1, "STRIDE_H": 1, "STRIDE_W": 1, "DIL_H": 1, "DIL_W": 1}
    toeplitz_grad_weight = {"DOT_IN_FP32": False, "BLOCK_KH": 32, "BLOCK_KW": 16, "BLOCK_I": 32, "BLOCK_J": 16}
    launches = [
        (kernels.depthwise_forward_kernel, {"HAS_BIAS": True, "STATIC_KH": 0, "STATIC_KW": 0, "TILE_W": 0}),
        (kernels.depthwise_forward_kernel, {"HAS_BIAS": True, "STATIC_KH": 3, "STATIC_KW": 5, "TILE_W": 8}),  # 4x8
        (kernels.depthwise_forward_kernel, {"HAS_BIAS": False, "STATIC_KH": 0, "STATIC_KW": 7, "TILE_W": 0}),  # rows
        (kernels.depthwise_grad_input_kernel, {"TILE_W": 0, "STATIC_KW": 0, "STRIDE_H": 1, "STRIDE_W": 2}),
        (kernels.depthwise_grad_input_kernel, {"TILE_W": 8, "STATIC_KW": 5, "STRIDE_H": 2, "STRIDE_W": 3}),
        (kernels.depthwise_grad_weight_kernel, {"LOOP_TAPS": False, "BLOCK_W": 8}),
        (kernels.depthwise_grad_weight_kernel, {"LOOP_TAPS": True, "BLOCK_W": 32}),
        (kernels.depthwise_grad_weight_kernel, {"LOOP_TAPS": True, "BLOCK_W": 32, "HAS_BIAS": False}),  # taps alone
        (kernels.separable_forward_kernel, separable | {"STATIC_KH": 0, "STATIC_KW": 0}),
        (kernels.separable_forward_kernel, separable | {"STATIC_KH": 3, "STATIC_KW": 3, "MID_ACT": 5}),  # gelu
        (kernels.separable_forward_kernel, separable | {"STATIC_KH": 0, "STATIC_KW": 3, "MID_ACT": 4}),  # silu
        (kernels.separable_forward_kernel, separable | {"STATIC_KH": 3, "STATIC_KW": 3, "STATS": True}),  # epilogue
        (kernels.depthwise_moments_kernel, {"HAS_BIAS": True, "STATIC_KH": 3, "STATIC_KW": 3, "TILE_W": 0}),
        (kernels.separable_forward_kernel, separable | {"STATIC_KH": 3, "STATIC_KW": 3, "HAS_SCALE": True}),  # SE
        (
            kernels.depthwise_moments_kernel,
            {"HAS_BIAS": True, "STATIC_KH": 0, "STATIC_KW": 0, "TILE_W": 0, "MID_ACT": 3, "ROUND": True},
        ),  # activated means
        (
            kernels.depthwise_moments_kernel,
            {
                "HAS_BIAS": False,
                "STATIC_KH": 3,
                "STATIC_KW": 3,
                "TILE_W": 0,
                "MID_ACT": 4,
                "ROUND": True,
                "SUMS_ONLY": True,
            },
        ),  # the squeeze-excitation's means: sums alone
        (kernels.finalize_moments_kernel, finalize | {"FOLD": True, "HAS_BIAS": True, "HAS_GAMMA": True, "TILE_W": 8}),
        (kernels.finalize_moments_kernel, finalize),  # the fused kernel's epilogue's parts (runs of pixels)
        (kernels.finalize_moments_kernel, finalize | {"FOLD": True, "RUNNING": True}),  # running statistics updated
        (kernels.finalize_moments_kernel, finalize | {"RUNNING": True}),
        # integers equal to 1 become constants in Triton's launcher: depth multiplier, stride and dilation 1 (the
        # common case) in the kernels first run without a GPU (statistics pass, activated means, fused epilogue/SE)
        (
            kernels.depthwise_moments_kernel,
            {"HAS_BIAS": True, "STATIC_KH": 3, "STATIC_KW": 3, "TILE_W": 0, "MID_ACT": 4, "ROUND": True} | ones,
        ),
        (
            kernels.separable_forward_kernel,
            separable | {"STATIC_KH": 0, "STATIC_KW": 0, "STATS": True, "HAS_SCALE": True} | ones,
        ),
        # batch 1 and one tile, a 1x1 kernel, one channel: Triton's launcher makes integers equal to 1 constants
        (kernels.finalize_moments_kernel, finalize | {"FOLD": True, "PARTS": 1, "P": 1, "C": 1, "TAPS": 1}),
        # statistics launches that finalize in their last program per channel block (an atomic counter)
        (
            kernels.depthwise_moments_kernel,
            {"HAS_BIAS": True, "STATIC_KH": 3, "STATIC_KW": 3, "TILE_W": 0}
            | {"FINALIZE": True, "FOLD": True, "HAS_GAMMA": True, "HAS_BETA": True, "RUNNING": True, "BLOCK_Q": 64},
        ),
        (kernels.depthwise_moments_kernel, {"HAS_BIAS": False, "TILE_W": 4, "FINALIZE": True, "FOLD": True} | ones),
        (kernels.separable_forward_kernel, separable | {"STATS": True, "FINALIZE": True, "RUNNING": True} | ones),
        (kernels.depthwise_forward_toeplitz_kernel, toeplitz),
        (kernels.depthwise_grad_weight_toeplitz_kernel, toeplitz_grad_weight),
    ]
    capabilities = [int(c) for c in sys.argv[1:]] or [90]
    failures = 0
    for capability in capabilities:
        for fn, extra in launches:
            for data, acc in dtypes.items():
                toeplitz_kernels = (
                    kernels.depthwise_forward_toeplitz_kernel,
                    kernels.depthwise_grad_weight_toeplitz_kernel,
                )
                if fn in toeplitz_kernels and data == "fp64":
                    continue  # never launched for fp64 (the direct kernel runs those)
                constexprs = {"ACC": acc, "BLOCK_P": 32, "BLOCK_C": 32, **extra}
                if "PRECISION" in fn.arg_names:
                    constexprs["PRECISION"] = "ieee" if data in ("fp32", "fp64") else "tf32"
                constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
                try:
                    compile_one(fn, data, constexprs, capability)
                    print(f"ok   sm_{capability} {fn.fn.__name__} {data}")
                except Exception as error:  # report every failure, then exit 1
                    failures += 1
                    print(f"FAIL sm_{capability} {fn.fn.__name__} {data}: {type(error).__name__}: {error}"[:2000])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
