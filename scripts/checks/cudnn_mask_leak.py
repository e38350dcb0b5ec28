"""Re-checks the declared cuDNN mask limit (impls/sdpa.py, the cudnn branch of the adapter):
cuDNN treats a bool attn_mask, or one filled with finfo.min, like a large finite negative bias,
so a masked key with logits near 1e4 leaks through; a float mask filled with -inf does not.
That is why the adapter hands cuDNN a -inf float mask. Also counts NaN gradients with few
visible keys through bool and -inf masks, non-causal.

    python3 scripts/checks/cudnn_mask_leak.py        (CUDA only; writes $OUT/cudnn_mask_leak.json)

Expected while the limit holds: `bool` and `float_min` rows over 0.05 at large scales, no
`float_-inf` row. Evidence: evidence/h100/runs/s4-diag/call3-cudnn_diag.json (torch 2.11, cuDNN 9.19).
"""
import itertools
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

dev = "cuda"
CUDNN, MATH = SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH
out = {}

def sdpa(backend, q, k, v, mask):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

def masks(vis, dtype):
    fl = torch.zeros(vis.shape, dtype=dtype, device=dev).masked_fill(~vis, float("-inf"))
    big = torch.zeros(vis.shape, dtype=dtype, device=dev).masked_fill(~vis, torch.finfo(dtype).min)
    return {"bool": vis, "float_-inf": fl, "float_min": big}

# 1. leak: row i sees key i only (window (0, 0)); keys scaled by f
rows = []
for dtype, S, f in itertools.product((torch.bfloat16, torch.float16), (2, 9, 64, 200), (1, 30, 100, 300, 1e3, 1e4)):
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, 2, S, 64, device=dev, dtype=dtype, generator=g)
    k = (torch.randn(1, 2, S, 64, device=dev, dtype=torch.float32, generator=g) * f).to(dtype)
    v = torch.randn(1, 2, S, 64, device=dev, dtype=dtype, generator=g)
    vis = torch.eye(S, dtype=torch.bool, device=dev)[None, None]
    for name, m in masks(vis, dtype).items():
        try:
            o = sdpa(CUDNN, q, k, v, m)
            err = (o.float() - v.float()).abs().max().item()
        except Exception as e:
            err = f"{type(e).__name__}: {str(e)[:80]}"
        rows.append((str(dtype)[6:], S, f, name, err))
out["leak"] = rows
print("leak (row i sees key i only; max |out - v|):")
for r in rows:
    if r[3] == "bool" or not isinstance(r[4], float) or r[4] > 0.05:
        print("  ", r)

# 2. NaN dq with few visible keys (key padding), non-causal
rows = []
for dtype, Sq, Sk, nvis, mk in itertools.product((torch.float16, torch.bfloat16), (1, 2, 3, 8), (2, 16, 64, 65, 128),
                                                 (1, 2, 5), ("bool", "float_-inf")):
    if nvis > Sk:
        continue
    g = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(1, 1, Sq, 64, device=dev, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(1, 1, Sk, 64, device=dev, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(1, 1, Sk, 64, device=dev, dtype=dtype, generator=g).requires_grad_()
    vis = (torch.arange(Sk, device=dev) < nvis).expand(1, 1, Sq, Sk)
    m = masks(vis, dtype)[mk]
    try:
        o = sdpa(CUDNN, q, k, v, m)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
        res = {n: int(t.isnan().sum()) for n, t in (("out", o), ("dq", dq), ("dk", dk), ("dv", dv))}
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
    rows.append((str(dtype)[6:], Sq, Sk, nvis, mk, res))
out["nan"] = rows
print("NaN counts (few visible keys):")
for r in rows:
    if any(v for v in r[5].values()):
        print("  ", r)
print("cases with NaN:", sum(1 for r in rows if any(v for v in r[5].values())), "of", len(rows))
os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "cudnn_mask_leak.json"), "w"), default=str)
