"""The terminal: live progress while a run goes, a summary after it, and run comparisons.

Everything fits the terminal it is printed on, 80 columns included (at most 100 are used):
tables are grouped by variant, wide matrices are split into column chunks, long text wraps and
long replay commands break into shell continuations.
"""

from __future__ import annotations

import shlex
import time
from types import TracebackType

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as _RichProgress
from rich.table import Column, Table
from rich.text import Text

from attnbench.reports import tables as T
from attnbench.results import CorrectnessRow, Results

WIDTH = 100  # the widest a summary line may be
_STATUS_STYLE = {"pass": "green", "fail": "bold red", "error": "bold yellow", "skip": "dim", "none": "dim"}
_MAX_REASON_LINES = 12


def _console(console: Console | None) -> Console:
    if console is not None:
        return console
    return Console(width=min(WIDTH, Console().width), emoji=False)


def _unicode(console: Console) -> bool:
    return (console.encoding or "").lower().startswith("utf")


# -- progress --------------------------------------------------------------------------
class Progress:
    """Live progress of a verify or bench run.

    with Progress(total=None) as p:
        p.update(variant="dense", impl="naive", done=3, total=40, failed=1, message="grad_q: pass")

    On a terminal this is a rich progress bar (variant / impl, done/total, pass and fail counts,
    elapsed time, the latest message). Elsewhere (CI logs, pytest capture) it prints a plain line
    when the variant changes, when a failure is counted, every `every` seconds otherwise, and once
    at the end. Progress goes to stderr unless a console is given.
    """

    def __init__(self, total: int | None = None, console: Console | None = None, every: float = 10.0) -> None:
        _check_count("total", total, allow_none=True)
        self.console = console if console is not None else Console(stderr=True)
        self.total = total
        self.every = every
        self.variant = ""
        self.impl = ""
        self.done = 0
        self.failed = 0
        self.message = ""
        self.start = 0.0
        self._last_line = 0.0
        self._bar: _RichProgress | None = None
        self._task = None

    @property
    def passed(self) -> int:
        return self.done - self.failed

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start if self.start else 0.0

    def __enter__(self) -> Progress:
        self.start = time.monotonic()
        if self.console.is_terminal:
            self._bar = _RichProgress(
                SpinnerColumn(),
                TextColumn("{task.description}", markup=False),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("[green]{task.fields[ok]}[/] [red]{task.fields[bad]}[/]"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[message]}", markup=False, style="dim",
                           table_column=Column(no_wrap=True, overflow="ellipsis", max_width=36)),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._label() or "attnbench", total=self.total, ok="", bad="", message="")
            self._refresh()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._refresh()
            self._bar.stop()
            self._bar = None
        else:
            self._line(final=True, interrupted=kind is not None)

    def update(
        self,
        variant: str | None = None,
        impl: str | None = None,
        done: int | None = None,
        total: int | None = None,
        failed: int | None = None,
        message: str | None = None,
    ) -> None:
        """Set any of the fields; the others keep their values. Counts are totals, not steps;
        message is free text about the current step (the property or cell being run)."""
        if message is not None and not isinstance(message, str):
            raise TypeError(f"Progress.message: must be a str, got {type(message).__name__}")
        _check_count("done", done, allow_none=True)
        _check_count("total", total, allow_none=True)
        _check_count("failed", failed, allow_none=True)
        # Plain mode prints on a new variant, a new failure, or every `every` seconds: a CI log
        # gets a line per variant and per failure, not one per check.
        news = (variant is not None and variant != self.variant) or (failed is not None and failed > self.failed)
        if variant is not None:
            self.variant = variant
        if impl is not None:
            self.impl = impl
        if total is not None:
            self.total = total
        if done is not None:
            self.done = done
        if failed is not None:
            self.failed = failed
        if message is not None:
            self.message = message.replace("\n", " ")
        if self.failed > self.done:
            raise ValueError(f"failed: {self.failed} is more than done ({self.done})")
        if self._bar is not None:
            self._refresh()
        elif news or time.monotonic() - self._last_line >= self.every:
            self._line()

    def advance(self, n: int = 1, failed: int = 0) -> None:
        """Count n more checks done, `failed` of them failing."""
        self.update(done=self.done + n, failed=self.failed + failed)

    def _label(self) -> str:
        return "/".join(x for x in (self.variant, self.impl) if x)

    def _counts(self) -> str:
        if self.total is None and self.done == 0:
            return ""
        total = "?" if self.total is None else str(self.total)
        return f"{self.done}/{total} done, {self.passed} pass, {self.failed} fail"

    def _refresh(self) -> None:
        u = _unicode(self.console)
        ok = f"{'✓' if u else 'pass'} {self.passed}"
        bad = f"{'✗' if u else 'fail'} {self.failed}" if self.failed else ""
        self._bar.update(
            self._task, description=self._label() or "attnbench", completed=self.done, total=self.total, ok=ok, bad=bad,
            message=self.message,
        )  # fmt: skip

    def _line(self, final: bool = False, interrupted: bool = False) -> None:
        self._last_line = time.monotonic()
        state = " (interrupted)" if interrupted else " (finished)" if final else ""
        head = ": ".join(x for x in (self._label(), self._counts()) if x)
        parts = [x for x in (head, f"{self.elapsed:.1f} s{state}", "" if final else self.message) if x]
        self.console.print(
            "[attnbench] " + " · ".join(parts),
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip


def _check_count(name: str, value: object, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"Progress.{name}: must be an int >= 0, got {value!r}")


# -- summary ---------------------------------------------------------------------------
def summary(results: Results, console: Console | None = None) -> None:
    """Print a finished run: correctness matrices, every failure, performance tables, zoo."""
    if not isinstance(results, Results):
        raise TypeError(f"summary: results must be a Results, got {type(results).__name__}")
    console = _console(console)
    console.print(Text(f"attnbench · {T.headline(results)}", style="bold"), overflow="fold")
    if results.env.get("synthetic"):
        console.print(Text("synthetic sample data: not a measurement", style="bold yellow"))
    checked = T.checked_rows(results)
    if checked:
        _rule(console, f"Correctness · {T.correctness_line(checked)}")
        tables = [t for m in T.matrices(checked) for t in _matrix_tables(m, console)]
        for n, table in enumerate(tables):
            console.print(*([table] if n == 0 else ["", table]), sep="\n")
        _failures(checked, console)
    if results.perf:
        label = T.timing_label(results)
        _rule(console, "Performance" + (f" · {label}" if label else ""))
        for n, group in enumerate(T.perf_groups(results.perf)):
            if n:
                console.print()
            console.print(_perf_table(group, results.peaks))
            for note in T.perf_notes(group, results.peaks):
                console.print(Text(f"  {note}", style="dim"), overflow="fold")
    if results.zoo:
        _rule(console, T.zoo_summary(results.zoo))
        console.print(_zoo_table(results))
        if T.zoo_note(results):
            console.print(Text(T.zoo_note(results), style="dim"), overflow="fold")
    if not (results.correctness or results.perf or results.zoo):
        console.print("nothing to report: the results have no rows")


def not_verified(lines: list[str], console: Console | None = None, title: str = "Not verified") -> None:
    """What was asked for but checked nothing, and why, one line each (nothing when empty)."""
    if not lines:
        return
    console = _console(console)
    _rule(console, f"{title} ({len(lines)})")
    for line in lines:
        console.print(Text(f"  {line}", style="yellow"), overflow="fold")


def verdict(results: Results, code: int, meaning: str, console: Console | None = None) -> None:
    """The last line of a verify or run: the counts, the exit code and what it means."""
    console = _console(console)
    word = {0: "PASS", 1: "FAIL", 2: "ERROR", 3: "NOT VERIFIED"}.get(code, "EXIT")
    if results.zoo:
        counts = T.zoo_summary(results.zoo)
    else:
        c = T.counts(T.checked_rows(results))
        counts = ", ".join(f"{c[k]} {label}" for k, label in
                           (("pass", "pass"), ("fail", "fail"), ("error", "error"), ("skip", "unsupported")))
    style = "bold green" if code == 0 else "bold red"
    console.print()
    console.print(Text(f"verdict: {word} · {counts} · exit {code}: {meaning}", style=style), soft_wrap=True)


def _rule(console: Console, title: str) -> None:
    console.print()
    console.rule(Text(title, style="bold"), align="left")


def _matrix_tables(matrix: T.Matrix, console: Console) -> list[Table]:
    """The matrix as one table, or several when the implementations do not fit the width."""
    u = _unicode(console)
    width = min(console.width, WIDTH)
    prop_w = min(max([len(p) for p in matrix.properties] + [8]), 30)
    chunks: list[list[str]] = [[]]
    used = prop_w + 2
    for impl in matrix.impls:
        col = max(min(len(impl), 14), 7) + 2
        if chunks[-1] and used + col > width:
            chunks.append([])
            used = prop_w + 2
        chunks[-1].append(impl)
        used += col
    out = []
    for n, impls in enumerate(chunks):
        part = f" ({n + 1}/{len(chunks)})" if len(chunks) > 1 else ""
        table = Table(
            title=f"{matrix.variant}{part}", title_justify="left", title_style="bold cyan",
            box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False,
        )  # fmt: skip
        table.add_column("property", max_width=prop_w, overflow="fold", no_wrap=False)
        for impl in impls:
            table.add_column(impl, justify="left", overflow="fold", min_width=7, max_width=14)
        for prop in matrix.properties:
            cells = [matrix.cell(prop, i) for i in impls]
            table.add_row(prop, *[Text(c.text(u), style=_STATUS_STYLE[c.status]) for c in cells])
        out.append(table)
    return out


def _failures(rows: list[CorrectnessRow], console: Console) -> None:
    bad = T.failures(rows)
    if not bad:
        return
    _rule(console, f"Failures ({len(bad)})")
    mark = "✗" if _unicode(console) else "X"
    for n, row in enumerate(bad):
        if n:
            console.print()
        style = _STATUS_STYLE[row.status if row.status in _STATUS_STYLE else "error"]
        head = Text(f"{mark} " if row.status == "fail" else "! ", style=style)
        head.append(T.failure_title(row), style="bold")
        if row.error_ratio is not None:
            head.append(f"  (error ratio {row.error_ratio:.3g})", style=style)
        console.print(head, overflow="fold")
        reason = (row.reason or "no reason given").splitlines()
        if len(reason) > _MAX_REASON_LINES:
            reason = reason[:_MAX_REASON_LINES] + [f"... {len(reason) - _MAX_REASON_LINES} more lines in report.md"]
        _field(console, "reason", "\n".join(reason))
        if row.counterexample:
            _field(console, "counterexample", row.counterexample, style="cyan")
        if row.seed:
            _field(console, "seed", str(row.seed))
        if row.replay:
            _field(console, "replay", shell_wrap(row.replay, min(console.width, WIDTH) - 18), style="green")


def _field(console: Console, label: str, text: str, style: str = "") -> None:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=16, style="dim", justify="right")
    grid.add_column(overflow="fold", style=style)
    grid.add_row(label, Text(text))
    console.print(grid)


