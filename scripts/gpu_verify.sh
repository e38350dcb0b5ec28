#!/usr/bin/env bash
# On a CUDA machine: the GPU-marked unit tests, then the property suite on the GPU, each under a
# time cap, rows streamed to $OUT (or ./gpu-out) so a capped run keeps what finished.
#   usage: scripts/gpu_verify.sh [tests_seconds] [properties_seconds]
#   env:   SELECT='triton or flex'  only these property rows (pytest -k)
#          DONE='a.jsonl b.jsonl'   skip rows that passed (or do not apply) in these row files (resume)
#          TESTS=0                  skip the unit tests
#          NODES=file               only these property nodeids, in this order (one per line)
#          WORKERS=14               xdist workers (default nproc/2, at most 8)
# Measured on the H100 (2026-11-23): every non-Triton, non-flex property row (289) in 184 s with
# 7 workers; OMP_NUM_THREADS=2 matters (16 torch threads per worker made it 5x slower).
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 OMP_NUM_THREADS=2
export ATTNBENCH_TRITON_AUTOTUNE=0  # first fitting config: correctness does not need the tuner
# flex compiles static shapes, the kernel the benchmarks time (ATTNBENCH_FLEX_DYNAMIC=1: automatic
# dynamic shapes, fewer compiles, but a different kernel; MoA flex gave wrong outputs under it)
export ATTNBENCH_FLEX_DYNAMIC=${ATTNBENCH_FLEX_DYNAMIC:-0}
# one in-process compile per worker: 15 workers each with a 16-process compile pool thrash the host
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-1}
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
workers=${WORKERS:-$(( $(nproc) / 2 ))}; [ -z "${WORKERS:-}" ] && [ "$workers" -gt 8 ] && workers=8
common=(-q -p no:cacheprovider --no-header -o addopts="--import-mode=importlib" -n "$workers")
if [ "${TESTS:-1}" != 0 ]; then
    timeout "${1:-200}" python3 -m pytest tests -m gpu "${common[@]}" >"$out/gpu_tests.log" 2>&1
    echo "gpu unit tests: exit $? : $(tail -n 1 "$out/gpu_tests.log")"
fi
sel=(); [ -n "${SELECT:-}" ] && sel=(-k "$SELECT")
[ -n "${NODES:-}" ] && sel+=(--attnbench-only-file "$NODES")
skip=()
if [ -n "${DONE:-}" ]; then
    # passed and unsupported rows are skipped; failed ones run again
    python3 -c "import json,sys; rows=[json.loads(l) for f in sys.argv[1:] for l in open(f) if l.strip()];
[print(r['nodeid']) for r in rows if r['status'] in ('pass', 'skip')]" $DONE >"$out/done.txt"
    skip=(--attnbench-skip-file "$out/done.txt")
fi
# rows go to a fresh folder per call: the plugin appends, and a reused machine keeps /tmp
rows=$(mktemp -d /tmp/attnbench-rows.XXXXXX)
timeout "${2:-400}" python3 -m pytest properties -p attnbench.app.plugin --device cuda --hypothesis-profile ci \
    "${sel[@]}" "${common[@]}" "${skip[@]}" --attnbench-results "$rows/gpu_rows.jsonl" \
    >"$out/gpu_properties.log" 2>&1
echo "gpu properties: exit $? : $(tail -n 1 "$out/gpu_properties.log")"
cat "$rows"/gpu_rows.jsonl* >"$out/gpu_rows.jsonl" 2>/dev/null
rm -rf "$rows"
grep -E "^(FAILED|ERROR)" "$out"/gpu_*.log | cut -c1-160 | head -40
