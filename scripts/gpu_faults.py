"""The bench fault set and the quick sweep on a CUDA device, each pair in a child process.

    PYTHONPATH=tests/faults python3 scripts/gpu_faults.py      # writes $OUT/gpu_faults.json

1. every fault of tests/faults/ plus dense/naive on one float32 CUDA cell: the statuses that
   tests/test_faults.py expects on the CPU (crashed / timeout / error / oom, naive ok);
2. `attnbench bench --quick --device cuda`: no error / crashed / timeout row, and its time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from attnbench.files import latest, write_atomic
from attnbench.perf import bench
from attnbench.perf.sweeps import Cell
from attnbench.spec import Spec

NAMES = ("raises", "nan", "shape", "dtype", "sleeps", "oom", "mutates", "exits", "segfault")


def main() -> int:
    out = Path(os.environ.get("OUT", "."))
    os.environ.setdefault("ATTNBENCH_BENCH_DEADLINE", "20")
    cell = Cell("dense", "fwd", spec=Spec(B=1, Hq=2, Sq=32, D=16, causal=True, dtype="float32", device="cuda"))
    start = time.perf_counter()
    faults = bench.run_bench(quick=True, device="cuda", impls=["dense/naive", *[f"fault_{n}:impl" for n in NAMES]],
                             cells=[cell], budget_s=None, prewarm_workers=0)
    report = {"faults": {r.impl: [r.status, r.reason[:200]] for r in faults.perf},
              "faults_seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(report["faults"], indent=1), flush=True)
    env = dict(os.environ)
    env.pop("ATTNBENCH_BENCH_DEADLINE")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "attnbench.app.cli", "bench", "--quick", "--device", "cuda",
                           "--out", str(out / "results")], env=env, capture_output=True, text=True)
    report["quick_rc"] = done.returncode
    report["quick_seconds"] = round(time.perf_counter() - start, 1)
    run = latest(out / "results")
    if run is not None:
        rows = json.loads((run / "results.json").read_text())["perf"]
        report["quick_statuses"] = Counter(r["status"] for r in rows)
        report["quick_bad"] = [f"{r['variant']}/{r['impl']} {r['mode']}: {r['status']} {r['reason'][:120]}"
                               for r in rows if r["status"] in ("error", "crashed", "timeout")]
    report["quick_tail"] = done.stdout[-3000:] + done.stderr[-2000:]
    write_atomic(out / "gpu_faults.json", json.dumps(report, indent=1, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "quick_tail"}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