def shell_wrap(command: str, width: int) -> str:
    """Break a long shell command between arguments with `\\` continuations (still pastes)."""
    if len(command) <= width:
        return command
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: leave it to the terminal's folding
        return command
    lines, line = [], ""
    for word in (shlex.quote(w) for w in words):
        if line and len(line) + 1 + len(word) > width - 2:
            lines.append(line + " \\")
            line = "  " + word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n".join(lines)


def _perf_table(group: T.PerfGroup, peaks: dict) -> Table:
    table = Table(
        title=group.caption, title_justify="left", title_style="bold cyan",
        box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False,
    )  # fmt: skip
    headers, texts = T.perf_table(group, peaks)
    for name in headers:
        table.add_column(name, justify="left" if name == "impl" else "right", no_wrap=name != "impl",
                         overflow="fold", max_width=18 if name == "impl" else None)  # fmt: skip
    best = T.best_tflops(group, peaks)
    last = None
    for row, cells in zip(group.sorted_rows(), texts):
        label = T.seq_label(row.shape)
        if label == last:  # blank the repeated S and B, so each sequence length reads as a block
            cells[0] = cells[1] = ""
        elif last is not None:
            table.add_section()
        last = label
        style = ""
        if row.status != "ok":
            style = "red"
        elif T.suspect(row, peaks):
            style = "yellow"
        elif row.tflops is not None and best.get(label) == row.tflops and len(group.impls) > 1:
            style = "bold green"
        table.add_row(*cells, style=style)
    return table


