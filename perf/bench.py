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
import gc
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnbench.registry import MODULE_VARIANTS, VARIANTS, Impl, registry
from attnbench.results import PerfRow, Results, environment, over_peak
from attnbench.spec import Inputs, Spec

from . import memory, prewarm, slow, work
from .gate import DEFAULT_REFERENCE, resolve_reference
from .isolate import run_isolated
from .sweeps import Cell, cell_key, sweep_cells
from .timing import is_cuda, measure_peaks, peak_memory, synchronize, time_call


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


# -- running one cell --------------------------------------------------------------------------


class KernelCase:
    """Inputs and the prepare/run pair for a kernel cell (dense / local variants)."""

    def __init__(self, impl: Impl, cell: Cell, input_sets: list) -> None:
        self.fn, self.cell, self.sets = impl.fn, cell, input_sets
        self.cfg = cell.spec.config()
        self.n_sets = len(input_sets)
        self.checked = False

    def call(self, inp):
        out = self.fn(inp.q, inp.k, inp.v, self.cfg, inp.key_padding_mask, inp.bias)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not self.checked:  # a wrong output is an error row, never a timing
            spec = self.cell.spec
            check_output(out, (spec.B, spec.Hq, spec.Sq, spec.Dv), spec.torch_dtype)
            self.checked = True
        return out

    def clear_grads(self, inp) -> None:
        for t in (inp.q, inp.k, inp.v, inp.bias):
            if t is not None:
                t.grad = None

    def prepare(self, i: int):
        inp = self.sets[i]
        if self.cell.mode == "fwd":
            return inp
        self.clear_grads(inp)
        if self.cell.mode == "bwd":  # the forward is untimed: only the backward is measured
            return self.call(inp), inp.grad_out
        return inp

    def run(self, state):
        mode = self.cell.mode
        if mode == "fwd":
            with torch.no_grad():
                return self.call(state)
        if mode == "bwd":
            out, grad = state
            out.backward(grad)
            return None
        out = self.call(state)
        out.backward(state.grad_out)
        return None

    def work(self) -> tuple[float, float]:
        spec, inp = self.cell.spec, self.sets[0]
        flops = work.attention_flops(spec, self.cell.mode, inp.key_padding_mask)
        return flops, work.attention_bytes(spec, self.cell.mode)


