"""Why do the sweep's first calls miss what prewarm compiled? One flex cell and one triton
D=64 cell: prewarm them in a spawned worker, then run them in this process, with the
FX-graph cache's hash details logged by both (TORCH_LOGS=+torch._inductor.codecache) and
the Triton cache's entries counted before and after."""
import json
import os
import sys
import time

import torch

from attnbench.perf import cases, measure, prewarm
from attnbench.perf.sweeps import sweep_cells
from attnbench.registry import registry


def tcache():
    d = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    return set(os.listdir(d)) if os.path.isdir(d) else set()

def main():
    global cells
    cells = sweep_cells(False, "cuda", ["dense"])
    def pick(impl, **want):
        for c in cells:
            sh = c.shape()
            if c.mode == want.get("mode", "fwd") and all(sh.get(k) == v for k, v in want.items() if k != "mode"):
                return c
        raise SystemExit(f"no cell {want}")
    flex = registry().get("dense/flex")
    tri = registry().get("dense/triton")
    jobs = [(flex, [pick(flex, B=4, Sq=4096, D=128, causal=False, dtype="bfloat16", mode=m) for m in ("fwd", "fwdbwd")]),
            (tri, [pick(tri, B=4, Sq=4096, D=64, causal=True, dtype="bfloat16", mode=m) for m in ("fwd", "fwdbwd")])]
    groups = prewarm.plan([(c, impl) for impl, cs in jobs for c in cs])
    print("== prewarm", [g.label() for g in groups], file=sys.stderr, flush=True)
    t = time.perf_counter()
    s = prewarm.prewarm(groups, 2, 300, lambda m: print(m, file=sys.stderr, flush=True))
    print("== prewarm done", round(time.perf_counter() - t, 1), s.as_dict(), file=sys.stderr, flush=True)
    out = {}
    for impl, cs in jobs:
        for c in cs:
            before_t = tcache()
            before = measure.compile_cache_counts()
            print(f"== parent first call {impl.key} {c.label()}", file=sys.stderr, flush=True)
            case = cases.make_case(impl, c)
            t = time.perf_counter()
            case.run(case.prepare(0))
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            after = measure.compile_cache_counts()
            new_t = tcache() - before_t
            out[f"{impl.key} {c.label()}"] = {"s": round(dt, 2), "triton_new_cache_entries": len(new_t),
                                              **{k: after[k] - before[k] for k in after}}
            print("==", out, file=sys.stderr, flush=True)
            del case
    print(json.dumps(out, indent=1))
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "cache_diag.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
