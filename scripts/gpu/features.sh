#!/usr/bin/env bash
# The score / sequence / fp8 features on the GPU: their named sweeps (varlen, paged_decode,
# score_features, fp8) under a budget, feature properties (Triton's by default) through
# `attnbench verify`, and the GPU-only unit tests of those paths. Files under $OUT: features.json
# (the sweeps), features_sweep.log, verify_features.log, results_features.json, gpu_units.txt.
# Usage: [SWEEPS="paged_decode fp8"] [IMPLS="dense/flex"] [PROPS="document paged"] [UNITS="paged"]
#        ATTNBENCH_COMMIT=<sha> scripts/gpu/features.sh [sweep budget s, default 110] [verify cap s, default 150]
# SWEEPS: the named sweeps (default all four; "" runs none); IMPLS: the implementations verified
# (default dense/triton); PROPS: property names or parts of names (default every feature property);
# UNITS: the -k expression of the GPU unit tests (default "fp8 or paged or varlen"; "" runs none).
source scripts/gpu/env.sh
start=$SECONDS
sweeps=() impls=() props=()
for name in ${SWEEPS-varlen paged_decode score_features fp8}; do sweeps+=(--sweep "$name"); done
for name in ${IMPLS:-dense/triton}; do impls+=(--impl "$name"); done
for name in ${PROPS:-fp8 descale varlen other_sequences paged block_placement decoding_step score_features \
              sink_scales alibi_slopes}; do props+=(--property "$name"); done
if [ ${#sweeps[@]} -gt 0 ]; then
    timeout -s INT -k 15 $(( ${1:-110} + 40 )) python3 -m attnbench.perf.bench --device cuda "${sweeps[@]}" \
        --budget "${1:-110}" --out "$OUT/features.json" >"$OUT/features_sweep.log" 2>&1
    echo "feature sweeps: exit $? in $((SECONDS - start)) s"
fi
start=$SECONDS
timeout -s INT -k 15 "${2:-150}" attnbench verify --device cuda "${impls[@]}" --workers 8 \
    "${props[@]}" --out "$OUT/v" >"$OUT/verify_features.log" 2>&1
echo "feature properties (${IMPLS:-dense/triton}): exit $? in $((SECONDS - start)) s; $(tail -n 1 "$OUT/verify_features.log")"
cp "$OUT"/v/runs/*/results.json "$OUT/results_features.json" 2>/dev/null
if [ -n "${UNITS-fp8 or paged or varlen}" ]; then
    timeout 70 python3 -m pytest -p no:cacheprovider -q tests/test_impls_triton.py -m gpu \
        -k "${UNITS-fp8 or paged or varlen}" >"$OUT/gpu_units.txt" 2>&1
    echo "GPU unit tests: exit $?; $(tail -n 1 "$OUT/gpu_units.txt")"
fi
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("results_features.json",):
    f = out / name
    if f.exists():
        for r in json.loads(f.read_text())["correctness"]:
            print(f"  {r['status']:5} {r.get('duration_s') or 0:6.1f} s  {r['impl']} {r['property']}  {(r.get('reason') or '')[:160]}")
            if r["status"] in ("fail", "error"):
                print(f"      counterexample: {r.get('counterexample')}")
f = out / "features.json"
if f.exists():
    for r in json.loads(f.read_text())["perf"]:
        print(f"  {r['status']:11} {r['impl']:14} {r['mode']:7} {str(r['shape'])[:90]}  ms={r.get('ms')} tflops={r.get('tflops')} gbps={r.get('gbps')} {(r.get('reason') or '')[:60]}")
PY