class ModuleCaseRunner:
    """A seed module built by the impl's factory, timed forward on (B, S, dim) inputs."""

    def __init__(self, impl: Impl, cell: Cell, n_sets: int) -> None:
        m = cell.module
        self.cell = cell
        dtype = getattr(torch, m.dtype)
        self.module = impl.fn(**m.ctor).to(device=m.device, dtype=dtype).eval()
        self.xs = []
        for seed in range(n_sets):
            g = torch.Generator().manual_seed(seed)
            self.xs.append(torch.randn(m.B, m.S, m.dim, generator=g, dtype=torch.float64).to(m.device, dtype))
        self.n_sets = n_sets
        self.checked = False

    def prepare(self, i: int):
        return self.xs[i]

    def run(self, x):
        with torch.no_grad():
            out = self.module(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not self.checked:  # a wrong output is an error row, never a timing
            check_output(out, tuple(x.shape), x.dtype)
            self.checked = True
        return out

    def work(self) -> tuple[float | None, float]:
        x = self.xs[0]
        flops = work.module_flops(self.cell.variant, self.cell.module.ctor, x, self.module, self.cell.mode)
        return flops, work.module_bytes(x, self.run(x), self.module.parameters())


def check_output(out, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raise ValueError unless out is a tensor of this shape and dtype."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"returned {type(out).__name__}, not a tensor")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"returned an output of shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise ValueError(f"returned {str(out.dtype).removeprefix('torch.')} for {str(dtype).removeprefix('torch.')} "
                         "inputs")


_OOM_TEXT = ("out of memory", "not enough memory", "defaultcpuallocator", "can't allocate memory")


def failure_status(exc: BaseException) -> str:
    """"oom" for running out of memory (CUDA, or the host: MemoryError, the CPU allocator's
    RuntimeError), else "error"."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return "oom"
    text = str(exc).lower()
    return "oom" if isinstance(exc, RuntimeError) and any(t in text for t in _OOM_TEXT) else "error"


def needs_for(cell: Cell) -> set[str]:
    return {"backward"} if cell.mode != "fwd" else set()


def why_not(impl: Impl, cell: Cell) -> str | None:
    """Why `impl` cannot run `cell`, or None."""
    if cell.spec is not None:
        return impl.why_not(cell.spec, needs_for(cell))
    if not impl.device_ok(cell.device):
        return f"device {cell.device} not supported"
    if cell.dtype not in impl.dtypes:
        return f"dtype {cell.dtype} not supported"
    missing = needs_for(cell) - impl.features
    return f"unsupported features: {', '.join(sorted(missing))}" if missing else None


def n_input_sets(cell: Cell) -> int:
    """Rotate several input sets when one set is cache-sized (a few MB on the CPU, < 64 MB on CUDA)."""
    if cell.spec is None:
        return 2
    nbytes = work.attention_bytes(cell.spec, "fwd")
    return 3 if nbytes < (64 << 20 if is_cuda(cell.device) else 8 << 20) else 1


def make_inputs(cell: Cell) -> list[Inputs]:
    """The cell's rotation of input sets (seeds seed, seed + 1, ...), differentiable so every
    mode of a problem shares them (the forward is timed under no_grad)."""
    return [perf_inputs(cell.spec.replace(seed=cell.spec.seed + i)) for i in range(n_input_sets(cell))]


def perf_inputs(spec: Spec) -> Inputs:
    """Seeded N(0, 1) inputs drawn on the spec's device: at benchmark sizes the contract's own
    draw (float64 on the CPU, then cast) takes seconds per problem. Specs with a bias or key
    padding use Spec.make_inputs, whose masks and biases follow the spec's fields exactly."""
    if spec.bias is not None or spec.has_padding:
        return spec.make_inputs(requires_grad=True)
    g = torch.Generator(device=spec.device).manual_seed(spec.seed)
    draw_dtype = torch.float64 if spec.dtype == "float64" else torch.float32

    def draw(*shape: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
        t = torch.randn(*shape, device=spec.device, dtype=draw_dtype, generator=g) * scale
        return t.to(spec.torch_dtype).requires_grad_(grad)

    m = spec.magnitude
    return Inputs(
        q=draw(spec.B, spec.Hq, spec.Sq, spec.D, scale=m),
        k=draw(spec.B, spec.Hkv, spec.Sk, spec.D, scale=m),
        v=draw(spec.B, spec.Hkv, spec.Sk, spec.Dv),
        key_padding_mask=None,
        bias=None,
        grad_out=draw(spec.B, spec.Hq, spec.Sq, spec.Dv, grad=False),
    )


def make_case(impl: Impl, cell: Cell, inputs: list | None = None) -> KernelCase | ModuleCaseRunner:
    """The prepare/run pair (and work model) for one implementation on one cell."""
    if cell.spec is not None:
        return KernelCase(impl, cell, inputs if inputs is not None else make_inputs(cell))
    return ModuleCaseRunner(impl, cell, n_input_sets(cell))


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
    row = _blank(cell, impl, "ok", "")
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
        row.tflops = _round(work.tflops(flops, row.ms))
        row.gbps = _round(work.gbps(nbytes, row.ms))
        if row.tflops is not None and peaks.get("matmul_tflops"):
            row.pct_peak = _round(100 * row.tflops / peaks["matmul_tflops"])
            if over_peak(row.pct_peak):
                row.reason = "; ".join(filter(None, [row.reason, (
                    f"measurement error: {row.pct_peak:.0f}% of the measured matmul peak "
                    f"({peaks['matmul_tflops']:g} TFLOP/s): the peak probe read low or the work model over-counts")]))
        if row.gbps is not None and peaks.get("copy_gbps"):
            row.pct_bw = _round(100 * row.gbps / peaks["copy_gbps"])
        if flops is None:
            row.reason = "no work model for this variant: TFLOP/s not reported"
    except Exception as exc:  # one broken implementation never aborts the sweep
        row.status, row.reason = failure_status(exc), _reason(exc)
    finally:
        del case
        if row.status != "ok":
            _release(cell.device)
    return row


def _time(case, cell: Cell, settings: Settings, row: PerfRow):
    kw = dict(device=cell.device, warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms,
              min_reps=settings.min_reps, max_ms=settings.max_ms,
              n_sets=case.n_sets)
    if cell.graph and is_cuda(cell.device):
        try:
            return time_call(case.prepare, case.run, graph=True, **kw)
        except Exception as exc:  # not capturable: time it eagerly and say so
            row.reason = f"CUDA graph capture failed ({_reason(exc)}); timed eagerly"
            _release(cell.device)
    return time_call(case.prepare, case.run, **kw)


def _reason(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:400]}"


def _round(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _release(device: str) -> None:
    gc.collect()
    if is_cuda(device):
        try:
            synchronize(device)
            torch.cuda.empty_cache()
        except Exception:  # a poisoned context: the next cells will say so in their rows
            pass


# -- the sweep ---------------------------------------------------------------------------------


def candidates(cell: Cell, impls: list[Impl]) -> list[tuple[Impl, str | None]]:
    """The implementations of the cell's variant that run on its device, with why_not reasons."""
    return [(i, why_not(i, cell)) for i in impls if i.variant == cell.variant and i.device_ok(cell.device)]


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


def run_cells(
    cells: list[Cell],
    impls: list[Impl],
    *,
    settings: Settings,
    peaks: dict,
    progress: Callable[[str], None] | None = None,
    first_calls: list | None = None,
) -> list[PerfRow]:
    """Run every (cell, implementation) pair; rows in cell order. first_calls: see measure."""
    say = progress or (lambda msg: None)
    start = time.perf_counter()
    plan = [(cell, impl, reason) for cell in cells for impl, reason in candidates(cell, impls)]
    rows: list[PerfRow] = []
    first_calls = first_calls if first_calls is not None else []
    cache = InputCache()
    for n, (cell, impl, reason) in enumerate(plan, 1):
        elapsed = time.perf_counter() - start
        if reason is not None:
            row = _blank(cell, impl, "unsupported", reason)
        elif settings.budget_s is not None and elapsed > settings.budget_s:
            row = _blank(cell, impl, "skipped", f"sweep time budget of {settings.budget_s:.0f} s spent")
        else:
            try:
                inputs = cache.get(cell)
            except Exception as exc:
                row = _blank(cell, impl, failure_status(exc), _reason(exc))
            else:
                row = measure(impl, cell, settings, peaks, inputs, first_calls)
        rows.append(row)
        say(f"[{n}/{len(plan)} {time.perf_counter() - start:.0f}s] {cell.label()} · {impl.name}: {_describe(row)}")
    cache.clear()
    return rows


class InputCache:
    """The input sets of the last kernel cell: the implementations of a cell (and its modes
    that share inputs) reuse them; a new problem frees the old one first."""

    def __init__(self) -> None:
        self.key = None
        self.inputs: list | None = None

    def get(self, cell: Cell) -> list | None:
        if cell.spec is None:
            return None
        key = cell.spec  # every mode of a problem shares its inputs
        if key != self.key:
            device = cell.device
            self.clear(device)
            self.inputs = make_inputs(cell)
            self.key = key
        return self.inputs

    def clear(self, device: str = "cpu") -> None:
        self.key, self.inputs = None, None
        _release(device)


def _blank(cell: Cell, impl: Impl, status: str, reason: str) -> PerfRow:
    return PerfRow(variant=cell.variant, impl=impl.name, mode=cell.mode, shape=cell.shape(), status=status,
                   reason=reason, timer="cuda_events" if is_cuda(cell.device) else "wall_clock")


def _describe(row: PerfRow) -> str:
    if row.status != "ok":
        return f"{row.status} ({row.reason[:80]})"
    tf = f", {row.tflops:.1f} TFLOP/s" if row.tflops is not None else ""
    return f"{row.ms:.4g} ms{tf}"


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
                r.speedup = _round(ref.ms / r.ms)
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
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device: unknown device {device!r}; 'cpu' or 'cuda[:n]'")
    if is_cuda(device) and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for but CUDA is not available")
    settings = Settings.default(quick, device)
    if budget_s != -1:
        settings = Settings(settings.warmup_ms, settings.rep_ms, settings.min_reps, settings.max_ms, budget_s)
    cells = cells if cells is not None else sweep_cells(quick, device, variants)
    chosen = select_impls(sorted({c.variant for c in cells}, key=list(VARIANTS).index), impls)
    say = progress or (lambda msg: None)
    say(f"measuring the {device} peaks (matmul, copy)")
    started = time.perf_counter()
    results = Results(env=environment(), peaks=measure_peaks(device))
    results.env.update(bench_env(quick, device, settings, reference))
    warmed = _prewarm(cells, chosen, device, settings, prewarm_workers, say)
    if warmed is not None:
        results.env["prewarm"] = warmed.as_dict()
        if settings.budget_s is not None:
            settings = dataclasses.replace(settings, budget_s=max(settings.budget_s - warmed.seconds, 0.0))
    first_calls: list[dict] = []
    if isolate:
        tuning: dict = {}
        rows = run_isolated(cells, chosen, settings=settings, peaks=results.peaks, progress=say,
                            first_calls=first_calls, deadline_s=deadline_s, tuning=tuning)
    else:
        rows = run_cells(cells, chosen, settings=settings, peaks=results.peaks, progress=say, first_calls=first_calls)
        tuning = autotuner_picks(chosen)
    results.perf = finalize(rows, reference)
    if first_calls:  # where the compiling implementations' first-call seconds went
        results.env["first_calls"] = first_calls
    if tuning:  # which configs the autotuners chose: a cell slower than last time may be a different pick
        results.env["tuning"] = tuning
    memory.attach(results)
    results.env["bench_seconds"] = round(time.perf_counter() - started, 1)
    if out is not None:
        save(results, out)
    return results


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
            got = {"error": _reason(exc)}
        if got:
            picks[impl.key] = got
    return picks


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


def bench_env(quick: bool, device: str, settings: Settings, reference) -> dict[str, Any]:
    env: dict[str, Any] = {
        "bench_sweep": "quick" if quick else "full",
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


def table(results: Results) -> str:
    """A compact plain-text table of the perf rows (the end of a device run's output)."""
    lines = [f"{'cell':58} {'impl':22} {'ms':>9} {'TF/s':>7} {'%pk':>5} {'MiB':>8} {'x ref':>6}"]
    for r in results.perf:
        if r.status == "unsupported":
            continue
        label = _row_label(r)
        if r.status != "ok":
            lines.append(f"{label:58} {r.impl:22} {r.status}: {r.reason[:60]}")
            continue
        mem = f"{r.mem_bytes / 2**20:.1f}" if r.mem_bytes is not None else "-"
        tf = f"{r.tflops:.3g}" if r.tflops is not None else "-"
        pk = f"{r.pct_peak:.0f}{'!' if over_peak(r.pct_peak) else ''}" if r.pct_peak is not None else "-"
        sp = f"{r.speedup:.2f}" if r.speedup is not None else "-"
        lines.append(f"{label:58} {r.impl:22} {r.ms:9.4f} {tf:>7} {pk:>5} {mem:>8} {sp:>6}")
    return "\n".join(lines)


def _row_label(r: PerfRow) -> str:
    s = r.shape
    if r.variant in MODULE_VARIANTS:
        return f"{r.variant} B{s.get('B')} S{s.get('S')} {r.mode}"
    sq = f"S{s['Sq']}" if s["Sq"] == s["Sk"] else f"S{s['Sq']}x{s['Sk']}"
    h = f"H{s['Hq']}" + (f"/{s['Hkv']}" if s["Hkv"] != s["Hq"] else "")
    extra = (" c" if s.get("causal") else "") + (f" w{s['window'][0]}" if s.get("window") else "")
    extra += f" blk{s['block'][0]}" if s.get("block") else ""
    return f"{r.variant} B{s['B']} {h} {sq} D{s['D']}{extra} {s['dtype'][:4]} {r.mode}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnbench.perf.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
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
    args = p.parse_args(argv)
    if args.merge:
        results = merge(args.merge, args.reference)
        memory.attach(results)
    else:
        budget = None if args.budget == 0 else args.budget
        say = None if args.quiet else (lambda msg: print(msg, flush=True))
        results = run_bench(args.quick, args.device, args.variant, args.impl, None, say,
                            reference=args.reference, budget_s=budget, prewarm_workers=args.prewarm,
                            deadline_s=args.deadline)
    if args.out:
        print(f"wrote {save(results, args.out)}")
    print(f"peaks: {json.dumps(results.peaks)}")
    print(table(results))
    fits = memory.memory_fits(results.perf)
    if fits:
        print(memory.table(fits))
    return 0


if __name__ == "__main__":
    # Run through the importable module, not this __main__ copy: the sweep pickles Settings and
    # Cell for its child processes, which must find them as attnbench.perf.bench.Settings.
    from attnbench.perf import bench as _bench

    sys.exit(_bench.main())
