#!/usr/bin/env bash
# On a CUDA machine: the GPU-marked unit tests and the property suite on the GPU, with time caps,
# rows streamed to $OUT (or ./gpu-out) so a capped run keeps what finished.
#   usage: scripts/gpu_verify.sh [tests_seconds] [properties_seconds]
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 ATTNBENCH_TRITON_AUTOTUNE=0 TRITON_INTERPRET=0
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
workers=$(( $(nproc) / 2 )); [ "$workers" -gt 8 ] && workers=8
timeout "${1:-200}" python3 -m pytest tests -m gpu -n "$workers" -q -p no:cacheprovider --no-header \
    -o addopts="--import-mode=importlib" >"$out/gpu_tests.log" 2>&1
echo "gpu unit tests: exit $? : $(tail -n 1 "$out/gpu_tests.log")"
timeout "${2:-300}" python3 -m pytest properties -p attnbench.plugin --device cuda --hypothesis-profile ci \
    -n "$workers" -q -p no:cacheprovider --no-header -o addopts="--import-mode=importlib" \
    --attnbench-results "$out/gpu_rows.jsonl" >"$out/gpu_properties.log" 2>&1
echo "gpu properties: exit $? : $(tail -n 1 "$out/gpu_properties.log")"
grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" "$out/gpu_properties.log" | cut -c1-160 | head -40
