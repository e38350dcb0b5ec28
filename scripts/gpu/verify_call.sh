#!/usr/bin/env bash
# One implementation's GPU verification, measured: process start-up, where a row's time goes
# (scripts/gpu/where_time_goes.py: compile per specialization, repeat calls, the float64 oracle,
# Triton's autotuner vs one spread config), then `attnbench verify` under a cap with per-row times
# (scripts/gpu/verify_times.sh), then the size of the compile cache it filled. Files under $OUT:
# where_<impl>.json, verify_times.txt, results_*.json, verify_*.log, cache_size.txt.
# Usage: [WHERE=0] scripts/gpu/verify_call.sh CAP_SECONDS IMPL   (IMPL as `attnbench verify --impl` takes it;
#        WHERE=0 skips where_time_goes.py, ~150 s, once its numbers are in NOTES.md)
source scripts/gpu/env.sh
cap=${1:?seconds}; impl=${2:?impl}; tag=${impl//\//_}
start=$SECONDS
python3 -c "import attnbench.app.cli, attnbench.registry; import torch; torch.cuda.init()"
echo "start-up (import attnbench + torch, CUDA init): $((SECONDS - start)) s" | tee "$OUT/startup.txt"
[ "${WHERE:-1}" = 0 ] || timeout 150 python3 scripts/gpu/where_time_goes.py "$OUT/where_$tag.json" "$impl" 2>&1 | tail -n 8
scripts/gpu/verify_times.sh "$cap" "$impl" | tail -n 40
scripts/gpu/cache.sh pack || true
du -sh ~/.cache/attnbench/compiled/* 2>/dev/null | tee "$OUT/cache_size.txt"
