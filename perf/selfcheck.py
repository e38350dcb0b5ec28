"""Does the gate work on this machine? Sweep, sweep again, gate; then slow one implementation down.

    python -m attnbench.perf.selfcheck --out runs/ [--quick] [--budget 240] [--slow dense/sdpa_efficient=2]

1. run1: the sweep (the baseline; saved as run1.json).
2. run2: the same cells again (those run1 reached), in the same process: the gate must pass,
   and the distribution of ratio changes is the run-to-run noise the threshold has to cover.
3. run3: the variant of the slowed implementation again with ATTNBENCH_SLOWDOWN set (the impl
   does its work N times): the gate must fail on exactly that implementation's cells.
Writes run1.json, run2.json, run3.json and selfcheck.json (spread and verdicts) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from attnbench.files import write_atomic
from attnbench.registry import registry
from attnbench.reports import text
from attnbench.reports.terminal import gate_table

from . import bench, slow
from .cells import cell_key
from .gate import GateResult, gate, reference_chain
from .sweeps import sweep_cells


def spread(result: GateResult) -> dict:
    """How much the ratios moved between two runs of the same code (ok / improved / regressed cells)."""
    changes = sorted(abs(r.change) for r in result.rows if r.change is not None and r.status != "reference")
    if not changes:
        return {"cells": 0}
    q = lambda f: changes[min(len(changes) - 1, int(f * len(changes)))]
    return {"cells": len(changes), "median_abs_change": round(statistics.median(changes), 4),
            "p90_abs_change": round(q(0.9), 4), "max_abs_change": round(changes[-1], 4),
            "over_5pct": sum(c > 0.05 for c in changes), "drift": result.drift}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnbench.perf.selfcheck", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--budget", type=float, default=None, help="time budget of run1 in s (default: the sweep's)")
    p.add_argument("--slow", default="dense/sdpa_efficient=2", help="variant/impl=N for run3")
    p.add_argument("--reference", default=bench.DEFAULT_REFERENCE)
    p.add_argument("--threshold", type=float, default=0.10)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(msg, flush=True)
    slowdown = slow.parse(args.slow)
    if len(slowdown) != 1:
        raise ValueError(f"--slow: name exactly one variant/impl=N, got {args.slow!r}")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cells = sweep_cells(args.quick, device)
    budget = args.budget if args.budget is not None else -1
    run1 = bench.run_bench(args.quick, device, progress=say, reference=args.reference, budget_s=budget, cells=cells)
    run1.save(out / "run1.json")
    reached = {cell_key(r.variant, r.mode, r.shape) for r in run1.perf if r.status in ("ok", "oom", "error")}
    cells2 = [c for c in cells if c.key() in reached]
    say(f"run1: {len(reached)} of {len(cells)} cells in {run1.env['bench_seconds']} s; run2 repeats them")

    # run1 compiled everything in this process: no prewarm again. Host-bound cells stay unjudged even
    # here: on the H100 the host's enqueue times moved by up to 2x between two runs of one process.
    run2 = bench.run_bench(args.quick, device, progress=say, reference=args.reference, budget_s=None, cells=cells2,
                           prewarm_workers=0)
    run2.save(out / "run2.json")
    same = gate(run2, run1, args.threshold, args.reference)

    (key, times), = slowdown.items()
    variant, name = key.split("/", 1)
    os.environ[slow.ENV] = args.slow
    ref_names = reference_chain(variant, args.reference)
    cells3 = [c for c in cells2 if c.variant == variant]
    run3 = bench.run_bench(args.quick, device, progress=say, reference=args.reference, budget_s=None,
                           cells=cells3, prewarm_workers=0, impls=[n for n in dict.fromkeys([name, *ref_names])
                                                if registry().impls.get(f"{variant}/{n}")])
    del os.environ[slow.ENV]
    run3.save(out / "run3.json")
    slowed = gate(run3, run1, args.threshold, args.reference)

    failed_impls = sorted({r.impl for r in slowed.failures})
    report = {
        "device": run1.env.get("device_name"),
        "cells_run1": len(reached), "cells_total": len(cells), "run1_seconds": run1.env["bench_seconds"],
        "run2_seconds": run2.env["bench_seconds"], "run3_seconds": run3.env["bench_seconds"],
        "same_code": {"ok": same.ok, "counts": dict(same.counts), **spread(same)},
        "slowed": {"slowdown": args.slow, "ok": slowed.ok, "failed_impls": failed_impls,
                   "regressed_cells": slowed.counts.get("regressed", 0), "counts": dict(slowed.counts)},
    }
    write_atomic(out / "selfcheck.json", json.dumps(report, indent=1, default=str) + "\n")
    from rich.console import Console

    console = Console(width=150)
    console.print(gate_table(slowed))
    console.print(gate_table(same))
    print(text.perf_table(run1))
    print(json.dumps(report, indent=1, default=str))
    passed = same.ok and not slowed.ok and failed_impls == [name]
    print(f"selfcheck {'PASSED' if passed else 'FAILED'}: same code "
          f"{'passes' if same.ok else 'FAILS'} the gate; x{times} {key} "
          f"{'fails' if not slowed.ok else 'PASSES'} it ({failed_impls})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
