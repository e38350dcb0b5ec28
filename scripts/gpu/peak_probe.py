"""(e) The matmul peak three ways on this GPU, into a JSON file (argv[1]) and a short table:
the old probe (one 8192^3 bf16 shape from idle clocks, 25 ms warm-up: it read 680 TFLOP/s on an
H200), the sweep's probe (perf.timing.measure_peaks: the best short burst over four shapes, idle
gaps between bursts), and a sustained 3 s run of 8192^3 (whether clocks drop under a long load)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from attnbench.perf import timing


def old_probe() -> float:
    a, b = timing._operands(8192, 8192, 8192, torch.bfloat16, "cuda")
    t = timing.time_call(lambda i: None, lambda _: a @ b, device="cuda", flush=False, rep_ms=200)
    return 2 * 8192**3 / (t.ms * 1e-3) / 1e12


def sustained(seconds: float = 3.0) -> float:
    a, b = timing._operands(8192, 8192, 8192, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(16):
            a @ b
        n += 16
        torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - start) / 1e12


def clocks() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu",
                          "--format=csv,noheader"], capture_output=True, text=True)
    return out.stdout.strip()


def main(path: str) -> None:
    found = {"device": torch.cuda.get_device_name(), "clocks_idle": clocks()}
    found["old_probe_tflops"] = round(old_probe(), 1)
    found["measure_peaks"] = timing.measure_peaks("cuda")
    found["clocks_after_probe"] = clocks()
    found["sustained_3s_tflops"] = round(sustained(), 1)
    found["clocks_after_sustained"] = clocks()
    found["measure_peaks_again"] = timing.measure_peaks("cuda")
    with open(path, "w") as f:
        json.dump(found, f, indent=1)
    p = found["measure_peaks"]
    print(f"old probe {found['old_probe_tflops']} | measure_peaks {p['matmul_tflops']} ({p['matmul_shape']}) "
          f"then {found['measure_peaks_again']['matmul_tflops']} | sustained 3 s {found['sustained_3s_tflops']} TFLOP/s")
    print("by shape:", p["matmul_by_shape"], "| copy", p["copy_gbps"], "GB/s")
    print("clocks idle / after probe / after sustained:", found["clocks_idle"], "/", found["clocks_after_probe"], "/",
          found["clocks_after_sustained"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "peaks.json")
