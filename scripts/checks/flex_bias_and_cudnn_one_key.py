"""Re-checks two declared limits on their smallest cases:
A: impls/flex.py `_flex_limits`: compiled flex with a bias and Sq = Sk = 1 fails to compile its
   backward (Inductor CompilationError), on the decoding kernel and on the main one alike.
B: impls/sdpa.py `_cudnn_single_key`: cuDNN gives NaN gradients for a row with one visible key
   through a -inf mask, on some inputs only: through the adapter, and raw SDPA with one or two
   visible keys, dead keys zeroed or random.

    python3 scripts/checks/flex_bias_and_cudnn_one_key.py A|B     (CUDA only)

Evidence: evidence/h100/runs/s5-diag/call5-flex_bias_excerpt.log (A),
evidence/h100/runs/s5-diag/call5-cudnn_one_key.log (B).
"""

import itertools
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnbench.impls import flex as flex_mod
from attnbench.modules.common import FLEX_MAIN_KERNEL
from attnbench.properties.harness import verdicts
from attnbench.registry import registry
from attnbench.spec import Spec


def nan_counts(**tensors: torch.Tensor) -> str:
    return " ".join(f"{n} {int(t.isnan().sum())}" for n, t in tensors.items())


def flex_bias() -> None:
    impl = registry().get("dense/flex")
    spec = Spec(B=2, Sq=1, device="cuda", bias="full")
    for force in (False, True):
        if force:  # every call on the main flex kernel (not the decoding one)
            orig = flex_mod._compiled_flex()
            flex_mod._compiled_flex = lambda orig=orig: (lambda *a, **kw: orig(*a, **{**kw, "kernel_options": FLEX_MAIN_KERNEL}))
        for s in (spec, spec.replace(Sq=2, Sk=2)):  # Sq = Sk = 2: the contrast, inside the claim
            try:
                worst = max(v.ratio for v in verdicts(impl, s, grad=True).values())
                print(f"A force_main={force} {s.short()}: ran, worst ratio {worst:.3g}", flush=True)
            except Exception as exc:
                print(f"A force_main={force} {s.short()}: FAIL {type(exc).__name__}: {str(exc)[:1500]}", flush=True)


def cudnn_one_key() -> None:
    impl = registry().get("dense/sdpa_cudnn")
    for Sq, Sk, win, D, mag in ((1, 64, (0, None), 16, 3.0), (1, 64, (0, None), 16, 1.0), (1, 64, (0, None), 64, 3.0),
                                (1, 64, (1, None), 16, 3.0), (1, 8, (0, None), 16, 3.0), (2, 64, (0, None), 16, 3.0)):
        s = Spec(Sq=Sq, Sk=Sk, D=D, dtype="float16", device="cuda", window=win, magnitude=mag)
        x = s.make_inputs(requires_grad=True)
        out, _ = impl.fn(x.q, x.k, x.v, s.config(), x.key_padding_mask, x.bias)
        dq, dk, dv = torch.autograd.grad(out, (x.q, x.k, x.v), x.grad_out)
        print(f"B adapter {s.short()}: NaN {nan_counts(out=out, dq=dq, dk=dk, dv=dv)}", flush=True)
    # raw cuDNN: one or two visible keys at the end, dead keys zeroed or random, a (1, 1, Sq, Sk) -inf mask
    for nvis, zero, D, mag, Sk in itertools.product((1, 2), (True, False), (16, 64), (1.0, 3.0), (8, 64)):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = (mag * torch.randn(1, 1, 1, D, device="cuda", generator=g)).half().requires_grad_()
        k = (mag * torch.randn(1, 1, Sk, D, device="cuda", generator=g)).half()
        v = (mag * torch.randn(1, 1, Sk, D, device="cuda", generator=g)).half()
        vis = torch.arange(Sk, device="cuda") >= Sk - nvis
        if zero:
            k, v = k.masked_fill(~vis[:, None], 0), v.masked_fill(~vis[:, None], 0)
        k, v = k.requires_grad_(), v.requires_grad_()
        mask = torch.zeros(1, 1, 1, Sk, dtype=torch.half, device="cuda").masked_fill(~vis, float("-inf"))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
        print(f"B raw nvis={nvis} zero_dead={zero} D={D} mag={mag} Sk={Sk}: NaN {nan_counts(out=o, dq=dq, dk=dk, dv=dv)}",
              flush=True)


if __name__ == "__main__":
    flex_bias() if sys.argv[1:] == ["A"] else cudnn_one_key()
