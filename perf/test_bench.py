"""pytest-benchmark view of the sweep: one benchmark per (cell, implementation).

    pytest perf/test_bench.py -m perf [--attnbench-sweep=full] [--device cuda] --benchmark-autosave
    pytest perf/test_bench.py -m perf --benchmark-compare        # against the last saved run
    pytest perf/test_bench.py -m perf -n 2 --attnbench-out=runs/ # sharded over 2 GPUs (see conftest.py)

Each test first measures the cell with the attnbench harness (CUDA events, L2 flush, rotated
inputs) and records the PerfRow; then pytest-benchmark times the same call in pedantic mode
with a CUDA-synchronized target and an untimed setup (L2 flush, next input set), so its
statistics are comparable across commits with --benchmark-compare. TFLOP/s, GB/s, memory and
the harness's median go into benchmark.extra_info. Storage is keyed by device model
(conftest.py). Implementations come from the registry only.
"""

from __future__ import annotations

import pytest
import torch

from attnbench.perf import bench
from attnbench.perf.conftest import bench_device
from attnbench.perf.memory import LINEAR_MAX, memory_fits
from attnbench.perf.sweeps import Cell, sweep_cells
from attnbench.perf.timing import L2Flush, is_cuda, peak_memory, synchronize
from attnbench.results import PerfRow
from attnbench.spec import Spec

pytestmark = pytest.mark.perf


def _selection(config: pytest.Config):
    names = [n for n in config.getoption("impl", []) if ":" not in n] or None
    extra = [n for n in config.getoption("impl", []) if ":" in n]
    if extra:
        from attnbench.registry import registry

        registry(extra=extra)
    return names, config.getoption("variant", []) or None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = bench_device(config)
    names, variants = _selection(config)
    cells = sweep_cells(config.getoption("attnbench_sweep") != "full", device, variants)
    impls = bench.select_impls(sorted({c.variant for c in cells}), names)
    params = []
    for cell in cells:
        for impl, reason in bench.candidates(cell, impls):
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param((cell, impl), id=f"{cell.label()}@{impl.name}".replace(" ", "-"),
                                       marks=marks))
    metafunc.parametrize("case", params)


_inputs = bench.InputCache()


def test_attention(case, benchmark, perf_rows: list, perf_peaks: dict, pytestconfig: pytest.Config) -> None:
    cell, impl = case
    quick = pytestconfig.getoption("attnbench_sweep") != "full"
    settings = bench.Settings.default(quick, cell.device)
    try:
        inputs = _inputs.get(cell)
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"out of memory making the inputs: {exc}")
    row = bench.measure(impl, cell, settings, perf_peaks, inputs)
    perf_rows.append(row)
    if row.status == "oom":
        pytest.skip(f"out of memory: {row.reason}")
    assert row.status == "ok", row.reason
    benchmark.group = cell.label()
    benchmark.extra_info.update(_extra(cell, row))
    case_ = bench.make_case(impl, cell, inputs)
    _pedantic(benchmark, case_, cell, row)


def _extra(cell: Cell, row: PerfRow) -> dict:
    keep = ("tflops", "gbps", "pct_peak", "mem_bytes", "ms", "ms_p20", "ms_p80", "timer", "reason")
    info = {k: getattr(row, k) for k in keep}
    info.update(variant=cell.variant, impl=row.impl, mode=cell.mode, shape=row.shape,
                pct_bw=getattr(row, "pct_bw", None), harness="attnbench.perf.timing (median of CUDA events)")
    if is_cuda(cell.device):
        info["device_name"] = torch.cuda.get_device_name(cell.device)
    return info


def _pedantic(benchmark, case, cell: Cell, row: PerfRow) -> None:
    """pytest-benchmark's own timing: flush + next input set untimed, the call synchronized."""
    device = cell.device
    flush = L2Flush(device)
    turn = iter(range(10**9))

    def setup():
        state = case.prepare(next(turn) % case.n_sets)
        flush()
        synchronize(device)
        return (state,), {}

    def target(state):
        case.run(state)
        synchronize(device)

    rounds = int(min(max(200.0 / max(row.ms, 1e-3), 5), 200))
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=2)


# -- memory against sequence length -------------------------------------------------------------

MEMORY_S = (1024, 2048, 4096, 8192, 16384)


@pytest.mark.gpu
def test_memory_linear(pytestconfig: pytest.Config) -> None:
    """Implementations that declare memory="linear" keep extra memory O(S): fit the exponent of
    peak memory (forward and forward+backward) over S = 1k..16k, bf16, 16 heads, D=128, causal
    (dense) or a causal window of 512 (local)."""
    device = bench_device(pytestconfig)
    if not is_cuda(device):
        pytest.skip("peak memory is read from the CUDA allocator")
    names, _ = _selection(pytestconfig)
    impls = [i for i in bench.select_impls(["dense", "local"], names) if i.memory == "linear"]
    if not impls:
        pytest.skip("no available implementation declares memory='linear'")
    rows = []
    for S in MEMORY_S:
        for mode in ("fwd", "fwdbwd"):
            base = Spec(B=1, Hq=16, Sq=S, D=128, dtype="bfloat16", device=device, causal=True)
            for variant, spec in (("dense", base), ("local", base.replace(window=(512, 0)))):
                cell = Cell(variant, mode, spec=spec)
                for impl, reason in bench.candidates(cell, impls):
                    if reason is None:
                        rows.append(_memory_row(impl, cell))
    fits = memory_fits(rows, declared={i.key: i.memory for i in impls})
    bad = [f for f in fits if not f.ok]
    assert fits, "no memory series measured"
    assert not bad, "\n".join(f"{f.variant}/{f.impl} {f.mode}: exponent {f.exponent:.2f} > {LINEAR_MAX} "
                              f"(S={f.S}, bytes={f.mem_bytes})" for f in bad)


def _memory_row(impl, cell: Cell) -> PerfRow:
    row = PerfRow(variant=cell.variant, impl=impl.name, mode=cell.mode, shape=cell.shape())
    try:
        case = bench.make_case(impl, cell)
        case.run(case.prepare(0))  # compile / autotune outside the measurement
        row.mem_bytes = peak_memory(case.prepare, case.run, cell.device)
    except torch.cuda.OutOfMemoryError as exc:
        row.status, row.reason = "oom", str(exc)[:200]
    finally:
        torch.cuda.empty_cache()
    return row
