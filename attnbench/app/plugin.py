"""The pytest plugin behind `attnbench verify` and the property suite.

- parametrizes the `impl` fixture of every test marked `@pytest.mark.variant(...)` over the
  registered, available implementations of those variants (or the bug zoo with --zoo, or the
  ones named with --impl); properties never name an implementation;
- gives tests a `device` fixture (--device) and a `measure(ratio)` fixture that keeps the worst
  error ratio per test;
- records one CorrectnessRow (attnbench.results) per test (pass / fail / error / skip) with the failure's minimal
  spec, Hypothesis seed and a command that replays it, into --attnbench-results (JSON), and
  streams one `@@attnbench {...}` line per finished test with --attnbench-stream.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from attnbench.cache import cache_dir
from attnbench.procs import STREAM_PREFIX
from attnbench.properties import profiles, strategies
from attnbench.registry import Impl, is_target, load_zoo, registry
from attnbench.results import CorrectnessRow

_STREAM = False


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("attnbench")
    g.addoption("--impl", action="append", default=[], help="implementation key, name, or package.module:object (repeatable)")
    g.addoption("--variant", action="append", default=[], help="only these variants (repeatable)")
    g.addoption("--device", default=None, help="cpu or cuda (default: cpu)")
    g.addoption("--zoo", action="store_true", help="run against the bug zoo instead of the registered implementations")
    g.addoption("--property", action="append", default=[],
                help="only this property (its exact name, or a part of its name); unknown names are an error (repeatable)")
    g.addoption("--attnbench-results", default=None, help="append correctness rows here (JSON lines)")
    g.addoption("--attnbench-stream", action="store_true", help="print one machine-readable line per started/finished test")
    g.addoption("--attnbench-skip-file", default=None, help="deselect the node ids listed in this file (used on restart)")
    g.addoption("--attnbench-shard", default=None,
                help="I/N: run only every N-th check, starting at the I-th (verify's parallel test processes)")
    g.addoption("--attnbench-only-file", default=None,
                help="run only the node ids listed in this file, in its order (GPU runs that cannot finish everything)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "variant(*names): the variants a property applies to")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: long-running")
    config.addinivalue_line("markers", "perf: benchmarks")
    global _STREAM
    _STREAM = bool(config.getoption("attnbench_stream"))
    _hypothesis_home()
    _apply_seed(config)
    strategies.use_full_palette(config.getoption("hypothesis_profile", None) == "thorough")


def _hypothesis_home() -> None:
    """Hypothesis' files (example database, caches) go to attnbench's cache directory, never into
    a `.hypothesis/` folder of whatever directory the user runs from (HYPOTHESIS_STORAGE_DIRECTORY
    still wins when set)."""
    if os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        return
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        return
    set_hypothesis_home_dir(cache_dir("hypothesis"))


def _apply_seed(config: pytest.Config) -> None:
    """The profile: --hypothesis-profile, else dev. A derandomized profile (ci) ignores
    --hypothesis-seed; with an explicit seed, run the same profile randomized by that seed, so
    `--hypothesis-seed N` really changes the examples."""
    try:
        from hypothesis import settings

        import attnbench.properties.profiles  # noqa: F401  (registers ci / dev / thorough)
    except ImportError:
        return
    profile = config.getoption("hypothesis_profile", None)
    if not profile and hasattr(config.option, "hypothesis_profile"):
        # plain pytest: dev, not Hypothesis' default, whose 200 ms deadline a first call that
        # compiles, or a loaded machine, exceeds on a correct kernel; replays then name it too
        profile = config.option.hypothesis_profile = "dev"
    if profile:
        settings.load_profile(profile)
    seed = config.getoption("hypothesis_seed", None)
    if seed is not None and settings.default.derandomize:
        name = f"{profile or 'default'}-seeded"
        settings.register_profile(name, parent=settings.default, derandomize=False)
        settings.load_profile(name)


_WORST = pytest.StashKey[float]()


# -- selection ---------------------------------------------------------------------------
def selected_impls(config: pytest.Config, variants: tuple[str, ...]) -> list[Impl]:
    names = config.getoption("impl")
    wanted_variants = set(config.getoption("variant")) or None
    if config.getoption("zoo"):
        pool = [i for i in load_zoo() if not names or i.key in names or i.name in names]
    elif names:
        pool = registry().resolve(names, wanted_variants or ())
    else:
        pool = registry().select(available_only=True)
    out = []
    for impl in pool:
        if impl.variant not in variants:
            continue
        if wanted_variants and impl.variant not in wanted_variants:
            continue
        out.append(impl)
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "impl" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("variant")
    if marker is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: a test taking `impl` needs @pytest.mark.variant(...)")
    impls = selected_impls(metafunc.config, marker.args)
    metafunc.parametrize("impl", impls, ids=[i.key for i in impls])


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    dev = request.config.getoption("device") or "cpu"
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("--device cuda but no CUDA device")
    return dev


@pytest.fixture(autouse=True)
def _check_impl_available(request: pytest.FixtureRequest) -> None:
    impl = request.node.callspec.params.get("impl") if hasattr(request.node, "callspec") else None
    if not isinstance(impl, Impl):  # None, or pytest's empty-parameter-set placeholder
        return
    reason = impl.unavailable()
    if reason:
        pytest.skip(f"{impl.key} unavailable: {reason}")
    dev = request.config.getoption("device") or "cpu"
    if not impl.device_ok(dev):
        pytest.skip(f"{impl.key} does not run on {dev}")


_CURRENT: list[pytest.Item] = []


# CUDA errors after which the process's context is unusable (every later call fails the same way)
STICKY_DEVICE_ERRORS = (
    "illegal memory access", "unspecified launch failure", "device-side assert", "misaligned address",
    "illegal instruction", "an illegal address", "CUDA error: launch failure",
)
# The exit code of a test process that ends itself because its device context is lost
# (verify restarts it without the finished tests; pytest-xdist restarts the worker).
DEVICE_LOST_EXIT = 75


def sticky_device_error(text: str) -> bool:
    return any(marker in text for marker in STICKY_DEVICE_ERRORS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    _CURRENT.append(item)
    restore = _examples_for(item)
    unguard = _guard_lost_device(item)
    try:
        result = yield
        # Kernel launches are asynchronous: a fault surfaces at the next synchronizing call, which
        # may be in another test. Synchronizing here charges it to the test that launched it.
        if (item.config.getoption("device") or "cpu").startswith("cuda") and _impl_of(item) is not None:
            import torch

            torch.cuda.synchronize()
        return result
    finally:
        unguard()
        restore()
        _CURRENT.pop()


def _guard_lost_device(item: pytest.Item) -> Callable[[], None]:
    """Wrap the Hypothesis test's inner function (Hypothesis' documented hook,
    `.hypothesis.inner_test`) so that the example which loses the CUDA context ends the test
    process at once, recorded with the case it drew. Hypothesis would otherwise shrink on a
    poisoned context, where every later example fails with the same error, and report the
    simplest case it tried instead of the one that faulted. Returns what unwraps it."""
    hyp = getattr(getattr(item, "obj", None), "hypothesis", None)
    if hyp is None or not isinstance(_impl_of(item), Impl):
        return lambda: None
    inner = hyp.inner_test

    # wraps: Hypothesis derives a derandomized profile's examples from the inner test's source
    # and name (function_digest) and prints failures under its name and signature
    @functools.wraps(inner)
    def guarded(*args, **kwargs):
        strategies.forget_drawn()
        try:
            return inner(*args, **kwargs)
        except Exception as exc:
            if sticky_device_error(f"{type(exc).__name__}: {exc}"):
                _stop_at_lost_device(item, exc, kwargs)
            raise

    hyp.inner_test = guarded
    return lambda: setattr(hyp, "inner_test", inner)


def _stop_at_lost_device(item: pytest.Item, exc: BaseException, drawn: dict) -> None:
    """Record the faulting example (the case it drew, else its plain drawn arguments) and end."""
    impl = _impl_of(item)
    case = strategies.drawn_case()
    if case is None:
        plain = {k: v for k, v in drawn.items() if k not in item.fixturenames and not hasattr(v, "draw")}
        case = f"dict({', '.join(f'{k}={v!r}' for k, v in plain.items())})" if plain else None
    row = CorrectnessRow(
        variant=impl.variant, impl=impl.name, property=getattr(item, "originalname", item.name), status="fail",
        device=item.config.getoption("device") or "cpu",
        reason=f"{_first_line(exc)} [at the case drawn, not shrunk: the CUDA context is lost; "
        "the remaining tests run in a fresh process]",
        counterexample=(case if isinstance(case, str) else repr(case)) if case is not None else None,
        seed=_seed("", item.config),
        replay=replay_command(item, impl),
    )
    line = row.to_line(item.nodeid)
    _append_row(item.config, line)
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # inside the test's call pytest captures stdout: the row must reach verify
        capture.suspend_global_capture(in_=True)
    if _STREAM:
        _emit(line)
    _end_lost_device(item, row)


def _examples_for(item: pytest.Item) -> Callable[[], None]:
    """Apply profiles.settings_for to this test item (a Hypothesis test reads its settings from
    the function when it is called); returns what puts the test's own settings back."""
    impl, fn = _impl_of(item), getattr(item, "obj", None)
    current = getattr(fn, "_hypothesis_internal_use_settings", None)
    if not isinstance(impl, Impl) or current is None:
        return lambda: None
    changed = profiles.settings_for(impl, item.config.getoption("device") or "cpu", current)
    if changed is None:
        return lambda: None
    fn._hypothesis_internal_use_settings = changed
    return lambda: setattr(fn, "_hypothesis_internal_use_settings", current)


