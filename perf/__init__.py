"""Performance: timing harness, work models, sweeps, the regression gate, baselines.

Entry points: `attnbench.perf.bench.run_bench` (the sweep -> Results), `attnbench.perf.gate.gate`
(current vs baseline -> GateResult), `attnbench.perf.selfcheck` (sweep, re-run, gate, slowed impl),
`perf/test_bench.py` (pytest-benchmark view; sharded over GPUs with pytest-xdist).
"""
