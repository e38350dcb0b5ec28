"""The timing harness: CUDA events on a GPU, wall clock on the CPU (and it says which).

One timed call is `run(prepare(i))`: `prepare` does the untimed part (pick input set i of a
rotation, clear gradients, or run the forward whose backward is timed) and `run` the timed
part. On CUDA, in the manner of triton.testing.do_bench: a first call (compilation,
autotuning), an estimate, warm-up, then many repetitions, each after an L2 flush (a buffer
bigger than the L2 is zeroed), bracketed by CUDA events; input sets rotate so a problem that
fits in the cache does not time the cache. The median and the 20th / 80th percentiles are
reported. Graph mode captures one CUDA graph per input set and times its replays: that
removes the launch gaps that dominate small shapes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Timing:
    ms: float  # median
    p20: float
    p80: float
    reps: int
    timer: str  # cuda_events | cuda_graph | wall_clock
    first_ms: float  # the first call alone: compilation, autotuning, allocation
    host_ms: float | None = None  # CUDA: median host time to enqueue one timed call, less the flush's GPU time


# A CUDA call whose enqueueing takes this share of its GPU time kept the GPU waiting on the host:
# its time follows the host CPU (a Python loop of small kernels, a slow launch path), not the GPU.
# The host starts enqueueing while the GPU still runs the L2 flush, so the flush's GPU time is
# taken off the host time first (it hides that much enqueueing).
HOST_BOUND = 0.8
_FLUSH_MS: dict[str, float] = {}


def is_cuda(device: str) -> bool:
    return device.split(":")[0] == "cuda"


def synchronize(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def summarize(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of timing samples in ms."""
    if not samples:
        raise ValueError("samples: no timing samples")
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), cuts[1], cuts[7]


class L2Flush:
    """Zeroes a buffer larger than the L2 cache before each timed call (CUDA only)."""

    def __init__(self, device: str, enabled: bool = True) -> None:
        self.buffer = None
        if enabled and is_cuda(device):
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
            self.buffer = torch.empty(max(256 << 20, 2 * l2), dtype=torch.int8, device=device)

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()

    def gpu_ms(self) -> float:
        """GPU time of one flush (median of 5, measured once per device and process); 0 if off."""
        if self.buffer is None:
            return 0.0
        key = str(self.buffer.device)
        if key not in _FLUSH_MS:
            clock = _Clock(key)
            for _ in range(5):
                started = clock.start()
                self()
                clock.stop(started)
            _FLUSH_MS[key] = statistics.median(clock.samples())
        return _FLUSH_MS[key]


