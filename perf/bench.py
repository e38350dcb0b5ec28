"""The benchmark sweep: every available implementation of the selected variants, cell by cell.

Implementations come from the registry only (`registry().select(variant)`, filtered by
`impl.why_not(spec, needs)`); nothing here names one, except the reference that speedups are
read against (a parameter). Each (cell, implementation) pair runs in a child process
(perf/isolate.py). A cell that runs out of memory, raises, returns a wrong output, crashes the
process or passes the per-cell deadline is recorded (status "oom" / "error" / "crashed" /
"timeout" with the reason) and the sweep goes on.

    python -m attnbench.perf.bench --quick --out results/bench.json
    python -m attnbench.perf.bench --merge runs/perf-gw*.json --out merged.json   # xdist shards
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from attnbench import procs
from attnbench.registry import VARIANTS, Impl, registry
from attnbench.reports import text
from attnbench.results import PerfRow, Results, environment

from . import memory, prewarm, slow
from .cases import candidates
from .cells import Cell, cell_key
from .gate import DEFAULT_REFERENCE, resolve_reference
from .isolate import run_isolated
from .measure import Settings, autotuner_picks, rounded, run_cells
from .sweeps import SWEEPS, check_sweeps, default_sweeps, sweep_cells
from .timing import is_cuda, measure_peaks


def select_impls(variants: Iterable[str], names: Iterable[str] | None = None) -> list[Impl]:
    """Available implementations of these variants (only the named ones, when names are given:
    "sdpa_flash" means that name in every variant, "dense/sdpa_flash" one variant,
    "package.module:object" the implementations that object holds)."""
    names = list(names or [])
    reg = registry(extra=[n for n in names if ":" in n])
    chosen = [i for v in variants for i in reg.select(v)]
    if names:
        unknown = [n for n in names if ":" not in n and not any(n in (i.name, i.key) for i in reg.impls.values())]
        if unknown:
            raise ValueError(f"impls: unknown implementation(s) {unknown}; known: {sorted(reg.impls)}")
        chosen = [i for i in chosen if i.name in names or i.key in names or i.origin in names]
    return slow.apply(chosen)


def finalize(rows: list[PerfRow], reference: str | dict | None = None) -> list[PerfRow]:
    """Fill speedup (reference time / this time, same cell) and the reference's name. A cell
    where the preferred reference did not run falls back to the variant's registry reference."""
    cells: dict[str, dict[str, PerfRow]] = defaultdict(dict)
    for r in rows:
        cells[cell_key(r.variant, r.mode, r.shape)][r.impl] = r
    for by_impl in cells.values():
        ok = [n for n, r in by_impl.items() if r.status == "ok" and r.ms]
        if not ok:
            continue
        ref = by_impl.get(resolve_reference(next(iter(by_impl.values())).variant, ok, reference))
        for r in by_impl.values():
            if ref is not None and r.status == "ok" and r.ms:
                r.speedup = rounded(ref.ms / r.ms)
                r.reference = ref.impl
    return rows


