"""Throughput of attnbench's Triton kernel next to SDPA (flash, cuDNN) and FlexAttention.

    python perf/triton_tune.py [--out DIR] [--quick]

bf16, D=128, 16 heads, S=4096, B=4 (16k tokens), causal and not, forward and forward+backward,
timed with triton.testing.do_bench (median; warmup 50 ms, rep 200 ms, as the anchors in
/work/shared/anchors). FLOPs = 4*B*H*Sq*Sk*D, halved when causal; fwd+bwd counts 3.5x.
A sliding-window row (causal, window 512, S=8192, B=2) counts only the useful 4*B*H*S*W*D.

Before timing, the autotuned kernel is checked against the float64 oracle on a slice of the
same shape (same autotune key, so the same config), forward and gradients. Writes
triton_tune.json and triton_tune.md to --out (default $OUT or .) and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from attnbench.files import write_atomic
from attnbench.impls import naive
from attnbench.impls import triton as tri
from attnbench.oracles.dense import attention as oracle
from attnbench.spec import Config


def _flops(B: int, H: int, Sq: int, Sk: int, D: int, causal: bool, mode: str, window: int | None = None) -> float:
    f = 4.0 * B * H * Sq * (window if window else Sk) * D * (0.5 if causal and not window else 1.0)
    return f * (3.5 if mode == "fwdbwd" else 1.0)


def _bench(fn, grads: list[torch.Tensor] | None = None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=200, grad_to_none=grads, return_mode="median")


def _inputs(B, H, S, D, dtype, grad, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda: torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=g).requires_grad_(grad)
    return make(), make(), make(), torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=g)


# -- implementations under test -------------------------------------------------------------
def _ours(causal: bool, window: int | None, D: int):
    cfg = Config(scale=1 / math.sqrt(D), causal=causal, window=(window, 0) if window else None)
    return lambda q, k, v: tri.attention(q, k, v, cfg)[0]


def _sdpa(backend_name: str, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return sdpa(q, k, v, is_causal=causal)

    return fn


def _flex(causal: bool, window: int | None, B: int, H: int, S: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    if window:
        mod = lambda b, h, q, k: (k <= q) & (q - k <= window)
    elif causal:
        mod = lambda b, h, q, k: k <= q
    else:
        return lambda q, k, v: compiled(q, k, v)
    mask = create_block_mask(mod, None, None, S, S, device="cuda")
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)


def _time(fn, B, H, S, D, causal, window=None) -> dict:
    row = {}
    q, k, v, do = _inputs(B, H, S, D, torch.bfloat16, grad=False)
    with torch.no_grad():
        fn(q, k, v)  # compile / autotune outside the timing
        row["fwd_ms"] = _bench(lambda: fn(q, k, v))
    q, k, v, do = _inputs(B, H, S, D, torch.bfloat16, grad=True)
    step = lambda: fn(q, k, v).backward(do)
    step()
    row["fwdbwd_ms"] = _bench(step, grads=[q, k, v])
    for mode in ("fwd", "fwdbwd"):
        row[f"{mode}_tflops"] = _flops(B, H, S, S, D, causal, mode, window) / row[f"{mode}_ms"] * 1e-9
    return row


# -- correctness of the tuned kernel ---------------------------------------------------------
def _check(B, H, S, D, causal, window=None) -> dict:
    """Oracle (float64) vs ours and vs naive (bf16) on one batch element, two heads."""
    cfg = Config(scale=1 / math.sqrt(D), causal=causal, window=(window, 0) if window else None)
    q, k, v, do = (t[:1, :2].detach().clone() for t in _inputs(B, H, S, D, torch.bfloat16, grad=False))
    result = {}
    for name, fn in (("triton", tri.attention), ("naive", naive.attention), ("oracle", oracle)):
        dtype = torch.float64 if name == "oracle" else torch.bfloat16
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves, cfg)
        grads = torch.autograd.grad(out, leaves, do.to(dtype))
        result[name] = [out.detach(), lse.detach().float(), *grads]
    errs = {}
    names = ("out", "lse", "dq", "dk", "dv")
    for i, name in enumerate(names):
        truth = result["oracle"][i].double()
        ours = (result["triton"][i].double() - truth).abs().max().item()
        ref = (result["naive"][i].double() - truth).abs().max().item()
        errs[name] = {"triton": ours, "naive": ref, "ratio": ours / max(ref, 1e-12)}
    return errs


def _configs() -> dict:
    ker = tri.kernels(False)
    out = {}
    for kind, tuner in ker.TUNED.items():
        best = getattr(tuner, "best_config", None)
        out[kind] = str(best) if best is not None else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="only our kernel, non-causal")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    import triton

    env = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    B, H, S, D = 4, 16, 4096, 128
    rows, checks = [], {}
    cases = [(False, None)] if args.quick else [(False, None), (True, None)]
    for causal, window in cases:
        impls = {"triton": _ours(causal, window, D)}
        if not args.quick:
            impls.update({
                "sdpa_flash": _sdpa("FLASH_ATTENTION", causal),
                "sdpa_cudnn": _sdpa("CUDNN_ATTENTION", causal),
                "flex": _flex(causal, window, B, H, S),
            })
        for name, fn in impls.items():
            t0 = time.time()
            try:
                row = _time(fn, B, H, S, D, causal)
            except Exception as exc:  # one failing baseline never hides the others
                row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            row.update(impl=name, S=S, B=B, causal=causal, wall_s=round(time.time() - t0, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
        checks[f"causal={causal}"] = _check(B, H, S, D, causal)
        print("check", causal, json.dumps(checks[f"causal={causal}"]), flush=True)
    if not args.quick:
        Bw, Sw, W = 2, 8192, 512
        for name, fn in (("triton", _ours(True, W, D)), ("flex", _flex(True, W, Bw, H, Sw))):
            row = _time(fn, Bw, H, Sw, D, True, window=W)
            row.update(impl=f"{name}_window{W}", S=Sw, B=Bw, causal=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
        checks["window"] = _check(Bw, H, Sw, D, True, W)
    configs = _configs()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "triton_tune.json", json.dumps({"env": env, "rows": rows, "checks": checks,
                                                       "configs": configs}, indent=1))
    table = _table(rows, env)
    write_atomic(out / "triton_tune.md", table)
    print(json.dumps(configs, indent=1))
    print(table)
    return 0


def _table(rows: list[dict], env: dict) -> str:
    lines = [
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; bf16, D=128, H=16",
        "",
        "| impl | B | S | causal | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['B']} | {r['S']} | {r['causal']} | error: {r['error'][:60]} | | | |")
            continue
        lines.append(
            f"| {r['impl']} | {r['B']} | {r['S']} | {r['causal']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.1f} "
            f"| {r['fwdbwd_ms']:.3f} | {r['fwdbwd_tflops']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
