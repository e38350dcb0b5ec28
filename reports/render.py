"""Files: results.json, report.md (plots beside it in plots/) and one self-contained report.html.

write_all(results, out_dir) writes a run; compare(a, b, out_dir) writes compare.md and
compare.html for two runs. The HTML embeds its CSS and its plots (inline SVG) and loads
nothing: it can be mailed, attached to CI, or opened from a file system with no network.
"""

from __future__ import annotations

import html
import importlib.resources
import os
from pathlib import Path

from attnbench.files import write_atomic
from attnbench.reports import plots as P
from attnbench.reports import tables as T
from attnbench.results import CorrectnessRow, Results

LEGEND = (
    "✓ pass · ✗ fail · ! error (the check crashed) · – unsupported · blank: not run in these results. "
    "The number is the worst measured error ÷ the allowed error: at most 1 passes."
)
_MARK = {"pass": "✓", "fail": "✗", "error": "!", "skip": "–"}


def write_all(results: Results, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, report.md and report.html; returns {"json", "md", "html"} -> path, plus
    "plots" -> the folder of SVG figures report.md links to (when matplotlib is installed)."""
    if not isinstance(results, Results):
        raise TypeError(f"write_all: results must be a Results, got {type(results).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": results.save(out / "results.json")}
    figures = P.all_plots(results)
    for old in [f for section in P.SECTIONS for f in out.glob(f"plots/{section}-*.svg")]:
        old.unlink()  # figures of an earlier report in the same folder
    if figures:
        (out / "plots").mkdir(exist_ok=True)
        for fig in figures:
            _write(out / "plots" / f"{fig.name}.svg", fig.svg + "\n")
        paths["plots"] = out / "plots"
    paths["md"] = _write(out / "report.md", markdown(results, figures))
    paths["html"] = _write(out / "report.html", html_report(results, figures))
    return paths


def compare(
    a: Results,
    b: Results,
    out_dir: str | os.PathLike,
    threshold: float = 0.10,
    names: tuple[str, str] = ("A", "B"),
    console=None,
) -> dict[str, Path]:
    """Write compare.md and compare.html: run b against run a, cell by cell.

    With a rich console, also print the side-by-side comparison there (terminal.comparison).
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, Results):
            raise TypeError(f"compare: {name} must be a Results, got {type(value).__name__}")
    if console is not None:
        from attnbench.reports.terminal import comparison

        cmp = comparison(a, b, console=console, threshold=threshold, names=names)
    else:
        cmp = T.compare_runs(a, b, threshold)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "md": _write(out / "compare.md", compare_markdown(cmp, names)),
        "html": _write(out / "compare.html", compare_html(cmp, names)),
    }


def _write(path: Path, text: str) -> Path:
    return write_atomic(path, text)


