"""The `attnbench` command: list, verify, bench, report, gate, and run (the main job)."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from attnbench import procs
from attnbench.app import verify
from attnbench.cache import compiler_env
from attnbench.files import new_run_dir, results_file, set_latest
from attnbench.perf import gate, isolate, sweeps
from attnbench.perf.bench import run_bench
from attnbench.perf.gate import add_arguments as gate_arguments
from attnbench.registry import VARIANTS, error_line, is_target, load_zoo, registry
from attnbench.reports.render import compare, write_all
from attnbench.reports.terminal import Progress, not_verified, summary, verdict
from attnbench.reports.text import sweep_table
from attnbench.results import Results
from attnbench.spec import FEATURES

# The terminal's own width (80 columns when output is not a terminal), at most 100 for reading;
# no emoji codes: `--impl mod:x` must not print ❌.
console = Console(width=min(Console().width, 100), emoji=False)

PROFILES = ("ci", "dev", "thorough")

# Exit codes of verify and run (also in --help and README's Commands section).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOTHING = 0, 1, 2, 3
EXIT_MEANING = {
    EXIT_OK: "every requested check ran and passed",
    EXIT_FAILED: "a check failed or crashed",
    EXIT_USAGE: "bad usage or input; nothing was checked",
    EXIT_NOTHING: "something requested was not checked at all",
}
EXIT_EPILOG = "exit codes: " + "; ".join(f"{code}: {text}" for code, text in EXIT_MEANING.items())


def error(message: str) -> int:
    """A one-line error for bad input (never markup, never a traceback); returns EXIT_USAGE."""
    console.print(Text("error: ", style="bold red") + Text(" ".join(message.split())), soft_wrap=True)
    return EXIT_USAGE


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def write_run(results, root: str) -> dict:
    """Write a run into a new folder root/runs/<id>/ and point root/latest at it."""
    run_dir = new_run_dir(root)
    paths = write_all(results, run_dir)
    set_latest(root, run_dir)
    return paths


def _prepare_env(device: str) -> None:
    """The compilers' settings (attnbench.cache.compiler_env: the Triton interpreter on the CPU,
    shared persistent compile caches on a GPU), before triton or a kernel package is imported."""
    for name, value in compiler_env(device).items():
        os.environ.setdefault(name, value)


# -- list --------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    problem = _check_impl_args(args)
    if problem:
        return error(problem)
    reg = registry(extra=[t for t in args.impl if is_target(t)])
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
            status = "[green]available[/]" if why is None else f"[yellow]unavailable: {escape(why)}[/]"
            if args.zoo:
                status = f"[red]{escape(getattr(impl, 'bug', '') or impl.description)}[/]"
            dtypes = " ".join(d.replace("bfloat", "bf").replace("float", "f") for d in impl.dtypes)
            features = _features(impl.features)
            if why is None and (lacks := impl.lacks_here(impl.features)):
                features += f" [yellow](not on this machine: {escape(lacks)})[/]"
            table.add_row(impl.name + ("*" if impl.reference else ""), status,
                          f"{' '.join(impl.devices)} / {dtypes}", features)
        console.print(table)
    console.print("[dim]* the variant's reference: the tolerance rule measures others against its error. "
                  "features: what the implementation declares; properties only draw cases it declares.[/]")
    for b in reg.broken:
        console.print(Text("failed to load ", style="red") + Text(f"{b.origin}: {b.reason}"))
    return 0


def _features(features: frozenset[str]) -> str:
    """Short: the list when few, else 'all but ...' (module variants declare few kernel features)."""
    missing = FEATURES - features
    if len(features) > len(FEATURES) / 2:
        return "all but " + ", ".join(sorted(missing)) if missing else "all"
    return ", ".join(sorted(features)) or "-"


# -- verify ------------------------------------------------------------------------------
def _check_impl_args(args: argparse.Namespace) -> str | None:
    """A one-line message for a bad selection (variant, implementation, device), before anything runs."""
    for v in args.variant:
        if v not in VARIANTS:
            return f"unknown variant {v!r}; one of: {', '.join(VARIANTS)}"
    problem = _check_device(args.device)
    if problem:
        return problem
    if getattr(args, "zoo", False):
        names = {i.key for i in load_zoo()} | {i.name for i in load_zoo()}
        bad = [n for n in args.impl if n not in names]
        return f"unknown bug-zoo member(s) {bad}; see `attnbench list --zoo`" if bad else None
    reg = registry()
    for name in args.impl:
        try:
            impls = reg.resolve([name], args.variant)
        except KeyError as exc:
            return f"--impl {name}: {exc.args[0]}"
        except Exception as exc:  # the module named cannot be imported: say why, in one line
            return f"--impl {name}: {error_line(exc)}"
        outside = [i.key for i in impls if args.variant and i.variant not in args.variant]
        if outside and len(outside) == len(impls):
            return f"--impl {name} is {', '.join(outside)}, outside the selected --variant {' '.join(args.variant)}"
    return None


def _check_device(device: str | None) -> str | None:
    if device is None:
        return None
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        return f"--device {device}: expected cpu, cuda or cuda:N"
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return f"--device {device}: no CUDA device on this machine (torch.cuda.is_available() is False)"
        if index and int(index) >= torch.cuda.device_count():
            return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def do_verify(args: argparse.Namespace):
    device = args.device or default_device()
    _prepare_env(device)
    counts = {"done": 0, "failed": 0}
    with Progress() as progress:

        def on_row(row) -> None:
            counts["done"] += 1
            counts["failed"] += row.status in ("fail", "error")
            progress.update(variant=row.variant, impl=row.impl, done=counts["done"], failed=counts["failed"],
                            message=f"{row.property}: {row.status}")

        def on_start(event: dict) -> None:
            name = event.get("property") or event["nodeid"].split("::")[-1]
            progress.update(variant=event.get("variant"), impl=event.get("impl"), message=f"running {name}")

        def on_collect(left: int) -> None:  # a (re)started test process: what is done plus what it will run
            progress.update(total=counts["done"] + left)

        outcome = verify.run(
            impls=args.impl, variants=args.variant, properties=args.property, profile=args.profile,
            device=device, seed=args.seed, zoo=args.zoo, on_row=on_row, on_start=on_start, on_collect=on_collect,
            deadline_s=args.deadline, workers=args.workers,
        )
    if outcome.not_run:
        console.print(f"[red]{len(outcome.not_run)} test(s) did not run[/] after crashes or timeouts: "
                      + ", ".join(outcome.not_run[:10]) + (" ..." if len(outcome.not_run) > 10 else ""))
    return outcome


def _verify_keeping_partial(args: argparse.Namespace):
    """do_verify; when a signal stops it and --out is given, the checks that finished are written
    into a run folder of their own (env "interrupted" names the signal; `latest` does not move)
    before the command ends."""
    try:
        return do_verify(args)
    except procs.Interrupted as stop:
        partial = getattr(stop, "partial", None)
        if args.out and partial is not None and partial.correctness:
            # a run folder of its own; `latest` keeps pointing at the last finished run
            paths = write_all(partial, new_run_dir(args.out))
            print(f"attnbench: {len(partial.correctness)} finished check(s) kept in {paths['json']} (interrupted run)",
                  file=sys.stderr)
        raise


def _settings_problem() -> str | None:
    """A bad ATTNBENCH_VERIFY_* / ATTNBENCH_BENCH_DEADLINE setting, as one line, before anything runs."""
    for setting in (verify.default_deadline, verify.default_workers, isolate.default_deadline):
        try:
            setting("cpu")
        except ValueError as exc:
            return str(exc)
    return None


def _suite_problem(outcome) -> int | None:
    """EXIT_USAGE with its one-line error when the suite refused the selection or could not start."""
    if outcome.usage_error:
        return error(outcome.usage_error)
    if outcome.collect_error:
        console.print(Text("error: the property suite could not be collected:\n", style="bold red")
                      + Text(outcome.collect_error))
        return EXIT_USAGE
    return None


def verify_code(outcome, zoo: bool = False) -> int:
    """The exit code of a finished verify (EXIT_MEANING)."""
    if zoo:
        return EXIT_FAILED if any(z.status != "caught" for z in outcome.results.zoo) else EXIT_OK
    if outcome.failures:
        return EXIT_FAILED
    return EXIT_NOTHING if outcome.not_verified else EXIT_OK


def finish(outcome, code: int) -> int:
    """Print what was not verified and the verdict, as the command's last lines; return code."""
    not_verified(outcome.not_verified, console=console)
    verdict(outcome.results, code, EXIT_MEANING[code], console=console)
    return code


