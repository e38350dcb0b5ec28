#!/usr/bin/env bash
# (c) The GPU property rows of one implementation (SELECT, a pytest -k expression; default
# flash_attn4) under the ci profile, with per-row times: gpu_rows.jsonl and row_times.txt under $OUT.
# Usage: [SELECT=triton] scripts/gpu/rows.sh [seconds, default 420]
source scripts/gpu/env.sh
SELECT=${SELECT:-flash_attn4} TESTS=0 WORKERS=${WORKERS:-4} scripts/gpu_verify.sh 0 "${1:-420}"
python3 scripts/gpu/row_times.py "$OUT/gpu_rows.jsonl" | tee "$OUT/row_times.txt"