def run_bench(
    quick: bool,
    device: str | None,
    variants: Iterable[str] | None = None,
    impls: Iterable[str] | None = None,
    out: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    *,
    reference: str | dict | None = DEFAULT_REFERENCE,
    budget_s: float | None = -1,
    cells: list[Cell] | None = None,
    prewarm_workers: int | None = None,
    isolate: bool = True,
    deadline_s: float | None = None,
    sweeps: Iterable[str] | None = None,
) -> Results:
    """Sweep every available implementation of the selected variants; see the module docstring.

    quick: the small sweep (< 2 min on a 2-core CPU, a few minutes on an H100). device:
    "cpu", "cuda" or "cuda:N" (default: CUDA when present). impls: implementation names
    ("sdpa_flash" or "dense/sdpa_flash"). out: a .json path (or a directory, which gets
    bench.json). budget_s: the sweep's time budget (default per device and quick; None = none),
    prewarming included. prewarm_workers: processes that compile the compiling implementations
    first (perf/prewarm.py); None = one per spare core on CUDA, none on the CPU; 0 = off.
    isolate: time every pair in a child process (perf/isolate.py: a crash or a hang becomes a
    `crashed` / `timeout` row, and each implementation gets its own share of the budget); False
    runs them in this process. deadline_s: the per-cell deadline (default isolate.default_deadline).
    sweeps: names of registered sweeps (perf/sweeps.py; default: the device's default sweeps).
    A signal (procs.Interrupted, see procs.on_signals) ends the sweep's processes and carries the
    finished rows as `stop.partial`, a Results whose env["interrupted"] names the signal; the
    pairs not measured have no row.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device: unknown device {device!r}; 'cpu' or 'cuda[:n]'")
    if is_cuda(device) and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for but CUDA is not available")
    settings = Settings.default(quick, device)
    if budget_s != -1:
        settings = Settings(settings.warmup_ms, settings.rep_ms, settings.min_reps, settings.max_ms, budget_s)
    sweeps = list(sweeps or [])
    cells = cells if cells is not None else sweep_cells(quick, device, variants, sweeps)
    chosen = select_impls(sorted({c.variant for c in cells}, key=list(VARIANTS).index), impls)
    say = progress or (lambda msg: None)
    say(f"measuring the {device} peaks (matmul, copy)")
    started = time.perf_counter()
    results = Results(env=environment(), peaks=measure_peaks(device))
    results.env.update(bench_env(quick, device, settings, reference, sweeps or default_sweeps(device)))
    first_calls: list[dict] = []
    tuning: dict = {}
    try:
        warmed = _prewarm(cells, chosen, device, settings, prewarm_workers, say)
        if warmed is not None:
            results.env["prewarm"] = warmed.as_dict()
            if settings.budget_s is not None:
                settings = dataclasses.replace(settings, budget_s=max(settings.budget_s - warmed.seconds, 0.0))
        if isolate:
            rows = run_isolated(cells, chosen, settings=settings, peaks=results.peaks, progress=say,
                                first_calls=first_calls, deadline_s=deadline_s, tuning=tuning)
        else:
            rows = run_cells(cells, chosen, settings=settings, peaks=results.peaks, progress=say,
                             first_calls=first_calls)
            tuning = autotuner_picks(chosen)
    except procs.Interrupted as stop:  # the finished rows are kept: the callers write them as an interrupted run
        results.env["interrupted"] = stop.name
        stop.partial = _complete(results, getattr(stop, "rows", []), reference, first_calls, tuning, started)
        raise
    _complete(results, rows, reference, first_calls, tuning, started)
    if out is not None:
        save(results, out)
    return results


def _complete(results: Results, rows: list[PerfRow], reference, first_calls: list, tuning: dict,
              started: float) -> Results:
    """Put the rows into results with their speedups, and what the run recorded beside them."""
    results.perf = finalize(rows, reference)
    if first_calls:  # where the compiling implementations' first-call seconds went
        results.env["first_calls"] = first_calls
    if tuning:  # which configs the autotuners chose: a cell slower than last time may be a different pick
        results.env["tuning"] = tuning
    memory.attach(results)
    results.env["bench_seconds"] = round(time.perf_counter() - started, 1)
    return results


def _prewarm(cells, impls, device, settings, workers, say) -> prewarm.Summary | None:
    """Compile the compiling implementations' cells in parallel first (at most 40% of the budget)."""
    if workers is None:
        workers = prewarm.default_workers() if is_cuda(device) else 0
    groups = prewarm.plan([(c, i) for c in cells for i, reason in candidates(c, impls) if reason is None])
    if workers < 1 or not groups:
        return None
    limit = 0.4 * settings.budget_s if settings.budget_s is not None else 600.0
    say(f"prewarm: {len(groups)} (implementation, problem) groups on {min(workers, len(groups))} worker processes")
    summary = prewarm.prewarm(groups, workers, limit, say)
    say(f"prewarm: {summary.done} done, {len(summary.failed)} failed, {summary.timed_out} left, "
        f"{summary.seconds:.0f} s (serially {summary.worker_seconds:.0f} s)")
    return summary


def bench_env(quick: bool, device: str, settings: Settings, reference, sweeps: list[str]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "bench_sweep": "quick" if quick else "full",
        "bench_sweeps": sweeps,
        "bench_device": device,
        "bench_settings": dataclasses.asdict(settings),
        "bench_reference": reference,
        "l2_flush": is_cuda(device),
    }
    if slow.active():
        env["slowdown"] = slow.active()
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["sm_count"] = props.multi_processor_count
        env["l2_bytes"] = getattr(props, "L2_cache_size", None)
        env["gpu_memory_bytes"] = props.total_memory
    return env


