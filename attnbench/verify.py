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
import random
import subprocess
import sys
import tempfile
from collections import Counter
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
    usage_error: str | None = None  # a bad selection the suite itself found (an unknown property)
    not_verified: list[str] = field(default_factory=list)  # "what: why" for each request that checked nothing
    seed: int | None = None  # the Hypothesis seed of a randomized profile (drawn when not given)

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
        "-q", "--no-header", "-p", "no:randomly", "-p", "no:benchmark",
        f"--hypothesis-profile={profile}",
        "--device", device,
    ]
    for i in impls:
        args += ["--impl", i]
    for v in variants:
        args += ["--variant", v]
    for prop in properties:
        args += ["--property", prop]
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
    on_start: Callable[[dict], None] | None = None,
    on_collect: Callable[[int], None] | None = None,
    paths: Iterable[str] = (),
) -> Outcome:
    """paths: property files or folders to run instead of the installed suite (for tests).
    on_start(event): a check starts (event has nodeid, variant, impl, property); on_collect(n):
    n checks are left to run in a freshly started test process."""
    if seed is None and not derandomized(profile):  # a seed the failures can print and the CLI can take
        seed = random.SystemRandom().randrange(2**32)
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
    child = _Child(rows, done, on_row, on_start, on_collect)
    with tempfile.TemporaryDirectory(prefix="attnbench-verify-") as tmp:
        skip_file = Path(tmp) / "skip.txt"
        for _ in range(MAX_RESTARTS + 1):
            skip_file.write_text("\n".join(sorted(done)))
            # -P: do not put the working directory first on sys.path; started from a checkout, its
            # attnbench/ folder would shadow the installed package (whose subpackages live elsewhere).
            args = [sys.executable, "-P", "-m", "pytest", *base, "--attnbench-stream", "--attnbench-skip-file", str(skip_file)]
            current, tail, code = child.run(args, env)
            log_parts.append("\n".join(tail))
            if child.usage_error:
                break
            if code in (0, 1, 5):  # all ran (pass / some failed / none collected)
                break
            if current is None:  # died outside a test: collection or usage error
                collect_error = f"pytest exited with code {code}:\n" + "\n".join(tail[-30:])
                break
            row = _crash_row(current, code, tail)
            crashed.append(current["nodeid"])
            done.add(current["nodeid"])
            rows.append(row)
            if on_row:
                on_row(row)
    results = Results(env=environment(), correctness=rows)
    if seed is not None:
        results.env["hypothesis_seed"] = seed
    if zoo:
        results.zoo = kill_table(rows)
    outcome = Outcome(results=results, log="\n".join(log_parts), crashed=crashed, collect_error=collect_error,
                      usage_error=child.usage_error, seed=seed)
    if not (outcome.usage_error or outcome.collect_error or zoo):
        outcome.not_verified = not_verified(rows, child.requested, properties=properties)
        if outcome.not_verified:
            results.env["not_verified"] = outcome.not_verified
    return outcome


def derandomized(profile: str) -> bool:
    """Whether a Hypothesis profile draws the same examples every run (ci) or random ones."""
    from hypothesis import settings

    import attnbench.properties.profiles  # noqa: F401  (registers ci / dev / thorough)

    try:
        return bool(settings.get_profile(profile).derandomize)
    except Exception:  # an unknown profile: pytest reports it
        return True


class _Child:
    """Runs one test process and turns its stream lines into rows and progress events."""

    def __init__(self, rows, done, on_row, on_start, on_collect) -> None:
        self.rows, self.done = rows, done
        self.on_row, self.on_start, self.on_collect = on_row, on_start, on_collect
        self.usage_error: str | None = None
        self.requested: dict = {}  # what the test process was asked to verify (plugin.requested)

    def run(self, args, env) -> tuple[dict | None, list[str], int]:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
        current = None
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if not line.startswith(STREAM_PREFIX):
                tail.append(line)
                del tail[:-400]
                continue
            event = json.loads(line[len(STREAM_PREFIX) :])
            kind = event.pop("event", None)
            if kind == "start":
                current = event
                if self.on_start:
                    self.on_start(event)
            elif kind == "collected":
                if self.on_collect:
                    self.on_collect(int(event["total"]))
            elif kind == "requested":
                self.requested = event
            elif kind == "usage_error":
                self.usage_error = str(event["message"])
            else:
                self.done.add(event.pop("nodeid", ""))
                row = _row(event)
                self.rows.append(row)
                current = None
                if self.on_row:
                    self.on_row(row)
        return current, tail, proc.wait()


def _row(event: dict) -> CorrectnessRow:
    known = CorrectnessRow.__dataclass_fields__
    return CorrectnessRow(**{k: v for k, v in event.items() if k in known})


def _crash_row(started: dict, code: int, tail: list[str]) -> CorrectnessRow:
    """The row of the test that was running when its process died; `started` is its start event
    (the plugin names the implementation and builds the replay command there)."""
    name = started["nodeid"].split("::")[-1]
    prop, _, key = name.partition("[")
    variant, _, impl = key.rstrip("]").partition("/")
    signal = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return CorrectnessRow(
        variant=started.get("variant", variant),
        impl=started.get("impl", impl),
        property=started.get("property", prop),
        status="error",
        reason=f"the test process died ({signal}); last output: " + " | ".join(tail[-3:])[-300:],
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
