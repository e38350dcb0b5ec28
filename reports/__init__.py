"""Reports: the results schema and every way of showing results.

- schema.Results: the one results file (results.json) that verify, bench, gate and report share.
- terminal.Progress (live progress), terminal.summary (after a run), terminal.comparison (two runs).
- render.write_all (results.json, report.md + plots/, self-contained report.html), render.compare.
- tables: the grouping and formatting all of them share; plots: inline SVG figures (matplotlib).
"""