def record_ratio(ratio: float) -> None:
    """Record one measured error / allowed error for the running test; a passing test reports
    its worst (a failing one the ratio its failure states, see _failed_ratio)."""
    if not _CURRENT:
        return
    item = _CURRENT[-1]
    ratio = float("inf") if ratio != ratio else float(ratio)  # NaN counts as the worst
    worst = item.stash.get(_WORST, None)
    if worst is None or ratio > worst:
        item.stash[_WORST] = ratio


@pytest.fixture(scope="session")
def measure():
    """measure(ratio): session-scoped (Hypothesis-safe); records onto the running test."""
    return record_ratio


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _select_properties(config, items)
    _shard(config, items)
    path = config.getoption("attnbench_skip_file")
    if path and Path(path).exists():
        skip = set(Path(path).read_text().split("\n"))
        config.hook.pytest_deselected(items=[i for i in items if i.nodeid in skip])
        items[:] = [i for i in items if i.nodeid not in skip]
    path = config.getoption("attnbench_only_file")
    if path:
        order = {n: k for k, n in enumerate(x.strip() for x in Path(path).read_text().splitlines()) if n}
        config.hook.pytest_deselected(items=[i for i in items if i.nodeid not in order])
        items[:] = sorted((i for i in items if i.nodeid in order), key=lambda i: order[i.nodeid])
    if _STREAM:  # the number of checks this process will run, for a true progress total
        _emit({"event": "collected", "total": sum(isinstance(_impl_of(i), Impl) for i in items)})
        _emit({"event": "requested", **requested(config)})


