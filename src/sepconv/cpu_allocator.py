"""Keep freed CPU memory for reuse: the cheapest large speed-up for convolutions on CPU with glibc.

PyTorch allocates every activation with ``malloc``. glibc serves large blocks with ``mmap`` and gives
them back to the OS on ``free``, so each new activation of a few MB starts on fresh pages that the
kernel must fault in and zero. On this project's 2-core machine that made a 144-channel 56x56
depthwise conv on a fresh input several times slower than on reused memory
(``benchmarks/cpu.py --keep-freed-memory`` measures layers and models both ways).
:func:`keep_freed_memory` asks glibc (``mallopt``) to serve blocks up to 32 MiB from its heap and not
to trim it, so freed activations are reused — the CPU analogue of PyTorch's CUDA caching allocator,
and what preloading jemalloc or tcmalloc achieves. The price: the process keeps its peak heap
instead of returning it to the OS. It changes no result, only where memory comes from.

It is process-wide and opt-in: a library should not change its host's allocator behind its back. The regimes
rank plans differently (a (1, 144, 56, 56) separable 3x3 forward: channels_last with conversions first with
glibc's defaults, NCHW with the pointwise product first by 1.2-1.3x with freed memory kept; ``benchmarks/cpu.py``
both ways, README), so the CPU strategy (:mod:`sepconv.cpu_strategy`) keys its decisions on the regime: once
this applies, each layer decides again at its next call, timed in the new regime (call it before a model's first
calls to spare the first regime's measurements). It sees only this function: another allocator preloaded
(jemalloc, tcmalloc) or ``mallopt`` called directly goes unnoticed.

>>> keep_freed_memory()  # on Linux with glibc; False elsewhere
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["freed_memory_kept", "keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit systems
_NEVER_TRIM = 2**31 - 1
_kept = False  # whether keep_freed_memory() applied in this process (it cannot be undone)


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks below 32 MiB for reuse; True if applied, False if not glibc."""
    global _kept
    if not _set_glibc_thresholds():
        return False
    if not _kept:
        _kept = True
        from sepconv import cpu_strategy  # here: the strategy imports this module

        cpu_strategy._allocator_regime_changed()
    return True


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` applied in this process.

    >>> keep_freed_memory(), freed_memory_kept()
    (True, True)
    """
    return _kept


def _set_glibc_thresholds() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    return bool(mmap_ok and trim_ok)
