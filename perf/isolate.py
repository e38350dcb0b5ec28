"""The sweep's (cell, implementation) pairs run in a child process, one pair at a time.

The parent sends the child the index of the next pair on its stdin; the child times it with
`measure.measure` and answers one `@@attnbench {...}` line holding the row. The parent:

- kills the child (and its process group) when a pair takes longer than the per-cell deadline
  and records a `timeout` row, or records a `crashed` row with the exit code or signal when the
  child dies; then starts a new child for the pairs left. An implementation that crashes or
  times out MAX_FAULTS_PER_IMPL times has its remaining cells recorded as skipped;
- gives every implementation its own share of the sweep's time budget (`Budgets`), so one slow
  implementation cannot spend the time of another.

    python -m attnbench.perf.isolate PLAN     # the child; PLAN is a pickle written by the parent
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from attnbench import procs
from attnbench.procs import STREAM_PREFIX
from attnbench.registry import Impl
from attnbench.reports.text import row_brief
from attnbench.results import PerfRow

from . import slow
from .cases import InputCache, candidates
from .cells import Cell
from .measure import autotuner_picks, blank_row, failure_status, measure, reason_of

MAX_FAULTS_PER_IMPL = 2  # crashes + timeouts of one implementation before its other cells are skipped
READY_S = 600.0  # a child that has not imported torch and the registry by then is taken as hung


def default_deadline(device: str) -> float:
    """Seconds one (cell, implementation) pair may take: ATTNBENCH_BENCH_DEADLINE, else 120 s on
    a CPU (the slowest quick-sweep cell took 9 s on a loaded 2-core box) and 600 s on CUDA (a
    first call may compile for minutes when prewarming did not cover it)."""
    seconds = procs.seconds_setting("ATTNBENCH_BENCH_DEADLINE")
    if seconds is not None:
        return seconds
    return 120.0 if device.split(":")[0] == "cpu" else 600.0


class Budgets:
    """Per-implementation shares of the sweep's time budget (seconds spent in cells).

    While the sweep is within its budget every pair runs. Once it is spent, an implementation
    still runs until it has had its own share (the budget / the implementations with cells):
    one slow implementation cannot spend the others' time. The sweep then takes at most about
    twice its budget, and a run that fits its budget is not cut."""

    def __init__(self, total: float | None, impls: list[str]) -> None:
        self.total = total
        self.spent: dict[str, float] = defaultdict(float)
        n = len(set(impls))
        self.share = total / n if total is not None and n else 0.0

    def allows(self, impl: str) -> bool:
        if self.total is None or sum(self.spent.values()) < self.total:
            return True
        return self.spent[impl] < self.share

    def charge(self, impl: str, seconds: float) -> None:
        self.spent[impl] += seconds


@dataclass
class Plan:
    """What the child needs: the pairs (cell, implementation key), the settings and peaks, and
    the --impl targets to load beyond the registry."""

    pairs: list[tuple[Cell, str]]
    settings: object
    peaks: dict
    targets: list[str]


@dataclass
class _Worker:
    proc: subprocess.Popen
    lines: procs.Lines
    tail: list[str] = field(default_factory=list)
    ready: bool = False

    def read(self, timeout: float) -> dict | None:
        """The next protocol event; None when the child ended; TimeoutError after timeout s."""
        end = time.monotonic() + timeout
        while True:
            line = self.lines.get(max(end - time.monotonic(), 0.0))
            if line is None:
                return None
            if line.startswith(STREAM_PREFIX):
                try:
                    return json.loads(line[len(STREAM_PREFIX):])
                except ValueError:  # torn by the child's death
                    pass
            self.tail.append(line)
            del self.tail[:-50]

    def send(self, text: str) -> bool:
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            procs.kill_tree(self.proc)
        procs.reap(self.proc)


def run_isolated(
    cells: list[Cell],
    impls: list[Impl],
    *,
    settings,
    peaks: dict,
    progress: Callable[[str], None] | None = None,
    first_calls: list | None = None,
    deadline_s: float | None = None,
    tuning: dict | None = None,
) -> list[PerfRow]:
    """Like measure.run_cells, each pair timed in a child process; rows in cell order.
    tuning: gets the autotuner picks the children report when they finish. A signal
    (procs.Interrupted) stops the worker and carries the finished rows as `stop.rows`."""
    say = progress or (lambda msg: None)
    plan = [(cell, impl, reason) for cell in cells for impl, reason in candidates(cell, impls)]
    runnable = [k for k, (_, _, reason) in enumerate(plan) if reason is None]
    if not plan:
        return []
    device = plan[0][0].device
    deadline_s = deadline_s if deadline_s is not None else default_deadline(device)
    budgets = Budgets(settings.budget_s, [plan[k][1].key for k in runnable])
    faults: Counter = Counter()
    rows: list[PerfRow] = []
    start = time.perf_counter()
    targets = sorted({i.origin for i in impls if ":" in (i.origin or "")})
    worker: _Worker | None = None
    with tempfile.TemporaryDirectory(prefix="attnbench-bench-") as tmp:
        plan_file = Path(tmp) / "plan.pickle"
        plan_file.write_bytes(pickle.dumps(Plan([(c, i.key) for c, i, _ in plan], settings, peaks, targets)))
        try:
            for n, (cell, impl, reason) in enumerate(plan):
                if reason is not None:
                    row = blank_row(cell, impl, "unsupported", reason)
                elif faults[impl.key] >= MAX_FAULTS_PER_IMPL:
                    row = blank_row(cell, impl, "skipped",
                                 f"not run: {impl.key} crashed or timed out {faults[impl.key]} times in this sweep")
                elif not budgets.allows(impl.key):
                    row = blank_row(cell, impl, "skipped", f"sweep time budget of {budgets.total:.0f} s spent, and its "
                                 f"own share ({budgets.share:.0f} s) too")
                else:
                    if worker is None:
                        worker = _start(plan_file, device)
                    row, seconds, worker = _run_pair(worker, n, cell, impl, deadline_s, first_calls)
                    budgets.charge(impl.key, seconds)
                    if row.status in ("crashed", "timeout"):
                        faults[impl.key] += 1
                rows.append(row)
                say(f"[{n + 1}/{len(plan)} {time.perf_counter() - start:.0f}s] {cell.label()} · {impl.name}: "
                    f"{row_brief(row)}")
            if worker is not None and tuning is not None:
                tuning.update(_finish(worker))
        except procs.Interrupted as stop:  # the rows that finished go with it: run_bench keeps them
            stop.rows = rows
            raise
        finally:
            if worker is not None:
                worker.stop()
    return rows


def _start(plan_file: Path, device: str) -> _Worker | None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")
    proc = procs.spawn([sys.executable, "-P", "-m", "attnbench.perf.isolate", str(plan_file)], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    return _Worker(proc, procs.Lines(proc.stdout))


def _run_pair(worker: _Worker, n: int, cell: Cell, impl: Impl, deadline_s: float,
              first_calls: list | None) -> tuple[PerfRow, float, _Worker | None]:
    """Run pair n in the worker: (its row, seconds it took, the worker to use next: None after a
    crash, a timeout or a worker that could not start; the next pair starts a fresh one)."""
    if not worker.ready:
        try:
            hello = worker.read(READY_S)
        except TimeoutError:
            hello = {"error": f"the bench worker did not start within {READY_S:.0f} s"}
        if hello is None or "error" in hello:
            code = worker.proc.poll()
            worker.stop()
            why = (hello or {}).get("error") or f"the bench worker died while starting (exit code {code})"
            return blank_row(cell, impl, "crashed", why + _last(worker.tail)), 0.0, None
        worker.ready = True
    t0 = time.monotonic()
    event = None
    if worker.send(str(n)):
        try:
            event = worker.read(deadline_s)
        except TimeoutError:
            worker.stop()
            row = blank_row(cell, impl, "timeout", f"timeout: still running after the {deadline_s:.0f} s per-cell "
                         "deadline; the worker process was killed" + _last(worker.tail))
            return row, deadline_s, None
    seconds = time.monotonic() - t0
    if event is None:  # the worker died in this pair
        try:
            code = worker.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # its output closed but it lives on: end it
            code = procs.kill_tree(worker.proc)
        worker.stop()
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return blank_row(cell, impl, "crashed", f"crashed: the worker process died ({how})" + _last(worker.tail)), seconds, None
    first = event.pop("first_call", None)
    if first and first_calls is not None:
        first_calls.append(first)
    return _perf_row(event), seconds, worker


def _finish(worker: _Worker) -> dict:
    """Ask a live worker for its autotuner picks; it exits after answering."""
    if worker.proc.poll() is not None or not worker.send("end"):
        return {}
    try:
        event = worker.read(60.0)
    except TimeoutError:
        return {}
    return (event or {}).get("tuning", {})


def _last(tail: list[str]) -> str:
    lines = [x for x in tail if x.strip()][-3:]
    return ("; last output: " + " | ".join(lines)[-300:]) if lines else ""


def _perf_row(data: dict) -> PerfRow:
    known = PerfRow.__dataclass_fields__
    return PerfRow(**{k: v for k, v in data.items() if k in known})


# -- the child ---------------------------------------------------------------------------------


def _emit(out, event: dict) -> None:
    out.write("\n" + STREAM_PREFIX + json.dumps(event, default=str) + "\n")
    out.flush()


def worker_main(plan_file: str) -> int:
    """Answer each index read from stdin with that pair's row; `end`: the autotuner picks, then exit."""
    import dataclasses

    out = sys.stdout
    try:
        plan: Plan = pickle.loads(Path(plan_file).read_bytes())
        from attnbench.registry import registry

        reg = registry(extra=plan.targets)
        impls = {k: slow.apply([reg.get(k)])[0] for k in {key for _, key in plan.pairs}}
    except Exception as exc:  # reported against the pair the parent asks for first
        _emit(out, {"error": f"the bench worker could not start: {type(exc).__name__}: {exc}"})
        return 1
    _emit(out, {"ready": True})
    cache = InputCache()
    ran: list[Impl] = []
    for line in sys.stdin:
        command = line.strip()
        if command == "end":
            _emit(out, {"tuning": autotuner_picks(ran)})
            return 0
        cell, key = plan.pairs[int(command)]
        impl = impls[key]
        ran.append(impl)
        first: list = []
        try:
            inputs = cache.get(cell)
        except Exception as exc:
            row = blank_row(cell, impl, failure_status(exc), reason_of(exc))
        else:
            row = measure(impl, cell, plan.settings, plan.peaks, inputs, first)
        data = dataclasses.asdict(row)
        if first:
            data["first_call"] = first[0]
        _emit(out, data)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
