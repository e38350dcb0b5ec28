"""Sliding-window benchmark: effective TFLOP/s and peak memory of local attention on a GPU.

Problem (defaults): causal sliding window (W, 0), W = 512, S = 8192, bf16, D = 128, B = 2,
16 heads. Effective work counts only visible (query, key) pairs: query i sees min(i, W) + 1
keys, so a head does 4 * D * pairs FLOPs forward (QK^T and PV, 2 FLOPs per multiply-add);
forward + backward counts 3.5x the forward (the anchors' convention). The anchors
(/work/shared/anchors) used 4 * B * H * S * W * D instead; both are reported.

Compared, on the same inputs:
- flex_window: torch.compile'd FlexAttention with a sliding-window BlockMask (direct call);
- sdpa_efficient_densemask: SDPA's memory-efficient kernel with a dense (S, S) bool mask;
- every implementation of variant "local" in the registry that runs on CUDA and covers the
  spec (bucketed, flex, triton, blockwise, naive, sdpa_*, local_attention, ...).
Timing: triton.testing.do_bench, median (wall clock on the CPU in --smoke mode). Memory:
torch.cuda.max_memory_allocated during one call minus what was allocated before it (the
inputs), for S in 1024 ... 16384: linear for windowed kernels, quadratic for dense masks.

    python -m attnbench.perf.local_bench --out $OUT            # on a CUDA machine
    python -m attnbench.perf.local_bench --smoke               # tiny CPU run of the same code
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from attnbench.files import write_atomic
from attnbench.registry import registry
from attnbench.results import PerfRow, Results, environment
from attnbench.spec import Spec

# H100 80GB HBM3, 2026-11-22 (/work/shared/anchors), effective TFLOP/s with the S * W count.
ANCHORS = {
    "flex_window": {"fwd": 240.6, "fwdbwd": 236.9},
    "sdpa_efficient_densemask": {"fwd": 8.3, "fwdbwd": 7.8},
}
BWD_FACTOR = 3.5


def visible_pairs(S: int, W: int) -> int:
    """Visible (query, key) pairs of one head under a causal window (W, 0), Sq = Sk = S."""
    if W >= S - 1:
        return S * (S + 1) // 2
    return S * (W + 1) - W * (W + 1) // 2


def effective_tflops(pairs_total: int, D: int, mode: str, ms: float) -> float:
    flops = 4 * D * pairs_total * (1.0 if mode == "fwd" else BWD_FACTOR)
    return flops / (ms * 1e-3) / 1e12


@dataclass
class Candidate:
    name: str
    origin: str  # "direct" or the registry key
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    backward: bool = True


# -- the two direct baselines ----------------------------------------------------------------
def direct_candidates(S: int, W: int, device: str) -> list[Candidate]:
    out = []
    if device == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        window = lambda b, h, q, kv: (kv <= q) & (q - kv <= W)
        block_mask = create_block_mask(window, None, None, S, S, device=device)
        out.append(Candidate("flex_window", "direct", lambda q, k, v: compiled(q, k, v, block_mask=block_mask)))
    i = torch.arange(S, device=device)
    dense = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= W)

    def sdpa_dense(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.EFFICIENT_ATTENTION if device == "cuda" else SDPBackend.MATH
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)

    out.append(Candidate("sdpa_efficient_densemask", "direct", sdpa_dense))

    # bucketed with quarter-window buckets looking 4 back: 1.25 W + 1 keys scored per query
    # instead of the default geometry's 2 W (w = W, one bucket back).
    from attnbench.impls.bucketed import Geometry, attention

    geom = Geometry(w=-(-W // 4), nb=4, nf=0)
    cfg = Spec(Sq=S, causal=True, window=(W, 0), D=1).config()
    out.append(Candidate(f"bucketed_w{geom.w}", "direct",
                         lambda q, k, v: attention(q, k, v, replace(cfg, scale=q.shape[-1] ** -0.5), geom=geom)[0]))
    return out


def registry_candidates(spec: Spec) -> tuple[list[Candidate], list[PerfRow]]:
    """Registry local impls covering the spec; rows saying why the others are left out."""
    cands, skipped = [], []
    cfg = spec.config()
    for impl in registry().select(variant="local", available_only=False):
        why = impl.unavailable() or impl.why_not(spec)
        if why:
            skipped.append(_row(impl.name, impl.key, "fwd", spec, status="unsupported", reason=why))
            continue
        fn = impl.fn
        cands.append(Candidate(impl.name, impl.key, lambda q, k, v, fn=fn: fn(q, k, v, cfg)[0],
                               backward=impl.why_not(spec, {"backward"}) is None))
    return cands, skipped


# -- measuring ----------------------------------------------------------------------------------
def _row(name: str, origin: str, mode: str, spec: Spec, **kw) -> PerfRow:
    shape = dict(B=spec.B, Hq=spec.Hq, Hkv=spec.Hkv, Sq=spec.Sq, Sk=spec.Sk, D=spec.D, causal=spec.causal,
                 window=list(spec.window), dtype=spec.dtype)
    row = PerfRow(variant="local", impl=name, mode=mode, shape=shape, **kw)
    row.origin = origin
    return row


def _inputs(spec: Spec, grad: bool, seed: int = 0):
    g = torch.Generator(device=spec.device).manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, device=spec.device, dtype=spec.torch_dtype)
    q, k, v = (make(spec.B, spec.Hq, spec.Sq, spec.D) for _ in range(3))
    dout = make(spec.B, spec.Hq, spec.Sq, spec.D)
    for t in (q, k, v):
        t.requires_grad_(grad)
    return q, k, v, dout


def _step(c: Candidate, q, k, v, dout, mode: str) -> Callable[[], None]:
    if mode == "fwd":
        qd, kd, vd = q.detach(), k.detach(), v.detach()  # some kernels refuse inputs that require grad

        def fwd():
            with torch.no_grad():
                c.fn(qd, kd, vd)
        return fwd

    def fwdbwd():
        c.fn(q, k, v).backward(dout)
    return fwdbwd


def _time(step: Callable[[], None], device: str, grads, warmup: int, rep: int) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median"))
    step()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
    return sorted(samples)[1]


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_candidates(spec: Spec, cands: list[Candidate], W: int, args, deadline: float) -> list[PerfRow]:
    rows = []
    pairs = spec.B * spec.Hq * visible_pairs(spec.Sq, W)
    q, k, v, dout = _inputs(spec, grad=True)
    reference = None
    for c in cands:
        for mode in ("fwd", "fwdbwd"):
            row = _row(c.name, c.origin, mode, spec, timer="do_bench" if spec.device == "cuda" else "wall_clock")
            rows.append(row)
            if mode == "fwdbwd" and not c.backward:
                row.status, row.reason = "unsupported", "no backward"
                continue
            if time.monotonic() > deadline:
                row.status, row.reason = "skipped", "time budget spent"
                continue
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        out = c.fn(q.detach(), k.detach(), v.detach()).float()
                    if reference is None:
                        reference = out
                    row.err_vs_first = (out - reference).norm().item() / reference.norm().item()
                    del out
                row.ms = _time(_step(c, q, k, v, dout, mode), spec.device, [q, k, v], args.warmup, args.rep)
                row.tflops = effective_tflops(pairs, spec.D, mode, row.ms)
                row.tflops_sw = effective_tflops(spec.B * spec.Hq * spec.Sq * W, spec.D, mode, row.ms)
                row.anchor_tflops = ANCHORS.get(c.name, {}).get(mode)
            except torch.OutOfMemoryError as exc:
                row.status, row.reason = "oom", str(exc).splitlines()[0][:200]
            except Exception as exc:  # one broken candidate never stops the run
                row.status, row.reason = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            finally:
                q.grad = k.grad = v.grad = None
                _free()
    return rows


def peak_bytes(c: Candidate, spec: Spec, mode: str) -> int:
    q, k, v, dout = _inputs(spec, grad=mode == "fwdbwd")
    step = _step(c, q, k, v, dout, mode)
    step()  # compile / autotune outside the measured call
    q.grad = k.grad = v.grad = None
    _free()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def memory_sweep(base: Spec, W: int, sizes: list[int], skip: set[str], deadline: float, args) -> list[PerfRow]:
    rows = []
    if base.device != "cuda":
        return rows
    names = None
    for S in sizes:
        spec = base.replace(Sq=S, Sk=None)
        cands = registry_candidates(spec)[0] + direct_candidates(S, W, spec.device)
        if names is None:
            names = [c.name for c in cands if c.name not in skip]
        for c in cands:
            if c.name not in names:
                continue
            for mode in ("fwd", "fwdbwd"):
                row = _row(c.name, c.origin, f"{mode}_mem", spec)
                rows.append(row)
                if mode == "fwdbwd" and not c.backward:
                    row.status, row.reason = "unsupported", "no backward"
                elif time.monotonic() > deadline:
                    row.status, row.reason = "skipped", "time budget spent"
                elif any(r.impl == c.name and r.mode == row.mode and r.status == "oom" for r in rows[:-1]):
                    row.status, row.reason = "oom", "out of memory at a smaller S"
                else:
                    try:
                        row.mem_bytes = peak_bytes(c, spec, mode)
                    except torch.OutOfMemoryError as exc:
                        row.status, row.reason = "oom", str(exc).splitlines()[0][:200]
                    except Exception as exc:
                        row.status, row.reason = "error", f"{type(exc).__name__}: {str(exc)[:200]}"
                _free()
    return rows


# -- report ---------------------------------------------------------------------------------------
def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[PerfRow], mem_rows: list[PerfRow], spec: Spec, W: int, sizes: list[int]) -> str:
    lines = [
        f"sliding window (W={W}, 0) causal, S={spec.Sq}, B={spec.B}, H={spec.Hq}, D={spec.D}, {spec.dtype}; "
        f"visible pairs per head {visible_pairs(spec.Sq, W):,}",
        "",
        "| impl | origin | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | S*W TFLOP/s fwd / fwd+bwd"
        " | anchor | rel err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {}
    for r in rows:
        by.setdefault((r.impl, r.origin), {})[r.mode] = r
    for (name, origin), modes in by.items():
        f, b = modes.get("fwd"), modes.get("fwdbwd")

        def cell(r, attr):
            if r is None:
                return "-"
            return _fmt(getattr(r, attr, None), ".4g" if attr == "ms" else ".1f") if r.status == "ok" else r.status

        anchor = ANCHORS.get(name)
        anchor = "-" if anchor is None else f"{anchor['fwd']} / {anchor['fwdbwd']}"
        lines.append(
            f"| {name} | {origin} | {cell(f, 'ms')} | {cell(f, 'tflops')} | {cell(b, 'ms')} | {cell(b, 'tflops')} | "
            f"{cell(f, 'tflops_sw')} / {cell(b, 'tflops_sw')} | "
            f"{anchor} | "
            f"{_fmt(getattr(f, 'err_vs_first', None), '.1e') if f else '-'} |"
        )
    if mem_rows:
        lines += ["", "peak memory above the inputs, MiB (fwd / fwd+bwd)", "",
                  "| impl | " + " | ".join(f"S={S}" for S in sizes) + " |", "|---|" + "---|" * len(sizes)]
        mem = {}
        for r in mem_rows:
            val = f"{r.mem_bytes / 2**20:.0f}" if r.mem_bytes is not None else r.status
            mem.setdefault(r.impl, {}).setdefault(r.shape["Sq"], {})[r.mode] = val
        for name, per_s in mem.items():
            cells = [f"{per_s.get(S, {}).get('fwd_mem', '-')} / {per_s.get(S, {}).get('fwdbwd_mem', '-')}" for S in sizes]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for local_bench.json / .md")
    p.add_argument("--S", type=int, default=8192)
    p.add_argument("--W", type=int, default=512)
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--mem-sizes", default="1024,2048,4096,8192,16384")
    p.add_argument("--mem-skip", default="", help="comma-separated impl names left out of the memory sweep")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--budget-s", type=float, default=200.0, help="stop starting new measurements after this")
    p.add_argument("--smoke", action="store_true", help="tiny float32 shapes on the CPU (checks the code path)")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.S, args.W, args.B, args.H, args.D, args.dtype, args.mem_sizes = 256, 32, 1, 2, 32, "float32", "128,256"
    elif device != "cuda":
        p.error("needs a CUDA device (use --smoke for a CPU check of the code path)")
    deadline = time.monotonic() + args.budget_s
    spec = Spec(B=args.B, Hq=args.H, Sq=args.S, D=args.D, dtype=args.dtype, device=device, causal=True,
                window=(args.W, 0))
    sizes = [int(s) for s in args.mem_sizes.split(",") if s]

    cands, skipped = registry_candidates(spec)
    rows = time_candidates(spec, direct_candidates(args.S, args.W, device) + cands, args.W, args, deadline)
    skip = {s for s in args.mem_skip.split(",") if s}
    mem_rows = memory_sweep(spec, args.W, sizes, skip, deadline, args)

    results = Results(env=environment(), perf=rows + skipped + mem_rows)
    out = Path(args.out)
    results.save(out / "local_bench.json")
    text = table(rows, mem_rows, spec, args.W, sizes)
    write_atomic(out / "local_bench.md", text + "\n")
    for r in skipped:
        print(f"left out: {r.impl}: {r.reason}")
    print(f"\n{results.env.get('device_name')}, torch {results.env.get('torch')}, triton {results.env.get('triton')}")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