# -- Markdown --------------------------------------------------------------------------
def _md(text: object) -> str:
    """Text for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def _md_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(_md(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _fence(text: str, lang: str = "") -> list[str]:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return [f"{ticks}{lang}", text, ticks]


def _banners(results: Results) -> list[str]:
    """What a reader must know before any table: sample data, or a run that a signal stopped."""
    banners = []
    if results.env.get("synthetic"):
        banners.append("Synthetic sample data: not a measurement.")
    if results.env.get("interrupted"):
        banners.append(f"Interrupted run (stopped by {results.env['interrupted']}): only the rows that finished; "
                       "what was not reached is absent.")
    return banners


def markdown(results: Results, figures: list[P.Plot] | None = None, plot_dir: str = "plots") -> str:
    """The report as Markdown; figures (if any) are linked from plot_dir/<name>.svg."""
    lines = ["# attnbench report", "", T.headline(results), ""]
    for banner in _banners(results):
        lines += [f"> **{banner}**", ""]
    checked = T.checked_rows(results)
    lines += [_md_overview(results), ""]
    if checked:
        lines += ["## Correctness", "", LEGEND, ""]
        for m in T.matrices(checked):
            headers = ["property", *m.impls]
            rows = [[p, *[m.cell(p, i).text() for i in m.impls]] for p in m.properties]
            lines += [f"### {m.variant}", "", *_md_table(headers, rows)]
        skipped = T.skip_reasons(checked)
        if skipped:
            lines += ["**Unsupported** (not run, and why):", ""]
            for (variant, impl), reasons in skipped.items():
                why = "; ".join(f"{r} ({n})" for r, n in reasons.most_common())
                lines.append(f"- {variant} / {impl}: {why}")
            lines.append("")
        lines += _md_failures(checked)
    if results.perf:
        lines += ["## Performance", "", _perf_legend(results), ""]
        if figures is None:
            lines += [f"_{P.MISSING_NOTE}_", ""]
        for g in T.perf_groups(results.perf):
            lines += [f"### {g.caption}", ""]
            for fig in P.placed(figures, "perf", g.slug):
                lines += [f"![{fig.alt}]({plot_dir}/{fig.name}.svg)", ""]
            headers, rows = T.perf_table(g, results.peaks)
            lines += _md_table(headers, rows, right={i for i, h in enumerate(headers) if h != "impl"})
            notes = T.perf_notes(g, results.peaks)
            lines += [f"- {n}" for n in notes] + ([""] if notes else [])
        for fig in P.placed(figures, "perf"):
            lines += [f"![{fig.alt}]({plot_dir}/{fig.name}.svg)", ""]
    error_figs = P.placed(figures, "errors")
    if checked and (error_figs or figures is None):
        lines += ["## Error ratios", ""]
        lines += [f"![{f.alt}]({plot_dir}/{f.name}.svg)" for f in error_figs] or [f"_{P.MISSING_NOTE}_"]
        lines.append("")
    if results.zoo:
        lines += ["## Bug zoo", "", T.zoo_summary(results.zoo) + ".", ""]
        rows = [[z.member, z.bug_class, ", ".join(z.caught_by) or "—", _zoo_status(z), z.detail] for z in results.zoo]
        headers = ["member", "bug class", "caught by", "status", "detail"]
        if not any(z.detail for z in results.zoo):
            headers, rows = headers[:-1], [r[:-1] for r in rows]
        lines += _md_table(headers, rows)
        lines += [T.zoo_note(results), ""] if T.zoo_note(results) else []
    lines += ["## Environment", "", *_md_table(["", "value"], [list(r) for r in T.env_rows(results)])]
    return "\n".join(lines).rstrip() + "\n"


def _md_overview(results: Results) -> str:
    parts = []
    if T.checked_rows(results):
        parts.append(f"**Correctness:** {T.correctness_line(T.checked_rows(results))}.")
    if results.perf:
        ok = sum(r.status == "ok" for r in results.perf)
        parts.append(f"**Performance:** {ok} of {len(results.perf)} cells measured.")
    if results.zoo:
        parts.append(f"**{_cap(T.zoo_summary(results.zoo))}.**")
    return " ".join(parts) or "No results."


def _zoo_status(z) -> str:
    return "killed" if z.status == "caught" else "**MISSED**"


def _md_failures(rows: list[CorrectnessRow]) -> list[str]:
    bad = T.failures(rows)
    if not bad:
        return ["No failures.", ""]
    lines = [f"## Failures ({len(bad)})", ""]
    for row in bad:
        mark = _MARK.get(row.status, "!")
        lines += [f"### {mark} {T.failure_title(row)}", ""]
        if row.error_ratio is not None:
            lines += [f"Error ratio **{row.error_ratio:.3g}** (the failing check's error ÷ allowed).", ""]
        lines += ["Reason:", "", *_fence(row.reason or "no reason given", "text"), ""]
        if row.counterexample:
            lines += ["Minimal counterexample:", "", *_fence(row.counterexample, "python"), ""]
        if row.seed:
            lines += [f"Seed: `{row.seed}`", ""]
        if row.replay:
            lines += ["Replay:", "", *_fence(row.replay, "sh"), ""]
    return lines


def _perf_legend(results: Results) -> str:
    peaks = results.peaks or {}
    peak = f" of the measured {peaks.get('dtype', '')} matmul peak ({peaks['matmul_tflops']:g} TFLOP/s)" if (
        peaks.get("matmul_tflops")
    ) else ""
    timers = T.timing_label(results) or ", ".join(sorted({r.timer for r in results.perf if r.timer}))
    return (
        f"ms is the median ({timers or 'timer unknown'}); noise is half the p20–p80 range; "
        f"% peak is{peak or ' of the matmul peak'}; memory is the peak allocated beyond the inputs; "
        "speedup is the reference implementation's time ÷ this time. OOM and unsupported cells name their reason; "
        f"? marks a cell not to trust (noise over {T.NOISE_LIMIT:.0f}% or over {T.PEAK_LIMIT:.0f}% of the peak), "
        "never ranked as the winner."
    )


# -- HTML ------------------------------------------------------------------------------
def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _css() -> str:
    return importlib.resources.files("attnbench.reports").joinpath("report.css").read_text(encoding="utf-8")


_COPY_JS = """
document.querySelectorAll('button.copy').forEach(function (b) {
  b.addEventListener('click', function () {
    var text = b.parentElement.querySelector('pre').innerText;
    if (navigator.clipboard) { navigator.clipboard.writeText(text); b.textContent = 'copied'; }
  });
});
"""


def _page(title: str, body: list[str]) -> str:
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title>",
            f"<style>\n{_css()}</style>",
            "</head><body><main>",
            *body,
            "<footer>Generated by attnbench. This page is self-contained: it loads nothing.</footer>",
            f"</main><script>{_COPY_JS}</script></body></html>",
            "",
        ]
    )


def _table(headers: list[str], rows: list[list[str]], cls: str = "", num: set[int] = frozenset(),
           row_cls: list[str] | None = None) -> str:  # fmt: skip
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f'<th class="num">{h}</th>' if i in num else f"<th>{h}</th>" for i, h in enumerate(headers))
    body = []
    for n, row in enumerate(rows):
        rc = f' class="{row_cls[n]}"' if row_cls and row_cls[n] else ""
        cells = "".join(f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f"<tr{rc}>{cells}</tr>")
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def html_report(results: Results, figures: list[P.Plot] | None = None) -> str:
    """The report as one self-contained HTML page."""
    body = ["<h1>attnbench report</h1>", f'<p class="sub">{_e(T.headline(results))}</p>']
    body += [f'<div class="banner">{_e(banner)}</div>' for banner in _banners(results)]
    sections = [("correctness", "Correctness"), ("failures", "Failures"), ("performance", "Performance"),
                ("errors", "Error ratios"), ("zoo", "Bug zoo"), ("environment", "Environment")]  # fmt: skip
    checked = T.checked_rows(results)
    present = {
        "correctness": bool(checked),
        "failures": bool(T.failures(checked)),
        "performance": bool(results.perf),
        "errors": bool(checked),
        "zoo": bool(results.zoo),
        "environment": True,
    }
    body.append(
        '<nav class="toc">' + "".join(f'<a href="#{k}">{v}</a>' for k, v in sections if present[k]) + "</nav>"
    )
    body.append(_cards(results))
    if checked:
        body += _html_correctness(checked)
        body += _html_failures(checked)
    if results.perf:
        body += _html_perf(results, figures)
    if checked:
        errs = P.placed(figures, "errors")
        body.append('<h2 id="errors">Error ratios</h2>')
        if figures is None:
            body.append(f'<p class="note">{_e(P.MISSING_NOTE)}</p>')
        elif not errs:
            body.append('<p class="note">No property reported an error ratio.</p>')
        body += [_figure(f) for f in errs]
    if results.zoo:
        body += _html_zoo(results)
    body.append('<h2 id="environment">Environment</h2>')
    body.append(_table(["", "value"], [[_e(k), f'<span class="mono">{_e(v)}</span>'] for k, v in T.env_rows(results)]))
    return _page("attnbench report", body)


def _cards(results: Results) -> str:
    c = T.counts(T.checked_rows(results))
    cards = []
    if T.checked_rows(results):
        bad = c["fail"] + c["error"]
        cards.append(("good" if bad == 0 else "bad", f"{bad}", "failing checks"))
        cards.append(("good", f"{c['pass']}", "passing checks"))
        cards.append(("", f"{c['skip']}", "unsupported"))
    if results.perf:
        ok = sum(r.status == "ok" for r in results.perf)
        cards.append(("", f"{ok}/{len(results.perf)}", "perf cells measured"))
    if results.zoo:
        caught = sum(z.status == "caught" for z in results.zoo)
        cards.append(("good" if caught == len(results.zoo) else "bad", f"{caught}/{len(results.zoo)}", "zoo bugs killed"))
    items = "".join(
        f'<div class="card {k}"><div class="big">{_e(v)}</div><div class="lbl">{_e(lbl)}</div></div>'
        for k, v, lbl in cards
    )
    return f'<div class="cards">{items}</div>'


def _html_correctness(rows: list[CorrectnessRow]) -> list[str]:
    out = ['<h2 id="correctness">Correctness</h2>', f'<p class="legend">{_e(LEGEND)}</p>']
    for m in T.matrices(rows):
        head = ["property"] + [f'<span title="{_e(i)}">{_e(i)}</span>' for i in m.impls]
        body = []
        for prop in m.properties:
            cells = [f"<th>{_e(prop)}</th>"]
            for impl in m.impls:
                cell = m.cell(prop, impl)
                tip = "; ".join(cell.reasons()) or cell.status
                cells.append(f'<td class="c {cell.status}" title="{_e(tip)}">{_e(cell.text())}</td>')
            body.append(f"<tr>{''.join(cells)}</tr>")
        heads = "".join(f'<th class="impl">{h}</th>' if n else f"<th>{h}</th>" for n, h in enumerate(head))
        out.append(f"<h3>{_e(m.variant)}</h3>")
        out.append(
            f'<div class="scroll"><table class="matrix"><thead><tr>{heads}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>'
        )
    skipped = T.skip_reasons(rows)
    if skipped:
        items = "".join(
            f"<li>{_e(v)} / {_e(i)}: " + _e("; ".join(f"{r} ({n})" for r, n in reasons.most_common())) + "</li>"
            for (v, i), reasons in skipped.items()
        )
        out.append(f"<details><summary>Why cells are unsupported</summary><ul>{items}</ul></details>")
    return out


def _html_failures(rows: list[CorrectnessRow]) -> list[str]:
    bad = T.failures(rows)
    if not bad:
        return ['<p class="ok">No failures.</p>']
    out = [f'<h2 id="failures">Failures ({len(bad)})</h2>']
    for row in bad:
        cls = "failure error" if row.status == "error" else "failure"
        mark = _MARK.get(row.status, "!")
        parts = [f'<div class="{cls}"><h3>{_e(mark)} {_e(T.failure_title(row))}</h3><dl>']
        if row.error_ratio is not None:
            parts.append(f'<dt>error ratio</dt><dd class="text"><b>{_e(f"{row.error_ratio:.3g}")}</b>'
                         " (the failing check's error ÷ allowed)</dd>")  # fmt: skip
        parts.append(f'<dt>reason</dt><dd class="text">{_e(row.reason or "no reason given")}</dd>')
        if row.counterexample:
            parts.append(f"<dt>counterexample</dt><dd>{_pre(row.counterexample)}</dd>")
        if row.seed:
            parts.append(f'<dt>seed</dt><dd class="text mono">{_e(row.seed)}</dd>')
        if row.replay:
            parts.append(f"<dt>replay</dt><dd>{_pre(row.replay)}</dd>")
        parts.append("</dl></div>")
        out.append("".join(parts))
    return out


def _pre(text: str) -> str:
    return f'<button class="copy" type="button">copy</button><pre>{_e(text)}</pre>'


def _figure(fig: P.Plot) -> str:
    return f'<figure role="img" aria-label="{_e(fig.alt)}">{fig.inline()}<figcaption>{_e(fig.alt)}</figcaption></figure>'


def _html_perf(results: Results, figures: list[P.Plot] | None) -> list[str]:
    out = ['<h2 id="performance">Performance</h2>', f'<p class="legend">{_e(_perf_legend(results))}</p>']
    if figures is None:
        out.append(f'<p class="note">{_e(P.MISSING_NOTE)}</p>')
    for g in T.perf_groups(results.perf):
        out.append(f"<h3>{_e(g.caption)}</h3>")
        out += [_figure(fig) for fig in P.placed(figures, "perf", g.slug)]
        best = T.best_tflops(g, results.peaks)
        headers, texts = T.perf_table(g, results.peaks)
        rows, classes, last = [], [], None
        for r, text in zip(g.sorted_rows(), texts):
            label = T.seq_label(r.shape)
            cls = [r.status] if r.status != "ok" else []
            if r.status == "ok" and r.tflops is not None and best.get(label) == r.tflops and len(g.impls) > 1:
                cls.append("best")
            if label != last and last is not None:
                cls.append("first")
            last = label
            cells = [_e(c) for c in text]
            if r.status != "ok" and r.reason:
                cells[3] = f'<span title="{_e(r.reason)}">{cells[3]}</span>'
            rows.append(cells)
            classes.append(" ".join(cls))
        num = {i for i, h in enumerate(headers) if h != "impl"}
        out.append(_table([_e(h) for h in headers], rows, num=num, row_cls=classes))
        notes = T.perf_notes(g, results.peaks)
        if notes:
            out.append('<ul class="legend">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    out += [_figure(fig) for fig in P.placed(figures, "perf")]
    return out


def _html_zoo(results: Results) -> list[str]:
    rows = []
    for z in results.zoo:
        status = '<span class="ok">killed</span>' if z.status == "caught" else '<span class="bad">MISSED</span>'
        rows.append([_e(z.member), _e(z.bug_class), _e(", ".join(z.caught_by) or "—"), status, _e(z.detail)])
    headers = ["member", "bug class", "caught by", "status", "detail"]
    if not any(z.detail for z in results.zoo):
        headers, rows = headers[:-1], [r[:-1] for r in rows]
    return [
        '<h2 id="zoo">Bug zoo</h2>',
        f'<p class="legend">{_e(_cap(T.zoo_summary(results.zoo)))}. Each member is a deliberately '
        "broken implementation; the properties that caught it are listed.</p>",
        _table(headers, rows),
        f'<p class="legend">{_e(T.zoo_note(results))}</p>' if T.zoo_note(results) else "",
    ]


# -- comparison files ------------------------------------------------------------------
def _compare_perf_rows(cmp: T.Comparison) -> list[tuple[str, list[list[str]], list[str], str]]:
    """Per perf group: (title, rows of text cells, verdicts, geometric-mean line)."""
    groups: dict[str, tuple[str, list[list[str]], list[str], list[T.PerfChange]]] = {}
    for c in cmp.perf:
        key = "|".join(T.group_key(c.variant, c.mode, c.shape))
        title = T.group_title(c.variant, c.mode, c.shape)
        _, rows, verdicts, changes = groups.setdefault(key, (title, [], [], []))
        changes.append(c)
        ratio = c.ratio
        rows.append([
            T.seq_label(c.shape), c.impl, _ms(c.a), _ms(c.b), "" if ratio is None else T.fmt_times(ratio),
            T.fmt_num(c.a.tflops if c.a else None), T.fmt_num(c.b.tflops if c.b else None),
            "" if c.verdict in ("same", "n/a") else c.verdict,
        ])  # fmt: skip
        verdicts.append(c.verdict)
    out = []
    for title, rows, verdicts, changes in groups.values():
        means = T.geomean_ratios(changes)
        line = ", ".join(f"{impl} {T.fmt_times(r)}" for impl, r in means.items())
        out.append((title, rows, verdicts, f"Geometric mean time ratio: {line}." if line else ""))
    return out


def _ms(row) -> str:
    if row is None:
        return "—"
    return T.fmt_ms(row.ms) if row.status == "ok" else T.status_text(row)


def _compare_headers(names: tuple[str, str]) -> list[str]:
    a, b = names
    return ["S", "impl", f"{a} ms", f"{b} ms", f"{b} ÷ {a}", f"{a} TFLOP/s", f"{b} TFLOP/s", "verdict"]


def compare_markdown(cmp: T.Comparison, names: tuple[str, str] = ("A", "B")) -> str:
    a, b = names
    regressions, improvements = cmp.regressions(), cmp.improvements()
    lines = [f"# attnbench comparison: {a} → {b}", "", f"- **{a}:** {T.headline(cmp.a)}", f"- **{b}:** {T.headline(cmp.b)}", ""]
    if not cmp.same_device():
        lines += ["> **Different devices:** time ratios compare machines, not code.", ""]
    if cmp.peak_warning():
        lines += [f"> **Warning:** {cmp.peak_warning()}.", ""]
    lines += [f"**{len(regressions)} regression(s), {len(improvements)} improvement(s)** "
              f"(slower = over {1 + cmp.threshold:.2f}× and outside the p20–p80 noise).", ""]  # fmt: skip
    if regressions:
        lines += ["## Regressions", "", *[f"- {r}" for r in regressions], ""]
    if improvements:
        lines += ["## Improvements", "", *[f"- {r}" for r in improvements], ""]
    diff = cmp.env_diff()
    if diff:
        lines += ["## Environment changes", "", *_md_table(["", a, b], [list(d) for d in diff])]
    if cmp.perf:
        lines += ["## Performance", ""]
        for title, rows, _, mean in _compare_perf_rows(cmp):
            lines += [f"### {title}", "", *_md_table(_compare_headers(names), rows, right={0, 2, 3, 4, 5, 6})]
            lines += [mean, ""] if mean else []
    if cmp.a.correctness or cmp.b.correctness:
        lines += ["## Correctness changes", ""]
        if cmp.correctness:
            rows = [[c.variant, c.impl, c.property, c.a.text() or "not run", c.b.text() or "not run", c.verdict]
                    for c in cmp.correctness]  # fmt: skip
            lines += _md_table(["variant", "impl", "property", a, b, "change"], rows)
        else:
            lines += ["No cell changed status.", ""]
    if cmp.zoo:
        lines += ["## Bug zoo changes", "", *[f"- {z.member}: {z.a or 'absent'} → {z.b or 'absent'}" for z in cmp.zoo]]
    return "\n".join(lines).rstrip() + "\n"


def compare_html(cmp: T.Comparison, names: tuple[str, str] = ("A", "B")) -> str:
    a, b = names
    regressions, improvements = cmp.regressions(), cmp.improvements()
    body = [
        f"<h1>attnbench comparison: {_e(a)} → {_e(b)}</h1>",
        f'<p class="sub"><b>{_e(a)}:</b> {_e(T.headline(cmp.a))}<br><b>{_e(b)}:</b> {_e(T.headline(cmp.b))}</p>',
    ]
    if not cmp.same_device():
        body.append('<div class="banner">Different devices: time ratios compare machines, not code.</div>')
    if cmp.peak_warning():
        body.append(f'<div class="banner">Warning: {_e(cmp.peak_warning())}.</div>')
    body.append(
        '<div class="cards">'
        f'<div class="card {"bad" if regressions else "good"}"><div class="big">{len(regressions)}</div>'
        '<div class="lbl">regressions</div></div>'
        f'<div class="card good"><div class="big">{len(improvements)}</div><div class="lbl">improvements</div></div>'
        "</div>"
    )
    body.append(f'<p class="legend">Slower means over {1 + cmp.threshold:.2f}× the time and outside the p20–p80 noise.</p>')
    if regressions:
        body.append("<h2>Regressions</h2><ul>" + "".join(f'<li class="bad">{_e(r)}</li>' for r in regressions) + "</ul>")
    if improvements:
        body.append("<h2>Improvements</h2><ul>" + "".join(f"<li>{_e(r)}</li>" for r in improvements) + "</ul>")
    diff = cmp.env_diff()
    if diff:
        body += ["<h2>Environment changes</h2>", _table(["", _e(a), _e(b)], [[_e(x) for x in d] for d in diff])]
    if cmp.perf:
        body.append("<h2>Performance</h2>")
        cls = {"slower": "error", "broke": "oom", "faster": "best", "fixed": "best"}
        for title, rows, verdicts, mean in _compare_perf_rows(cmp):
            body.append(f"<h3>{_e(title)}</h3>")
            body.append(_table([_e(h) for h in _compare_headers(names)], [[_e(c) for c in r] for r in rows],
                               num={0, 2, 3, 4, 5, 6}, row_cls=[cls.get(v, "") for v in verdicts]))  # fmt: skip
            if mean:
                body.append(f'<p class="legend">{_e(mean)}</p>')
    if cmp.a.correctness or cmp.b.correctness:
        body.append("<h2>Correctness changes</h2>")
        if cmp.correctness:
            rows = [
                [_e(c.variant), _e(c.impl), _e(c.property), _e(c.a.text() or "not run"),
                 _e(c.b.text() or "not run"), f'<span class="{"bad" if c.verdict == "newly failing" else ""}">'
                 f"{_e(c.verdict)}</span>"]
                for c in cmp.correctness
            ]  # fmt: skip
            body.append(_table(["variant", "impl", "property", _e(a), _e(b), "change"], rows))
        else:
            body.append("<p>No cell changed status.</p>")
    if cmp.zoo:
        items = "".join(f"<li>{_e(z.member)}: {_e(z.a or 'absent')} → {_e(z.b or 'absent')}</li>" for z in cmp.zoo)
        body.append(f"<h2>Bug zoo changes</h2><ul>{items}</ul>")
    return _page(f"attnbench comparison {a} → {b}", body)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]
