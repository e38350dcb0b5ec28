"""The `attnbench` command: list, verify, bench, report, gate, and run (the main job)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from rich.console import Console
from rich.table import Table

from attnbench.registry import VARIANTS, load_zoo, registry
from attnbench.spec import FEATURES

console = Console(width=max(100, min(Console().width, 140)))

PROFILES = ("ci", "dev", "thorough")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def write_run(results, root: str) -> dict:
    """Write a run into a new folder root/runs/<id>/ and point root/latest at it."""
    from attnbench.files import new_run_dir, set_latest
    from attnbench.reports.render import write_all

    run_dir = new_run_dir(root)
    paths = write_all(results, run_dir)
    set_latest(root, run_dir)
    return paths


def _prepare_env(device: str) -> None:
    # The Triton interpreter must be chosen before triton is imported anywhere.
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


# -- list --------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    reg = registry(extra=[t for t in args.impl if ":" in t])
    impls = load_zoo() if args.zoo else list(reg.impls.values())
    for variant in VARIANTS:
        rows = sorted((i for i in impls if i.variant == variant), key=lambda i: (not i.reference, i.name))
        if args.variant and variant not in args.variant:
            continue
        if not rows:
            if not args.zoo:
                console.print(f"[bold]{variant}[/]: [yellow]no implementation yet[/]")
            continue
        table = Table(title=f"[bold]{variant}[/]" + (" (bug zoo)" if args.zoo else ""), title_justify="left",
                      caption=VARIANTS[variant] if args.verbose else None, caption_justify="left")
        table.add_column("impl", no_wrap=True)
        table.add_column("bug" if args.zoo else "status")
        table.add_column("devices / dtypes")
        table.add_column("features", overflow="fold")
        for impl in rows:
            why = impl.unavailable()
            status = "[green]available[/]" if why is None else f"[yellow]unavailable: {why}[/]"
            if args.zoo:
                status = f"[red]{getattr(impl, 'bug', '') or impl.description}[/]"
            dtypes = " ".join(d.replace("bfloat", "bf").replace("float", "f") for d in impl.dtypes)
            table.add_row(impl.name + ("*" if impl.reference else ""), status,
                          f"{' '.join(impl.devices)} / {dtypes}", _features(impl.features))
        console.print(table)
    console.print("[dim]* the variant's reference: the tolerance rule measures others against its error. "
                  "features: what the implementation declares; properties only draw cases it declares.[/]")
    for b in reg.broken:
        console.print(f"[red]failed to load[/] {b.origin}: {b.reason}")
    return 0


def _features(features: frozenset[str]) -> str:
    """Short: the list when few, else 'all but ...' (module variants declare few kernel features)."""
    missing = FEATURES - features
    if len(features) > len(FEATURES) / 2:
        return "all but " + ", ".join(sorted(missing)) if missing else "all"
    return ", ".join(sorted(features)) or "-"


# -- verify ------------------------------------------------------------------------------
def _check_impl_args(args: argparse.Namespace) -> str | None:
    """A clear message for an unknown implementation or variant, before anything runs."""
    for v in args.variant:
        if v not in VARIANTS:
            return f"unknown variant {v!r}; one of: {', '.join(VARIANTS)}"
    if getattr(args, "zoo", False):  # bench has no --zoo
        names = {i.key for i in load_zoo()} | {i.name for i in load_zoo()}
        bad = [n for n in args.impl if n not in names]
        return f"unknown bug-zoo member(s) {bad}; see `attnbench list --zoo`" if bad else None
    reg = registry()
    for name in args.impl:
        try:
            if ":" in name:
                reg.load_spec(name)
            else:
                reg.get(name)
        except (KeyError, ValueError, TypeError, ImportError, AttributeError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) else str(exc)
            return f"--impl {name}: {msg}"
    return None


def do_verify(args: argparse.Namespace):
    from attnbench import verify
    from attnbench.reports.terminal import Progress

    device = args.device or default_device()
    _prepare_env(device)
    counts = {"done": 0, "failed": 0}
    with Progress() as progress:

        def on_row(row) -> None:
            counts["done"] += 1
            counts["failed"] += row.status in ("fail", "error")
            progress.update(variant=row.variant, impl=row.impl, done=counts["done"], failed=counts["failed"],
                            message=f"{row.property}: {row.status}")

        def on_start(nodeid: str) -> None:
            name = nodeid.split("::")[-1]
            progress.update(message=f"running {name}")

        outcome = verify.run(
            impls=args.impl, variants=args.variant, properties=args.property, profile=args.profile,
            device=device, seed=args.seed, zoo=args.zoo, on_row=on_row, on_start=on_start,
            deadline_s=args.deadline,
        )
    if outcome.not_run:
        console.print(f"[red]{len(outcome.not_run)} test(s) did not run[/] after crashes or timeouts: "
                      + ", ".join(outcome.not_run[:10]) + (" ..." if len(outcome.not_run) > 10 else ""))
    return outcome


def cmd_verify(args: argparse.Namespace) -> int:
    problem = _check_impl_args(args)
    if problem:
        console.print(f"[red]error:[/] {problem}")
        return 2
    from attnbench.reports.terminal import summary

    outcome = do_verify(args)
    if outcome.collect_error:
        console.print(f"[red]the property suite could not be collected:[/]\n{outcome.collect_error}")
        return 2
    summary(outcome.results, console=console)
    if args.out:
        paths = write_run(outcome.results, args.out)
        console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if args.zoo:
        missed = [z.member for z in outcome.results.zoo if z.status != "caught"]
        if missed:
            console.print(f"[red]bug-zoo members not caught:[/] {', '.join(missed)}")
        return 1 if missed else 0
    return 1 if outcome.failures else 0


# -- bench / report / gate ---------------------------------------------------------------
def do_bench(args: argparse.Namespace, quick: bool):
    from attnbench.perf.bench import run_bench
    from attnbench.reports.terminal import Progress

    device = args.device or default_device()
    _prepare_env(device)
    with Progress() as progress:
        return run_bench(quick=quick, device=device, variants=args.variant or None, impls=args.impl or None,
                         out=None, progress=lambda msg: progress.update(message=msg), deadline_s=args.cell_deadline)


def cmd_bench(args: argparse.Namespace) -> int:
    from attnbench.reports.terminal import summary

    problem = _check_impl_args(args)
    if problem:
        console.print(f"[red]error:[/] {problem}")
        return 2
    results = do_bench(args, quick=args.quick)
    summary(results, console=console)
    paths = write_run(results, args.out)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 1 if broken_cells(results) else 0


BROKEN = ("error", "crashed", "timeout")  # perf rows that say an implementation is broken (oom is a size limit)


def broken_cells(results) -> list:
    """The perf rows whose implementation raised, crashed or hung; printed, one line per implementation."""
    rows = [r for r in results.perf if r.status in BROKEN]
    by_impl: dict[str, list] = {}
    for r in rows:
        by_impl.setdefault(f"{r.variant}/{r.impl}", []).append(r)
    for key, bad in by_impl.items():
        console.print(f"[red]bench: {key}[/]: {len(bad)} cell(s) {'/'.join(sorted({r.status for r in bad}))}: "
                      f"{bad[0].reason[:160]}")
    return rows


def cmd_report(args: argparse.Namespace) -> int:
    from attnbench.files import new_run_dir, results_file
    from attnbench.reports.render import compare, write_all
    from attnbench.reports.schema import Results
    from attnbench.reports.terminal import summary

    runs = []
    for path in args.results:
        try:
            runs.append(Results.load(results_file(path)))
        except (OSError, ValueError) as exc:
            console.print(f"[red]error:[/] cannot read {path}: {exc}")
            return 2
    if args.rows:  # correctness rows streamed by the plugin (--attnbench-results), e.g. from a GPU run
        from attnbench.verify import results_from_rows

        runs[0] = runs[0].merge(results_from_rows(args.rows))
    # never over a run's own files: a new folder in --out/runs/, or in reports/ beside the first file
    first = results_file(args.results[0]).resolve()
    out = new_run_dir(args.out) if args.out else new_run_dir(first.parent, "reports")
    if len(runs) == 1:
        summary(runs[0], console=console)
        paths = write_all(runs[0], out)
    elif len(runs) == 2:
        paths = compare(runs[0], runs[1], out, console=console)
    else:
        console.print("[red]error:[/] report takes one results file, or two to compare")
        return 2
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from attnbench.perf.gate import default_baseline, gate
    from attnbench.reports.schema import Results

    baseline_path = args.baseline or default_baseline()
    if baseline_path is None:
        console.print("[red]error:[/] no baseline given and none committed for this device; use --baseline")
        return 2
    try:
        current, baseline = Results.load(args.current), Results.load(baseline_path)
    except (OSError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    result = gate(current, baseline, threshold=args.threshold, reference=args.reference,
                  fail_on_missing=args.fail_on_missing, judge_host_bound=args.judge_host_bound)
    console.print(result.table(verbose=args.verbose))
    console.print(("[green]gate passed[/]" if result.ok else "[red]gate failed[/]") + f" (threshold {args.threshold:.0%})")
    return 0 if result.ok else 1


# -- run: the main job -------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from attnbench.files import new_run_dir, set_latest
    from attnbench.reports.render import write_all
    from attnbench.reports.terminal import summary

    problem = _check_impl_args(args)
    if problem:
        console.print(f"[red]error:[/] {problem}")
        return 2
    device = args.device or default_device()
    args.device = device
    _prepare_env(device)
    console.rule(f"attnbench run on {device}: verify ({args.profile} profile)")
    start = time.perf_counter()
    outcome = do_verify(args)
    if outcome.collect_error:
        console.print(f"[red]the property suite could not be collected:[/]\n{outcome.collect_error}")
        return 2
    run_dir = new_run_dir(args.out)
    outcome.results.save(run_dir / "results.json")  # kept whatever happens to the benchmark
    console.print(f"verify results: {run_dir / 'results.json'}")
    console.rule(f"quick benchmark on {device}")
    try:
        perf = do_bench(args, quick=True)
    except Exception as exc:  # the report still gets written with what we have
        console.print(f"[red]benchmark failed:[/] {type(exc).__name__}: {exc}")
        from attnbench.reports.schema import Results

        perf = Results()
    results = outcome.results.merge(perf)
    results.peaks = perf.peaks or results.peaks
    summary(results, console=console)
    paths = write_all(results, run_dir)
    set_latest(args.out, run_dir)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - start:.0f} s")
    broken = broken_cells(perf)
    return 1 if outcome.failures or broken else 0


# -- parser ------------------------------------------------------------------------------
def seconds(text: str) -> float:
    """A positive, finite number of seconds (an argparse type: a bad value is a one-line error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnbench", description="Verify attention implementations against float64 "
                                "oracles, benchmark them, and report.")
    sub = p.add_subparsers(dest="command", required=True)

    def selection(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--variant", action="append", default=[], help=f"one of {', '.join(VARIANTS)} (repeatable)")
        sp.add_argument("--impl", action="append", default=[],
                        help="implementation (variant/name, name, or package.module:object) (repeatable)")
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")

    sp = sub.add_parser("list", help="variants, implementations, what each supports, why one is unavailable")
    selection(sp)
    sp.add_argument("--zoo", action="store_true", help="list the bug zoo instead")
    sp.add_argument("-v", "--verbose", action="store_true", help="also describe each variant")
    sp.set_defaults(func=cmd_list)

    def verify_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--property", action="append", default=[], help="only properties matching this name")
        sp.add_argument("--profile", choices=PROFILES, default="ci", help="Hypothesis profile (default ci)")
        sp.add_argument("--seed", type=int, default=None, help="Hypothesis seed (randomizes the ci profile)")
        sp.add_argument("--zoo", action="store_true", help="run the suite against the bug zoo; print the kill table")
        sp.add_argument("--deadline", type=seconds, default=None, metavar="S",
                        help="kill a test process that makes no progress for S seconds (no test started or "
                             "finished, no implementation called) and record a timeout (default: "
                             "ATTNBENCH_VERIFY_DEADLINE, else 300 on a CPU, 900 on CUDA)")

    def bench_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--cell-deadline", type=seconds, default=None, metavar="S",
                        help="kill a benchmark cell still running after S seconds and record a timeout (default: "
                             "ATTNBENCH_BENCH_DEADLINE, else 120 on a CPU, 600 on CUDA)")

    sp = sub.add_parser("verify", help="run the property suite against implementations")
    selection(sp)
    verify_opts(sp)
    sp.add_argument("--out", default=None,
                    help="also write results.json / report.md / report.html into OUT/runs/<id>/ (OUT/latest points at it)")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("bench", help="latency, TFLOP/s and memory of every available implementation")
    selection(sp)
    sp.add_argument("--quick", action="store_true", help="a small sweep (< 2 min on a CPU)")
    bench_opts(sp)
    sp.add_argument("--out", default="results",
                    help="root folder: each run writes OUT/runs/<id>/ and OUT/latest points at it (default results/)")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("report", help="render results.json (or compare two runs side by side)")
    sp.add_argument("results", nargs="+", help="results.json, or two of them to compare")
    sp.add_argument("--out", default=None,
                    help="write into a new folder OUT/runs/<id>/ (default: a new folder reports/<id>/ beside the first file)")
    sp.add_argument("--rows", default=None, help="add correctness rows from a --attnbench-results file (JSON lines)")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("gate", help="fail when a benchmark regressed against a baseline")
    sp.add_argument("current", help="results.json of this run")
    sp.add_argument("--baseline", default=None, help="baseline results.json (default: the committed one for this GPU)")
    sp.add_argument("--threshold", type=float, default=0.10, help="allowed slowdown of time ratios (default 0.10)")
    sp.add_argument("--reference", default=None, help="reference implementation for the ratios")
    sp.add_argument("--fail-on-missing", action="store_true", help="fail when a baseline cell did not run")
    sp.add_argument("--judge-host-bound", action="store_true",
                    help="judge cells whose time follows the host CPU too (both runs from one host)")
    sp.add_argument("--verbose", action="store_true", help="list every cell")
    sp.set_defaults(func=cmd_gate)

    sp = sub.add_parser("run", help="the main job: verify + quick benchmark + report on this machine")
    selection(sp)
    verify_opts(sp)
    bench_opts(sp)
    sp.add_argument("--out", default="results",
                    help="root folder: results.json / report.md / report.html go to OUT/runs/<id>/, OUT/latest "
                         "points at the newest finished run (default results/)")
    sp.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    from attnbench import procs

    args = build_parser().parse_args(argv)
    if getattr(args, "device", None):
        _prepare_env(args.device)
    try:
        with procs.on_signals():
            try:
                return args.func(args)
            finally:
                procs.kill_all()
    except procs.Interrupted as stop:
        print(f"attnbench: stopped by {stop.name}; child processes ended, finished runs untouched", file=sys.stderr)
        return 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main())
