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

import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from attnbench.registry import Impl

from .cases import make_case
from .cells import Cell
from .timing import synchronize

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
    stacks: dict[str, str] = field(default_factory=dict)  # left group -> its worker's Python stacks then

    @property
    def timed_out(self) -> int:
        return len(self.left)

    def as_dict(self) -> dict:
        return {
            "workers": self.workers, "groups": self.groups, "done": self.done, "seconds": round(self.seconds, 1),
            "worker_seconds": round(self.worker_seconds, 1), "failed": self.failed, "timed_out": self.timed_out,
            "left": self.left, "stacks": self.stacks,
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

    Each worker has its own task and result pipes (no queue shared between workers): a worker
    that dies (a segfault, os._exit, the kernel's out-of-memory killer) fails its own group at
    once, with its exit code or signal, and cannot wedge the others. In multiprocessing.Pool a
    dead worker's task is never reported, and one killed while holding the shared queue's lock
    blocks every other worker; on an H200 12 of 46 groups were left that way (4 workers gone,
    6 sleeping). A dead worker is not replaced: the survivors take the remaining groups.
    Stragglers are cut short (see _stragglers); before that, each straggler's worker dumps its
    Python stacks (SIGUSR1, faulthandler) into `Summary.stacks`."""
    say = progress or (lambda msg: None)
    summary = Summary(workers=min(workers, len(groups)), groups=len(groups))
    if not groups or workers < 1:
        return summary
    share_triton_cache()
    start = time.monotonic()
    longest = 0.0
    unsent = list(range(len(groups)))
    running: dict[_Worker, int] = {}
    started: dict[int, tuple[int, float]] = {}  # group -> (worker pid, monotonic start)
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with tempfile.TemporaryDirectory(prefix="attnbench-prewarm-") as stack_dir:
        with _env(WORKER_ENV):
            idle = [_Worker(ctx, stack_dir) for _ in range(summary.workers)]
        live = list(idle)
        try:
            while unsent or running:
                while idle and unsent:
                    worker, i = idle.pop(), unsent.pop(0)
                    worker.send(i, groups[i])
                    running[worker] = i
                if not running:  # every worker died: the sweep compiles the rest itself
                    break
                now = time.monotonic()
                left = set(running.values()) | set(unsent)
                if now - start > timeout_s or _stragglers(left, started, longest, now):
                    break
                for worker in _ready(running, timeout=0.5):
                    i = running[worker]
                    outcome = worker.outcome(started)
                    if outcome is None:  # it only said it started
                        continue
                    del running[worker]
                    seconds, error = outcome
                    if worker.dead:
                        live.remove(worker)
                    else:
                        idle.append(worker)
                        longest = max(longest, seconds)
                    summary.worker_seconds += seconds
                    if error is None:
                        summary.done += 1
                    else:
                        summary.failed.append(f"{groups[i].label()}: {error}")
                    say(f"prewarm [{summary.done + len(summary.failed)}/{len(groups)} {time.monotonic() - start:.0f}s] "
                        f"{groups[i].label()}: {'ok' if error is None else error[:100]} ({seconds:.1f} s)")
            remaining = sorted(set(running.values()) | set(unsent))
            if remaining:
                summary.left = [groups[j].label() for j in remaining]
                summary.stacks = _dump_stacks({groups[j].label(): started.get(j) for j in remaining}, stack_dir)
                say(f"prewarm: stopped after {time.monotonic() - start:.0f} s, {len(remaining)} groups left to the "
                    "sweep: " + "; ".join(summary.left))
                for label, stack in summary.stacks.items():
                    say(f"prewarm: where {label} was:\n{stack}")
        finally:
            for worker in live:
                worker.stop()
    summary.seconds = time.monotonic() - start
    return summary


class _Worker:
    """One spawned worker process with its own task and result pipes."""

    def __init__(self, ctx, stack_dir: str) -> None:
        task_recv, self.tasks = ctx.Pipe(duplex=False)
        self.results, result_send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_worker_main, args=(task_recv, result_send, stack_dir), daemon=True)
        self.process.start()
        task_recv.close()
        result_send.close()
        self.dead = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, i: int, group: Group) -> None:
        self.tasks.send((i, group))

    def outcome(self, started: dict[int, tuple[int, float]]) -> tuple[float, str | None] | None:
        """Read what the worker said: a start (recorded in `started`; returns None) or the
        (seconds, error) of its group. A worker that died instead says how."""
        while self.results.poll():
            try:
                kind, i, *rest = self.results.recv()
            except (EOFError, OSError):
                break
            if kind == "start":
                started[i] = (rest[0], rest[1])
                continue
            return rest[0], rest[1]
        if self.process.is_alive():
            return None
        self.process.join(5)
        self.dead = True
        since = max((t for pid, t in started.values() if pid == self.pid), default=None)
        elapsed = time.monotonic() - since if since is not None else 0.0
        return elapsed, f"worker {self.pid} died: {exit_reason(self.process.exitcode)}"

    def stop(self) -> None:
        try:
            self.tasks.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()  # a straggler still compiling, or stuck
            self.process.join(5)


def _ready(running: dict[_Worker, int], timeout: float) -> list[_Worker]:
    """Workers with a result to read, or whose process has ended."""
    by_handle = {}
    for worker in running:
        by_handle[worker.results] = worker
        by_handle[worker.process.sentinel] = worker
    ready = multiprocessing.connection.wait(list(by_handle), timeout=timeout)
    return list(dict.fromkeys(by_handle[h] for h in ready))


def exit_reason(code: int | None) -> str:
    """A worker's exit code in words: a negative one is the signal that ended it."""
    if code is None:
        return "no exit code (still running?)"
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (the kernel's out-of-memory killer sends it: see dmesg)" if name == "SIGKILL" else ""
    return f"killed by {name}{hint}"


def share_triton_cache() -> str:
    """One Triton cache directory for the workers and this process. Inductor sets
    TRITON_CACHE_DIR to its own directory the first time a process compiles through it, so a
    worker that compiled only Triton kernels wrote to ~/.triton/cache while the sweep, after its
    first flex cell, looked in Inductor's directory: the triton kernels' first calls recompiled
    (13-26 s each at D=64 and in fp16; 191 new cache entries for one call, H100, 2026-11-23).
    Setting it before anything compiles gives every process Inductor's directory."""
    if not os.environ.get("TRITON_CACHE_DIR"):
        try:
            from torch._inductor.runtime.cache_dir_utils import triton_cache_dir

            os.environ["TRITON_CACHE_DIR"] = triton_cache_dir(0)
        except ImportError:  # an older torch: Triton's own default for everyone
            os.environ["TRITON_CACHE_DIR"] = os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return os.environ["TRITON_CACHE_DIR"]


def _stragglers(pending: set[int], started: dict[int, tuple[int, float]], longest: float, now: float) -> bool:
    """True when every pending group has started and one has run past 1.5x max(longest, 10 s),
    or every one has run past max(longest, 10 s): then nothing left looks like the rest, and
    the sweep compiles what they were compiling itself (the one group seen stuck, on three
    H100 machines, took the sweep 2-6 s)."""
    if not pending or any(i not in started for i in pending):
        return False
    ran = [now - started[i][1] for i in pending]
    return max(ran) > 1.5 * max(longest, 10.0) or min(ran) > max(longest, 10.0)


def _dump_stacks(running: dict[str, tuple[int, float] | None], stack_dir: str) -> dict[str, str]:
    """Ask each straggler's worker for its Python stacks; the last 3,000 characters of each,
    under a line that says whether the worker was still there (on six H100 machines the flex
    S=16384 group's file came back empty: a dead worker, whose task the pool never reports,
    writes nothing; a live one answers SIGUSR1, and its watchdog dumps every STACK_EVERY_S)."""
    if not hasattr(signal, "SIGUSR1"):
        return {}
    for entry in running.values():
        if entry is not None:
            try:
                os.kill(entry[0], signal.SIGUSR1)
            except OSError:
                pass
    time.sleep(1.0)
    stacks = {}
    for label, entry in running.items():
        if entry is None:
            continue
        try:
            text = Path(stack_dir, f"{entry[0]}.txt").read_text(errors="replace")
        except OSError:
            text = ""
        state = worker_state(entry[0])
        head = f"[worker {entry[0]}: {state}{'' if text.strip() else '; it wrote no stack'}]"
        stacks[label] = f"{head}\n{text[-3000:]}" if text.strip() else head
    return stacks


def worker_state(pid: int) -> str:
    """'running', 'sleeping', ... from /proc where there is one; 'gone' once it has exited."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone (exited or killed)"
    except OSError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "alive"
    names = {"R": "running", "S": "sleeping", "D": "in uninterruptible I/O", "Z": "gone (a zombie: exited or killed)",
             "T": "stopped"}
    return names.get(fields[0], f"state {fields[0]}")


_STACK_FILE = None  # in a worker: kept open for faulthandler
STACK_EVERY_S = 10.0  # a worker busy on one group this long dumps its stacks (then again, as often)


def _init_worker(stack_dir: str) -> None:
    global _STACK_FILE
    if hasattr(signal, "SIGUSR1"):
        _STACK_FILE = open(Path(stack_dir, f"{os.getpid()}.txt"), "w")
        faulthandler.register(signal.SIGUSR1, file=_STACK_FILE, all_threads=True)


def _worker_main(tasks, results, stack_dir: str) -> None:
    """A worker's loop: (index, group) tasks in, ("start", ...) then ("done", index, seconds,
    error) out; None ends it. The registry loads first (imports of every implementation, seconds
    with FlashAttention-4's), so no group's time, which the straggler rule reads, carries it."""
    _init_worker(stack_dir)
    try:
        from attnbench.registry import registry

        registry()
    except Exception:  # the group's own _resolve reports it
        pass
    while True:
        try:
            task = tasks.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None:
            return
        results.send(("start", task[0], os.getpid(), time.monotonic()))
        results.send(("done", *_warm(task)))


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
    if _STACK_FILE is not None:  # a watchdog thread in C: needs no signal and no GIL to write
        faulthandler.dump_traceback_later(STACK_EVERY_S, repeat=True, file=_STACK_FILE)
    try:
        impl = _resolve(group)
        for cell in group.cells:
            case = make_case(impl, cell)
            case.run(case.prepare(0))
            synchronize(cell.device)
            del case
    except Exception as exc:  # recorded; the sweep itself will run (and record) this pair
        return i, time.perf_counter() - start, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    finally:
        if _STACK_FILE is not None:
            faulthandler.cancel_dump_traceback_later()
    return i, time.perf_counter() - start, None


def _resolve(group: Group) -> Impl:
    from attnbench.registry import registry

    reg = registry()
    if group.impl_key not in reg.impls and ":" in group.impl_origin:
        reg.load_spec(group.impl_origin)  # named on the command line (package.module:object)
    if group.impl_key not in reg.impls:
        raise KeyError(f"implementation {group.impl_key!r} not found in the worker process")
    return reg.impls[group.impl_key]
