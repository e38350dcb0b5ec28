"""pytest configuration for the benchmarks in perf/ (pytest-benchmark and pytest-xdist).

- One GPU per xdist worker: the controller records the visible GPUs in ATTNBENCH_GPU_POOL,
  and worker gwN sets CUDA_VISIBLE_DEVICES to the N-th (modulo the pool) when this file is
  imported, before anything touches CUDA. Shard a sweep over every GPU with:
      pytest perf/test_bench.py -m perf -n <number of GPUs> --attnbench-sweep=full \\
          --attnbench-out=runs/ -p no:randomly
      python -m attnbench.perf.bench --merge runs/perf-*.json --out merged.json
  (pytest-benchmark switches itself off under xdist; the attnbench harness still times every
  cell with CUDA events and each worker writes its rows to --attnbench-out.)
- pytest-benchmark storage per device model: its machine id ignores the GPU, so unless
  --benchmark-storage is given, runs are stored under .benchmarks/<device name>, and
  `pytest perf/test_bench.py --benchmark-autosave` then `--benchmark-compare` compares
  commits on the same GPU model only.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess

import pytest

DEFAULT_STORAGE = "file://./.benchmarks"
POOL = "ATTNBENCH_GPU_POOL"


def visible_gpus() -> list[str]:
    """GPU ids this process may use, without initializing CUDA (which would fix the device set)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def pin_worker_gpu() -> str | None:
    """In xdist worker gwN, restrict CUDA to the N-th GPU of the pool; returns the GPU id."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        os.environ.setdefault(POOL, ",".join(visible_gpus()))
        return None
    pool = [g for g in os.environ.get(POOL, "").split(",") if g]
    if not pool:
        return None
    gpu = pool[int(re.sub(r"\D", "", worker) or 0) % len(pool)]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu


PINNED = pin_worker_gpu()  # at import: before any test module (or torch.cuda) runs


def device_label(device: str) -> str:
    """A file-name-safe device model name: 'NVIDIA_H100_80GB_HBM3', 'cpu-x86_64-...'."""
    if device.split(":")[0] == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu-" + platform.machine() + "-" + _cpu_model()
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("attnbench-perf")
    g.addoption("--attnbench-sweep", choices=("quick", "full"), default="quick",
                help="which sweep perf/test_bench.py parametrizes over (default quick)")
    g.addoption("--attnbench-out", default=None,
                help="directory: each worker writes its rows to perf-<worker>.json (merge with bench --merge)")
    g.addoption("--attnbench-reference", default=None, help="reference implementation for speedups")


def bench_device(config: pytest.Config) -> str:
    device = config.getoption("device", None)
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if PINNED is not None and os.environ.get("CUDA_VISIBLE_DEVICES") != PINNED:
        raise pytest.UsageError(f"CUDA_VISIBLE_DEVICES changed after the worker was pinned to GPU {PINNED}")
    storage = getattr(config.option, "benchmark_storage", None)
    if storage is None or storage != DEFAULT_STORAGE:
        return  # pytest-benchmark absent, or the user chose a storage
    if config.getoption("dist", "no") != "no":
        return  # xdist controller: benchmarks are off under xdist, and it should not grab a GPU
    config.option.benchmark_storage = f"{DEFAULT_STORAGE}/{device_label(bench_device(config))}"


ROWS = pytest.StashKey[list]()
PEAKS = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def perf_rows(pytestconfig: pytest.Config) -> list:
    """PerfRows of this worker, written to --attnbench-out at the end of the session."""
    return pytestconfig.stash.setdefault(ROWS, [])


@pytest.fixture(scope="session")
def perf_peaks(pytestconfig: pytest.Config) -> dict:
    from attnbench.perf.timing import measure_peaks

    if PEAKS not in pytestconfig.stash:
        pytestconfig.stash[PEAKS] = measure_peaks(bench_device(pytestconfig))
    return pytestconfig.stash[PEAKS]


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    out, rows = config.getoption("attnbench_out", None), config.stash.get(ROWS, None)
    if not out or not rows:
        return
    from attnbench.perf.bench import finalize, save
    from attnbench.results import Results, environment

    results = Results(env=environment(), peaks=config.stash.get(PEAKS, {}))
    results.env.update({"bench_sweep": config.getoption("attnbench_sweep"), "xdist_worker":
                        os.environ.get("PYTEST_XDIST_WORKER"), "cuda_visible_devices":
                        os.environ.get("CUDA_VISIBLE_DEVICES")})
    if bench_device(config).split(":")[0] == "cuda":
        import torch

        results.env["device_name"] = torch.cuda.get_device_name()
    results.perf = finalize(list(rows), config.getoption("attnbench_reference", None))
    save(results, os.path.join(out, f"perf-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.json"))
