"""The triton adapter's own host cost, without any kernel: checks, the autograd Function, the
argument dicts and allocations, with every launch stubbed out. Runs on the CPU (TRITON_INTERPRET=1
for the adapter's checks); the launches themselves are what scripts/diag/triton_host.py times on a GPU.

    TRITON_INTERPRET=1 python3 scripts/diag/triton_host_cpu.py
"""

from __future__ import annotations

import platform
import time
import types

import torch

from attnbench.impls import triton as tri
from attnbench.spec import Config


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, n: int = 2000, rounds: int = 3) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(times)[len(times) // 2]


def main() -> None:
    tri._launch = lambda *args, **kwargs: None
    tri.kernels = lambda interpret=None: types.SimpleNamespace(bwd_preprocess=_NoLaunch())
    q, k, v = (torch.randn(1, 16, 1024, 128, dtype=torch.float16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    cfg = Config(scale=128 ** -0.5, causal=True)

    def forward():
        with torch.no_grad():
            tri.attention(q, k, v, cfg)

    def forward_backward():
        out, _ = tri.attention(q, k, v, cfg)
        torch.autograd.grad(out, [q, k, v], g)

    print(f"{time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()} "
          f"torch {torch.__version__}; B=1 H=16 S=1024 D=128 fp16 causal, launches stubbed, median of 3 x 2000")
    print(f"forward (no grad)   {per_call_us(forward):7.1f} us")
    print(f"forward + backward  {per_call_us(forward_backward):7.1f} us")


if __name__ == "__main__":
    main()
