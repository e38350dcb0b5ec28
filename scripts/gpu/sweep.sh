#!/usr/bin/env bash
# (d) The full perf sweep with FA4 (results + the H200 baseline candidate), then the gate: the new
# run against itself (must pass), against the H100 baseline (refused, exit 2) and --cross-device
# (a report, exit 3). About 7-8 minutes. Usage: scripts/gpu/sweep.sh [budget seconds, default 450]
# Pass the commit from the checkout that sent the tree (ATTNBENCH_COMMIT=<sha> scripts/gpu/sweep.sh): the
# device's copy may carry a stale .git, so `git rev-parse HEAD` there names the wrong commit (without it the
# run records that stale commit with -dirty).
source scripts/gpu/env.sh
model=$(python3 -c "import torch; from attnbench.perf.gate import model_slug; print(model_slug(torch.cuda.get_device_name()))")
python3 -m attnbench.perf.bench --budget "${1:-450}" --out "$OUT/$model.json" >"$OUT/sweep.log" 2>&1
echo "sweep: exit $?"; grep -E "^(peaks|prewarm: [0-9])" "$OUT/sweep.log"
{
    for base in "$OUT/$model.json" perf/baselines/h100.json; do
        python3 -m attnbench.perf.gate "$OUT/$model.json" --baseline "$base"; echo "gate vs $base: exit $?"
    done
    python3 -m attnbench.perf.gate "$OUT/$model.json" --baseline perf/baselines/h100.json --cross-device
    echo "gate --cross-device: exit $?"
} >"$OUT/gate.txt" 2>&1
grep "exit" "$OUT/gate.txt"
# prewarm workers that died: the kernel's out-of-memory killer leaves its mark here
{ dmesg 2>/dev/null | grep -iE "out of memory|killed process|oom" | tail -20; free -g; } >"$OUT/dmesg_oom.txt" 2>&1
python3 - "$OUT/$model.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
rows = d["perf"]
print(f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} rows ok; skipped {sum(r['status'] == 'skipped' for r in rows)}; "
      f"peak {d['peaks']['matmul_tflops']} TFLOP/s ({d['peaks'].get('matmul_shape')}); prewarm {d['env'].get('prewarm', {}).get('done')}"
      f"/{d['env'].get('prewarm', {}).get('groups')} left {d['env'].get('prewarm', {}).get('left')}")
fa4 = [r for r in rows if r["impl"] == "flash_attn4"]
print(f"flash_attn4: {sum(r['status'] == 'ok' for r in fa4)} of {len(fa4)} ok")
for r in rows:
    if r["status"] == "ok" and (r.get("pct_peak") or 0) > 100:
        print("OVER PEAK:", r["impl"], r["mode"], r["shape"], r["pct_peak"])
PY
tail -n 80 "$OUT/sweep.log"