def _shard(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep this process's share of the checks (--attnbench-shard I/N): every N-th in collection
    order, so each shard gets a mix of implementations and properties."""
    value = config.getoption("attnbench_shard")
    if not value:
        return
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise pytest.UsageError(f"--attnbench-shard: expected I/N with 0 <= I < N, got {value!r}")
    keep = [item for k, item in enumerate(items) if k % int(count) == int(index)]
    config.hook.pytest_deselected(items=[item for k, item in enumerate(items) if k % int(count) != int(index)])
    items[:] = keep


def requested(config: pytest.Config) -> dict:
    """What this run was asked to verify, for the runner's no-silent-pass check: the keys of the
    implementations (named with --impl, else every available one of the selected variants),
    whether they were named, and the implementation sources that failed to load (they would
    have run when none was named)."""
    if config.getoption("zoo"):
        return {"impls": [], "explicit": True, "broken": []}
    names, variants = config.getoption("impl"), config.getoption("variant")
    reg = registry()
    if names:
        impls = reg.resolve(names, variants)
    else:
        impls = [i for i in reg.select(available_only=True) if not variants or i.variant in variants]
    broken = [] if names else [f"{b.origin}: failed to load: {b.reason}" for b in reg.broken]
    return {"impls": list(dict.fromkeys(i.key for i in impls)), "explicit": bool(names), "broken": broken}


def _select_properties(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--property P keeps the tests named P, or when none is, those whose name contains P. A P
    that matches no property at all is a usage error: checking nothing must never pass."""
    wanted = config.getoption("property")
    if not wanted:
        return
    names = {getattr(i, "originalname", i.name) for i in items}
    keep: set[str] = set()
    for p in wanted:
        found = {p} if p in names else {n for n in names if p in n}
        if not found:
            close = difflib.get_close_matches(p, sorted(names), n=2, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            message = f"unknown property {p!r}; {hint}known: {', '.join(sorted(names))}"
            if _STREAM:
                _emit({"event": "usage_error", "message": message})
            raise pytest.UsageError(message)
        keep |= found
    config.hook.pytest_deselected(items=[i for i in items if getattr(i, "originalname", i.name) not in keep])
    items[:] = [i for i in items if getattr(i, "originalname", i.name) in keep]


def _impl_of(item: pytest.Item):
    return item.callspec.params.get("impl") if hasattr(item, "callspec") else None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem) -> None:
    if _STREAM:
        impl = _impl_of(item)
        event = {"event": "start", "nodeid": item.nodeid}
        if isinstance(impl, Impl):  # what a crash of this test is reported against, and how to replay it
            event.update(variant=impl.variant, impl=impl.name, property=getattr(item, "originalname", item.name),
                         replay=replay_command(item, impl))
        _emit(event)


def _emit(event: dict) -> None:
    sys.stdout.write("\n" + STREAM_PREFIX + json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


# -- reporting ---------------------------------------------------------------------------
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    impl = item.callspec.params.get("impl") if hasattr(item, "callspec") else None
    if not isinstance(impl, Impl):  # None, or the placeholder of an empty parameter set (no impl selected)
        return
    failed = report.failed
    finished = (report.when == "call") or (report.when == "setup" and (report.failed or report.skipped))
    if not finished:
        return
    text = _failure_text(report, call) if failed else ""
    row = CorrectnessRow(
        variant=impl.variant,
        impl=impl.name,
        property=getattr(item, "originalname", item.name),
        status=_status(report, call),
        device=item.config.getoption("device") or "cpu",
        reason=_reason(report, call) if (failed or report.skipped) else "",
        error_ratio=_failed_ratio(call) if failed else item.stash.get(_WORST, None),
        counterexample=_counterexample(text) if failed else None,
        seed=_seed(text, item.config) if failed else None,
        replay=replay_command(item, impl) if failed else None,
        duration_s=round(report.duration, 3),
    )
    lost = failed and sticky_device_error(text)
    if lost:
        row.reason += " [the CUDA context is lost: the remaining tests run in a fresh process]"
    line = row.to_line(item.nodeid)
    _append_row(item.config, line)
    if failed:
        detail = f"{row.replay}\nminimal spec: {row.counterexample}\nseed: {row.seed}"
        report.sections.append(("attnbench replay", detail))
    if _STREAM:
        _emit(line)
    if lost:
        _end_lost_device(item, row)


def _end_lost_device(item: pytest.Item, row: CorrectnessRow) -> None:
    """The test hit a sticky CUDA error: every later test in this process would fail with it and
    be charged to the wrong implementation. Record why and end the process; its supervisor starts
    a fresh one for the tests that are left (verify's loop, or pytest-xdist's worker restart)."""
    message = (f"{row.variant}/{row.impl} {row.property}: the CUDA context is lost (sticky device error); "
               "ending this test process")
    if _STREAM:
        _emit({"event": "device_lost", "nodeid": item.nodeid, "message": message})
    sys.stderr.write(f"attnbench: {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(DEVICE_LOST_EXIT)


def _failed_ratio(call) -> float | None:
    """The ratio of the check that failed, as its message states it (the tolerance rule says
    "(ratio 6.66e+05; ..."), so a failure's header and reason give one number. Examples tried
    on the way (other explicit examples, shrinking) have other ratios and do not count; a
    failure that is not a tolerance check (an exception, a wrong shape) has no ratio."""
    exc = call.excinfo.value if call.excinfo is not None else None
    if exc is None:
        return None
    ratios = []
    for e in [exc, *getattr(exc, "exceptions", ())]:
        stated = getattr(e, "ratio", None)
        if isinstance(stated, (int, float)):
            ratios.append(float(stated))
        else:
            ratios += [float(m) for m in _RATIO.findall(str(e).split("\n", 1)[0])]
    return max(ratios) if ratios else None


_RATIO = re.compile(r"\(ratio ([-+.\deE]+|inf|nan)\b")


def _failure_text(report, call) -> str:
    """The failure's message and Hypothesis' notes on it (falsifying example, reproduction
    blob), read from the exception itself; else pytest's text without its `E ` markers."""
    exc = call.excinfo.value if call.excinfo is not None else None
    if exc is None:
        return strip_markers(report.longreprtext)
    parts = [str(exc), *map(str, getattr(exc, "__notes__", ()))]
    for sub in getattr(exc, "exceptions", ()):
        parts += [str(sub), *map(str, getattr(sub, "__notes__", ()))]
    text = "\n".join(parts)
    return text if _FALSIFYING.search(text) else strip_markers(report.longreprtext)


_FALSIFYING = re.compile(r"Falsifying (?:explicit )?example|Failing test case")


def strip_markers(text: str) -> str:
    """pytest's failure text without the `E   ` it puts before each line of an exception."""
    return re.sub(r"(?m)^E(?: {1,3}|$)", "", text)


def _status(report, call) -> str:
    if report.skipped:
        return "skip"
    if report.passed:
        return "pass"
    if report.when == "setup":
        return "error"
    return "fail"


def _reason(report, call) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return skip_reason(str(report.longrepr[2]))
    if call.excinfo is not None:
        exc = call.excinfo.value
        if isinstance(exc, BaseExceptionGroup):  # Hypothesis' "found N distinct failures": name each,
            parts = []  # with its own falsifying spec (Hypothesis notes it on each sub-exception)
            for i, e in enumerate(exc.exceptions, 1):
                case = _failing_case(e)
                parts.append(f"({i}) {_first_line(e)[:300]}" + (f" [{case}]" if case else ""))
            return f"{_first_line(exc)}: {'; '.join(parts)}"[:2000]
        if _all_declined(exc):
            return DECLINED_REASON
        return _first_line(exc)[:400]
    return report.longreprtext.strip().splitlines()[-1][:400] if report.longreprtext else ""


def _all_declined(exc: BaseException) -> bool:
    """Whether Hypothesis gave up because every example was filtered out: its filter_too_much
    health check, or Unsatisfiable where it tried every input."""
    from hypothesis.errors import FailedHealthCheck, Unsatisfiable

    return isinstance(exc, Unsatisfiable) or (
        isinstance(exc, FailedHealthCheck) and "0 inputs were generated successfully" in str(exc))


DECLINED_REASON = ("no drawn case ran: the implementation declares what this property needs, but declined "
                   "every case drawn for it (its supports(), dtypes or layouts); a declaration wider than "
                   "what runs here checks nothing. A feature this machine lacks belongs in Impl.absent "
                   "(Hypothesis: every example filtered out)")


def skip_reason(text: str) -> str:
    """A skip's own message: Hypothesis appends "Failing explicit example: ..." (the whole call)
    to a skip raised inside an @example, which is not a failure and not part of the reason."""
    text = text.removeprefix("Skipped: ")
    return re.split(r"\n(?:Failing explicit example|Falsifying explicit example|Failing test case)", text)[0].strip()


def _failing_case(exc: BaseException) -> str | None:
    """The example Hypothesis noted on one exception: its Spec(...) / ModuleCase(...) if it drew
    one, else its plain drawn arguments."""
    text = "\n".join(map(str, getattr(exc, "__notes__", ())))
    if not _FALSIFYING.search(text):
        return None
    case = _counterexample(text)
    return case[len("dict(") : -1] if case and case.startswith("dict(") else case


def _plain_args(note: str) -> str | None:
    """The drawn arguments of a falsifying call with plain values (fixtures like impl= are objects)."""
    call = re.sub(r"  # [^\n]*", "", note.split("(", 1)[-1])  # "  # or any other generated value"
    args = [a for a in _top_level_args(call) if _PLAIN.fullmatch(a)]
    return ", ".join(a for a in args if not a.startswith("device="))[:300] or None


_PLAIN = re.compile(r"\w+=(-?[\d.]+(?:e[+-]?\d+)?|True|False|None|'[^']*')")


def _top_level_args(call: str) -> list[str]:
    """Split "a=1, b=f(2, 3)) ..." at its top-level commas, up to the unmatched ")"."""
    args, depth, start, quote = [], 0, 0, None
    for i, ch in enumerate(call):
        if depth == 0 and not quote and ch == ")":
            call = call[:i]
            break
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(call[start:i].strip())
            start = i + 1
    args.append(call[start:].strip())
    return [a for a in args if a]


def _first_line(exc: BaseException) -> str:
    first = next((line for line in str(exc).strip().splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"


_CASE = re.compile(r"\b(?:Spec|ModuleCase|VarlenSpec|PagedSpec)\(")  # the drawn cases whose repr pastes back into Python
_NOTED = re.compile(r"(^\s*spec: )(?:Spec|ModuleCase|VarlenSpec|PagedSpec)\(", re.MULTILINE)


def _counterexample(text: str) -> str | None:
    """The minimal failing case as Python: the Spec(...) or ModuleCase(...) of Hypothesis'
    falsifying example (parentheses balanced); else its plain drawn arguments; else the last
    Spec(...) in the failure text."""
    text = strip_markers(text)
    m = _FALSIFYING.search(text)
    falsifying = m.start() if m else -1
    starts = [m.start() for m in _CASE.finditer(text)]
    after = [s for s in starts if falsifying >= 0 and s > falsifying]
    # the strategies note the case they settle on in its short form (`spec: Spec(B=2, ...)`): the
    # last such note is the case the test ran; Hypothesis' own "Draw n" lines print every field
    noted = [m.end(1) for m in _NOTED.finditer(text)
             if m.start() > falsifying >= 0]
    for start in noted[-1:] or after[:1] or list(reversed(starts)):
        case = _balanced(text, start)
        if case:
            return case
    args = _plain_args(text[falsifying:]) if falsifying >= 0 else None
    return f"dict({args})" if args else None


def _balanced(text: str, start: int) -> str | None:
    """The call that starts at text[start] up to its closing parenthesis, on one line."""
    depth = 0
    for i in range(text.index("(", start), len(text)):
        depth += text[i] == "("
        depth -= text[i] == ")"
        if depth == 0:
            return re.sub(r"\(\s+", "(", re.sub(r",?\s*\)$", ")", " ".join(text[start : i + 1].split())))
    return None


def _seed(text: str, config: pytest.Config) -> str:
    """What `attnbench verify --seed` takes to draw the same examples: the seed of the run, or
    for a derandomized profile a note that every run draws the same ones."""
    seed = config.getoption("hypothesis_seed", None)
    profile = config.getoption("hypothesis_profile", None) or "default"
    if seed is not None:
        return str(seed)
    m = re.search(r"@reproduce_failure\((.+?)\)", text)  # a random run without a seed (plain pytest)
    if m:
        return f"none given; Hypothesis' blob: @reproduce_failure({m.group(1)})"
    from hypothesis import settings

    if settings.default.derandomize:
        return f"derandomized ({profile} profile)"
    return f"none given ({profile} profile: random; its example database replays a failure first)"


def replay_command(item: pytest.Item, impl: Impl) -> str:
    """One shell command that re-runs this property against this implementation only, with the
    same profile, seed and device; it works pasted from any directory."""
    cfg = item.config
    target = impl_target(impl)
    parts = [*cli_command(), "verify", "--impl", target, "--variant", impl.variant,
             "--property", getattr(item, "originalname", item.name)]
    if cfg.getoption("zoo"):
        parts.append("--zoo")
    profile = cfg.getoption("hypothesis_profile", None)
    if profile:
        parts += ["--profile", profile]
    seed = cfg.getoption("hypothesis_seed", None)
    if seed is not None:
        parts += ["--seed", str(seed)]
    dev = cfg.getoption("device")
    if dev:
        parts += ["--device", dev]
    command = shlex.join(parts)
    path = os.environ.get("PYTHONPATH", "")
    if is_target(target) and path:  # where the named module was found, made absolute
        path = os.pathsep.join(str(Path(p).resolve()) for p in path.split(os.pathsep) if p)
        command = f"PYTHONPATH={shlex.quote(path)} {command}"
    return command


def impl_target(impl: Impl) -> str:
    """How --impl names exactly this implementation: its key for registered ones; for one loaded
    from package.module:object, the module attribute bound to it, else object[variant/name]
    (one member of a list)."""
    origin = impl.origin or ""
    if not is_target(origin):
        return impl.key
    module_name, _, attr = origin.partition(":")
    module = sys.modules.get(module_name)
    obj = module
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part, None)
    if _same(obj, impl):
        return origin
    names = [name for name, value in vars(module).items() if _same(value, impl)] if module is not None else []
    return f"{module_name}:{names[0]}" if names else f"{origin}[{impl.key}]"


def _same(obj: object, impl: Impl) -> bool:
    """obj is this implementation (the watchdog hands tests a copy with a wrapped fn: same key)."""
    return isinstance(obj, Impl) and obj.key == impl.key and obj.origin == impl.origin


def cli_command() -> list[str]:
    """The attnbench command of this environment: `attnbench` when that is what the shell finds,
    else the script's full path (an environment that is not activated)."""
    script = Path(sys.executable).parent / "attnbench"
    found = shutil.which("attnbench")
    if found and script.exists() and Path(found).resolve() == script.resolve():
        return ["attnbench"]
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "attnbench.app.cli"]


def _append_row(config: pytest.Config, row: dict) -> None:
    """Append the row to --attnbench-results as one JSON line, at once: a run killed by a time
    limit keeps every row it finished. Under pytest-xdist each worker writes its own file."""
    path = config.getoption("attnbench_results")
    if not path:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    target = Path(f"{path}.{worker}" if worker else path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def read_rows(path: str | os.PathLike) -> list[CorrectnessRow]:
    """Rows written with --attnbench-results (and its per-worker siblings PATH.gwN). A line that
    is not a JSON object (a row torn by a killed run) is skipped with a warning on stderr; one
    that is not a row is a ValueError naming the file and line."""
    path = Path(path)
    rows = []
    for p in sorted([path, *path.parent.glob(path.name + ".gw*")]):
        if not p.exists():
            continue
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                rows.append(CorrectnessRow.from_line(row, f"{p}:{n}"))
            else:
                print(f"warning: {p}:{n}: skipped a row that is not a JSON object (torn?): {line[:80]!r}",
                      file=sys.stderr)
    return rows
