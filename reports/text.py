"""Plain-text tables for terminals and logs: the benchmark's rows, its memory fits, the sweep list.

Each function takes rows (or objects with the named attributes) and returns the text; nothing
here measures or decides anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from attnbench.reports.tables import cell_label
from attnbench.results import PerfRow, Results, over_peak

CELL_WIDTH = 64


def perf_table(results: Results) -> str:
    """The perf rows, one line each (unsupported cells left out): the end of a device run's output."""
    lines = [f"{'cell':{CELL_WIDTH}} {'impl':22} {'ms':>9} {'TF/s':>7} {'%pk':>5} {'MiB':>8} {'x ref':>6}"]
    for r in results.perf:
        if r.status == "unsupported":
            continue
        label = cell_label(r.variant, r.mode, r.shape)
        if r.status != "ok":
            lines.append(f"{label:{CELL_WIDTH}} {r.impl:22} {r.status}: {r.reason[:60]}")
            continue
        mem = f"{r.mem_bytes / 2**20:.1f}" if r.mem_bytes is not None else "-"
        tf = f"{r.tflops:.3g}" if r.tflops is not None else "-"
        pk = f"{r.pct_peak:.0f}{'!' if over_peak(r.pct_peak) else ''}" if r.pct_peak is not None else "-"
        sp = f"{r.speedup:.2f}" if r.speedup is not None else "-"
        lines.append(f"{label:{CELL_WIDTH}} {r.impl:22} {r.ms:9.4f} {tf:>7} {pk:>5} {mem:>8} {sp:>6}")
    return "\n".join(lines)


def row_brief(row: PerfRow) -> str:
    """A perf row in a few words for progress lines: '1.23 ms, 4.5 TFLOP/s' or 'oom (reason)'."""
    if row.status != "ok":
        return f"{row.status} ({row.reason[:80]})"
    tf = f", {row.tflops:.1f} TFLOP/s" if row.tflops is not None else ""
    return f"{row.ms:.4g} ms{tf}"


def memory_table(fits: Iterable[Any]) -> str:
    """Memory-vs-S fits (perf/memory.py's MemoryFit): the exponent and its verdict per implementation."""
    lines = [f"{'variant/impl':32} {'mode':6} {'S':>18} {'exponent':>8}  verdict"]
    for f in fits:
        flag = "" if f.ok else f"  FAIL: declared {f.expected}"
        lines.append(f"{f.variant + '/' + f.impl:32} {f.mode:6} {f'{f.S[0]}..{f.S[-1]}':>18} {f.exponent:8.2f}  "
                     f"{f.verdict}{flag}")
    return "\n".join(lines)


def sweep_table(sweeps: Iterable[Any]) -> str:
    """The registered sweeps (perf/sweeps.py's Sweep): name, devices, where it is a default, description."""
    lines = [f"{'sweep':14} {'devices':10} {'default on':10}  description"]
    for s in sweeps:
        lines.append(f"{s.name:14} {','.join(s.devices):10} {','.join(s.default) or '-':10}  {s.description}")
    return "\n".join(lines)


def grid_table(corner: str, rows: list[str], columns: list[str], value) -> str:
    """A Markdown grid: one line per row name, one column per column name, value(row, column) in each cell."""
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(str(value(row, col)) for col in columns) + " |")
    return "\n".join(lines)


def ratio_text(x: float | None) -> str:
    """A gate ratio (this implementation's time over the reference's): '-' when absent."""
    return "-" if x is None else f"{x:.3f}"


def change_text(x: float | None) -> str:
    """A gate change (now against the baseline), signed percent: '-' when absent."""
    return "-" if x is None else f"{x:+.1%}"


def gate_text(result: Any) -> str:
    """A perf gate's verdict and the rows worth reading (perf/gate.py's GateResult), plain text."""
    lines = [result.summary()]
    for r in result.shown():
        lines.append(f"  {r.status:12} {r.cell} {r.impl:22} "
                     f"{ratio_text(r.base_ratio):>8} -> {ratio_text(r.cur_ratio):>8} {change_text(r.change):>8} {r.note}")
    return "\n".join(lines)
