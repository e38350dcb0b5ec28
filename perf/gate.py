"""The regression gate: compare a run with a baseline through ratios taken within each run.

Each implementation's time is divided by the reference implementation's time in the SAME
cell of the SAME run, so a faster or slower machine (clock drift, another GPU of the same
model, a busy host) cancels out. A cell regresses when its ratio grew by more than the
threshold (default 10%) and by more than the timings' own resolution (the widest p20-p80
spread, relative to the median, of the four timings behind the two ratios; a change inside
that band is reported as "noisy" and not judged). A cell that ran in the baseline but fails
now (oom / error) is broken; both fail the gate. Cells missing from the current run, new
cells, cells whose reference did not run and cells timed by different timers in the two runs
(CUDA graph replays against eager CUDA events: "retimed") are reported and do not fail it
(unless fail_on_missing, for missing cells). A cell whose preferred reference did not run
falls back to the registry's reference implementation of the variant, in both runs alike.

Host-bound cells: a CUDA timing whose enqueueing took >= 80% of its GPU time (row.host_ms,
perf/timing.HOST_BOUND) kept the GPU waiting on the host, so its time follows the host CPU
(which differs between machines of the same GPU model) and the reference's ratio does not
cancel that. A change past the threshold in such a cell is `host_bound`: reported, not failing,
unless judge_host_bound (compare runs from one host, e.g. two runs in one CI job, with it on).
The reference is the denominator of every ratio in its cell, so a cell takes the first reference
of the chain that was GPU-bound in both runs (a host-bound reference that runs faster on another
host would "regress" implementations whose own times did not move: seen with sdpa_flash at
0.32 ms on the H100, evidence/h100/runs/s7/call3-gate-before-fix.txt); if every candidate was
host-bound, the cell's changes are host_bound.

Per device model: a run is compared only with a baseline of its own GPU model (env.device_name
of a CUDA run; "cpu" for a CPU run). The default baseline is the committed one for the CURRENT
RUN's model (perf/baselines/<model slug>.json, or any baseline file recording that model), not
the model of the machine the gate runs on. Comparing two models is refused (exit 2) unless
--cross-device asks for it, and then the result is a report with no verdict (exit 3): ratios
move with the hardware (an H200's extra bandwidth sped up memory-bound reference cells and
"regressed" 36 cells of an unchanged H100 baseline).

Exit codes: 0 pass, 1 fail, 2 bad input (unreadable file, a time that is NaN / zero / negative
/ not a number, a bad threshold, no baseline, two device models, an interrupted run as either
side: env.interrupted), 3 no verdict (no cell was
judged in both runs, or a --cross-device report). Every error names its file.

    python -m attnbench.perf.gate current.json --baseline perf/baselines/h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from attnbench.reports.tables import cell_label
from attnbench.results import PerfRow, Results

from .timing import HOST_BOUND

# The reference chain's head, best first: FlashAttention-4 where it runs (the fastest kernel on
# Hopper), else torch's FlashAttention-2 backend. Per cell, the first that ran in both runs wins.
DEFAULT_REFERENCE: tuple[str, ...] = ("flash_attn4", "sdpa_flash")
BASELINES = Path(__file__).resolve().parent / "baselines"
FAILING = ("regressed", "broken")
JUDGED = ("ok", "regressed", "improved", "noisy", "host_bound")  # a cell compared in both runs
EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_NO_VERDICT = 0, 1, 2, 3


class GateError(ValueError):
    """Bad gate input: the message is one line and names the file (or the option) at fault."""
ORDER = ("broken", "regressed", "host_bound", "noisy", "missing", "retimed", "no_reference", "improved", "new", "reference",
         "ok", "not_ok")


@dataclass
class GateRow:
    variant: str
    mode: str
    cell: str  # the cell's label (reports.tables.cell_label)
    impl: str
    status: str  # one of ORDER
    base_ratio: float | None = None
    cur_ratio: float | None = None
    change: float | None = None  # cur_ratio / base_ratio - 1
    base_ms: float | None = None
    cur_ms: float | None = None
    note: str = ""
    reference: str | None = None  # the implementation this cell's ratios are taken against


@dataclass
class GateResult:
    rows: list[GateRow]
    threshold: float
    references: dict[str, str | None]  # per variant, the first of the chain that ran (cells fall back)
    fail_on_missing: bool = False
    drift: float | None = None  # median change of the reference's own time (machine speed)
    counts: Counter = field(default_factory=Counter)
    devices: tuple[str, str] | None = None  # (current, baseline) device models when they differ (a report)

    def __post_init__(self) -> None:
        self.counts = Counter(r.status for r in self.rows)

    @property
    def failures(self) -> list[GateRow]:
        failing = FAILING + (("missing",) if self.fail_on_missing else ())
        return [r for r in self.rows if r.status in failing]

    @property
    def judged(self) -> int:
        """Cells compared in both runs (the reference's own rows not counted)."""
        return sum(self.counts[s] for s in JUDGED)

    @property
    def verdict(self) -> str:
        """pass | fail | no_verdict (nothing judged in both runs, or a cross-device report)."""
        if self.devices is not None or not self.judged:
            return "no_verdict"
        return "fail" if self.failures else "pass"

    @property
    def ok(self) -> bool:
        return self.verdict == "pass"

    @property
    def exit_code(self) -> int:
        return {"pass": EXIT_PASS, "fail": EXIT_FAIL, "no_verdict": EXIT_NO_VERDICT}[self.verdict]

    def summary(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items(), key=lambda x: ORDER.index(x[0])))
        used: dict[str, Counter] = defaultdict(Counter)
        for r in self.rows:
            if r.reference:
                used[r.variant][r.reference] += 1
        refs = ", ".join(f"{v}: {'/'.join(used[v])}" for v in sorted(used)) or "none"
        drift = f"; reference times moved {self.drift:+.1%} (median, cancels in ratios)" if self.drift is not None else ""
        if self.devices is not None:
            verdict = (f"REPORT, no verdict: {self.devices[0]!r} against a {self.devices[1]!r} baseline "
                       "(ratios move with the hardware)")
        elif not self.judged:
            verdict = "NO VERDICT: no cell ran in both runs"
        else:
            verdict = "PASS" if self.ok else f"FAIL ({len(self.failures)} cells)"
        return f"gate {verdict} at threshold {self.threshold:.0%}: {counts or 'no cells'}. References: {refs}{drift}"

    def shown(self, verbose: bool = False, per_status: int = 15) -> list[GateRow]:
        """Rows worth reading, worst first; informational statuses capped at per_status rows."""
        quiet = () if verbose else ("ok", "reference", "not_ok")
        rows = sorted((r for r in self.rows if r.status not in quiet),
                      key=lambda r: (ORDER.index(r.status), -(r.change or 0)))
        if verbose:
            return rows
        seen: Counter = Counter()
        kept = []
        for r in rows:
            seen[r.status] += 1
            if r.status in FAILING or seen[r.status] <= per_status:
                kept.append(r)
        return kept


