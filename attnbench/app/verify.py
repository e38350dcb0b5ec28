"""`attnbench verify`: run the property suite in a child pytest and collect one row per
(implementation, property).

The child process isolates crashes: when a kernel kills the interpreter (segfault, abort,
device error), the test that was running is recorded as an error ("crashed: ...") with the tail
of its output, and the child is started again without the tests already finished. A child that
makes no progress for the deadline (no test started or finished, no implementation called:
`attnbench.app.watchdog` reports those) is killed with its process group and the test recorded as
"timeout: ...". An implementation that crashes or hangs MAX_FAULTS_PER_IMPL times has its other
tests recorded as not run, so it cannot use up the restarts the others need. One broken
implementation never aborts the run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import attnbench.properties
from attnbench import procs
from attnbench.app.plugin import DEVICE_LOST_EXIT, read_rows
from attnbench.cache import compiler_env
from attnbench.procs import STREAM_PREFIX
from attnbench.registry import load_zoo
from attnbench.results import CorrectnessRow, Results, ZooRow, environment

PROPERTIES_DIR = Path(attnbench.properties.__file__).resolve().parent
PYTEST_INI = Path(__file__).resolve().parent / "pytest.ini"
MAX_RESTARTS = 50  # child processes restarted in one run, all implementations together
STARTUP_S = 600.0  # seconds a child may spend outside any test (start, collection, exit)
MAX_FAULTS_PER_IMPL = 3  # crashes + timeouts of one implementation before its other tests are left out


@dataclass
class Outcome:
    results: Results
    log: str = ""
    crashed: list[str] = field(default_factory=list)
    collect_error: str | None = None
    not_run: list[str] = field(default_factory=list)  # node ids left out after crashes / timeouts
    usage_error: str | None = None  # a bad selection the suite itself found (an unknown property)
    not_verified: list[str] = field(default_factory=list)  # "what: why" for each request that checked nothing
    seed: int | None = None  # the Hypothesis seed of a randomized profile (drawn when not given)

    @property
    def failures(self) -> list[CorrectnessRow]:
        return [r for r in self.results.correctness if r.status in ("fail", "error")]


@dataclass(frozen=True)
class Selection:
    """What a verify run checks: run() takes these fields as keywords and passes them to its test
    processes as pytest arguments. paths: property files or folders to run instead of the installed
    suite (for tests)."""

    impls: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()
    properties: tuple[str, ...] = ()
    profile: str = "ci"
    device: str = "cpu"
    seed: int | None = None
    zoo: bool = False
    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("impls", "variants", "properties", "paths"):  # given as any iterable of str
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def pytest_args(self) -> list[str]:
        args = [
            *(list(self.paths) or [str(PROPERTIES_DIR)]),
            "-c", str(PYTEST_INI),
            "--rootdir", str(PROPERTIES_DIR),
            "-p", "attnbench.app.plugin",
            "-p", "no:cacheprovider",
            "--import-mode=importlib",
            "-q", "--no-header", "-p", "no:randomly", "-p", "no:benchmark",
            f"--hypothesis-profile={self.profile}",
            "--device", self.device,
        ]
        for i in self.impls:
            args += ["--impl", i]
        for v in self.variants:
            args += ["--variant", v]
        for prop in self.properties:
            args += ["--property", prop]
        if self.seed is not None:
            args.append(f"--hypothesis-seed={self.seed}")
        if self.zoo:
            args.append("--zoo")
        return args


def default_deadline(device: str) -> float:
    """Seconds a child may go without progress (a test starting or finishing, or a call into an
    implementation starting) before it is killed: ATTNBENCH_VERIFY_DEADLINE, else 300 s on a
    CPU (Triton's interpreter) and 900 s on CUDA (a first call may compile for minutes)."""
    seconds = procs.seconds_setting("ATTNBENCH_VERIFY_DEADLINE")
    if seconds is not None:
        return seconds
    return 300.0 if device == "cpu" else 900.0


def default_workers(device: str) -> int:
    """Test processes a verify run uses: ATTNBENCH_VERIFY_WORKERS, else one per two CPU cores on
    CUDA (at most 8: a GPU row's time is compiles, which are CPU-bound, and an H200 holds eight
    processes' contexts and cases with room to spare: 8 ran the feature rows there,
    evidence/h200/features-2026-12-03) and one per CPU core on a CPU (at most 4)."""
    value = os.environ.get("ATTNBENCH_VERIFY_WORKERS")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"ATTNBENCH_VERIFY_WORKERS must be a positive integer, got {value!r}")
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.startswith("cuda"):
        return max(1, min(8, cores // 2))
    return max(1, min(4, cores))


def run(
    *,
    on_row: Callable[[CorrectnessRow], None] | None = None,
    on_start: Callable[[dict], None] | None = None,
    on_collect: Callable[[int], None] | None = None,
    deadline_s: float | None = None,
    workers: int | None = None,
    **selection: Any,
) -> Outcome:
    """selection: the fields of Selection (impls, variants, properties, profile, device, seed, zoo,
    paths). on_start(event): a check starts (event has nodeid, variant, impl, property);
    on_collect(n): n checks are left to run (called whenever a test process starts).
    deadline_s: seconds without progress before a child is killed (default: default_deadline).
    workers: test processes, each running every workers-th check (default: default_workers)."""
    chosen = Selection(**selection)
    if chosen.seed is None and not derandomized(chosen.profile):  # a seed the failures can print and the CLI can take
        chosen = dataclasses.replace(chosen, seed=random.SystemRandom().randrange(2**32))
    device, seed, zoo = chosen.device, chosen.seed, chosen.zoo
    base = chosen.pytest_args()
    deadline_s = deadline_s if deadline_s is not None else default_deadline(device)
    workers = workers if workers is not None else default_workers(device)
    env = dict(os.environ)
    for name, value in compiler_env(device).items():
        env.setdefault(name, value)
    # one launch config per compiled Triton specialization instead of autotuning every drawn
    # length: a correctness run compiles each specialization once (impls/triton.py, tune_mode)
    env.setdefault("ATTNBENCH_TRITON_AUTOTUNE", "spread")
    if device == "cpu":
        if workers > 1:  # torch's threads per process, so that the processes do not oversubscribe the cores
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    env["PYTHONUNBUFFERED"] = "1"

    shared = _Shared(on_row=on_row, on_start=on_start, on_collect=on_collect)
    shared.loops = [_Loop(on_row=shared.row, on_start=shared.start, on_collect=functools.partial(shared.collect, i))
                    for i in range(workers)]
    loops = shared.loops
    try:
        ends = _run_shards(loops, base, env, deadline_s)
    except procs.Interrupted as stop:  # the checks that finished are kept: the CLI writes them as a partial run
        stop.partial = Results(env={**environment(), "interrupted": stop.name},
                               correctness=[row for loop in loops for row in loop.rows])
        raise
    rows = [row for loop in loops for row in loop.rows]
    results = Results(env=environment(), correctness=rows)
    if seed is not None:
        results.env["hypothesis_seed"] = seed
    if zoo:
        results.zoo = kill_table(rows)
    first = loops[0]
    outcome = Outcome(
        results=results, log="\n".join(log for _, log in ends),
        crashed=[n for loop in loops for n in loop.crashed],
        collect_error=next((error for error, _ in ends if error), None),
        not_run=[n for loop in loops for n in loop.not_run],
        usage_error=next((loop.usage_error for loop in loops if loop.usage_error), None), seed=seed,
    )
    if not (outcome.usage_error or outcome.collect_error or zoo):
        outcome.not_verified = not_verified(rows, first.requested, properties=chosen.properties)
        if outcome.not_verified:
            results.env["not_verified"] = outcome.not_verified
    return outcome


def _run_shards(loops: list[_Loop], base: list[str], env: dict, deadline_s: float) -> list[tuple[str | None, str]]:
    """Every shard to its end, one thread each; (collect error, log) per shard."""
    workers = len(loops)
    with tempfile.TemporaryDirectory(prefix="attnbench-verify-") as tmp:
        jobs = [(loop, Path(tmp) / f"skip{i}.txt", [*base, *(["--attnbench-shard", f"{i}/{workers}"] if workers > 1 else [])])
                for i, loop in enumerate(loops)]
        if workers == 1:
            ends = [_run_shard(*jobs[0], env, deadline_s)]
        else:
            stop = threading.Event()
            pool = ThreadPoolExecutor(workers)
            try:
                ends = list(pool.map(lambda job: _run_shard(*job, env, deadline_s, stop), jobs))
            except BaseException:  # an interrupt in this thread: no shard may start another process
                stop.set()
                procs.kill_all()
                raise
            finally:
                pool.shutdown(wait=True)
    return ends


def _run_shard(loop: _Loop, skip_file: Path, base: list[str], env: dict, deadline_s: float,
               stop: threading.Event | None = None) -> tuple[str | None, str]:
    """One test process at a time for one shard of the checks, restarted without the finished
    checks after a crash, a timeout or a lost CUDA context (never once `stop` is set).
    Returns (collect error, log)."""
    log_parts: list[str] = []
    for _ in range(MAX_RESTARTS + 1):
        if stop is not None and stop.is_set():
            break
        skip_file.write_text("\n".join(sorted(loop.done)))
        # -P: do not put the working directory first on sys.path; started from a checkout, its
        # attnbench/ folder would shadow the installed package (whose subpackages live elsewhere).
        args = [sys.executable, "-P", "-m", "pytest", *base, "-p", "attnbench.app.watchdog",
                "--attnbench-stream", "--attnbench-skip-file", str(skip_file)]
        child = _run_child(args, env, loop, deadline_s)
        log_parts.append("\n".join(child.tail))
        if stop is not None and stop.is_set():  # killed because the run was interrupted: not the test's fault
            break
        if loop.usage_error:
            break
        if child.code in (0, 1, 5) and not child.timed_out:  # all ran (pass / some failed / none collected)
            break
        if child.code == DEVICE_LOST_EXIT and loop.device_lost and child.current is None:
            loop.lost_device(loop.device_lost[-1])  # its row is recorded; the rest run in a fresh child
            continue
        if child.current is None:  # died outside a test: collection or usage error
            what = f"no progress for {deadline_s:.0f} s" if child.timed_out else f"pytest exited with code {child.code}"
            return f"{what}:\n" + "\n".join(child.tail[-30:]), "\n".join(log_parts)
        loop.fault(child, deadline_s)
    else:  # the restart cap: what is left did not run, and says so
        loop.give_up(f"not run: verify stopped restarting its test process after {MAX_RESTARTS} restarts")
    return None, "\n".join(log_parts)


@dataclass
class _Shared:
    """The callbacks of a run, called from every shard's thread: serialized, with the progress
    total summed over the shards (each shard's rows so far plus what its process has left)."""

    on_row: Callable[[CorrectnessRow], None] | None
    on_start: Callable[[dict], None] | None
    on_collect: Callable[[int], None] | None
    loops: list[_Loop] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    planned: dict[int, int] = field(default_factory=dict)  # shard -> its rows + left at its last start

    def row(self, row: CorrectnessRow) -> None:
        with self.lock:
            if self.on_row:
                self.on_row(row)

    def start(self, event: dict) -> None:
        with self.lock:
            if self.on_start:
                self.on_start(event)

    def collect(self, shard: int, left: int) -> None:
        with self.lock:
            self.planned[shard] = len(self.loops[shard].rows) + left
            if self.on_collect and len(self.planned) == len(self.loops):
                self.on_collect(sum(self.planned.values()) - sum(len(loop.rows) for loop in self.loops))


def derandomized(profile: str) -> bool:
    """Whether a Hypothesis profile draws the same examples every run (ci) or random ones."""
    from hypothesis import settings

    import attnbench.properties.profiles  # noqa: F401  (registers ci / dev / thorough)

    try:
        return bool(settings.get_profile(profile).derandomize)
    except Exception:  # an unknown profile: pytest reports it
        return True



@dataclass
class _Child:
    code: int
    current: dict | None  # the start event of the test running when the child stopped
    tail: list[str]
    timed_out: bool = False


@dataclass
class _Loop:
    """What the children of one verify run have done so far."""

    on_row: Callable[[CorrectnessRow], None] | None = None
    on_start: Callable[[dict], None] | None = None
    on_collect: Callable[[int], None] | None = None
    usage_error: str | None = None
    requested: dict = field(default_factory=dict)  # what the test process was asked to verify (plugin.requested)
    rows: list[CorrectnessRow] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    crashed: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    collected: dict[str, str] = field(default_factory=dict)  # node id -> implementation key
    faults: Counter = field(default_factory=Counter)  # implementation key -> crashes + timeouts
    device_lost: list[str] = field(default_factory=list)  # tests after which a child ended on a lost CUDA context

    def add(self, row: CorrectnessRow) -> None:
        self.rows.append(row)
        if self.on_row:
            self.on_row(row)

    def fault(self, child: _Child, deadline_s: float) -> None:
        """The child died or hung in test child.current: record it; an implementation at its cap
        has its remaining tests recorded as not run (the others go on)."""
        nodeid = child.current["nodeid"]
        timeout = deadline_s if child.timed_out else None
        self.crashed.append(nodeid)
        self.done.add(nodeid)
        self.add(_crash_row(child.current, child.code, child.tail, timeout))
        self._count_fault(nodeid, "crashed or timed out")

    def lost_device(self, nodeid: str) -> None:
        """A test left its child's CUDA context unusable (its row says so): the fault counts
        against its implementation like a crash."""
        self._count_fault(nodeid, "lost the CUDA context or crashed")

    def _count_fault(self, nodeid: str, what: str) -> None:
        impl = self.collected.get(nodeid)
        if impl is None:
            return
        self.faults[impl] += 1
        if self.faults[impl] >= MAX_FAULTS_PER_IMPL:
            self.give_up(f"not run: {impl} {what} {self.faults[impl]} times", impl)

    def give_up(self, reason: str, impl: str | None = None) -> None:
        """Record every collected test (of impl, or all) that has not run as an error row."""
        for nodeid, key in self.collected.items():
            if nodeid in self.done or (impl is not None and key != impl):
                continue
            self.done.add(nodeid)
            self.not_run.append(nodeid)
            row = _crash_row({"nodeid": nodeid}, 0, [])
            row.reason, row.replay = reason, None
            self.add(row)


def _run_child(args: list[str], env: dict, loop: _Loop, deadline_s: float) -> _Child:
    """Run one child pytest to its end, or kill it (and its process group) after deadline_s
    seconds without progress."""
    proc = procs.spawn(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    lines = procs.Lines(proc.stdout)
    current = None
    tail: list[str] = []
    last = time.monotonic()
    try:
        while True:
            # implementation code runs only inside a test; outside one (imports, collection, the
            # end of the session) the child may take STARTUP_S
            allowed = deadline_s if current is not None else max(deadline_s, STARTUP_S)
            try:
                line = lines.get(max(last + allowed - time.monotonic(), 0.0))
            except TimeoutError:
                return _Child(procs.kill_tree(proc), current, tail, timed_out=True)
            if line is None:
                break
            if not line.startswith(STREAM_PREFIX):
                tail.append(line)
                del tail[:-400]
                continue
            try:
                event = json.loads(line[len(STREAM_PREFIX) :])
            except ValueError:  # a line torn by the child's death
                tail.append(line)
                continue
            last = time.monotonic()
            kind = event.get("event")
            if kind == "beat":
                continue
            if kind == "collected":  # the watchdog lists (node id, implementation); the plugin counts
                loop.collected.update((nodeid, key) for nodeid, key in event.get("items", []))
                if "total" in event and loop.on_collect:
                    loop.on_collect(int(event["total"]))
                continue
            if kind == "requested":
                event.pop("event")
                loop.requested = event
                continue
            if kind == "device_lost":  # the child ends itself after this event: restart it
                loop.device_lost.append(str(event.get("nodeid", "")))
                continue
            if kind == "usage_error":
                loop.usage_error = str(event["message"])
                continue
            if kind == "start":
                event.pop("event")
                current = event
                if loop.on_start:
                    loop.on_start(event)
                continue
            loop.done.add(event.get("nodeid", ""))
            loop.add(CorrectnessRow.from_line(event))
            current = None
        return _Child(proc.wait(), current, tail)
    finally:
        if proc.poll() is None:
            procs.kill_tree(proc)
        procs.reap(proc)


def _crash_row(started: dict, code: int, tail: list[str], timeout: float | None = None) -> CorrectnessRow:
    """The row of the test that was running when its process died or was killed; `started` is
    its start event (the plugin names the implementation and builds the replay command there)."""
    name = started["nodeid"].split("::")[-1]
    prop, _, key = name.partition("[")
    variant, _, impl = key.rstrip("]").partition("/")
    signal = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    if timeout is not None:
        what = f"timeout: no progress for {timeout:.0f} s (the deadline); the test process was killed"
    else:
        what = f"crashed: the test process died ({signal})"
    return CorrectnessRow(
        variant=started.get("variant", variant),
        impl=started.get("impl", impl),
        property=started.get("property", prop),
        status="error",
        reason=f"{what}; last output: " + " | ".join(tail[-3:])[-300:],
        replay=started.get("replay"),
    )


CHECKED = ("pass", "fail", "error")  # statuses of a check that ran; "skip" verified nothing


def not_verified(rows: list[CorrectnessRow], requested: dict, properties: Iterable[str] = ()) -> list[str]:
    """What a verify run was asked for but checked nothing of, one "what: why" line each.

    requested: the test process' account (plugin.requested): implementation keys, whether they
    were named with --impl, and the sources that failed to load. Judged:
    - every named implementation; without --impl and --property, every available one;
    - every --property;
    - without --impl, every implementation source that failed to load (it would have run).
    """
    properties = list(properties)
    out = []
    judged = requested.get("impls", []) if requested.get("explicit") or not properties else []
    for key in judged:
        variant, _, name = key.partition("/")
        mine = [r for r in rows if r.variant == variant and r.impl == name]
        if not any(r.status in CHECKED for r in mine):
            out.append(f"{key}: {_why_nothing(mine, f'no selected property applies to the {variant} variant')}")
    prop_names = list(dict.fromkeys(r.property for r in rows))
    for p in properties:
        chosen = {p} if p in prop_names else {n for n in prop_names if p in n}
        mine = [r for r in rows if r.property in chosen]
        if not any(r.status in CHECKED for r in mine):
            out.append(f"property {p}: {_why_nothing(mine, 'no selected implementation has it')}")
    out += requested.get("broken", [])
    if not requested and not rows:
        out.append("the test process reported nothing: no check ran")
    return out


def _why_nothing(rows: list[CorrectnessRow], no_rows: str) -> str:
    if not rows:
        return no_rows
    reasons = Counter(r.reason or "no reason given" for r in rows)
    text = "; ".join(f"{why} ({n})" if n > 1 else why for why, n in reasons.most_common(3))
    return f"every check skipped: {text}"


def results_from_rows(path: str | os.PathLike) -> Results:
    """Results from the rows a pytest run wrote with --attnbench-results (all xdist workers)."""
    return Results(correctness=read_rows(path))


def kill_table(rows: Iterable[CorrectnessRow]) -> list[ZooRow]:
    """For the bug zoo: which properties caught each member."""
    caught: dict[str, list[str]] = {}
    for r in rows:
        key = f"{r.variant}/{r.impl}"
        caught.setdefault(key, [])
        if r.status == "fail":
            caught[key].append(r.property)
    out = []
    for impl in load_zoo():
        hits = sorted(set(caught.get(impl.key, [])))
        if impl.key not in caught:
            continue  # not part of this run
        out.append(ZooRow(member=impl.key, bug_class=getattr(impl, "bug", "") or impl.description, caught_by=hits,
                          status="caught" if hits else "missed"))
    return out
