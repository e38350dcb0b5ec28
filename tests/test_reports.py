"""Reports: terminal summary width, Markdown sections, self-contained HTML, plots, JSON, comparisons."""

from __future__ import annotations

import dataclasses
import html
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console

from attnbench.reports import plots as P
from attnbench.reports import render
from attnbench.reports import tables as T
from attnbench.reports.sample import sample_results
from attnbench.reports.terminal import Progress, comparison, shell_wrap, summary
from attnbench.results import CorrectnessRow, PerfRow, Results

REPO = Path(__file__).resolve().parents[1]
HAVE_MPL = P.available()


def _record(width: int = 100) -> Console:
    return Console(width=width, record=True, file=io.StringIO(), color_system=None)


def _lines_fit(text: str, width: int = 100) -> None:
    wide = [line for line in text.splitlines() if cell_len(line.rstrip()) > width]
    assert not wide, f"{len(wide)} lines wider than {width}: {wide[:3]}"


def _slower(results: Results, impl: str, factor: float) -> Results:
    """A copy of results where one implementation's forward times grow by factor."""
    b = dataclasses.replace(results, perf=[dataclasses.replace(r) for r in results.perf])
    for r in b.perf:
        if r.impl == impl and r.mode == "fwd" and r.ms is not None:
            r.ms, r.ms_p20, r.ms_p80 = r.ms * factor, r.ms_p20 * factor, r.ms_p80 * factor
            r.tflops = r.tflops / factor
    return b


@pytest.fixture(scope="module")
def results() -> Results:
    return sample_results()


@pytest.fixture(scope="module")
def written(results, tmp_path_factory) -> dict[str, Path]:
    return render.write_all(results, tmp_path_factory.mktemp("report"))


# -- formatting and merging --------------------------------------------------------------
@pytest.mark.parametrize(
    "value, text",
    [(None, ""), (0.0, "0"), (0.004, "<.01"), (0.31, "0.31"), (4.2, "4.2"), (42.4, "42"), (4200, "4e3"),
     (float("inf"), "inf"), (float("nan"), "nan")],
)  # fmt: skip
def test_fmt_ratio(value, text):
    assert T.fmt_ratio(value) == text


def test_cell_worst_status_and_ratio_win():
    cell = T.Cell()
    cell.add(CorrectnessRow("dense", "x", "p", "pass", error_ratio=0.3))
    assert cell.text() == "✓ 0.3" or cell.text() == "✓ 0.30"
    cell.add(CorrectnessRow("dense", "x", "p", "pass", error_ratio=0.7))
    assert cell.text() == "✓ 0.70"
    cell.add(CorrectnessRow("dense", "x", "p", "fail", error_ratio=2.0, reason="too far"))
    cell.add(CorrectnessRow("dense", "x", "p", "fail", error_ratio=4.2, reason="further"))
    cell.add(CorrectnessRow("dense", "x", "p", "pass", error_ratio=9.0))  # a pass never outranks a fail
    assert (cell.status, cell.text()) == ("fail", "✗ 4.2")
    assert cell.reasons() == ["too far", "further"]
    skipped = T.Cell()
    skipped.add(CorrectnessRow("dense", "x", "p", "skip", reason="no bias"))
    assert skipped.text() == "–" and skipped.text(unicode=False) == "-"
    crashed = T.Cell()
    crashed.add(CorrectnessRow("dense", "x", "p", "weird-status"))
    assert crashed.status == "error"


def test_perf_groups_split_on_fixed_shape_and_sort_sequences():
    def row(impl, s, hq):
        return PerfRow("dense", impl, "fwd", dict(B=1, Hq=hq, Hkv=hq, Sq=s, Sk=s, D=64, dtype="float16"), ms=1.0)

    decode = row("a", 512, 8)
    decode.shape["Sq"] = 1
    groups = T.perf_groups([row("a", 2048, 8), row("a", 512, 8), row("b", 512, 8), row("a", 512, 16), decode])
    assert [len(g.rows) for g in groups] == [3, 1, 1]
    assert groups[2].title == "dense · fwd · fp16 · H8 · D64 · decode Sq=1 · B=1"
    assert T.seq_label(decode.shape) == "1→512"
    assert [T.seq_label(r.shape) for r in groups[0].sorted_rows()] == ["512", "512", "2048"]
    assert groups[0].title == "dense · fwd · fp16 · H8 · D64 · B=1"  # one curve per batch size
    assert groups[0].slug != groups[1].slug


