#!/usr/bin/env bash
# The GPU property suite of one or more implementations through `attnbench verify --device cuda`
# (the user's path: one test process per run, restarted after a crash or a lost CUDA context),
# each under a time cap, with per-row times. Writes under $OUT: verify_<impl>.log, the run's
# results in v_<impl>/ (and flat copies results_<impl>_<run>.json), and verify_times.txt (wall time per implementation, then the slowest rows).
# Usage: scripts/gpu/verify_times.sh SECONDS IMPL [IMPL ...]   (IMPL as `attnbench verify --impl` takes it)
source scripts/gpu/env.sh
cap=${1:?seconds per implementation}; shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
for impl in "$@"; do
    tag=${impl//\//_}
    start=$SECONDS
    timeout -s INT -k 20 "$cap" attnbench verify --device cuda --impl "$impl" --out "$OUT/v_$tag" >"$OUT/verify_$tag.log" 2>&1
    rc=$?
    echo "$impl: exit $rc in $((SECONDS - start)) s (cap $cap s): $(tail -n 1 "$OUT/verify_$tag.log")" | tee -a "$OUT/verify_times.txt"
    # the device tool returns files at most a few folders deep: a flat copy of each run's results
    for f in "$OUT/v_$tag"/runs/*/results.json; do [ -f "$f" ] && cp "$f" "$OUT/results_${tag}_$(basename "$(dirname "$f")").json"; done
done
python3 - "$OUT" <<'PY' | tee -a "$OUT/verify_times.txt"
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("v_*/runs/*/results.json")):
    rows = json.loads(f.read_text()).get("correctness", [])
    if not rows:
        continue
    print(f"== {f.parent}: {len(rows)} rows, {sum(r.get('duration_s') or 0 for r in rows):.0f} s in tests; "
          + ", ".join(f"{s} {sum(r['status'] == s for r in rows)}" for s in ("pass", "fail", "error", "skip")))
    for r in sorted(rows, key=lambda r: -(r.get("duration_s") or 0))[:12]:
        print(f"  {r.get('duration_s') or 0:7.1f} s  {r['status']:5} {r['variant']}/{r['impl']} {r['property']}  {(r.get('reason') or '')[:110]}")
    for r in rows:
        if r["status"] in ("fail", "error"):
            print(f"  FAILED {r['property']}: {(r.get('reason') or '')[:400]}\n    counterexample: {r.get('counterexample')}")
PY
