"""The GPU session's scripts run end to end (tiny shapes, Triton's interpreter): a broken script found only on
a lent GPU would waste its few minutes. Their outputs are checked for the fields the README and the auto-rule
test read, and for agreement with PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run_script(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_kernel_benchmark_quick_run_writes_comparable_rows(tmp_path):
    run_script(
        "benchmarks/kernels.py", "--quick", "--out", str(tmp_path), "--sections", "kernel_sizes", "separable",
        "--section-seconds", "kernel_sizes=1", "separable=1",
    )  # fmt: skip
    result = json.loads((tmp_path / "kernels_quick.json").read_text())
    assert {r["section"] for r in result["rows"]} == {"kernel_sizes", "separable"}
    for row in result["rows"]:
        assert row["max_abs_error_vs_eager"] < 1e-4
        for key in ("ours_forward_ms", "eager_forward_ms", "ours_forward_backward_ms", "ours_forward_repeat_ms"):
            assert row[key] > 0
        assert row["floor_forward_ms"] == max(row["memory_floor_forward_ms"], row["flop_floor_forward_ms"] or 0.0)
    assert (tmp_path / "kernels_quick.png").stat().st_size > 0


def test_launch_configuration_sweep_quick_run(tmp_path):
    run_script("benchmarks/tune_kernels.py", "--quick", "--out", str(tmp_path), "--seconds", "5",
               "--plan", "grad_weight:nhwc", "forward:nchw")  # fmt: skip
    rows = json.loads((tmp_path / "tune_kernels_quick.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} <= {"depthwise_grad_weight", "depthwise_forward"} and rows
    assert all(r["max_abs_error"] < 1e-4 and r["ms"] > 0 for r in rows)


def test_gpu_session_script_parses():
    done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_session.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
