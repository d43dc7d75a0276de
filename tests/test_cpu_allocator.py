"""keep_freed_memory: a freed activation stays with the process for reuse instead of going back to the OS, and
large tensors get transparent huge pages where the kernel allows them.

Checked in fresh processes through what the kernel reports: the resident set size (counted pages, not time) and
the huge pages backing the process's anonymous memory.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys, torch
if sys.argv[1] == "late":
    early = torch.empty(10)  # PyTorch's first CPU allocation: its huge-page setting is fixed from here on
if sys.argv[1] in ("tuned", "late", "tuned, meta default device"):
    from sepconv.cpu_allocator import keep_freed_memory
    assert keep_freed_memory()
from sepconv.cpu_allocator import huge_pages_in_use
if sys.argv[1] == "tuned, meta default device":
    with torch.device("meta"):
        huge_pages_in_use()  # probed first here: the probe must still look at CPU memory
def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
def huge_mib():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")) / 1024
before = resident_mib()
x = torch.empty(2**21).fill_(1.0)  # 8 MiB, touched
during = resident_mib()
del x
after = resident_mib()
huge_before = huge_mib()
big = torch.empty(2**24).fill_(1.0)  # 64 MiB, touched: above glibc's 32 MiB limit, a fresh mapping in every mode
print(during - before, after - before, huge_mib() - huge_before, int(huge_pages_in_use()))
"""


def run_script(mode: str) -> tuple[float, float, float, bool]:
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    during, after, huge, in_use = map(float, result.stdout.split())
    return during, after, huge, bool(in_use)


def kernel_huge_page_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")]


def test_freed_activation_memory_is_kept_for_reuse() -> None:
    during, after, _, _ = run_script("default")
    assert during >= 7.5 and during - after >= 7.5  # glibc mmaps the 8 MiB block and unmaps it on free
    during, after, _, _ = run_script("tuned")
    assert during >= 7.5 and during - after < 0.5  # kept in the heap, ready for the next activation


@pytest.mark.parametrize("mode", ["default", "tuned", "late", "tuned, meta default device"])
def test_huge_pages_in_use_says_what_the_kernel_backs_large_tensors_with(mode) -> None:
    """huge_pages_in_use() agrees with the huge pages the kernel reports under a fresh 64 MiB tensor; where the
    kernel gives them only to memory advised so (its usual mode, "madvise"), keep_freed_memory() before PyTorch's
    first CPU tensor gets them, and neither glibc's defaults nor a call after that first tensor does."""
    _, _, huge_mib, in_use = run_script(mode)
    assert in_use == (huge_mib >= 2)
    if kernel_huge_page_mode() == "madvise":
        assert in_use == mode.startswith("tuned")
    elif kernel_huge_page_mode() in ("never", None):
        assert not in_use