def cell_id(r: PerfRow) -> str:
    return f"{r.variant}|{r.mode}|{json.dumps(r.shape, sort_keys=True, default=str)}"


def reference_chain(variant: str, reference: str | dict | Iterable[str] | None,
                    recorded: Iterable[str] = ()) -> list[str]:
    """Candidates for a variant's reference, best first: the preferred ones (a name, names, or
    {variant: name}; default DEFAULT_REFERENCE), the ones a stored run recorded, the registry's."""
    preferred = reference.get(variant) if isinstance(reference, dict) else reference
    if not preferred:
        preferred = DEFAULT_REFERENCE
    head = [preferred] if isinstance(preferred, str) else list(preferred)
    chain = [*head, *recorded, *_registry_reference(variant)]
    return list(dict.fromkeys(n for n in chain if n))


def resolve_reference(variant: str, names: Iterable[str], reference: str | dict | Iterable[str] | None,
                      fallback: Iterable[str] = ()) -> str | None:
    """The first candidate of the reference chain that ran (is in `names`)."""
    names = set(names)
    return next((n for n in reference_chain(variant, reference, fallback) if n in names), None)


def _by_cell(results: Results) -> dict[str, dict[str, PerfRow]]:
    cells: dict[str, dict[str, PerfRow]] = defaultdict(dict)
    for r in results.perf:
        cells[cell_id(r)][r.impl] = r
    return cells