def _zoo_table(results: Results) -> Table:
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
    table.add_column("member", overflow="fold", max_width=24)
    table.add_column("bug class", overflow="fold", max_width=22)
    table.add_column("caught by", overflow="fold")
    table.add_column("", no_wrap=True)
    for z in results.zoo:
        caught = z.status == "caught"
        table.add_row(
            z.member, z.bug_class, ", ".join(z.caught_by) or "—",
            Text("killed" if caught else "MISSED", style="green" if caught else "bold red"),
        )  # fmt: skip
    return table


# -- comparing two runs ----------------------------------------------------------------
def comparison(
    a: Results, b: Results, console: Console | None = None, threshold: float = 0.10, names: tuple[str, str] = ("A", "B")
) -> T.Comparison:
    """Show run b against run a side by side; returns the comparison (see .regressions())."""
    console = _console(console)
    cmp = T.compare_runs(a, b, threshold)
    na, nb = (escape(n) for n in names)
    console.print(Text(f"attnbench comparison · {names[0]} → {names[1]}", style="bold"), overflow="fold")
    console.print(Text(f"{names[0]}: {T.headline(a)}", style="dim"), overflow="fold")
    console.print(Text(f"{names[1]}: {T.headline(b)}", style="dim"), overflow="fold")
    if not cmp.same_device():
        console.print(Text("different devices: time ratios compare machines, not code", style="bold yellow"))
    if cmp.peak_warning():
        console.print(Text(f"warning: {cmp.peak_warning()}", style="bold yellow"), overflow="fold")
    diff = cmp.env_diff()
    if diff:
        table = Table(title="environment changes", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
        table.add_column("")
        table.add_column(na, overflow="fold")
        table.add_column(nb, overflow="fold")
        for key, va, vb in diff:
            table.add_row(key, va, vb)
        console.print(table)
    _compare_perf(cmp, console, na, nb)
    _compare_correctness(cmp, console)
    _compare_zoo(cmp, console)
    regressions = cmp.regressions()
    _rule(console, f"{len(regressions)} regression(s), {len(cmp.improvements())} improvement(s)")
    for line in regressions:
        console.print(Text(f"  {line}", style="red"), overflow="fold")
    return cmp


_VERDICT_STYLE = {"slower": "bold red", "broke": "bold red", "faster": "green", "fixed": "green", "new": "cyan"}


def _compare_perf(cmp: T.Comparison, console: Console, na: str, nb: str) -> None:
    if not cmp.perf:
        return
    _rule(console, f"Performance · median time {nb} ÷ {na} (over {1 + cmp.threshold:.2f}× and outside noise = slower)")
    groups: dict[tuple, list[T.PerfChange]] = {}
    for c in cmp.perf:
        key = T.group_key(c.variant, c.mode, c.shape)
        groups.setdefault(key, []).append(c)
    for changes in groups.values():
        first = changes[0]
        title = T.group_title(first.variant, first.mode, first.shape)
        table = Table(
            title=title, title_justify="left", title_style="bold cyan",
            box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False,
        )  # fmt: skip
        for name in ("S", "impl", f"{na} ms", f"{nb} ms", "ratio", f"{na} TFLOP/s", f"{nb} TFLOP/s", ""):
            table.add_column(name, justify="left" if name in ("impl", "") else "right", overflow="fold")
        for c in changes:
            ratio = c.ratio
            table.add_row(
                T.seq_label(c.shape), c.impl, _ms_or_status(c.a), _ms_or_status(c.b),
                "" if ratio is None else T.fmt_times(ratio),
                T.fmt_num(c.a.tflops if c.a else None), T.fmt_num(c.b.tflops if c.b else None),
                Text("" if c.verdict in ("same", "n/a") else c.verdict, style=_VERDICT_STYLE.get(c.verdict, "")),
            )  # fmt: skip
        console.print(table)
        means = T.geomean_ratios(changes)
        if means:
            text = ", ".join(f"{impl} {T.fmt_times(r)}" for impl, r in means.items())
            console.print(Text(f"  geometric mean {nb} ÷ {na}: {text}", style="dim"), overflow="fold")


def _ms_or_status(row) -> str:
    if row is None:
        return "—"
    return T.fmt_ms(row.ms) if row.status == "ok" else T.status_text(row)


def _compare_correctness(cmp: T.Comparison, console: Console) -> None:
    if not (cmp.a.correctness or cmp.b.correctness):
        return
    u = _unicode(console)
    _rule(console, f"Correctness changes ({len(cmp.correctness)})")
    if not cmp.correctness:
        console.print("  no cell changed status")
        return
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
    for name in ("variant", "impl", "property", "before", "after", ""):
        table.add_column(name, overflow="fold")
    for c in cmp.correctness:
        table.add_row(
            c.variant, c.impl, c.property,
            Text(c.a.text(u) or "not run", style=_STATUS_STYLE[c.a.status]),
            Text(c.b.text(u) or "not run", style=_STATUS_STYLE[c.b.status]),
            Text(c.verdict, style="bold red" if c.verdict == "newly failing" else _VERDICT_STYLE.get(c.verdict, "")),
        )  # fmt: skip
    console.print(table)


def _compare_zoo(cmp: T.Comparison, console: Console) -> None:
    if not cmp.zoo:
        return
    _rule(console, "Bug zoo changes")
    for z in cmp.zoo:
        bad = z.a == "caught" and z.b != "caught"
        console.print(Text(f"  {z.member}: {z.a or 'absent'} → {z.b or 'absent'}", style="red" if bad else ""))
