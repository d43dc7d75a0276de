"""Root pytest configuration: Triton kernels run in Triton's CPU interpreter where there is no GPU.

Set before anything imports ``sepconv.kernels`` (Triton decides at decoration time), for the tests
and for the doctests under ``src/``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