def cmd_verify(args: argparse.Namespace) -> int:
    problem = _check_impl_args(args) or _settings_problem()
    if problem:
        return error(problem)
    outcome = _verify_keeping_partial(args)
    stop = _suite_problem(outcome)
    if stop is not None:
        return stop
    summary(outcome.results, console=console)
    if args.out:
        paths = write_run(outcome.results, args.out)
        console.print(f"wrote {', '.join(str(p) for p in paths.values())}", markup=False)
    if args.zoo:
        missed = [z.member for z in outcome.results.zoo if z.status != "caught"]
        if missed:
            console.print(Text("bug-zoo members not caught: ", style="red") + Text(", ".join(missed)))
    return finish(outcome, verify_code(outcome, args.zoo))


# -- bench / report / gate ---------------------------------------------------------------
def do_bench(args: argparse.Namespace, quick: bool):
    device = args.device or default_device()
    _prepare_env(device)
    # names as given: package.module:object targets are loaded again in the sweep's child processes
    impls = args.impl or None
    with Progress() as progress:
        return run_bench(quick=quick, device=device, variants=args.variant or None, impls=impls,
                         out=None, progress=lambda msg: _bench_progress(progress, msg), deadline_s=args.cell_deadline,
                         sweeps=getattr(args, "sweep", None))


