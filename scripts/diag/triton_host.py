"""Where do the triton forward's 170-310 us of host time per call go? Times the host's enqueue cost
of each layer of one call, outermost first, while the GPU is kept busy (so the time is the host's
alone), then profiles the whole call with cProfile.

Layers: attention() (checks + autograd Function + allocations + launch), _forward() (allocations +
argument dict + launch), each also with ATTNBENCH_TRITON_PLANS=0 (every launch through Triton's
JIT instead of the compiled kernel's launcher), _launch() (kept pick, plan or JIT), the tuned kernel called directly, the raw
JIT kernel with the tuned config, and an empty Triton kernel with as many arguments. Also the same
call with requires_grad inputs, and an SDPA call for scale.

    python3 scripts/diag/triton_host.py [--out DIR]     (CUDA only; writes triton_host.json)
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import json
import os
import pstats
import sys
import tempfile
import time

import torch
import triton

from attnbench.impls import triton as tri
from attnbench.spec import Config

N = 300


def host_us(fn, n: int = N, rounds: int = 5) -> float:
    """Median over rounds of the host time per call, with the GPU queue kept busy."""
    fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU spin: the launches below queue behind it
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        per.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    per.sort()
    return per[len(per) // 2]


def _empty_with(nargs: int):
    names = [f"a{i}" for i in range(nargs)]
    src = f"def empty({', '.join(names)}):\n    pass\n"
    path = os.path.join(tempfile.mkdtemp(), f"empty{nargs}.py")
    with open(path, "w") as f:
        f.write("import triton\n@triton.jit\n" + src)
    spec = importlib.util.spec_from_file_location(f"empty{nargs}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.empty


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    B, H, S, D = 1, 16, 1024, 128
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    cfg = Config(scale=D ** -0.5, causal=True)
    res: dict = {"shape": dict(B=B, H=H, S=S, D=D, causal=True, dtype="bfloat16"), "us": {}}
    us = res["us"]

    with torch.no_grad():
        us["attention (no grad)"] = host_us(lambda: tri.attention(q, k, v, cfg))
        us["_forward"] = host_us(lambda: tri._forward(q, k, v, cfg, None, None))
        os.environ["ATTNBENCH_TRITON_PLANS"] = "0"  # every launch through Triton's JIT (seventh session)
        us["attention (no grad), launch plans off"] = host_us(lambda: tri.attention(q, k, v, cfg))
        us["_forward, launch plans off"] = host_us(lambda: tri._forward(q, k, v, cfg, None, None))
        os.environ["ATTNBENCH_TRITON_PLANS"] = "1"
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    us["attention (requires_grad)"] = host_us(lambda: tri.attention(qg, kg, vg, cfg))

    # the launch alone, with the argument dict built once
    out = torch.empty_like(q)
    lse = torch.empty(B, H, S, device=dev)
    m2, inv_l = torch.empty_like(lse), torch.empty_like(lse)
    kw = tri._common(q, k, v, cfg, None, None)
    kw.update(Out=out, LSE=lse, M2=m2, INVL=inv_l, sob=out.stride(0), soh=out.stride(1), som=out.stride(2), Hq=H)
    us["_common (argument dict)"] = host_us(lambda: tri._common(q, k, v, cfg, None, None))
    us["_launch (kept pick, launch plan)"] = host_us(lambda: tri._launch("fwd", S, "BLOCK_M", B * H, False, **kw))
    os.environ["ATTNBENCH_TRITON_PLANS"] = "0"
    us["_launch (kept pick, JIT launch)"] = host_us(lambda: tri._launch("fwd", S, "BLOCK_M", B * H, False, **kw))
    os.environ["ATTNBENCH_TRITON_PLANS"] = "1"
    g_out = torch.randn_like(q)

    def fwd_bwd():
        out, _ = tri.attention(qg, kg, vg, cfg)
        torch.autograd.grad(out, [qg, kg, vg], g_out)

    us["attention + backward"] = host_us(fwd_bwd, n=100)
    os.environ["ATTNBENCH_TRITON_PLANS"] = "0"
    us["attention + backward, launch plans off"] = host_us(fwd_bwd, n=100)
    os.environ["ATTNBENCH_TRITON_PLANS"] = "1"
    res["plan_stats"] = dict(tri.PLAN_STATS)
    ker = tri.kernels(False)
    kw2 = {**kw, "enable_fp_fusion": True}
    grid = lambda meta: (tri._cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    us["TUNED[fwd][grid](**kw)"] = host_us(lambda: ker.TUNED["fwd"][grid](**kw2))
    tuner = ker.TUNED["fwd"]
    config = next(iter(tuner.cache.values())) if getattr(tuner, "cache", None) else None
    if config is not None:
        res["config"] = str(config)
        ck = {**kw2, **config.all_kwargs()}
        g = (tri._cdiv(S, config.kwargs["BLOCK_M"]), B * H)
        us["RAW[fwd][grid](**kw, **config) kwargs"] = host_us(lambda: ker.RAW["fwd"][g](**ck))
        names = ker.RAW["fwd"].arg_names
        pos = [ck[n] for n in names if n in ck]
        rest = {n: v for n, v in ck.items() if n not in names}
        if len(pos) == len(names):
            us["RAW[fwd][grid](*positional, **options)"] = host_us(lambda: ker.RAW["fwd"][g](*pos, **rest))
        res["n_kernel_args"] = len(names)
        res["n_constexpr"] = sum(1 for p in ker.RAW["fwd"].params if p.is_constexpr)
        empty = _empty_with(len(names))
        ints = [1] * len(names)
        us[f"empty kernel, {len(names)} int args"] = host_us(lambda: empty[(1,)](*ints))
        tens = [q] * 9 + [7] * (len(names) - 9)
        us[f"empty kernel, 9 tensors + {len(names) - 9} ints"] = host_us(lambda: empty[(1,)](*tens))
    e4 = _empty_with(4)
    us["empty kernel, 4 args"] = host_us(lambda: e4[(1,)](q, k, 1, 2))
    with torch.no_grad():
        us["sdpa (flash, is_causal)"] = host_us(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    us["torch.empty x4"] = host_us(lambda: [torch.empty(B, H, S, device=dev) for _ in range(4)])

    def device_ctx():
        with tri._device_ctx(q):
            pass

    us["torch.cuda.device(q.device) enter/exit"] = host_us(device_ctx)

    prof = cProfile.Profile()
    with torch.no_grad():
        torch.cuda._sleep(int(4e8))
        prof.enable()
        for _ in range(N):
            tri.attention(q, k, v, cfg)
        prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    res["profile_tottime"] = s.getvalue()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
    res["profile_cumulative"] = s.getvalue()

    res["env"] = dict(torch=torch.__version__, triton=triton.__version__, gpu=torch.cuda.get_device_name())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_host.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(res["profile_tottime"][:6000])
    for name, t in us.items():
        print(f"{t:8.1f} us  {name}")


if __name__ == "__main__":
    main()