def _ok(r: PerfRow | None) -> bool:
    return r is not None and r.status == "ok" and bool(r.ms) and r.ms > 0


def _recorded(results: Results) -> dict[str, list[str]]:
    """Per variant, the references a stored run's rows recorded, most used first."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in results.perf:
        if getattr(r, "reference", None):
            counts[r.variant][r.reference] += 1
    return {v: [n for n, _ in c.most_common()] for v, c in counts.items()}


def _registry_reference(variant: str) -> list[str]:
    try:
        from attnbench.registry import registry

        return [registry().reference(variant).name]
    except Exception:  # no registry here, or no reference for the variant
        return []


def host_share(r: PerfRow | None) -> float | None:
    """Host enqueue time over GPU time of a CUDA timing (None when not recorded)."""
    host = getattr(r, "host_ms", None) if r is not None else None
    return host / r.ms if host is not None and r.ms else None


def _host_bound(r: PerfRow | None) -> bool:
    share = host_share(r)
    return share is not None and share >= HOST_BOUND


def _spread(r: PerfRow) -> float | None:
    if r.ms_p20 is None or r.ms_p80 is None or not r.ms:
        return None
    return (r.ms_p80 - r.ms_p20) / r.ms


def check_threshold(threshold: object) -> float:
    """A finite fraction in (0, 10): 0.1 is 10%."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or not 0 < threshold < 10:
        raise GateError(f"threshold: must be a finite fraction in (0, 10), e.g. 0.1 for 10%, got {threshold!r}")
    return float(threshold)


def device_model(env: dict) -> str | None:
    """The device model a run's times belong to: "cpu" for a CPU sweep, else env.device_name."""
    where = env.get("bench_device") or env.get("device")
    if isinstance(where, str) and where.split(":")[0] == "cpu":
        return "cpu"
    name = env.get("device_name")
    return name if isinstance(name, str) and name.strip() else None


