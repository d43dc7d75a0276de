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

Blocks above 32 MiB (a batch of 32 large activations) still come fresh from the kernel each time, 4 KiB page by
page. For them :func:`keep_freed_memory` also sets PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (unless the environment
sets it), so that tensors of 2 MiB and more are advised onto transparent huge pages: one fault per 2 MiB instead
of 512. Measured side by side in fresh processes (``benchmarks/cpu_huge_pages.py``): a ReLU training step on
154 MB of fresh tensors 189 -> 88 ms with freed memory kept, PyTorch's (32, 96, 112, 112) stride-2 separable block
training step 378 -> 188 ms in NCHW, 120 -> 74 ms in channels_last. PyTorch reads the variable once, at its first
CPU allocation: call :func:`keep_freed_memory` before creating any tensor (model included);
:func:`huge_pages_in_use` says whether it took (the kernel must allow them: mode ``madvise`` or ``always``).
Child processes inherit the variable (a DataLoader's spawned workers): they get huge pages without the kept heap,
which the same benchmark measured faster than glibc's defaults on every workload (a 16 MB ReLU step 16.3 -> 9.9 ms;
5.4 with the kept heap too).

It is process-wide and opt-in: a library should not change its host's allocator behind its back. The regimes
rank plans differently (a (1, 144, 56, 56) separable 3x3 forward: channels_last with conversions first with
glibc's defaults, NCHW with the pointwise product first by 1.2-1.3x with freed memory kept; ``benchmarks/cpu.py``
both ways, README), so the CPU strategy (:mod:`sepconv.cpu_strategy`) keys its decisions on the regime: once
this applies, each layer decides again at its next call, timed in the new regime (call it before a model's first
calls to spare the first regime's measurements). It sees only this function and PyTorch's huge pages: another
allocator preloaded (jemalloc, tcmalloc) or ``mallopt`` called directly goes unnoticed.

>>> keep_freed_memory()  # on Linux with glibc; False elsewhere
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from pathlib import Path

import torch

__all__ = ["freed_memory_kept", "huge_pages_in_use", "keep_freed_memory"]

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"  # PyTorch's: advise huge pages for CPU tensors of 2 MiB and more
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit systems
_NEVER_TRIM = 2**31 - 1
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_PROBE_ELEMENTS = 2**20  # a 4 MiB float32 tensor: above PyTorch's 2 MiB threshold for advising huge pages
_kept = False  # whether keep_freed_memory() applied in this process (it cannot be undone)
_huge_pages: bool | None = None  # huge_pages_in_use()'s answer, fixed once PyTorch has allocated


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks below 32 MiB for reuse and ask PyTorch for huge pages above 2 MiB (it takes
    only before the process's first CPU tensor: :func:`huge_pages_in_use`); True if applied, False if not glibc."""
    global _kept
    if not _set_glibc_thresholds():
        return False
    os.environ.setdefault(HUGE_PAGES_ENV, "1")  # read by PyTorch at its first CPU allocation, if not made yet
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


def huge_pages_in_use() -> bool:
    """Whether PyTorch's CPU tensors of 2 MiB and more get transparent huge pages in this process: the kernel
    backs all large memory with them (mode ``always``), or it does so where advised (``madvise``) and PyTorch
    advises them (``THP_MEM_ALLOC_ENABLE=1`` at its first CPU allocation, as :func:`keep_freed_memory` sets it).
    Answered by allocating a 4 MiB tensor once: after that PyTorch's choice is fixed for the process.

    >>> isinstance(huge_pages_in_use(), bool)
    True
    """
    global _huge_pages
    if _huge_pages is None:
        _huge_pages = _probe_huge_pages()
    return _huge_pages


def _probe_huge_pages() -> bool:
    try:
        mode = _THP_MODE.read_text()
    except OSError:  # not Linux, or a kernel without transparent huge pages
        return False
    if "[always]" in mode:
        return True
    if "[madvise]" not in mode:
        return False
    probe = torch.empty(_PROBE_ELEMENTS, dtype=torch.float32, device="cpu")  # whatever the defaults are
    return "hg" in _vm_flags(probe.data_ptr())


def _vm_flags(address: int) -> list[str]:
    """The ``VmFlags`` of the mapping that holds ``address``, from ``/proc/self/smaps`` (empty if none is found)."""
    inside = False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head = line.split(maxsplit=1)[0]
                if not head.endswith(":"):  # a mapping's first line: "start-end perms offset ..."
                    start, _, end = head.partition("-")
                    inside = int(start, 16) <= address < int(end, 16)
                elif inside and head == "VmFlags:":
                    return line.split()[1:]
    except OSError:
        pass
    return []


def _set_glibc_thresholds() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    return bool(mmap_ok and trim_ok)
