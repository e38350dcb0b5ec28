"""Measuring: time one implementation on one cell, or a list of cells in this process.

`measure` turns every failure into a row (status "oom" or "error" with the reason), never an
exception; `run_cells` walks (cell, implementation) pairs under the sweep's time budget.
perf/isolate.py runs the same `measure` in child processes; perf/bench.py drives both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from attnbench.procs import Interrupted
from attnbench.registry import Impl
from attnbench.reports.text import row_brief
from attnbench.results import PerfRow, over_peak

from . import work
from .cases import InputCache, candidates, make_case, release
from .cells import Cell
from .timing import is_cuda, peak_memory, time_call


@dataclass(frozen=True)
class Settings:
    """How hard to time: warm-up and repetition budgets (ms), and the sweep's time budget (s)."""

    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_ms: float  # per timing: a slower call gets fewer repetitions
    budget_s: float | None  # whole sweep: cells after it are recorded as skipped

    @classmethod
    def default(cls, quick: bool, device: str) -> Settings:
        if is_cuda(device):
            return cls(10, 50, 5, 1500, 300) if quick else cls(15, 100, 10, 2000, 540)
        return cls(2, 15, 3, 300, 80) if quick else cls(5, 50, 3, 2000, 900)


_OOM_TEXT = ("out of memory", "not enough memory", "defaultcpuallocator", "can't allocate memory")


def failure_status(exc: BaseException) -> str:
    """"oom" for running out of memory (CUDA, or the host: MemoryError, the CPU allocator's
    RuntimeError), else "error"."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return "oom"
    text = str(exc).lower()
    return "oom" if isinstance(exc, RuntimeError) and any(t in text for t in _OOM_TEXT) else "error"


_CACHE_COUNTERS = (("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
                   ("aot_autograd", "autograd_cache_hit"), ("aot_autograd", "autograd_cache_miss"))


def compile_cache_counts() -> dict[str, int]:
    """torch.compile's on-disk cache hits and misses so far in this process (FX graphs, AOT
    autograd): whether a compiled implementation's first call loaded what prewarm built."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {name: int(counters[group][name]) for group, name in _CACHE_COUNTERS}


def measure(impl: Impl, cell: Cell, settings: Settings, peaks: dict, inputs: list | None = None,
            first_calls: list | None = None) -> PerfRow:
    """Time one implementation on one cell; failures become rows, never exceptions.
    first_calls: for implementations that compile, gets the cache counts of their first call."""
    row = blank_row(cell, impl, "ok", "")
    case = None
    before = compile_cache_counts() if impl.compiles and first_calls is not None else None
    try:
        case = make_case(impl, cell, inputs)
        flops, nbytes = case.work()
        timing = _time(case, cell, settings, row)
        row.ms, row.ms_p20, row.ms_p80, row.timer = timing.ms, timing.p20, timing.p80, timing.timer
        row.reps, row.first_ms = timing.reps, round(timing.first_ms, 3)
        if timing.host_ms is not None:
            row.host_ms = round(timing.host_ms, 4)
        if before is not None:
            after = compile_cache_counts()
            first_calls.append({"impl": impl.key, "cell": cell.label(), "first_ms": row.first_ms,
                                **{k: after[k] - before[k] for k in after if after[k] != before[k]}})
        row.mem_bytes = peak_memory(case.prepare, case.run, cell.device)
        row.tflops = rounded(work.tflops(flops, row.ms))
        row.gbps = rounded(work.gbps(nbytes, row.ms))
        if row.tflops is not None and peaks.get("matmul_tflops"):
            row.pct_peak = rounded(100 * row.tflops / peaks["matmul_tflops"])
            if over_peak(row.pct_peak):
                row.reason = "; ".join(filter(None, [row.reason, (
                    f"measurement error: {row.pct_peak:.0f}% of the measured matmul peak "
                    f"({peaks['matmul_tflops']:g} TFLOP/s): the peak probe read low or the work model over-counts")]))
        if row.gbps is not None and peaks.get("copy_gbps"):
            row.pct_bw = rounded(100 * row.gbps / peaks["copy_gbps"])
        if flops is None:
            row.reason = "no work model for this variant: TFLOP/s not reported"
    except Exception as exc:  # one broken implementation never aborts the sweep
        row.status, row.reason = failure_status(exc), reason_of(exc)
    finally:
        del case
        if row.status != "ok":
            release(cell.device)
    return row


def _time(case, cell: Cell, settings: Settings, row: PerfRow):
    kw = dict(device=cell.device, warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms,
              min_reps=settings.min_reps, max_ms=settings.max_ms,
              n_sets=case.n_sets)
    if cell.graph and is_cuda(cell.device):
        try:
            return time_call(case.prepare, case.run, graph=True, **kw)
        except Exception as exc:  # not capturable: time it eagerly and say so
            row.reason = f"CUDA graph capture failed ({reason_of(exc)}); timed eagerly"
            release(cell.device)
    return time_call(case.prepare, case.run, **kw)


def reason_of(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:400]}"


def rounded(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def run_cells(
    cells: list[Cell],
    impls: list[Impl],
    *,
    settings: Settings,
    peaks: dict,
    progress: Callable[[str], None] | None = None,
    first_calls: list | None = None,
) -> list[PerfRow]:
    """Run every (cell, implementation) pair; rows in cell order. first_calls: see measure. A
    signal (procs.Interrupted) carries the finished rows as `stop.rows`."""
    say = progress or (lambda msg: None)
    start = time.perf_counter()
    plan = [(cell, impl, reason) for cell in cells for impl, reason in candidates(cell, impls)]
    rows: list[PerfRow] = []
    first_calls = first_calls if first_calls is not None else []
    cache = InputCache()
    try:
        for n, (cell, impl, reason) in enumerate(plan, 1):
            elapsed = time.perf_counter() - start
            if reason is not None:
                row = blank_row(cell, impl, "unsupported", reason)
            elif settings.budget_s is not None and elapsed > settings.budget_s:
                row = blank_row(cell, impl, "skipped", f"sweep time budget of {settings.budget_s:.0f} s spent")
            else:
                try:
                    inputs = cache.get(cell)
                except Exception as exc:
                    row = blank_row(cell, impl, failure_status(exc), reason_of(exc))
                else:
                    row = measure(impl, cell, settings, peaks, inputs, first_calls)
            rows.append(row)
            say(f"[{n}/{len(plan)} {time.perf_counter() - start:.0f}s] {cell.label()} · {impl.name}: {row_brief(row)}")
    except Interrupted as stop:  # the rows that finished go with it: run_bench keeps them
        stop.rows = rows
        raise
    cache.clear()
    return rows


def blank_row(cell: Cell, impl: Impl, status: str, reason: str) -> PerfRow:
    return PerfRow(variant=cell.variant, impl=impl.name, mode=cell.mode, shape=cell.shape(), status=status,
                   reason=reason, timer="cuda_events" if is_cuda(cell.device) else "wall_clock")


def autotuner_picks(impls: Iterable[Impl]) -> dict[str, dict]:
    """{impl key: its autotuner's picks} for implementations that declare `tuning`; a failing
    report is recorded as its error, never raised."""
    picks, seen = {}, set()
    for impl in impls:
        if impl.tuning is None or impl.tuning in seen:  # one kernel serving two variants reports once
            continue
        seen.add(impl.tuning)
        try:
            got = impl.tuning()
        except Exception as exc:
            got = {"error": reason_of(exc)}
        if got:
            picks[impl.key] = got
    return picks