_BENCH_STEP = re.compile(r"\[(\d+)/(\d+)[^\]]*\]\s*(.*)")


def _bench_progress(progress, message: str) -> None:
    """The sweep says "[n/N 12s] cell · impl: result" after each cell: the bar advances to n of N
    and shows that cell; other messages (peaks, prewarming) are shown as they come."""
    m = _BENCH_STEP.match(message)
    if m is None:
        progress.update(message=message)
        return
    done, total, text = int(m.group(1)), int(m.group(2)), m.group(3)
    failed = progress.failed + bool(_BENCH_BROKEN.search(text))
    progress.update(total=total, done=done, failed=min(failed, done), message=text)


_BENCH_BROKEN = re.compile(r": (?:error|oom|crashed|timeout)\b")  # a cell that did not measure


def _bench_keeping_partial(args: argparse.Namespace):
    """do_bench; when a signal stops it, the rows that finished are written into a run folder of
    their own (env "interrupted" names the signal; `latest` does not move) before the command ends."""
    try:
        return do_bench(args, quick=args.quick)
    except procs.Interrupted as stop:
        partial = getattr(stop, "partial", None)
        if partial is not None and partial.perf:
            paths = write_all(partial, new_run_dir(args.out))
            print(f"attnbench: {len(partial.perf)} finished row(s) kept in {paths['json']} (interrupted run)",
                  file=sys.stderr)
        raise


def _broken_sources(args: argparse.Namespace) -> list[str]:
    """Implementation sources that failed to load, when this command would have run them
    (no --impl: every implementation was asked for)."""
    return [] if args.impl else [f"{b.origin}: failed to load: {b.reason}" for b in registry().broken]


def cmd_bench(args: argparse.Namespace) -> int:
    if args.list_sweeps:
        print(sweep_table(sweeps.SWEEPS.values()))
        return EXIT_OK
    problem = _check_impl_args(args) or _settings_problem()
    if not problem and args.sweep:
        try:
            sweeps.check_sweeps(args.sweep, args.device or default_device())
        except ValueError as exc:
            problem = str(exc)
    if problem:
        return error(problem)
    results = _bench_keeping_partial(args)
    summary(results, console=console)
    paths = write_run(results, args.out)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}", markup=False)
    broken = _broken_sources(args)
    not_verified(broken, console=console, title="Not measured")
    if broken_cells(results):
        return EXIT_FAILED
    return EXIT_NOTHING if broken else EXIT_OK


BROKEN = ("error", "crashed", "timeout")  # perf rows that say an implementation is broken (oom is a size limit)


def broken_cells(results) -> list:
    """The perf rows whose implementation raised, crashed or hung; printed, one line per implementation."""
    rows = [r for r in results.perf if r.status in BROKEN]
    by_impl: dict[str, list] = {}
    for r in rows:
        by_impl.setdefault(f"{r.variant}/{r.impl}", []).append(r)
    for key, bad in by_impl.items():
        console.print(Text(f"bench: {key}: {len(bad)} cell(s) {'/'.join(sorted({r.status for r in bad}))}: "
                           f"{bad[0].reason[:160]}", style="red"))
    return rows


def cmd_report(args: argparse.Namespace) -> int:
    if len(args.results) > 2:
        return error("report takes one results file, or two to compare")
    runs = []
    for path in args.results:
        try:
            runs.append(Results.load(results_file(path)))
        except (OSError, ValueError) as exc:
            return error(str(exc) if str(path) in str(exc) else f"{path}: {exc}")
    if args.rows:  # correctness rows streamed by the plugin (--attnbench-results), e.g. from a GPU run
        try:
            runs[0] = runs[0].merge(verify.results_from_rows(args.rows))
        except (OSError, ValueError, TypeError) as exc:
            return error(f"{args.rows}: {exc}")
    # never over a run's own files: a new folder in --out/runs/, or in reports/ beside the first file
    first = results_file(args.results[0]).resolve()
    out = new_run_dir(args.out) if args.out else new_run_dir(first.parent, "reports")
    if len(runs) == 1:
        summary(runs[0], console=console)
        paths = write_all(runs[0], out)
    else:
        paths = compare(runs[0], runs[1], out, console=console)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}", markup=False)
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    return gate.run(args, say=lambda msg: console.print(msg, markup=False, highlight=False, soft_wrap=True))


