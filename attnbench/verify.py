"""`attnbench verify`: run the property suite in a child pytest and collect one row per
(implementation, property).

The child process isolates crashes: when a kernel kills the interpreter (segfault, abort,
device error), the test that was running is recorded as an error ("crashed: ...") with the tail
of its output, and the child is started again without the tests already finished. A child that
makes no progress for the deadline (no test started or finished, no implementation called:
`attnbench.watchdog` reports those) is killed with its process group and the test recorded as
"timeout: ...". An implementation that crashes or hangs MAX_FAULTS_PER_IMPL times has its other
tests recorded as not run, so it cannot use up the restarts the others need. One broken
implementation never aborts the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import attnbench.properties
from attnbench import procs
from attnbench.plugin import STREAM_PREFIX
from attnbench.reports.schema import CorrectnessRow, Results, ZooRow, environment

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

    @property
    def failures(self) -> list[CorrectnessRow]:
        return [r for r in self.results.correctness if r.status in ("fail", "error")]


def pytest_args(
    *,
    impls: Iterable[str] = (),
    variants: Iterable[str] = (),
    properties: Iterable[str] = (),
    profile: str = "ci",
    device: str = "cpu",
    seed: int | None = None,
    zoo: bool = False,
    paths: Iterable[str] = (),
) -> list[str]:
    args = [
        *(list(paths) or [str(PROPERTIES_DIR)]),
        "-c", str(PYTEST_INI),
        "--rootdir", str(PROPERTIES_DIR),
        "-p", "attnbench.plugin",
        "-p", "no:cacheprovider",
        "--import-mode=importlib",
        "-q", "--no-header", "-p", "no:randomly",
        f"--hypothesis-profile={profile}",
        "--device", device,
    ]
    for i in impls:
        args += ["--impl", i]
    for v in variants:
        args += ["--variant", v]
    props = list(properties)
    if props:
        args += ["-k", " or ".join(props)]
    if seed is not None:
        args.append(f"--hypothesis-seed={seed}")
    if zoo:
        args.append("--zoo")
    return args


def default_deadline(device: str) -> float:
    """Seconds a child may go without progress (a test starting or finishing, or a call into an
    implementation starting) before it is killed: ATTNBENCH_VERIFY_DEADLINE, else 300 s on a
    CPU (Triton's interpreter) and 900 s on CUDA (a first call may compile for minutes)."""
    value = os.environ.get("ATTNBENCH_VERIFY_DEADLINE")
    if value:
        seconds = float(value)
        if not seconds > 0:
            raise ValueError(f"ATTNBENCH_VERIFY_DEADLINE must be a positive number of seconds, got {value!r}")
        return seconds
    return 300.0 if device == "cpu" else 900.0


def run(
    *,
    impls: Iterable[str] = (),
    variants: Iterable[str] = (),
    properties: Iterable[str] = (),
    profile: str = "ci",
    device: str = "cpu",
    seed: int | None = None,
    zoo: bool = False,
    on_row: Callable[[CorrectnessRow], None] | None = None,
    on_start: Callable[[str], None] | None = None,
    paths: Iterable[str] = (),
    deadline_s: float | None = None,
) -> Outcome:
    """paths: property files or folders to run instead of the installed suite (for tests).
    deadline_s: seconds without progress before a child is killed (default: default_deadline)."""
    base = pytest_args(
        impls=impls, variants=variants, properties=properties, profile=profile, device=device, seed=seed, zoo=zoo,
        paths=paths,
    )
    deadline_s = deadline_s if deadline_s is not None else default_deadline(device)
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in the interpreter on the CPU
    env["PYTHONUNBUFFERED"] = "1"

    loop = _Loop(on_row=on_row, on_start=on_start)
    log_parts: list[str] = []
    collect_error = None
    with tempfile.TemporaryDirectory(prefix="attnbench-verify-") as tmp:
        skip_file = Path(tmp) / "skip.txt"
        for _ in range(MAX_RESTARTS + 1):
            skip_file.write_text("\n".join(sorted(loop.done)))
            # -P: do not put the working directory first on sys.path; started from a checkout, its
            # attnbench/ folder would shadow the installed package (whose subpackages live elsewhere).
            args = [sys.executable, "-P", "-m", "pytest", *base, "-p", "attnbench.watchdog",
                    "--attnbench-stream", "--attnbench-skip-file", str(skip_file)]
            child = _run_child(args, env, loop, deadline_s)
            log_parts.append("\n".join(child.tail))
            if child.code in (0, 1, 5) and not child.timed_out:  # all ran (pass / some failed / none collected)
                break
            if child.current is None:  # died outside a test: collection or usage error
                what = f"no progress for {deadline_s:.0f} s" if child.timed_out else f"pytest exited with code {child.code}"
                collect_error = f"{what}:\n" + "\n".join(child.tail[-30:])
                break
            loop.fault(child, base, deadline_s)
        else:  # the restart cap: what is left did not run, and says so
            loop.give_up(f"not run: verify stopped restarting its test process after {MAX_RESTARTS} restarts")
    results = Results(env=environment(), correctness=loop.rows)
    if zoo:
        results.zoo = kill_table(loop.rows)
    return Outcome(results=results, log="\n".join(log_parts), crashed=loop.crashed, collect_error=collect_error,
                   not_run=loop.not_run)


@dataclass
class _Child:
    code: int
    current: str | None
    tail: list[str]
    timed_out: bool = False


@dataclass
class _Loop:
    """What the children of one verify run have done so far."""

    on_row: Callable[[CorrectnessRow], None] | None = None
    on_start: Callable[[str], None] | None = None
    rows: list[CorrectnessRow] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    crashed: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    collected: dict[str, str] = field(default_factory=dict)  # node id -> implementation key
    faults: Counter = field(default_factory=Counter)  # implementation key -> crashes + timeouts

    def add(self, row: CorrectnessRow) -> None:
        self.rows.append(row)
        if self.on_row:
            self.on_row(row)

    def fault(self, child: _Child, base: list[str], deadline_s: float) -> None:
        """The child died or hung in test child.current: record it; an implementation at its cap
        has its remaining tests recorded as not run (the others go on)."""
        nodeid = child.current
        timeout = deadline_s if child.timed_out else None
        self.crashed.append(nodeid)
        self.done.add(nodeid)
        self.add(_crash_row(nodeid, child.code, child.tail, base, timeout))
        impl = self.collected.get(nodeid)
        if impl is None:
            return
        self.faults[impl] += 1
        if self.faults[impl] >= MAX_FAULTS_PER_IMPL:
            self.give_up(f"not run: {impl} crashed or timed out {self.faults[impl]} times", impl)

    def give_up(self, reason: str, impl: str | None = None) -> None:
        """Record every collected test (of impl, or all) that has not run as an error row."""
        for nodeid, key in self.collected.items():
            if nodeid in self.done or (impl is not None and key != impl):
                continue
            self.done.add(nodeid)
            self.not_run.append(nodeid)
            row = _crash_row(nodeid, 0, [], [], None)
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
            if kind == "collected":
                loop.collected.update((nodeid, key) for nodeid, key in event.get("items", []))
                continue
            if kind == "start":
                current = event["nodeid"]
                if loop.on_start:
                    loop.on_start(current)
                continue
            loop.done.add(event.pop("nodeid", ""))
            loop.add(_row(event))
            current = None
        return _Child(proc.wait(), current, tail)
    finally:
        if proc.poll() is None:
            procs.kill_tree(proc)
        procs.reap(proc)


def _row(event: dict) -> CorrectnessRow:
    known = CorrectnessRow.__dataclass_fields__
    return CorrectnessRow(**{k: v for k, v in event.items() if k in known})


def _crash_row(nodeid: str, code: int, tail: list[str], base: list[str], timeout: float | None = None) -> CorrectnessRow:
    name = nodeid.split("::")[-1]
    prop, _, key = name.partition("[")
    key = key.rstrip("]")
    variant, _, impl = key.partition("/")
    signal = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    if timeout is not None:
        what = f"timeout: no progress for {timeout:.0f} s (the deadline); the test process was killed"
    else:
        what = f"crashed: the test process died ({signal})"
    replay = f"{sys.executable} -P -m pytest {' '.join(base)} -k {nodeid.split('::')[-1]!r}"
    return CorrectnessRow(
        variant=variant,
        impl=impl,
        property=prop,
        status="error",
        reason=f"{what}; last output: " + " | ".join(tail[-3:])[-300:],
        replay=replay,
    )


def results_from_rows(path: str | os.PathLike) -> Results:
    """Results from the rows a pytest run wrote with --attnbench-results (all xdist workers)."""
    from attnbench.plugin import read_rows

    return Results(correctness=[_row(r) for r in read_rows(path)])


def kill_table(rows: Iterable[CorrectnessRow]) -> list[ZooRow]:
    """For the bug zoo: which properties caught each member."""
    from attnbench.registry import load_zoo

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
