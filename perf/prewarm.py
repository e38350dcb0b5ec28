"""Compile before timing: the first calls of implementations that compile, in parallel.

A cold CUDA sweep spent 320 of its 498 s in first calls: Triton autotuning (every config of
every kernel compiled one after another) and torch.compile (one static graph per shape and
mode), all on one CPU core. `prewarm` runs those first calls in worker processes, one
(implementation, problem) group per task, so the compilers fill their on-disk caches (Triton's
kernel cache, Inductor's FX-graph and autotune caches) on many cores at once. The sweep then
times every implementation in the parent process as before: its first calls load compiled
code instead of building it (Triton still benchmarks its configs, on an idle GPU, so the
config it picks is not chosen under the workers' contention).

Which implementations: those that declare `compiles=True`. A failure in a worker is recorded
and otherwise ignored: the sweep runs that pair again and records what happens there.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from attnbench.registry import Impl

from .sweeps import Cell

# per worker: one compile thread each, so N workers use about N cores
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Group:
    """One task: an implementation's first call on every mode of one problem (the modes of a
    problem share kernels, so one worker compiling them all does each compile once)."""

    impl_key: str
    impl_origin: str
    cells: list[Cell]

    def label(self) -> str:
        return f"{self.impl_key} on {self.cells[0].label()} ({', '.join(c.mode for c in self.cells)})"


@dataclass
class Summary:
    workers: int = 0
    groups: int = 0
    done: int = 0
    seconds: float = 0.0
    worker_seconds: float = 0.0  # summed over tasks: the serial time it replaced
    failed: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # groups not finished when prewarming stopped

    @property
    def timed_out(self) -> int:
        return len(self.left)

    def as_dict(self) -> dict:
        return {
            "workers": self.workers, "groups": self.groups, "done": self.done, "seconds": round(self.seconds, 1),
            "worker_seconds": round(self.worker_seconds, 1), "failed": self.failed, "timed_out": self.timed_out,
            "left": self.left,
        }


def plan(pairs: list[tuple[Cell, Impl]]) -> list[Group]:
    """Group the runnable (cell, impl) pairs of compiling impls by (impl, problem); the groups
    with the most modes first (they take longest)."""
    groups: dict[tuple, Group] = {}
    for cell, impl in pairs:
        if not impl.compiles:
            continue
        problem = cell.spec if cell.spec is not None else cell.module
        key = (impl.key, problem)
        if key not in groups:
            groups[key] = Group(impl.key, impl.origin, [])
        groups[key].cells.append(cell)
    return sorted(groups.values(), key=lambda g: -len(g.cells))


def default_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 2) - 2))


def prewarm(
    groups: list[Group],
    workers: int,
    timeout_s: float,
    progress: Callable[[str], None] | None = None,
) -> Summary:
    """Run each group's first calls in `workers` spawned processes, at most `timeout_s` in all.
    Stragglers are cut short: from the moment fewer groups are left than workers (every group has
    started), the rest get 1.5x the longest group seen (a worker once sat 115 s past all others)."""
    say = progress or (lambda msg: None)
    summary = Summary(workers=min(workers, len(groups)), groups=len(groups))
    if not groups or workers < 1:
        return summary
    start = time.perf_counter()
    deadline = start + timeout_s
    longest, all_started = 0.0, None
    pending = set(range(len(groups)))
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with _env(WORKER_ENV), ctx.Pool(summary.workers) as pool:
        results = pool.imap_unordered(_warm, list(enumerate(groups)))
        for _ in groups:
            try:
                i, seconds, error = results.next(timeout=max(deadline - time.perf_counter(), 0.001))
            except multiprocessing.TimeoutError:
                summary.left = [groups[j].label() for j in sorted(pending)]
                say(f"prewarm: stopped after {time.perf_counter() - start:.0f} s, {len(pending)} groups left "
                    "to the sweep: " + "; ".join(summary.left))
                break
            pending.discard(i)
            longest = max(longest, seconds)
            if all_started is None and len(pending) < summary.workers:
                all_started = time.perf_counter()
            if all_started is not None:
                deadline = min(start + timeout_s, all_started + 1.5 * max(longest, 10.0))
            summary.worker_seconds += seconds
            if error is None:
                summary.done += 1
            else:
                summary.failed.append(f"{groups[i].label()}: {error}")
            say(f"prewarm [{summary.done + len(summary.failed)}/{len(groups)} {time.perf_counter() - start:.0f}s] "
                f"{groups[i].label()}: {'ok' if error is None else error[:100]} ({seconds:.1f} s)")
        pool.terminate()
    summary.seconds = time.perf_counter() - start
    return summary


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Spawned children copy os.environ when they start: set it around the pool."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _warm(task: tuple[int, Group]) -> tuple[int, float, str | None]:
    """In a worker: one untimed call per cell of the group; returns (index, seconds, error)."""
    i, group = task
    start = time.perf_counter()
    try:
        impl = _resolve(group)
        from .bench import make_case
        from .timing import synchronize

        for cell in group.cells:
            case = make_case(impl, cell)
            case.run(case.prepare(0))
            synchronize(cell.device)
            del case
    except Exception as exc:  # recorded; the sweep itself will run (and record) this pair
        return i, time.perf_counter() - start, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return i, time.perf_counter() - start, None


def _resolve(group: Group) -> Impl:
    from attnbench.registry import registry

    reg = registry()
    if group.impl_key not in reg.impls and ":" in group.impl_origin:
        reg.load_spec(group.impl_origin)  # named on the command line (package.module:object)
    if group.impl_key not in reg.impls:
        raise KeyError(f"implementation {group.impl_key!r} not found in the worker process")
    return reg.impls[group.impl_key]