class _Clock:
    """Start/stop pairs on CUDA events or the host's wall clock."""

    def __init__(self, device: str) -> None:
        self.cuda = is_cuda(device)
        self.device = device
        self.pairs: list[Any] = []
        self.host: list[float] = []  # CUDA: host ms from the start event to the stop event's record

    def start(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event, time.perf_counter()
        return time.perf_counter()

    def stop(self, started: Any) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.host.append((time.perf_counter() - started[1]) * 1e3)
            self.pairs.append((started[0], event))
        else:
            self.pairs.append((started, time.perf_counter()))

    def samples(self) -> list[float]:
        synchronize(self.device)
        if self.cuda:
            out = [a.elapsed_time(b) for a, b in self.pairs]
        else:
            out = [(b - a) * 1e3 for a, b in self.pairs]
        self.pairs = []
        return out


def _timed(prepare, run, clock: _Clock, flush: Callable[[], None], n: int, n_sets: int, offset: int = 0) -> list[float]:
    for i in range(n):
        state = prepare((offset + i) % n_sets)
        flush()
        started = clock.start()
        run(state)
        clock.stop(started)
    return clock.samples()


def capture_graphs(prepare, run, n_sets: int, device: str) -> list[torch.cuda.CUDAGraph]:
    """One CUDA graph per input set, after a warm-up on a side stream (as capture requires)."""
    graphs = []
    for i in range(n_sets):
        state = prepare(i)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run(state)
            run(state)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run(state)
        graphs.append(graph)
    synchronize(device)
    return graphs


def time_call(
    prepare: Callable[[int], Any],
    run: Callable[[Any], Any],
    *,
    device: str,
    n_sets: int = 1,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 1000,
    max_ms: float | None = None,
    flush: bool = True,
    graph: bool = False,
) -> Timing:
    """Time `run(prepare(i))`; see the module docstring. `max_ms` caps the time spent
    repeating a slow call: a steady call over max_ms / 3 is timed two or three times only."""
    if n_sets < 1:
        raise ValueError(f"n_sets: must be >= 1, got {n_sets}")
    if graph and not is_cuda(device):
        raise ValueError("graph: CUDA graphs need a CUDA device")
    clock = _Clock(device)
    flusher = L2Flush(device, enabled=flush)
    no_flush = lambda: None

    t0 = time.perf_counter()
    run(prepare(0))
    synchronize(device)
    first_ms = (time.perf_counter() - t0) * 1e3

    timer = "cuda_events" if clock.cuda else "wall_clock"
    if graph:
        graphs = capture_graphs(prepare, run, n_sets, device)
        prepare, run, timer = (lambda i: graphs[i]), (lambda g: g.replay()), "cuda_graph"

    budget = max_ms if max_ms is not None else float("inf")
    # The first call carried compilation; the next one says what a steady call costs.
    second = _timed(prepare, run, clock, flusher, 1, n_sets)
    if second[0] > budget / 3:  # too slow to repeat much: the steady calls we can afford
        samples = second + _timed(prepare, run, clock, flusher, 1 if second[0] > budget else 2, n_sets, 1)
        ms, p20, p80 = summarize(samples)
        return Timing(ms, p20, p80, len(samples), timer, first_ms, _host_ms(clock, flusher, len(samples), timer))
    estimate = min(second + _timed(prepare, run, clock, no_flush, 2, n_sets, 1))  # min: robust to a busy host
    estimate = max(estimate, 1e-3)
    n_warm = int(min(max(warmup_ms / estimate, 1), 1000))
    _timed(prepare, run, clock, no_flush, n_warm, n_sets)
    n_rep = int(min(max(rep_ms / estimate, min_reps), max_reps))
    if n_rep * estimate > budget:
        n_rep = max(1, int(budget / estimate))
    samples = _timed(prepare, run, clock, flusher, n_rep, n_sets)
    ms, p20, p80 = summarize(samples)
    return Timing(ms, p20, p80, n_rep, timer, first_ms, _host_ms(clock, flusher, n_rep, timer))


def _host_ms(clock: _Clock, flusher: L2Flush, n: int, timer: str) -> float | None:
    """Median host enqueue time of the last n timed calls, less what the flush before each hides."""
    if not clock.cuda or timer == "cuda_graph" or not clock.host:
        return None
    return max(statistics.median(clock.host[-n:]) - flusher.gpu_ms(), 0.0)


def peak_memory(prepare: Callable[[int], Any], run: Callable[[Any], Any], device: str) -> int | None:
    """Peak bytes allocated during one `run`, above what was allocated before it (inputs,
    saved activations of a timed backward, ...). None off CUDA (no allocator statistics)."""
    if not is_cuda(device):
        return None
    state = prepare(0)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = run(state)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result, state
    return int(peak)


# The matmul probe's shapes (m, n, k), bf16 on CUDA: square and long-k problems large enough to
# fill the chip for milliseconds per call. The best TFLOP/s of them is the peak.
CUDA_MATMULS = ((8192, 8192, 8192), (16384, 16384, 8192), (8192, 8192, 16384), (12288, 12288, 12288))
CPU_MATMULS = ((512, 512, 512),)
WARM_S = 0.2  # back-to-back matmuls before the probe: the SMs leave their idle clocks (345 MHz on an H200)
BURST = 10  # timed products per burst, after BURST_WARMUP untimed ones
BURST_WARMUP = 3
BURSTS = 3  # bursts per shape; the best one counts
IDLE_S = 0.5  # idle gap before each burst: board power falls back under the cap, the clocks recover


def _operands(m: int, n: int, k: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)  # random data: zeros run faster than real data
    a = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    b = torch.randn(k, n, device=device, dtype=dtype, generator=g)
    return a, b


def warm_clocks(device: str, seconds: float = WARM_S) -> float:
    """Keep the GPU busy with large matmuls for `seconds`, so the probe that follows runs at the
    clocks a busy GPU holds, not at the idle ones; returns the seconds spent."""
    if not is_cuda(device):
        return 0.0
    a, b = _operands(8192, 8192, 8192, torch.bfloat16, device)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(8):
            a @ b
        synchronize(device)
    return time.perf_counter() - start


def _burst_ms(run: Callable[[], Any], n: int, device: str) -> float:
    """Mean milliseconds per call of `n` back-to-back calls (CUDA events around the burst on a GPU)."""
    if is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n
    t = time.perf_counter()
    for _ in range(n):
        run()
    return (time.perf_counter() - t) * 1e3 / n


def matmul_tflops(m: int, n: int, k: int, dtype: torch.dtype, device: str, bursts: int = BURSTS,
                  idle_s: float = IDLE_S) -> float:
    """The best of `bursts` short bursts of one matmul: each burst is an idle gap of `idle_s`,
    BURST_WARMUP untimed products, then the mean of BURST timed ones. Short bursts after an idle
    gap run at the clocks the chip reaches before its power cap pulls them down (see measure_peaks)."""
    a, b = _operands(m, n, k, dtype, device)
    best = 0.0
    for _ in range(bursts):
        synchronize(device)
        time.sleep(idle_s)
        for _ in range(BURST_WARMUP):
            a @ b
        ms = _burst_ms(lambda: a @ b, BURST, device)
        best = max(best, 2 * m * n * k / (ms * 1e-3) / 1e12)
    return best


def _copy_ms(nbytes: int, device: str, rep_ms: float) -> Timing:
    g = torch.Generator(device=device).manual_seed(0)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(generator=g)
    dst = torch.empty_like(src)
    return time_call(lambda i: None, lambda _: dst.copy_(src), device=device, flush=False, rep_ms=rep_ms)


def measure_peaks(device: str) -> dict[str, Any]:
    """The device's measured ceilings: the best matmul rate the chip reaches (bf16 on CUDA, fp32
    on the CPU) and a device copy (bytes read + written). TFLOP/s and GB/s of every row are read
    against these; a cell above 100% of the matmul peak is a measurement error
    (attnbench.results.over_peak).

    The matmul rate is the best short burst (10 products after 3 warm-ups, an idle gap before
    each, several bursts per shape, several shapes) after a short warm-up. Why bursts: under a
    long load an H200 reaches its power cap and lowers its clocks; a sustained probe then reads
    the capped rate, not the best the chip does. evidence/h200/peaks-probe-2026-12-03.json holds
    the evidence: after 1 s of warm-up the clocks were 1965 MHz at 658 W and the windowed probe
    read 701 TFLOP/s; a sustained 3 s run fell to 1560 MHz and 676 TFLOP/s, where this machine
    type does 769-798 TFLOP/s as the mean of ten 8192^3 products after three warm-ups."""
    cuda = is_cuda(device)
    shapes, dtype = (CUDA_MATMULS, torch.bfloat16) if cuda else (CPU_MATMULS, torch.float32)
    nbytes = (1 << 30) if cuda else (32 << 20)
    warmed = warm_clocks(device)
    bursts, idle_s = (BURSTS, IDLE_S) if cuda else (1, 0.0)
    by_shape = {"x".join(map(str, mnk)): round(matmul_tflops(*mnk, dtype, device, bursts, idle_s), 3) for mnk in shapes}
    best = max(by_shape, key=by_shape.get)
    cp = _copy_ms(nbytes, device, 200 if cuda else 50)
    if cuda:
        torch.cuda.empty_cache()
    return {
        "matmul_tflops": by_shape[best],
        "copy_gbps": round(2 * nbytes / (cp.ms * 1e-3) / 1e9, 2),
        "dtype": str(dtype).removeprefix("torch."),
        "matmul_shape": best,
        "matmul_by_shape": by_shape,
        "warm_s": round(warmed, 2),
        "copy_bytes": nbytes,
        "timer": cp.timer,
    }
