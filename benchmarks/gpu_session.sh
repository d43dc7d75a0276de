#!/usr/bin/env bash
# One device call for a session with a GPU (see the device tool): the kernel tests on CUDA, then the
# kernel benchmark. Writes under $OUT (the device tool's folder) or benchmarks/results.
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=590)
#   BENCH_SECTIONS="depthwise separable" BENCH_SECONDS=300 bash benchmarks/gpu_session.sh --no-compile
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout "${TEST_SECONDS:-150}" python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_kernels_depthwise.py tests/test_kernels_separable.py tests/test_dispatch.py tests/test_accelerate.py \
    2>&1 | tail -25 | tee "$out/gpu_tests.txt"
# shellcheck disable=SC2086
timeout "${BENCH_SECONDS:-400}" python3 benchmarks/kernels.py --out "$out" --sections ${BENCH_SECTIONS:-depthwise separable models} "$@" \
    > "$out/kernels_log.jsonl" 2> "$out/kernels_stderr.txt"
echo "benchmark exit: $?" | tee -a "$out/gpu.txt"