def save(results: Results, out: str | os.PathLike) -> Path:
    path = Path(out)
    if path.suffix != ".json":
        path = path / "bench.json"
    return results.save(path)


def merge(paths: Iterable[str | os.PathLike], reference: str | dict | None = DEFAULT_REFERENCE) -> Results:
    """One Results from shards (pytest-xdist workers): rows concatenated, speedups recomputed."""
    runs = [Results.load(p) for p in paths]
    if not runs:
        raise ValueError("paths: nothing to merge")
    merged = Results(env=runs[0].env, peaks=runs[0].peaks)
    merged.env["shards"] = [{"device_name": r.env.get("device_name"), "peaks": r.peaks, "rows": len(r.perf)}
                            for r in runs]
    for r in runs:
        merged.perf += r.perf
    merged.perf = finalize(merged.perf, reference)
    return merged


def main(argv: list[str] | None = None) -> int:
    """The command line. SIGINT / SIGTERM end the sweep's processes, write the finished rows to
    --out (env["interrupted"] names the signal), print one line and exit 128 + the signal."""
    args = _parser().parse_args(argv)
    try:
        with procs.on_signals():
            try:
                return _main(args)
            finally:
                procs.kill_all()
    except procs.Interrupted as stop:
        partial = getattr(stop, "partial", None)
        kept = ""
        if args.out and partial is not None:
            kept = f"; {len(partial.perf)} finished row(s) written to {save(partial, args.out)} (interrupted run)"
        print(f"bench: stopped by {stop.name}; child processes ended{kept}", file=sys.stderr, flush=True)
        return 128 + stop.signum


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attnbench.perf.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sweep", action="append", default=None, help="a registered sweep (repeatable; see --list-sweeps)")
    p.add_argument("--list-sweeps", action="store_true", help="print the registered sweeps and exit")
    p.add_argument("--device", default=None)
    p.add_argument("--variant", action="append", default=None)
    p.add_argument("--impl", action="append", default=None)
    p.add_argument("--reference", default=DEFAULT_REFERENCE)
    p.add_argument("--budget", type=float, default=-1, help="sweep time budget in s (default per sweep; 0 = none)")
    p.add_argument("--prewarm", type=int, default=None,
                   help="worker processes that compile first (default: spare cores on CUDA, 0 on the CPU; 0 = off)")
    p.add_argument("--merge", nargs="+", default=None, help="merge xdist shard files instead of running")
    p.add_argument("--out", default=None)
    p.add_argument("--deadline", type=float, default=None,
                   help="per-cell deadline in s (default: ATTNBENCH_BENCH_DEADLINE, else 120 on a CPU, 600 on CUDA)")
    p.add_argument("--quiet", action="store_true")
    return p


def _main(args: argparse.Namespace) -> int:
    if args.list_sweeps:
        print(text.sweep_table(SWEEPS.values()))
        return 0
    if args.sweep:
        try:
            check_sweeps(args.sweep, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except ValueError as exc:
            _parser().error(str(exc))
    if args.merge:
        results = merge(args.merge, args.reference)
        memory.attach(results)
    else:
        budget = None if args.budget == 0 else args.budget
        say = None if args.quiet else (lambda msg: print(msg, flush=True))
        results = run_bench(args.quick, args.device, args.variant, args.impl, None, say,
                            reference=args.reference, budget_s=budget, prewarm_workers=args.prewarm,
                            deadline_s=args.deadline, sweeps=args.sweep)
    if args.out:
        print(f"wrote {save(results, args.out)}")
    print(f"peaks: {json.dumps(results.peaks)}")
    print(text.perf_table(results))
    fits = memory.memory_fits(results.perf)
    if fits:
        print(text.memory_table(fits))
    return 0


if __name__ == "__main__":
    # Run through the importable module, not this __main__ copy: the sweep's child processes
    # unpickle what this module hands them by their importable names.
    from attnbench.perf import bench as _bench

    sys.exit(_bench.main())