def test_pct_peak_falls_back_to_tflops_over_peak():
    row = PerfRow("dense", "x", "fwd", {}, ms=1.0, tflops=340.0)
    assert T.pct_peak(row, {"matmul_tflops": 680.0}) == pytest.approx(50.0)
    assert T.pct_peak(row, {}) is None
    row.pct_peak = 12.5
    assert T.pct_peak(row, {"matmul_tflops": 680.0}) == 12.5


# -- terminal ------------------------------------------------------------------------------
def test_summary_fits_100_columns_and_shows_everything(results):
    console = _record()
    summary(results, console=console)
    text = console.export_text()
    _lines_fit(text)
    assert "synthetic sample data" in text
    assert "✗ 4.2" in text and "! err" in text and "–" in text  # fail with ratio, error, unsupported
    for row in T.failures(T.checked_rows(results)):
        assert row.counterexample in text
        assert row.seed in text
    joined = re.sub(r"\\\n\s*", "", text)  # undo the shell continuations
    for row in T.failures(T.checked_rows(results)):
        assert row.replay in joined, row.replay
    assert "OOM" in text and "CUDA out of memory" in text
    for header in ("TFLOP/s", "% peak", "memory", "speedup"):
        assert header in text
    assert "7/8 killed" in text and "MISSED" in text
    assert "checks ran on bug-zoo members" in text and "off_by_one_causal · causal" not in text


def test_summary_wraps_wide_matrices_and_long_text():
    impls = [f"implementation_number_{i}" for i in range(14)]
    props = [f"a_rather_long_property_name_{i}_about_masking_edges" for i in range(5)]
    rows = [CorrectnessRow("dense", i, p, "pass", error_ratio=0.5) for i in impls for p in props]
    rows.append(CorrectnessRow(
        "dense", impls[3], props[0], "fail", error_ratio=123.0, reason="x" * 400 + "\n" + "line\n" * 40,
        counterexample="Spec(" + ", ".join(f"f{i}={i}" for i in range(60)) + ")",
        replay="attnbench verify " + " ".join(f"--opt{i} value{i}" for i in range(30)),
    ))  # fmt: skip
    perf = [PerfRow("dense", impls[0] * 3, "fwd", dict(B=1, Sq=s, Sk=2 * s, D=64, window=(128, 0), extra_flag=True),
                    ms=1.5, tflops=10.0, mem_bytes=2**30) for s in (128, 256)]  # fmt: skip
    console = _record()
    summary(Results(correctness=rows, perf=perf), console=console)
    text = console.export_text()
    _lines_fit(text)
    assert "(1/" in text  # the matrix was split into column chunks
    assert "more lines in report.md" in text
    assert "128→256" in text


def test_summary_of_empty_results_and_bad_input():
    console = _record()
    summary(Results(), console=console)
    assert "nothing to report" in console.export_text()
    with pytest.raises(TypeError, match="Results"):
        summary({"correctness": []})


def test_shell_wrap_keeps_the_command_runnable():
    args = "--impl 'my impl' " + " ".join(f"--flag{i} {i}" for i in range(20))
    wrapped = shell_wrap("printf '%s\\n' " + args, 40)
    assert len(wrapped.splitlines()) > 5 and all(len(line) <= 40 for line in wrapped.splitlines())
    out = subprocess.run(["bash", "-c", wrapped], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == shlex.split(args)
    assert shell_wrap("short command", 40) == "short command"


def test_progress_plain_lines_when_not_a_terminal():
    console = Console(file=io.StringIO(), width=100)
    with Progress(total=4, console=console, every=3600) as p:
        p.update(variant="dense", impl="naive", done=0)  # a new variant: a line
        p.update(done=1)  # nothing new, inside `every`: no line
        p.update(done=2, failed=1)  # a failure: a line
        p.update(impl="flex", done=3, failed=1)  # a new impl alone: no line
        p.advance(1, failed=1)  # a failure: a line
    lines = console.file.getvalue().splitlines()
    assert lines[0].startswith("[attnbench] dense/naive: 0/4 done, 0 pass, 0 fail")
    assert lines[1].startswith("[attnbench] dense/naive: 2/4 done, 1 pass, 1 fail")
    assert lines[2].startswith("[attnbench] dense/flex: 4/4 done, 2 pass, 2 fail")
    assert lines[3].startswith("[attnbench] dense/flex: 4/4 done, 2 pass, 2 fail") and lines[3].endswith("(finished)")
    assert len(lines) == 4


def test_progress_plain_line_carries_the_message():
    console = Console(file=io.StringIO(), width=100)
    with Progress(console=console, every=0) as p:
        p.update(message="dense/flex fwd S=4096")
    lines = console.file.getvalue().splitlines()
    assert re.fullmatch(r"\[attnbench\] \d+\.\d s · dense/flex fwd S=4096", lines[0]), lines[0]
    with pytest.raises(TypeError, match="message"):
        Progress(console=console).update(message=3)


def test_progress_live_bar_on_a_terminal():
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None)
    with Progress(total=None, console=console) as p:
        p.update(variant="local", impl="triton_local", done=5, failed=2)
        p.update(total=10, done=10)
    out = console.file.getvalue()
    assert "local/triton_local" in out and "10/10" in out and "✗ 2" in out


