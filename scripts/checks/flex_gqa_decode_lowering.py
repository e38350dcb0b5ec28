"""Re-checks the compiled-flex lowering limit that impls/flex.py works around (`DECODE_BELOW`:
grouped heads with a block mask and Sq < 128 go to the main kernel, FLEX_MAIN_KERNEL): on the
decoding kernel, Spec(Hq=4, Hkv=1, Sq=33, window=(0, None)) raises NoValidChoicesError, and
Spec(Hq=2, Hkv=1, Sq=64, D=32, key_lengths=(0,)) fails in its empty rows. One factor at a time
(MHA, bf16, Sq=200, no mask, causal, D=64), each against the float64 oracle. Run it with the
workaround removed to see whether the limit still holds.

    python3 scripts/checks/flex_gqa_decode_lowering.py [case ...]     (CUDA only; writes $OUT/flex_gqa_decode_lowering.json)

Evidence: evidence/h100/runs/s4-diag/call3-flex_diag.json.
"""
import json
import os
import sys
import time
import traceback

import torch

from attnbench.properties.harness import run_impl, run_oracle
from attnbench.registry import registry
from attnbench.spec import Spec

flex = registry().get("dense/flex")
cases = [
    ("ce_window", Spec(Hq=4, Hkv=1, Sq=33, device="cuda", window=(0, None)), False),
    ("ce_window_grad", Spec(Hq=4, Hkv=1, Sq=33, device="cuda", window=(0, None)), True),
    ("window_mha", Spec(Hq=4, Hkv=4, Sq=33, device="cuda", window=(0, None)), False),
    ("window_bf16", Spec(Hq=4, Hkv=1, Sq=33, device="cuda", window=(0, None), dtype="bfloat16"), False),
    ("window_S200", Spec(Hq=4, Hkv=1, Sq=200, device="cuda", window=(0, None)), False),
    ("gqa_nomask_S33", Spec(Hq=4, Hkv=1, Sq=33, device="cuda"), False),
    ("gqa_causal_S33", Spec(Hq=4, Hkv=1, Sq=33, device="cuda", causal=True), False),
    ("gqa_D64_S33", Spec(Hq=4, Hkv=1, Sq=33, D=64, device="cuda", window=(0, None)), False),
    ("ce_empty", Spec(Hq=2, Hkv=1, Sq=64, D=32, device="cuda", key_lengths=(0,)), True),
    ("empty_fwd", Spec(Hq=2, Hkv=1, Sq=64, D=32, device="cuda", key_lengths=(0,)), False),
    ("empty_mha", Spec(Hq=2, Hkv=2, Sq=64, D=32, device="cuda", key_lengths=(0,)), True),
    ("empty_bf16", Spec(Hq=2, Hkv=1, Sq=64, D=32, device="cuda", key_lengths=(0,), dtype="bfloat16"), True),
    ("gqa_kl1_grad", Spec(Hq=2, Hkv=1, Sq=64, D=32, device="cuda", key_lengths=(1,)), True),
    ("gqa_grad_S64", Spec(Hq=2, Hkv=1, Sq=64, D=32, device="cuda"), True),
]
only = sys.argv[1:]
res = {}
for name, spec, grad in cases:
    if only and name not in only:
        continue
    t = time.perf_counter()
    try:
        inputs = spec.make_inputs(requires_grad=grad)
        got = run_impl(flex, spec, inputs, grad=grad)
        want = run_oracle(spec, inputs, grad=grad)
        info = {"out_err": (got.out.double() - want.out.to(got.out.device)).abs().max().item(),
                "out_nan": int(got.out.isnan().sum())}
        if got.lse is not None:
            gl, wl = got.lse.double(), want.lse.to(got.lse.device)
            info["lse_mismatch_inf"] = int((torch.isneginf(gl) != torch.isneginf(wl)).sum())
        for n, g in (got.grads or {}).items():
            w = want.grads[n].to(g.device)
            info[f"{n}_err"] = (g.double() - w).abs().max().item()
            info[f"{n}_nan"] = int(g.isnan().sum())
    except Exception as e:
        tb = traceback.format_exc().splitlines()
        info = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:600]}", "tb": tb[-25:]}
    info["s"] = round(time.perf_counter() - t, 1)
    res[name] = info
    print(name, {k: v for k, v in info.items() if k != "tb"}, flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "flex_gqa_decode_lowering.json"), "w"), indent=1, default=str)
