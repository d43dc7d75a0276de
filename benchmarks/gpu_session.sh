#!/usr/bin/env bash
# One device call for a session with a GPU (see the device tool), sized to under 6 minutes so that a session's
# 15 minutes of device time hold the machine's start, this call and a rerun (of a part: the variables below):
# the launch-configuration sweep, the kernel benchmark (sections cut by time, most important rows first), a
# host-overhead profile, then the kernel tests on CUDA. At most 8 files under $OUT (the device tool's
# folder) or benchmarks/results. (The H200 run of 2026-11-26 took 290 s for the benchmark alone with section
# budgets of 213 s: a row started before its section's deadline runs to its end, compiling included.)
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=390)
#   TUNE_PLAN="forward:nchw" SECTIONS="depthwise" bash benchmarks/gpu_session.sh
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.sm,temperature.gpu --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/gpu.txt"
if [ "${TUNE_SECONDS:-60}" != 0 ]; then
    # shellcheck disable=SC2086
    timeout $(( ${TUNE_SECONDS:-60} + 25 )) python3 benchmarks/tune_kernels.py --seconds "${TUNE_SECONDS:-60}" --out "$out" \
        --min-kernel "${TUNE_MIN_KERNEL:-7}" \
        --plan ${TUNE_PLAN:-forward:nhwc grad_weight:nhwc forward:nchw grad_weight:nchw} > "$out/tune.log" 2>&1
    echo "tune exit: $? after ${SECONDS}s" | tee -a "$out/gpu.txt"
fi
# shellcheck disable=SC2086
timeout "${BENCH_SECONDS:-145}" python3 benchmarks/kernels.py --out "$out" --compile-where big-bf16 \
    --sections ${SECTIONS:-depthwise kernel_sizes separable separable_bn separable_se separable_se_train models} \
    --section-seconds ${SECTION_SECONDS:-depthwise=45 kernel_sizes=20 separable=20 separable_bn=10 separable_se=5 separable_se_train=5 models=15} \
    > "$out/kernels.log" 2>&1
echo "benchmark exit: $? after ${SECONDS}s" | tee -a "$out/gpu.txt"
if [ "${PROFILE_SECONDS:-45}" != 0 ]; then
    timeout "${PROFILE_SECONDS:-45}" python3 benchmarks/profile_overhead.py > "$out/profile.txt" 2>&1
    echo "profile exit: $? after ${SECONDS}s" | tee -a "$out/gpu.txt"
fi
# The whole kernel suite does not fit (Triton compiles per hypothesis example: 1 test in 40 s on the H200):
# the CUDA run takes the fixed-shape tests (the interpreter runs everything in CI).
CI=true timeout "${TEST_SECONDS:-85}" python3 -m pytest -o addopts= -v --durations=15 -p no:cacheprovider tests/test_kernels_depthwise.py \
    tests/test_kernels_separable.py tests/test_kernels_batch_norm.py tests/test_kernels_output_norm.py \
    tests/test_kernels_excitation.py tests/test_kernels_differentiable_excitation.py -k "low_precision or half_precision or every_precision or edge_cases or \
deterministic or partial_sum or unbatched or smooth_mid or kinks or two_intermediates or running_statistics_updated_once or \
finalize_in_launch_matches" > "$out/tests.txt" 2>&1
echo "tests exit: $? after ${SECONDS}s" | tee -a "$out/gpu.txt"
tail -3 "$out/tests.txt"
[ -f "$out/profile.txt" ] && head -5 "$out/profile.txt"
python3 - "$out" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[1]}/kernels.json"))
for row in r["rows"]:
    if "error" in row:  # a configuration that raised: its traceback is in kernels.json
        print("ERROR", row["section"], {k: v for k, v in row.items() if k in ("shape", "model", "batch", "dtype", "layout")}, row["error"][:300])
    elif row["section"] == "models":
        ms = {k: round(v, 3) for k, v in row.items() if k.endswith("_ms")}
        print(row["model"], row["mode"], row["batch"], ms, {k: v[:80] for k, v in row.items() if k.endswith("_error")})
    else:
        ms = {k: round(v, 3) for k, v in row.items() if k.endswith("_ms") and "floor" not in k}
        errors = {k.removeprefix("max_"): float(f"{v:.2g}") for k, v in row.items() if k.startswith("max_")}
        errors |= {k: v[:80] for k, v in row.items() if k.endswith("_graph_error")}  # a CUDA-graph capture failed
        print(row["section"][:3], row["shape"], row["batch"], row["dtype"], row["layout"], ms, errors)
PY
