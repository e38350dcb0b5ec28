#!/usr/bin/env bash
# Render an attnbench HTML report in headless Chromium and save a PNG screenshot.
#
#   scripts/screenshot_report.sh [REPORT.html] [OUT.png] [WIDTHxHEIGHT]
#
# With no REPORT, builds a report from the synthetic sample data (attnbench.reports.sample)
# into a temporary folder first. Needs Debian's chromium (apt-get install -y chromium).
# Chromium runs isolated: no network services, a throwaway profile, no GPU.
set -euo pipefail

report="${1:-}"
out="${2:-report.png}"
size="${3:-1280x2400}"

browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [[ -z "$browser" ]]; then
  echo "screenshot_report: chromium not found (apt-get install -y chromium)" >&2
  exit 2
fi
if [[ ! "$size" =~ ^[0-9]+x[0-9]+$ ]]; then
  echo "screenshot_report: size must be WIDTHxHEIGHT, got '$size'" >&2
  exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if [[ -z "$report" ]]; then
  python -c "import sys; from attnbench.reports.sample import sample_results; \
from attnbench.reports.render import write_all; write_all(sample_results(), sys.argv[1])" "$tmp/report"
  report="$tmp/report/report.html"
fi
if [[ ! -f "$report" ]]; then
  echo "screenshot_report: no such report '$report'" >&2
  exit 2
fi

abs="$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
out_abs="$(cd "$(dirname "$out")" 2>/dev/null && pwd || (mkdir -p "$(dirname "$out")" && cd "$(dirname "$out")" && pwd))/$(basename "$out")"
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --hide-scrollbars --user-data-dir="$tmp/profile" \
  --screenshot="$out_abs" --window-size="${size/x/,}" "file://$abs" >"$tmp/chromium.log" 2>&1 || {
  echo "screenshot_report: chromium failed:" >&2
  cat "$tmp/chromium.log" >&2
  exit 1
}
if [[ ! -s "$out_abs" ]]; then
  echo "screenshot_report: chromium wrote no screenshot" >&2
  cat "$tmp/chromium.log" >&2
  exit 1
fi
echo "$out_abs"
