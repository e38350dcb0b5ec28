"""Why do the triton sliding-window cells vary 140-270 TFLOP/s between leases? Times every launch
config of each Triton kernel (fwd, dkdv, dq) on the sweep's window shapes with a careful do_bench
(warmup 25 ms, rep 100 ms, three rounds in shuffled order), then lets the autotuner (as the
kernel ships it) pick five times from scratch and records its picks. A config whose time is
stable while the tuner's pick moves says the tuner's ranking is the noise.

    python3 scripts/diag/window_configs.py [--out DIR]     (CUDA only; writes window_configs.json)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys

import torch

from attnbench.impls import triton as tri
from attnbench.spec import Block, Config

SHAPES = {  # the gpu sweep's window cells: B=2, H=16, S=8192, D=128, bf16, causal
    "sliding(512,0)": dict(window=(512, 0)),
    "block(512,1,0)": dict(block=Block(512, 1, 0)),
}


def _capture(cfg: Config, q, k, v, backward: bool) -> dict:
    """The kwargs of each kernel launch of one call (fwd, and dkdv / dq when backward)."""
    seen = {}
    orig = tri._launch

    def spy(kind, length, block, heads, interpret, **kw):
        seen[kind] = (length, block, heads, dict(kw))
        return orig(kind, length, block, heads, interpret, **kw)

    tri._launch = spy
    try:
        out, _ = tri.attention(q, k, v, cfg)
        if backward:
            out.backward(torch.randn_like(out))
    finally:
        tri._launch = orig
    return seen


def _time_configs(kind: str, launch: tuple, rounds: int = 3) -> dict:
    from triton.testing import do_bench

    ker = tri.kernels(False)
    length, block, heads, kw = launch
    kw = {**kw, "enable_fp_fusion": kw["DOT_PREC"] != "ieee"}
    configs = ker.PRUNE[kind](ker.CONFIGS[kind], {}, **kw)
    times: dict[str, list[float]] = {str(c): [] for c in configs}
    for _ in range(rounds):
        order = list(configs)
        random.shuffle(order)
        for c in order:
            grid = (-(-length // c.kwargs[block]), heads)

            def call(c=c, grid=grid):
                ker.RAW[kind][grid](**kw, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)

            try:
                times[str(c)].append(do_bench(call, warmup=25, rep=100, return_mode="median"))
            except Exception as exc:  # a config that does not fit
                times[str(c)].append(float("nan"))
                print(f"  {kind} {c}: {type(exc).__name__}", file=sys.stderr)
    return times


def _tuner_picks(cfg: Config, q, k, v, n: int = 5) -> list[dict]:
    ker = tri.kernels(False)
    picks = []
    for _ in range(n):
        for tuner in ker.TUNED.values():
            tuner.cache.clear()
        out, _ = tri.attention(q, k, v, cfg)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        picks.append({kind: str(next(iter(t.cache.values()))) if t.cache else None for kind, t in ker.TUNED.items()})
    return picks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    random.seed(0)
    B, H, S, D = 2, 16, 8192, 128
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "commit": os.environ.get("ATTNBENCH_COMMIT", "?"), "shapes": {}}
    for name, extra in SHAPES.items():
        cfg = Config(scale=1 / math.sqrt(D), causal=True, **extra)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        launches = _capture(cfg, q, k, v, backward=True)
        entry = {kind: _time_configs(kind, launch) for kind, launch in launches.items()}
        entry["tuner_picks"] = _tuner_picks(cfg, q, k, v)
        result["shapes"][name] = entry
        print(f"== {name}")
        for kind in ("fwd", "dkdv", "dq"):
            ranked = sorted(entry[kind].items(), key=lambda kv: min(kv[1]))
            for c, ts in ranked:
                print(f"  {kind:5s} {min(ts):8.3f} ms  spread {max(ts) / min(ts) - 1:6.1%}  {c}")
        for p in entry["tuner_picks"]:
            print("  tuner:", p)
    with open(os.path.join(args.out, "window_configs.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
