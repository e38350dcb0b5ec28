#!/usr/bin/env bash
# One call of at most ~8 minutes (carry .fa4/2 after scripts/gpu/stash.sh carried .fa4/1): FA4
# installed (env.sh), the peak probe, scripts/checks/fa4_findings.py (each suspect spec in its own
# process), then FA4's property rows with its declarations, capped so the whole
# call ends by DEADLINE seconds (default 460). Seven files under $OUT: summary.txt, peaks.json,
# fa4_findings.json, fa4_install.log, gpu_properties.log, gpu_rows.jsonl, row_times.txt.
# Usage: scripts/gpu/findings.sh [deadline seconds, default 460]
start=$SECONDS deadline=${1:-460}
source scripts/gpu/env.sh
summary="$OUT/summary.txt"
{
    echo "== FA4 install: $(tail -n 1 "$OUT/fa4_install.log" 2>/dev/null) ($((SECONDS - start)) s)"
    echo "== peak probe"
    timeout 90 python3 scripts/gpu/peak_probe.py "$OUT/peaks.json" 2>&1 | tail -n 6
    echo "== fa4_findings ($((SECONDS - start)) s)"
    timeout 240 python3 scripts/checks/fa4_findings.py "$OUT/fa4_findings.json" 2>&1 | tail -n 100
    left=$((deadline - (SECONDS - start)))
    [ "$left" -lt 60 ] && left=60
    echo "== FA4 property rows, capped at $left s ($((SECONDS - start)) s)"
    scripts/gpu/rows.sh "$left" 2>&1 | tail -n 50
    cat "$OUT/gpu.txt" "$OUT/install.log" 2>/dev/null
    echo "== done in $((SECONDS - start)) s"
} >"$summary" 2>&1
rm -f "$OUT/gpu.txt" "$OUT/install.log"
tail -n 60 "$summary"
