"""`attnbench verify`: run the property suite in a child pytest and collect one row per
(implementation, property).

The child process isolates crashes: when a kernel kills the interpreter (segfault, abort,
device error), the test that was running is recorded as an error with the tail of its output,
and the child is started again without the tests already finished. One broken implementation
never aborts the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import attnbench.properties
from attnbench.plugin import STREAM_PREFIX
from attnbench.reports.schema import CorrectnessRow, Results, ZooRow, environment

PROPERTIES_DIR = Path(attnbench.properties.__file__).resolve().parent
PYTEST_INI = Path(__file__).resolve().parent / "pytest.ini"
MAX_RESTARTS = 20


@dataclass
class Outcome:
    results: Results
    log: str = ""
    crashed: list[str] = field(default_factory=list)
    collect_error: str | None = None

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
) -> Outcome:
    """paths: property files or folders to run instead of the installed suite (for tests)."""
    base = pytest_args(
        impls=impls, variants=variants, properties=properties, profile=profile, device=device, seed=seed, zoo=zoo,
        paths=paths,
    )
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in the interpreter on the CPU
    env["PYTHONUNBUFFERED"] = "1"

    rows: list[CorrectnessRow] = []
    done: set[str] = set()
    crashed: list[str] = []
    log_parts: list[str] = []
    collect_error = None
    with tempfile.TemporaryDirectory(prefix="attnbench-verify-") as tmp:
        skip_file = Path(tmp) / "skip.txt"
        for _ in range(MAX_RESTARTS + 1):
            skip_file.write_text("\n".join(sorted(done)))
            # -P: do not put the working directory first on sys.path; started from a checkout, its
            # attnbench/ folder would shadow the installed package (whose subpackages live elsewhere).
            args = [sys.executable, "-P", "-m", "pytest", *base, "--attnbench-stream", "--attnbench-skip-file", str(skip_file)]
            current, tail, code = _run_child(args, env, rows, done, on_row, on_start)
            log_parts.append("\n".join(tail))
            if code in (0, 1, 5):  # all ran (pass / some failed / none collected)
                break
            if current is None:  # died outside a test: collection or usage error
                collect_error = f"pytest exited with code {code}:\n" + "\n".join(tail[-30:])
                break
            row = _crash_row(current, code, tail, base)
            crashed.append(current)
            done.add(current)
            rows.append(row)
            if on_row:
                on_row(row)
    results = Results(env=environment(), correctness=rows)
    if zoo:
        results.zoo = kill_table(rows)
    return Outcome(results=results, log="\n".join(log_parts), crashed=crashed, collect_error=collect_error)


def _run_child(args, env, rows, done, on_row, on_start):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    current = None
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith(STREAM_PREFIX):
            event = json.loads(line[len(STREAM_PREFIX) :])
            if event.get("event") == "start":
                current = event["nodeid"]
                if on_start:
                    on_start(current)
                continue
            done.add(event.pop("nodeid", ""))
            row = _row(event)
            rows.append(row)
            current = None
            if on_row:
                on_row(row)
        else:
            tail.append(line)
            del tail[:-400]
    return current, tail, proc.wait()


def _row(event: dict) -> CorrectnessRow:
    known = CorrectnessRow.__dataclass_fields__
    return CorrectnessRow(**{k: v for k, v in event.items() if k in known})


def _crash_row(nodeid: str, code: int, tail: list[str], base: list[str]) -> CorrectnessRow:
    name = nodeid.split("::")[-1]
    prop, _, key = name.partition("[")
    key = key.rstrip("]")
    variant, _, impl = key.partition("/")
    signal = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    replay = f"{sys.executable} -P -m pytest {' '.join(base)} -k {nodeid.split('::')[-1]!r}"
    return CorrectnessRow(
        variant=variant,
        impl=impl,
        property=prop,
        status="error",
        reason=f"the test process died ({signal}); last output: " + " | ".join(tail[-3:])[-300:],
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
