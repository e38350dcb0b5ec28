"""The `attnbench` command: list, verify, bench, report, gate, and run (the main job)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from attnbench.perf.gate import add_arguments as gate_arguments
from attnbench.registry import VARIANTS, load_zoo, registry
from attnbench.spec import FEATURES

console = Console(width=max(100, min(Console().width, 140)))

PROFILES = ("ci", "dev", "thorough")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
    if args.zoo:
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
        )
    return outcome


def cmd_verify(args: argparse.Namespace) -> int:
    problem = _check_impl_args(args)
    if problem:
        console.print(f"[red]error:[/] {problem}")
        return 2
    from attnbench.reports.render import write_all
    from attnbench.reports.terminal import summary

    outcome = do_verify(args)
    if outcome.collect_error:
        console.print(f"[red]the property suite could not be collected:[/]\n{outcome.collect_error}")
        return 2
    summary(outcome.results, console=console)
    if args.out:
        paths = write_all(outcome.results, args.out)
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
                         out=None, progress=lambda msg: progress.update(message=msg))


def cmd_bench(args: argparse.Namespace) -> int:
    from attnbench.reports.render import write_all
    from attnbench.reports.terminal import summary

    results = do_bench(args, quick=args.quick)
    summary(results, console=console)
    paths = write_all(results, args.out)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from attnbench.reports.render import compare, write_all
    from attnbench.reports.schema import Results
    from attnbench.reports.terminal import summary

    runs = []
    for path in args.results:
        try:
            runs.append(Results.load(path))
        except (OSError, ValueError) as exc:
            console.print(f"[red]error:[/] cannot read {path}: {exc}")
            return 2
    if args.rows:  # correctness rows streamed by the plugin (--attnbench-results), e.g. from a GPU run
        from attnbench.verify import results_from_rows

        runs[0] = runs[0].merge(results_from_rows(args.rows))
    out = args.out or str(Path(args.results[0]).resolve().parent)
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
    from attnbench.perf import gate

    return gate.run(args, say=lambda msg: console.print(msg, markup=False, highlight=False, soft_wrap=True))


# -- run: the main job -------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from attnbench.reports.render import write_all
    from attnbench.reports.terminal import summary

    device = args.device or default_device()
    args.device = device
    _prepare_env(device)
    console.rule(f"attnbench run on {device}: verify ({args.profile} profile)")
    start = time.perf_counter()
    outcome = do_verify(args)
    if outcome.collect_error:
        console.print(f"[red]the property suite could not be collected:[/]\n{outcome.collect_error}")
        return 2
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
    paths = write_all(results, args.out)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - start:.0f} s")
    return 1 if outcome.failures else 0


# -- parser ------------------------------------------------------------------------------
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

    sp = sub.add_parser("verify", help="run the property suite against implementations")
    selection(sp)
    verify_opts(sp)
    sp.add_argument("--out", default=None, help="also write results.json / report.md / report.html here")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("bench", help="latency, TFLOP/s and memory of every available implementation")
    selection(sp)
    sp.add_argument("--quick", action="store_true", help="a small sweep (< 2 min on a CPU)")
    sp.add_argument("--out", default="results", help="directory for results.json and reports (default results/)")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("report", help="render results.json (or compare two runs side by side)")
    sp.add_argument("results", nargs="+", help="results.json, or two of them to compare")
    sp.add_argument("--out", default=None, help="output directory (default: next to the first file)")
    sp.add_argument("--rows", default=None, help="add correctness rows from a --attnbench-results file (JSON lines)")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("gate", help="fail when a benchmark regressed against a baseline of the same device model")
    gate_arguments(sp)
    sp.set_defaults(func=cmd_gate)

    sp = sub.add_parser("run", help="the main job: verify + quick benchmark + report on this machine")
    selection(sp)
    verify_opts(sp)
    sp.add_argument("--out", default="results", help="directory for results.json / report.md / report.html")
    sp.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "device", None):
        _prepare_env(args.device)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