@pytest.mark.parametrize(
    "kwargs, field", [({"done": -1}, "done"), ({"total": 2.5}, "total"), ({"done": 1, "failed": 2}, "failed")]
)
def test_progress_rejects_bad_counts(kwargs, field):
    with Progress(total=3, console=Console(file=io.StringIO())) as p:
        with pytest.raises(ValueError, match=field):
            p.update(**kwargs)


# -- files ---------------------------------------------------------------------------------
def test_write_all_writes_the_three_files(written):
    for key, name in (("json", "results.json"), ("md", "report.md"), ("html", "report.html")):
        assert written[key].name == name and written[key].stat().st_size > 0
    if HAVE_MPL:
        assert written["plots"].is_dir() and list(written["plots"].glob("perf-*.svg"))


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib (the plots extra) not installed")
def test_rewriting_a_report_drops_stale_plots(results, tmp_path):
    render.write_all(results, tmp_path)
    stale = tmp_path / "plots" / "perf-old-group.svg"
    stale.write_text("<svg/>")
    render.write_all(results, tmp_path)
    assert not stale.exists()


def test_rates_keep_significant_digits():
    assert [T.fmt_num(x) for x in (432.04, 15.0, 2.345, 1.749e-05, None)] == ["432.0", "15.0", "2.35", "1.75e-05", ""]
    assert [T.fmt_pct(x) for x in (63.4, 2.25, 0.05, 0.0)] == ["63%", "2.2%", "<0.1%", "0%"]


def test_markdown_has_every_section_and_failure(results, written):
    md = written["md"].read_text()
    for section in ("## Correctness", "## Failures (3)", "## Performance", "## Bug zoo", "## Environment"):
        assert f"\n{section}\n" in md, section
    assert "| property | naive | sdpa_flash | flex | triton_fa2 | flash_attn |" in md
    for row in T.failures(T.checked_rows(results)):
        assert row.counterexample in md and row.replay in md and row.seed in md
    assert "flash_attn not installed (12)" in md
    assert "| 16384 | 1 | naive | OOM |" in md
    assert "Synthetic sample data" in md
    if HAVE_MPL:
        assert "## Error ratios" in md
        for link in re.findall(r"\]\((plots/[^)]+\.svg)\)", md):
            assert (written["md"].parent / link).is_file()


def _external_refs(page: str) -> list[str]:
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.I)
    bad = [r for r in refs if not (r.startswith("#") or r.startswith("data:"))]
    bad += re.findall(r"@import|url\(\s*['\"]?(?!data:|#)[^)]*\)|<link\b|<iframe\b", page, flags=re.I)
    return bad


def test_html_is_self_contained(written):
    page = written["html"].read_text()
    assert _external_refs(page) == []
    assert "<style>" in page and "report.css" not in page
    assert page.count('class="failure') == 3
    assert 'id="zoo"' in page and 'id="environment"' in page


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib (the plots extra) not installed")
def test_plots_are_embedded_one_per_group_and_variant(results, written):
    page = written["html"].read_text()
    groups = [g for g in T.perf_groups(results.perf) if len({T.seq_len(r.shape) for r in g.rows}) >= 2]  # curves
    with_ratios = [m for m in T.matrices(T.checked_rows(results)) if any(c.ratio is not None for c in m.cells.values())]
    assert page.count("<svg") == len(groups) + len(with_ratios)
    assert "TFLOP/s" in page and "latency (ms)" in page and "memory" in page
    assert html.escape(P.MISSING_NOTE) not in page


