"""Reports: every way of showing results (the results file itself, its rows and its schema, is
attnbench.results, which verify, bench, gate and report share).

- terminal.Progress (live progress), terminal.summary (after a run), terminal.comparison (two runs).
- render.write_all (results.json, report.md + plots/, self-contained report.html), render.compare.
- tables: the grouping and formatting all of them share; plots: inline SVG figures (matplotlib).
"""
