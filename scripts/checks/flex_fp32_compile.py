"""Re-checks the declared float32 compile-time limit of compiled flex (impls/flex.py
`FP32_FAST_COMPILE_DIM`): in float32 with a head dim over 64 and a window or key padding, ptxas
takes minutes per shape, so properties and sweeps skip those specs. Times one spec's first
forward call (the compile) and its backward; run each spec in its own process under a timeout.

    python3 scripts/checks/flex_fp32_compile.py "Spec(Hq=3, Sq=108, D=96, window=(1, 27))"   (CUDA only)

Evidence: evidence/h100/runs/s6-diag/callE-flex_fp32_compile.txt (H100, torch 2.11, eight specs
at once, 330 s cap: float32 D=96 unmasked 110.7 s fwd, window (1, 27) 292.2 s, key padding over
330 s; float16 with the window + padding 21.4 s).
"""

import sys
import time

import torch

from attnbench.registry import registry
from attnbench.spec import Block, Spec  # noqa: F401  (for the eval'd spec)

spec = eval(sys.argv[1]).replace(device="cuda")  # noqa: S307 - the check's own argument
impl = registry().get("dense/flex")
why = impl.why_not(spec)
t0 = time.perf_counter()
x = spec.make_inputs(requires_grad=True)
out, _ = impl.fn(x.q, x.k, x.v, spec.config(), x.key_padding_mask, x.bias)
t1 = time.perf_counter()
out.backward(x.grad_out)
torch.cuda.synchronize()
print(f"{spec.short()} declared={why!r}: fwd {t1 - t0:.1f} s, bwd {time.perf_counter() - t1:.1f} s", flush=True)
