#!/usr/bin/env bash
# (a) FA4 installed from the carried parts (env.sh), (b) `attnbench list` with FA4's line and its
# import time, (e) the peak probe. About 1-2 minutes. Writes list.txt and peaks.json under $OUT.
source scripts/gpu/env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv | tee "$OUT/list.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/list.txt"
import time
t = time.perf_counter()
try:
    import flash_attn.cute as fa4
    print(f"import flash_attn.cute: {time.perf_counter() - t:.1f} s, version {getattr(fa4, '__version__', '?')}")
except Exception as exc:
    print(f"import flash_attn.cute FAILED: {type(exc).__name__}: {exc}")
PY
attnbench list --variant dense --variant local 2>&1 | tee -a "$OUT/list.txt"
python3 scripts/gpu/peak_probe.py "$OUT/peaks.json" 2>&1 | tee -a "$OUT/list.txt"
