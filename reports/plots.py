"""Plots as inline SVG text (matplotlib, Agg-free Figure API; the optional `plots` extra).

Every function returns None when matplotlib is absent, so reports degrade to tables with a note.
Figures are built with `matplotlib.figure.Figure` (no pyplot, no global state, no display).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

from attnbench.reports.tables import Matrix, PerfGroup, checked_rows, matrices, perf_groups, seq_len
from attnbench.results import Results

MISSING_NOTE = "Plots need matplotlib: pip install 'attnbench[plots]'."
_PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
)  # fmt: skip


@dataclass
class Plot:
    name: str  # file stem, unique within a report
    title: str
    svg: str  # a standalone <svg> document (no XML prolog), fixed size
    alt: str = ""

    def inline(self) -> str:
        """The SVG for embedding in HTML: natural size, shrunk (never grown) to the page width."""
        return self.svg.replace("<svg ", '<svg class="plot" ', 1)


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def impl_colors(names: list[str]) -> dict[str, str]:
    """One color per implementation, the same in every figure of a report."""
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(dict.fromkeys(names))}


def all_plots(results: Results) -> list[Plot] | None:
    """Every figure of a report: one per perf group, one per variant with error ratios."""
    if not available():
        return None
    names = [r.impl for r in results.perf] + [r.impl for r in results.correctness]
    colors = impl_colors(names)
    plots = []
    for group in perf_groups(results.perf):
        plot = perf_plot(group, colors)
        if plot is not None:
            plots.append(plot)
    for matrix in matrices(checked_rows(results)):
        plot = error_ratio_plot(matrix, colors)
        if plot is not None:
            plots.append(plot)
    return plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(fig) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "attnbench"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = re.sub(r"<\?xml[^>]*\?>\s*", "", text)
    text = re.sub(r"<!DOCTYPE[^>]*>\s*", "", text)
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    return text.strip()


def _style(ax, title: str) -> None:
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(True, which="major", color="#dddddd", linewidth=0.6)
    ax.tick_params(labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def perf_plot(group: PerfGroup, colors: dict[str, str]) -> Plot | None:
    """TFLOP/s, latency and memory against sequence length, one line per implementation."""
    rows = group.rows
    panels = [
        ("TFLOP/s", lambda r: r.tflops, "linear"),
        ("latency (ms)", lambda r: r.ms, "log"),
        ("memory", lambda r: r.mem_bytes, "bytes"),
    ]
    panels = [p for p in panels if any(r.status == "ok" and p[1](r) for r in rows)]
    if not panels:
        return None
    seqs = sorted({seq_len(r.shape) for r in rows if seq_len(r.shape) > 0})
    if len(seqs) < 2:  # one sequence length is a table row, not a curve
        return None
    fig = _figure(4.0 * len(panels), 3.1)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, value, yscale) in zip(axes, panels):
        _style(ax, label)
        for impl in group.impls:
            mine = sorted((r for r in rows if r.impl == impl), key=lambda r: seq_len(r.shape))
            pts = [(seq_len(r.shape), value(r)) for r in mine if r.status == "ok" and value(r)]
            color = colors.get(impl, "#333333")
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.6, color=color, label=impl)
            failed = [seq_len(r.shape) for r in mine if r.status in ("oom", "error")]
            if failed:  # mark OOM / error cells along the top edge, in the impl's color
                trans = ax.get_xaxis_transform()
                ax.plot(failed, [0.97] * len(failed), "x", color=color, markersize=7, mew=2, transform=trans)
                ax.annotate(
                    "OOM" if any(r.status == "oom" for r in mine) else "error",
                    (failed[0], 0.97), xycoords=trans, xytext=(5, -3), textcoords="offset points",
                    fontsize=7, color=color, va="top",
                )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [_k(s) for s in seqs])
        ax.xaxis.set_minor_formatter(_null())
        ax.set_xlabel("sequence length", fontsize=8)
        _y_axis(ax, yscale)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    title = group.title
    alt = f"{title}: " + ", ".join(p[0] for p in panels) + " against sequence length"
    return Plot(f"perf-{group.slug}", title, _svg(fig), alt)


def _null():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def _y_axis(ax, kind: str) -> None:
    """Plain tick labels (0.1, 1, 10; 256 MiB, 1 GiB) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    if kind == "linear":
        ax.set_ylim(bottom=0)
        return
    if kind == "bytes":
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_locator(LogLocator(base=2, numticks=8))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: _bytes(y)))
        ax.yaxis.set_minor_formatter(_null())
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: _plain(y)))
    lo, hi = ax.get_ylim()
    # Under a decade the log axis has no labelled major tick: label the minor ones.
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: _plain(y)) if hi / lo < 10 else _null())


def _plain(y: float) -> str:
    if y <= 0:
        return ""
    if y >= 1000:
        return f"{y / 1000:g}k"
    return f"{y:.3g}"


def _bytes(y: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if y < 1024 or unit == "TiB":
            return f"{y:.3g} {unit}"
        y /= 1024
    return ""


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def error_ratio_plot(matrix: Matrix, colors: dict[str, str]) -> Plot | None:
    """Worst error / allowed error per property and implementation; the tolerance is 1."""
    points = []  # (row index, impl index, ratio, failed)
    props = [p for p in matrix.properties if any(matrix.cell(p, i).ratio is not None for i in matrix.impls)]
    for y, prop in enumerate(props):
        for j, impl in enumerate(matrix.impls):
            cell = matrix.cell(prop, impl)
            if cell.ratio is not None and not math.isnan(cell.ratio):
                points.append((y, j, cell.ratio, cell.status == "fail"))
    if not points:
        return None
    from matplotlib.ticker import FuncFormatter

    floor = 1e-3
    fig = _figure(12.0, 1.1 + 0.3 * len(props))
    ax = fig.subplots()
    _style(ax, f"{matrix.variant}: worst error ÷ tolerance (right of the line fails)")
    n = len(matrix.impls)
    shown = set()
    for y, j, ratio, failed in points:
        offset = (j - (n - 1) / 2) * min(0.6 / max(n, 1), 0.15)
        impl = matrix.impls[j]
        x = min(max(ratio, floor), 1e6)
        ax.plot(
            x, y + offset, "X" if failed else "o", color=colors.get(impl, "#333333"),
            markersize=7 if failed else 5, label=impl if impl not in shown else None,
        )  # fmt: skip
        shown.add(impl)
    ax.axvline(1.0, color="#c0392b", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    xs = [min(max(p[2], floor), 1e6) for p in points]
    ax.set_xlim(min(min(xs), 0.1) / 1.5, max(max(xs), 2.0) * 1.5)  # the tolerance line is always in view
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _plain(x) if x < 1000 else f"{x:.0e}"))
    ax.xaxis.set_minor_formatter(_null())
    ax.set_yticks(range(len(props)), props, fontsize=8)
    ax.set_ylim(len(props) - 0.5, -0.5)
    ax.set_xlabel(f"error ratio (values below {floor:g} drawn at {floor:g})", fontsize=8)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    title = f"{matrix.variant}: error ratios"
    return Plot(f"errors-{_slug(matrix.variant)}", title, _svg(fig), f"{title} per property and implementation")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
