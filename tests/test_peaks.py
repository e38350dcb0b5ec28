"""Honest peaks: the matmul probe takes the best short burst of several shapes after idle gaps,
and a cell above 100% of the measured peak is flagged as a measurement error in rows and reports."""

from __future__ import annotations

import pytest

from attnbench.perf import bench, timing
from attnbench.perf.sweeps import Cell
from attnbench.registry import registry
from attnbench.reports import tables
from attnbench.results import PerfRow, over_peak
from attnbench.spec import Spec

SETTINGS = bench.Settings(warmup_ms=1, rep_ms=5, min_reps=3, max_ms=200, budget_s=None)


def test_the_peak_is_the_best_burst_after_an_idle_gap(monkeypatch):
    bursts = iter([2.0, 1.0, 1.5])  # ms per product, one burst each
    sleeps = []
    monkeypatch.setattr(timing, "_burst_ms", lambda run, n, device: next(bursts))
    monkeypatch.setattr(timing.time, "sleep", sleeps.append)
    rate = timing.matmul_tflops(100, 100, 100, timing.torch.float32, "cpu", bursts=3, idle_s=0.25)
    assert rate == pytest.approx(2e6 / 1e-3 / 1e12)  # the fastest burst, not the mean of the three
    assert sleeps == [0.25] * 3  # an idle gap before every burst lets the power cap release the clocks


def test_a_burst_is_the_mean_of_its_products():
    calls = []
    ms = timing._burst_ms(lambda: calls.append(1), timing.BURST, "cpu")
    assert len(calls) == timing.BURST and ms >= 0


def test_measure_peaks_records_every_shape_and_keeps_the_best(monkeypatch):
    rates = {(512, 512, 512): 1.0, (256, 256, 1024): 3.0, (1024, 256, 256): 2.0}
    monkeypatch.setattr(timing, "CPU_MATMULS", tuple(rates))
    monkeypatch.setattr(timing, "matmul_tflops", lambda m, n, k, *a, **kw: rates[(m, n, k)])
    peaks = timing.measure_peaks("cpu")
    assert peaks["matmul_tflops"] == 3.0 and peaks["matmul_shape"] == "256x256x1024"
    assert peaks["matmul_by_shape"] == {"512x512x512": 1.0, "256x256x1024": 3.0, "1024x256x256": 2.0}
    assert peaks["copy_gbps"] > 0 and peaks["warm_s"] == 0.0  # no clocks to warm on the CPU


def test_the_real_cpu_probe_runs():
    peaks = timing.measure_peaks("cpu")
    assert peaks["matmul_tflops"] == max(peaks["matmul_by_shape"].values()) > 0


def test_a_cell_above_the_peak_is_a_measurement_error():
    assert over_peak(100.5) and not over_peak(100.0) and not over_peak(None)
    naive = registry().get("dense/naive")
    cell = Cell("dense", "fwd", spec=Spec(B=1, Hq=2, Sq=32, D=16, causal=True))
    row = bench.measure(naive, cell, SETTINGS, peaks={"matmul_tflops": 1e-9})
    assert row.status == "ok" and row.pct_peak > 100
    assert "measurement error" in row.reason and "the peak probe read low" in row.reason
    honest = bench.measure(naive, cell, SETTINGS, peaks={"matmul_tflops": 1e9})
    assert "measurement error" not in honest.reason
    group = tables.PerfGroup(variant="dense", mode="fwd", shape={}, rows=[row, honest])
    cells = [tables.perf_cells(r, {}) for r in (row, honest)]
    pct = tables.PERF_HEADERS.index("% peak")
    assert cells[0][pct].endswith("?") and not cells[1][pct].endswith("?")
    notes = tables.perf_notes(group)
    assert len(notes) == 1 and "measurement error" in notes[0]
    assert "!" in bench.table(bench.Results(perf=[row]))


def test_old_rows_over_the_peak_are_flagged_in_reports_too():
    """Rows written before the flag existed carry only pct_peak: the report still flags them."""
    row = PerfRow(variant="dense", impl="fa4", mode="fwd", shape=dict(B=4, Sq=4096, Sk=4096), ms=1.0, tflops=723.0,
                  pct_peak=106.3)
    group = tables.PerfGroup(variant="dense", mode="fwd", shape={}, rows=[row])
    assert any("106% of the measured matmul peak" in n for n in tables.perf_notes(group))
