"""Sixth session: the dense/flex padding row never finished in a 10-minute call; one of its ci
examples (float32, D=96, window + key padding) sat in ptxas for minutes. How long does compiled
flex take to compile (forward call, then backward) per spec? Run each spec in its own process,
under a timeout, to compare float32 with and without masks, and float16.

    python3 scripts/diag/flex_fp32_compile.py "Spec(Hq=3, Sq=108, D=96, window=(1, 27))"   (CUDA only)

Measured (H100, torch 2.11, eight specs at once, 330 s cap): float32 D=96 unmasked 110.7 s fwd,
window (1, 27) 292.2 s, key_lengths (100,) and window + key_drop padding over 330 s; D=128 106.7 s,
D=80 112.6 s, D=64 / Dv=128 92.5 s (unmasked); float16 with the window + padding 21.4 s.
"""

import sys
import time

import torch

from attnbench.registry import registry
from attnbench.spec import Block, Spec  # noqa: F401  (for the eval'd spec)

spec = eval(sys.argv[1]).replace(device="cuda")  # noqa: S307 - a diagnosis script's own argument
impl = registry().get("dense/flex")
why = impl.why_not(spec)
t0 = time.perf_counter()
x = spec.make_inputs(requires_grad=True)
out, _ = impl.fn(x.q, x.k, x.v, spec.config(), x.key_padding_mask, x.bias)
t1 = time.perf_counter()
out.backward(x.grad_out)
torch.cuda.synchronize()
print(f"{spec.short()} declared={why!r}: fwd {t1 - t0:.1f} s, bwd {time.perf_counter() - t1:.1f} s", flush=True)
