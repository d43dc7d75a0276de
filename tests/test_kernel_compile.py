"""Every Triton kernel compiles for real GPUs (sm_80, sm_90) down to a cubin — checked without a GPU.

The CPU tests run the kernels in Triton's interpreter, which accepts some programs a GPU compile rejects;
this runs ``kernel_compile_check.py`` in a subprocess (the interpreter is chosen at import time).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_kernels_compile_for_ampere_and_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("kernel_compile_check.py")
    done = subprocess.run(
        [sys.executable, str(script), "80", "90"], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    launches = 26  # 4 kernels, plus unrolled/rectangular forward, row-unrolled forward, rectangular row-unrolled
    # grad-input, tap-looping grad-weight (with the bias's column and without), unrolled fused with gelu,
    # row-unrolled fused with silu, fused with the statistics epilogue, the batch statistics kernel, fused with a
    # squeeze-excitation scale, activated means (with the squared deviations and without), the statistics'
    # finalization with a fold (rectangular tiles) and without (runs), each also updating running statistics, and
    # with the integers a batch-1, one-tile, one-channel, 1x1 call passes (equal to 1: Triton makes them
    # constants); the statistics pass and the fused kernel with its epilogue and scale at multiplier, stride and
    # dilation 1 (constants too); the statistics pass finalizing in its last programs (fold, affine, running
    # statistics; and a rectangular tile without a bias at 1s) and the fused kernel's epilogue finalizing
    toeplitz = 6  # the experimental tensor-core forward and weight gradient: fp16, bf16, fp32
    assert done.stdout.count("ok   sm_") == 2 * (launches * 4 + toeplitz)  # 2 targets x launches x dtypes
