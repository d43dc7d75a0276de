"""keep_freed_memory: a freed activation stays with the process for reuse instead of going back to the OS.

Checked through the resident set size of a fresh process (counted pages, not time).
"""

import subprocess
import sys

SCRIPT = """
import sys, torch
if sys.argv[1] == "tuned":
    from sepconv.cpu_allocator import keep_freed_memory
    assert keep_freed_memory()
def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
before = resident_mib()
x = torch.empty(2**21).fill_(1.0)  # 8 MiB, touched
during = resident_mib()
del x
after = resident_mib()
print(during - before, after - before)
"""


def resident_growth_mib(mode: str) -> tuple[float, float]:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    during, after = map(float, result.stdout.split())
    return during, after


def test_freed_activation_memory_is_kept_for_reuse() -> None:
    during, after = resident_growth_mib("default")
    assert during >= 7.5 and during - after >= 7.5  # glibc mmaps the 8 MiB block and unmaps it on free
    during, after = resident_growth_mib("tuned")
    assert during >= 7.5 and during - after < 0.5  # kept in the heap, ready for the next activation
