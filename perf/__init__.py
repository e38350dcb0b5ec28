"""Performance: timing harness, work models, sweeps, the regression gate, baselines.

Layers, lowest first: timing.py and work.py (the timer, FLOP / byte models); cells.py (what a
measurement is about); sweeps.py (named sweeps of cells) and cases.py (a cell and an
implementation as a prepare / run pair); measure.py (time one pair, failures as rows);
prewarm.py and isolate.py (compile first; time in child processes); bench.py (the whole run).

Entry points: `attnbench.perf.bench.run_bench` (the sweep -> Results), `attnbench.perf.gate.gate`
(current vs baseline -> GateResult), `attnbench.perf.selfcheck` (sweep, re-run, gate, slowed impl),
`perf/test_bench.py` (pytest-benchmark view; sharded over GPUs with pytest-xdist).
"""