def model_slug(model: str) -> str:
    """A baseline file name for a device model: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")


def check_times(results: Results, path: str | Path) -> None:
    """Reject a run whose ok rows carry a time that is not a positive finite number, naming the
    file and the row: a NaN, zero or negative time makes every ratio of its cell meaningless."""
    if not results.perf:
        raise GateError(f"{path}: has no perf rows to compare")
    for n, r in enumerate(results.perf):
        if r.status != "ok":
            continue
        for name in ("ms", "ms_p20", "ms_p80", "host_ms"):
            value = getattr(r, name, None)
            if value is None and name != "ms":
                continue
            good = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
                value > 0 or (name == "host_ms" and value == 0))
            if not good:
                raise GateError(f"{path}: perf row {n} ({r.variant}/{r.impl} {r.mode}) has {name}={value!r}: "
                                "not a positive finite time")


def check_finished(results: Results, path: str | Path, role: str) -> None:
    """Refuse a run that a signal stopped (env.interrupted): the cells it did not reach would pass
    as missing, and as a baseline it would leave them unjudged from then on."""
    signal = results.env.get("interrupted")
    if signal:
        use = "not a baseline" if role == "baseline" else "the cells it did not reach would go unjudged"
        raise GateError(f"{path}: an interrupted run (stopped by {signal} after {len(results.perf)} rows): {use}; "
                        "gate a run that finished")


def load(path: str | Path) -> Results:
    """A results file for the gate; a file that cannot be read is a GateError naming it."""
    try:
        results = Results.load(path)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise GateError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    return results


def gate(
    current: Results,
    baseline: Results,
    threshold: float = 0.10,
    reference: str | dict | Iterable[str] | None = None,
    fail_on_missing: bool = False,
    judge_host_bound: bool = False,
    cross_device: bool = False,
    paths: tuple[str, str] = ("current run", "baseline"),
) -> GateResult:
    """Judge every (cell, implementation) of the baseline and the current run; see the module
    docstring. reference: an implementation name (or names, or {variant: name}); default
    DEFAULT_REFERENCE where it ran, else the baseline's recorded reference, else the variant's
    registry reference. Two device models raise GateError unless cross_device, which gives a
    report with no verdict. paths name the two runs in errors."""
    threshold = check_threshold(threshold)
    for results, path, role in ((current, paths[0], "current"), (baseline, paths[1], "baseline")):
        check_finished(results, path, role)
        check_times(results, path)
    models = device_model(current.env), device_model(baseline.env)
    for path, model in zip(paths, models):
        if model is None:
            raise GateError(f"{path}: records no device model (env.device_name): cannot tell which baseline it matches")
    if models[0] != models[1] and not cross_device:
        raise GateError(f"{paths[0]} ran on {models[0]!r}, {paths[1]} on {models[1]!r}: the gate compares runs of "
                        "one device model (a baseline per model in perf/baselines/; --cross-device for a report)")
    recorded = _recorded(baseline)
    variants = {r.variant for r in baseline.perf} | {r.variant for r in current.perf}
    chains = {v: reference_chain(v, reference, recorded.get(v, ())) for v in variants}
    base_cells, cur_cells = _by_cell(baseline), _by_cell(current)
    rows: list[GateRow] = []
    drift: list[float] = []
    for cid in list(base_cells) + [c for c in cur_cells if c not in base_cells]:
        base, cur = base_cells.get(cid, {}), cur_cells.get(cid, {})
        variant = next(iter((base or cur).values())).variant
        # The cell's reference: the first of the chain that ran in this cell in both runs and was
        # GPU-bound in both (a host-bound denominator moves every ratio of the cell with the host);
        # failing that, the first that ran in both.
        ran = [n for n in chains[variant] if _ok(base.get(n)) and _ok(cur.get(n))]
        ref = next((n for n in ran if not _host_bound(base[n]) and not _host_bound(cur[n])), ran[0] if ran else None)
        for impl in list(base) + [i for i in cur if i not in base]:
            row = _judge(base.get(impl), cur.get(impl), base.get(ref), cur.get(ref), impl == ref, threshold,
                         judge_host_bound)
            if row is not None:
                row.reference = ref
                rows.append(row)
        if ref is not None:
            drift.append(cur[ref].ms / base[ref].ms - 1)
    ran = {(r.variant, r.impl) for r in (*baseline.perf, *current.perf) if _ok(r)}
    refs = {v: next((n for n in c if (v, n) in ran), c[0] if c else None) for v, c in chains.items()}
    devices = models if models[0] != models[1] else None
    return GateResult(rows, threshold, refs, fail_on_missing, statistics.median(drift) if drift else None,
                      devices=devices)


def _judge(b: PerfRow | None, c: PerfRow | None, rb: PerfRow | None, rc: PerfRow | None,
           is_ref: bool, threshold: float, judge_host_bound: bool = False) -> GateRow | None:
    some = b or c
    if some.status == "unsupported" and (b is None or c is None or b.status == c.status):
        return None  # never ran, nothing to compare
    row = GateRow(some.variant, some.mode, cell_label(some.variant, some.mode, some.shape), some.impl, "ok",
                  base_ms=b.ms if b else None, cur_ms=c.ms if c else None)
    if b is None or not _ok(b):
        row.status = "new" if _ok(c) else "not_ok"
        if b is not None and _ok(c):
            row.note = f"was {b.status} in the baseline"
        return row
    if c is None or c.status in ("skipped", "unsupported"):
        row.status, row.note = "missing", ("not run" if c is None else f"{c.status}: {c.reason[:60]}")
        return row
    if not _ok(c):
        row.status, row.note = "broken", f"{c.status}: {c.reason[:80]}"
        return row
    if b.timer and c.timer and b.timer != c.timer:  # graph replays drop the launch gaps eager timings keep
        row.status, row.note = "retimed", f"timed by {b.timer} in the baseline, by {c.timer} now: not compared"
        return row
    if is_ref:
        row.status, row.change = "reference", c.ms / b.ms - 1
        row.note = "absolute time change (the ratios' denominator)"
        return row
    if not (_ok(rb) and _ok(rc)):
        row.status, row.note = "no_reference", "no reference implementation ran in this cell in both runs"
        return row
    row.base_ratio, row.cur_ratio = b.ms / rb.ms, c.ms / rc.ms
    row.change = row.cur_ratio / row.base_ratio - 1
    # The measurement's own resolution: the widest p20-p80 spread (relative to the median) of the
    # four timings behind the two ratios. A change inside it is not evidence either way.
    band = max((s for s in map(_spread, (b, c, rb, rc)) if s is not None), default=0.0)
    # Host-bound timings among the four (the reference's too: it is the ratio's denominator).
    host = max(((h, who) for who, r in (("", b), ("", c), ("the reference's ", rb), ("the reference's ", rc))
                if (h := host_share(r)) is not None), default=None)
    if abs(row.change) > threshold:
        if not judge_host_bound and host is not None and host[0] >= HOST_BOUND:
            row.status = "host_bound"
            row.note = (f"{row.change:+.0%}, but {host[1]}host enqueueing took {host[0]:.0%} of the GPU time: "
                        "this ratio follows the host CPU; not judged (--judge-host-bound)")
        elif abs(row.change) <= band:
            row.status = "noisy"
            row.note = f"{row.change:+.0%} is within the timings' p20-p80 spread ({band:.0%}): not judged"
        else:
            row.status = "regressed" if row.change > 0 else "improved"
    elif band > threshold:
        row.note = f"noisy: p20-p80 spread {band:.0%} of the median"
    return row


def default_baseline(model: str | None) -> Path | None:
    """The committed baseline of this device model: perf/baselines/<model slug>.json, else any
    baseline file whose run recorded that model; None if there is none."""
    if not model:
        return None
    named = BASELINES / f"{model_slug(model)}.json"
    if named.is_file():
        return named
    for path in sorted(BASELINES.glob("*.json")):
        try:
            env = json.loads(path.read_text()).get("env", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(env, dict) and device_model(env) == model:
            return path
    return None


def _threshold_arg(text: str) -> float:
    try:
        return check_threshold(float(text))
    except (ValueError, GateError) as exc:
        raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, GateError) else
                                         f"threshold: not a number: {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The gate's options (shared by `attnbench gate` and `python -m attnbench.perf.gate`)."""
    p.add_argument("current", help="results.json of this run")
    p.add_argument("--baseline", default=None,
                   help="baseline results.json (default: the committed one for the current run's device model)")
    p.add_argument("--threshold", type=_threshold_arg, default=0.10,
                   help="allowed slowdown of time ratios, a fraction (default 0.10)")
    p.add_argument("--reference", default=None, help="reference implementation for the ratios")
    p.add_argument("--fail-on-missing", action="store_true", help="fail when a baseline cell did not run")
    p.add_argument("--judge-host-bound", action="store_true",
                   help="judge cells whose time follows the host CPU too (both runs from one host)")
    p.add_argument("--cross-device", action="store_true",
                   help="compare runs of two device models anyway: a report with no verdict (exit 3)")
    p.add_argument("--verbose", action="store_true", help="list every cell, not only the ones worth reading")


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> int:
    """Load, check and gate; one line per error (exit 2), the table, then the verdict's exit code."""
    try:
        current = load(args.current)
        check_finished(current, args.current, "current")  # before looking for its baseline
        baseline_path = args.baseline or default_baseline(device_model(current.env))
        if baseline_path is None:
            model = device_model(current.env)
            raise GateError(f"{args.current}: no baseline committed for device model {model!r} "
                            f"(perf/baselines/{model_slug(model or 'unknown')}.json); give --baseline")
        baseline = load(baseline_path)
        result = gate(current, baseline, args.threshold, args.reference, args.fail_on_missing,
                      args.judge_host_bound, args.cross_device, paths=(str(args.current), str(baseline_path)))
    except GateError as exc:
        say(f"error: {exc}")
        return EXIT_BAD_INPUT
    from rich.console import Console

    from attnbench.reports.terminal import gate_table

    Console(width=160).print(gate_table(result, verbose=args.verbose))
    say(f"gate: {result.verdict.replace('_', ' ')} against {baseline_path} (exit {result.exit_code})")
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnbench.perf.gate", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv), say=lambda msg: print(msg, file=sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
