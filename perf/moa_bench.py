"""MixtureOfAttention routing half the tokens vs dense attention on the same input.

The mixture-of-attention README expects routing half the queries and half the keys to make
attention ~4x cheaper (N/2 x N/2 scores instead of N x N). This measures where that holds:
- core: the attention kernel alone, dense (B, H, N, dh) vs routed (B*E, H, N/2, dh) with the
  null key (N/2 + 1 keys), with and without the key padding mask the module passes;
- module: a dense prenorm attention block (projections + kernel + output projection) vs
  MixtureOfAttention (routing, gathers, per-expert projections, null key, scatter), for one
  and two experts, loop / batched / flex strategies (automatic kernel choice: on CUDA without
  flash-attn that is sdpa_flash, as for the dense block); plus route() alone.

    python -m attnbench.perf.moa_bench [--device cuda] [--seqs 4096 16384] [--out moa.json]

Prints a table (ms, median of CUDA-event timings; speedup = dense / this) and writes JSON rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from attnbench.files import write_atomic
from attnbench.perf.timing import time_call
from attnbench.registry import registry
from attnbench.spec import Config


class DenseBlock(nn.Module):
    """The dense baseline: prenorm, q/k/v projections, one attention kernel call, output projection."""

    def __init__(self, dim: int, heads: int, dim_head: int, kernel: str):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.kernel = registry().get(f"dense/{kernel}").fn
        self.gain = nn.Parameter(torch.ones(dim))
        self.to_qkv = nn.Parameter(torch.randn(dim, 3 * inner) / math.sqrt(dim))
        self.to_out = nn.Parameter(torch.randn(inner, dim) / math.sqrt(inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        h = F.normalize(x, dim=-1) * math.sqrt(x.shape[-1]) * self.gain
        q, k, v = (h @ self.to_qkv).view(B, N, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        out, _ = self.kernel(q, k, v, Config(scale=self.dim_head**-0.5))
        return out.transpose(1, 2).reshape(B, N, -1) @ self.to_out


def timed(fn, device: str, backward: bool, x: torch.Tensor | None = None, quick: bool = False) -> float:
    """Median ms of fn() (fwd) or fn() + backward (fwdbwd)."""
    grad = None

    def prepare(i):
        if x is not None:
            x.grad = None
        return None

    def run(_):
        nonlocal grad
        out = fn()
        if backward:
            if grad is None:
                grad = torch.randn_like(out)
            out.backward(grad)

    rep = 5.0 if quick else 100.0
    return time_call(prepare, run, device=device, warmup_ms=rep / 4, rep_ms=rep, max_ms=2000).ms


def core_rows(B, N, H, dh, dtype, device, quick) -> list[dict]:
    """The attention kernel alone: dense N x N vs routed (N/2) x (N/2 + 1), for 1 and 2 experts."""
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    cfg, kq = Config(scale=dh**-0.5), N // 2
    dense = (make(B, H, N, dh), make(B, H, N, dh), make(B, H, N, dh))
    cases = [("core/dense", k, 0, dense, None) for k in ("sdpa_flash", "sdpa_efficient")]
    for E in (1, 2):
        routed = (make(B * E, H, kq, dh), make(B * E, H, kq + 1, dh), make(B * E, H, kq + 1, dh))
        keep = torch.ones(B * E, kq + 1, dtype=torch.bool, device=device)
        cases += [("core/routed", "sdpa_flash", E, routed, None), ("core/routed+mask", "sdpa_efficient", E, routed,
                                                                     keep)]
    if device == "cpu":
        cases = [(label, "naive", E, t, m) for label, kern, E, t, m in cases if kern == "sdpa_efficient"]
    rows = []
    for label, kernel, E, (a, b, c), mask in cases:
        impl = registry().impls.get(f"dense/{kernel}")
        if impl is None or impl.unavailable():
            continue
        for mode in ("fwd", "fwdbwd"):
            fn = lambda impl=impl, a=a, b=b, c=c, mask=mask: impl.fn(a, b, c, cfg, key_padding_mask=mask)[0]
            rows.append(dict(part=label, kernel=kernel, experts=E, N=N, mode=mode,
                             ms=timed(fn, device, mode == "fwdbwd", quick=quick)))
    return rows


def module_rows(B, N, dim, H, dh, dtype, device, quick, flex: bool) -> list[dict]:
    rows = []
    x = torch.randn(B, N, dim, device=device, dtype=dtype, requires_grad=True)
    dense_kernel = "sdpa_flash" if device == "cuda" else "naive"
    torch.manual_seed(0)
    dense = DenseBlock(dim, H, dh, dense_kernel).to(device, dtype)
    models = [("module/dense", dense_kernel, 0, dense, lambda: dense(x))]
    variants = [(1, "batched"), (2, "batched"), (1, "loop")] + ([(1, "flex")] if flex else [])
    for E, strategy in variants:
        make = registry().get(f"MixtureOfAttention/{strategy}").fn  # impls/moa_<strategy>.py; auto kernel
        m = make(dim=dim, num_routed_queries=N // 2, num_routed_key_values=N // 2, num_experts=E, dim_head=dh,
                 heads=H).to(device, dtype)
        models.append((f"module/moa_{strategy}", None, E, m, lambda m=m: m(x)))
        if strategy == "batched":
            models.append(("module/route_only", "-", E, m, lambda m=m: m.route(x).q_weight))
    for label, kern, E, m, fn in models:
        for mode in ("fwd", "fwdbwd"):
            try:
                ms = timed(fn, device, mode == "fwdbwd", x=x, quick=quick)
                kern = kern or m.last_kernel.removeprefix("dense/")
                rows.append(dict(part=label, kernel=kern, experts=E, N=N, mode=mode, ms=ms))
            except Exception as exc:  # one failing row is reported, not fatal
                rows.append(dict(part=label, kernel=kern, experts=E, N=N, mode=mode, ms=None,
                                 error=f"{type(exc).__name__}: {str(exc)[:200]}"))
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup = the dense row of the same part family, N, mode and kernel family / this row."""
    for r in rows:
        family = r["part"].split("/")[0]
        base = [d for d in rows if d["N"] == r["N"] and d["mode"] == r["mode"] and d["ms"]
                and d["part"] == f"{family}/dense" and (family == "module" or d["kernel"] == r["kernel"])]
        if r["part"] == "core/routed+mask":  # against the dense kernel that takes no mask either way
            base = [d for d in rows if d["N"] == r["N"] and d["mode"] == r["mode"] and d["ms"]
                    and d["part"] == "core/dense" and d["kernel"] == r["kernel"]]
        r["speedup"] = round(base[0]["ms"] / r["ms"], 2) if base and r["ms"] else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim-head", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--flex", action="store_true", help="also time the flex strategy (compiles; CUDA)")
    ap.add_argument("--quick", action="store_true", help="short timings (smoke runs)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    rows = []
    for N in a.seqs:
        rows += core_rows(a.batch, N, a.heads, a.dim_head, dtype, a.device, a.quick)
        rows += module_rows(a.batch, N, a.dim, a.heads, a.dim_head, dtype, a.device, a.quick,
                            a.flex and N == max(a.seqs))
        if a.device == "cuda":
            torch.cuda.empty_cache()
    add_speedups(rows)
    env = dict(device=torch.cuda.get_device_name() if a.device == "cuda" else "cpu", torch=torch.__version__,
               dtype=a.dtype, batch=a.batch, dim=a.dim, heads=a.heads, dim_head=a.dim_head)
    if a.out:
        write_atomic(a.out, json.dumps(dict(env=env, rows=rows), indent=1))
    print(f"# {env}")
    print(f"{'part':<20} {'kernel':<15} {'E':>2} {'N':>6} {'mode':<7} {'ms':>9} {'speedup':>8}")
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "ERR"
        print(f"{r['part']:<20} {r['kernel']:<15} {r['experts']:>2} {r['N']:>6} {r['mode']:<7} {ms:>9} "
              f"{r['speedup'] or '':>8}  {r.get('error', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