def test_reports_degrade_without_matplotlib(results, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "available", lambda: False)
    paths = render.write_all(results, tmp_path)
    page, md = paths["html"].read_text(), paths["md"].read_text()
    assert "<svg" not in page and html.escape(P.MISSING_NOTE) in page and P.MISSING_NOTE in md
    assert not (tmp_path / "plots").exists()
    assert "## Failures (3)" in md


def test_json_round_trips_through_load(results, written):
    loaded = Results.load(written["json"])
    assert loaded.to_dict() == json.loads(json.dumps(results.to_dict()))
    assert [type(r) for r in loaded.perf[:1]] == [PerfRow]
    assert loaded.zoo[-1] == results.zoo[-1]


def test_unknown_row_keys_survive_a_round_trip(tmp_path):
    row = CorrectnessRow("dense", "naive", "p", "pass")
    row.examples = 200  # a newer writer's field
    path = Results(correctness=[row]).save(tmp_path / "r.json")
    again = Results.load(path).save(tmp_path / "r2.json")
    assert Results.load(again).correctness[0].examples == 200


def test_write_all_rejects_non_results(tmp_path):
    with pytest.raises(TypeError, match="Results"):
        render.write_all({"perf": []}, tmp_path)


# -- comparisons -------------------------------------------------------------------------
def test_compare_flags_slower_cells_new_failures_and_missed_bugs(results, tmp_path):
    b = _slower(results, "flex", 1.3)
    b.correctness = [dataclasses.replace(r) for r in results.correctness]
    for r in b.correctness:
        if (r.impl, r.property) == ("sdpa_flash", "lse_matches_oracle"):
            r.status, r.error_ratio = "fail", 2.5
        if (r.impl, r.property) == ("triton_fa2", "window_edges_exact"):
            r.status = "pass"
    b.zoo = [dataclasses.replace(z) for z in results.zoo]
    b.zoo[0].status = "missed"
    cmp = T.compare_runs(results, b)
    regressions = cmp.regressions()
    assert sum("dense/flex fwd" in r and "1.30× slower" in r for r in regressions) == 6  # S=512..16384
    assert any("sdpa_flash lse_matches_oracle" in r for r in regressions)
    assert any("off_by_one_causal" in r for r in regressions)
    assert not any("naive" in r or "fwdbwd" in r for r in regressions)
    assert any("window_edges_exact: fixed" in r for r in cmp.improvements())
    console = _record()
    paths = render.compare(results, b, tmp_path, names=("main", "pr"), console=console)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    assert "slower" in md and "newly failing" in md and "## Regressions" in md
    assert _external_refs(page) == []
    assert comparison(results, b, console=_record()).regressions() == regressions
    text = console.export_text()
    _lines_fit(text)
    assert "slower" in text and "newly failing" in text and "regression(s)" in text


def test_compare_ignores_changes_inside_the_noise(results):
    b = _slower(results, "flex", 1.12)  # above the 10% threshold ...
    for r in b.perf:
        if r.impl == "flex" and r.mode == "fwd" and r.ms is not None:
            r.ms_p20 = r.ms / 1.2  # ... but the p20-p80 bands overlap
    assert not [c for c in T.compare_runs(results, b).perf if c.verdict == "slower"]
    assert [c for c in T.compare_runs(results, _slower(results, "flex", 1.12)).perf if c.verdict == "slower"]


def test_compare_reports_cells_that_broke_and_identical_runs_are_quiet(results):
    assert T.compare_runs(results, results).regressions() == []
    b = dataclasses.replace(results, perf=[dataclasses.replace(r) for r in results.perf])
    b.perf[1].status, b.perf[1].ms = "oom", None
    assert any("now OOM" in r for r in T.compare_runs(results, b).regressions())
    with pytest.raises(ValueError, match="threshold"):
        T.compare_runs(results, b, threshold=-0.1)


# -- looking at it ---------------------------------------------------------------------------
@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser")), reason="chromium not installed")
def test_screenshot_renders_a_nonblank_page(written, tmp_path):
    out = tmp_path / "shot.png"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "screenshot_report.sh"), str(written["html"]), str(out), "1280x1600"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 1600)
    pil = pytest.importorskip("PIL.Image")
    image = pil.open(out).convert("L")
    dark = sum(image.histogram()[:128])
    assert dark > 0.005 * width * height  # text and tables were drawn, not a blank page
