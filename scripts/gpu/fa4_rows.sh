#!/usr/bin/env bash
# (c) Every GPU property row of FlashAttention-4 under the ci profile, with per-row times
# (gpu_rows.jsonl, fa4_row_times.txt under $OUT). Usage: scripts/gpu/fa4_rows.sh [seconds, default 420]
source scripts/gpu/env.sh
SELECT=${SELECT:-flash_attn4} TESTS=0 WORKERS=${WORKERS:-4} scripts/gpu_verify.sh 0 "${1:-420}"
python3 - "$OUT/gpu_rows.jsonl" <<'PY' | tee "$OUT/fa4_row_times.txt"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
rows.sort(key=lambda r: -r["duration_s"])
total = sum(r["duration_s"] for r in rows)
print(f"{len(rows)} rows, {total:.0f} s summed over workers; by status: "
      + ", ".join(f"{s} {sum(r['status'] == s for r in rows)}" for s in sorted({r['status'] for r in rows})))
for r in rows:
    print(f"{r['duration_s']:8.1f} s  {r['status']:5}  {r['variant']}/{r['impl']}  {r['property']}  {r['reason'][:120]}")
PY