# -- run: the main job -------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    problem = _check_impl_args(args) or _settings_problem()
    if problem:
        return error(problem)
    device = args.device or default_device()
    args.device = device
    _prepare_env(device)
    console.rule(f"attnbench run on {device}: verify ({args.profile} profile)")
    start = time.perf_counter()
    outcome = _verify_keeping_partial(args)
    stop = _suite_problem(outcome)
    if stop is not None:
        return stop
    run_dir = new_run_dir(args.out)
    outcome.results.save(run_dir / "results.json")  # kept whatever happens to the benchmark
    console.print(f"verify results: {run_dir / 'results.json'}", markup=False)
    console.rule(f"quick benchmark on {device}")
    try:
        perf = do_bench(args, quick=True)
    except procs.Interrupted as stop:  # the verify results and the finished rows stay in this run's folder
        partial = getattr(stop, "partial", None) or Results()
        kept = outcome.results.merge(partial)
        kept.env = {**kept.env, "interrupted": stop.name}
        kept.save(run_dir / "results.json")
        print(f"attnbench: verify results and {len(partial.perf)} finished benchmark row(s) kept in "
              f"{run_dir / 'results.json'} (interrupted run)", file=sys.stderr)
        raise
    except Exception as exc:  # the report still gets written with what we have
        console.print(f"[red]benchmark failed:[/] {type(exc).__name__}: {exc}")
        perf = Results()
    results = outcome.results.merge(perf)
    results.peaks = perf.peaks or results.peaks
    summary(results, console=console)
    paths = write_all(results, run_dir)
    set_latest(args.out, run_dir)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - start:.0f} s",
                  markup=False)
    code = verify_code(outcome, args.zoo)
    if broken_cells(perf) and code != EXIT_FAILED:
        code = EXIT_FAILED
    return finish(outcome, code)


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


def count(text: str) -> int:
    """A positive integer (an argparse type: a bad value is a one-line error)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


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
        sp.add_argument("--property", action="append", default=[],
                        help="only this property: its exact name, or a part of its name (repeatable; "
                        "a name that matches no property is an error)")
        sp.add_argument("--profile", choices=PROFILES, default="ci", help="Hypothesis profile (default ci)")
        sp.add_argument("--seed", type=int, default=None,
                        help="Hypothesis seed (randomizes the ci profile; dev and thorough draw one and print it)")
        sp.add_argument("--zoo", action="store_true", help="run the suite against the bug zoo; print the kill table")
        sp.add_argument("--deadline", type=seconds, default=None, metavar="S",
                        help="kill a test process that makes no progress for S seconds (no test started or "
                             "finished, no implementation called) and record a timeout (default: "
                             "ATTNBENCH_VERIFY_DEADLINE, else 300 on a CPU, 900 on CUDA)")
        sp.add_argument("--workers", type=count, default=None, metavar="N",
                        help="test processes running the checks in parallel (default: ATTNBENCH_VERIFY_WORKERS, "
                             "else one per CPU core on a CPU, one per two cores on CUDA; at most 4)")

    def bench_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--cell-deadline", type=seconds, default=None, metavar="S",
                        help="kill a benchmark cell still running after S seconds and record a timeout (default: "
                             "ATTNBENCH_BENCH_DEADLINE, else 120 on a CPU, 600 on CUDA)")

    sp = sub.add_parser("verify", help="run the property suite against implementations", epilog=EXIT_EPILOG)
    selection(sp)
    verify_opts(sp)
    sp.add_argument("--out", default=None,
                    help="also write results.json / report.md / report.html into OUT/runs/<id>/ (OUT/latest points at it)")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("bench", help="latency, TFLOP/s and memory of every available implementation")
    selection(sp)
    sp.add_argument("--quick", action="store_true", help="a small sweep (< 2 min on a CPU)")
    sp.add_argument("--sweep", action="append", default=None, metavar="NAME",
                    help="run this registered sweep (repeatable; default: the device's default sweeps)")
    sp.add_argument("--list-sweeps", action="store_true", help="list the registered sweeps and exit")
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

    sp = sub.add_parser("gate", help="fail when a benchmark regressed against a baseline of the same device model")
    gate_arguments(sp)
    sp.set_defaults(func=cmd_gate)

    sp = sub.add_parser("run", help="the main job: verify + quick benchmark + report on this machine",
                        epilog=EXIT_EPILOG)
    selection(sp)
    verify_opts(sp)
    bench_opts(sp)
    sp.add_argument("--out", default="results",
                    help="root folder: results.json / report.md / report.html go to OUT/runs/<id>/, OUT/latest "
                         "points at the newest finished run (default results/)")
    sp.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
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
