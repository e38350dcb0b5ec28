"""What each torch SDPA backend accepts on this machine: every backend of impls/sdpa.py on every
case below (ignoring the declarations), judged against the float64 oracle with the suite's
tolerance rule. Behind the declarations in impls/sdpa.py (NOTES.md, SDPA backends).

Run: python scripts/checks/sdpa_probe.py [cuda|cpu] [out.json]
"""

from __future__ import annotations

import json
import sys

import torch

from attnbench.impls.naive import attention as naive
from attnbench.impls.sdpa import BACKENDS, attention
from attnbench.oracles.dense import attention as oracle
from attnbench.properties.tolerance import compare
from attnbench.spec import Spec

PROBE_CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "causal Sq<Sk": dict(Sq=32, Sk=80, causal=True),
    "causal Sq>Sk": dict(Sq=80, Sk=32, causal=True),
    "causal top_left": dict(Sq=32, Sk=80, causal=True, align="top_left"),
    "gqa": dict(Hkv=2, causal=True),
    "mqa": dict(Hkv=1),
    "dv": dict(Dv=32),
    "window": dict(causal=True, window=(16, 0)),
    "blocked": dict(block=(16, 1, 0)),
    "key_padding": dict(key_lengths=(0, 50)),
    "bias+grad": dict(bias="full"),
    "bias -inf rows": dict(causal=True, bias="per_head", bias_neginf=0.6),
    "scale 0": dict(scale=0.0, causal=True),
    "D=12": dict(D=12),
    "D=256": dict(D=256),
    "dropout": dict(dropout_p=0.2),
}


def probe(device: str = "cuda", dtypes=("float32", "float16", "bfloat16")) -> list[dict]:
    """Run every backend on every case (ignoring the declarations) and judge it against the
    float64 oracle with the suite's tolerance rule. Returns rows {case, backend, dtype, result}."""
    rows = []
    for case, fields in PROBE_CASES.items():
        for backend in BACKENDS:
            for dtype in dtypes:
                spec = Spec(**{**dict(B=2, Hq=4, Sq=64, D=64), **fields, "dtype": dtype, "device": device})
                try:
                    result = _probe_one(spec, backend, oracle, naive, compare)
                except Exception as exc:  # the point is to record what each backend refuses
                    result = "ERR " + f"{type(exc).__name__}: {exc}".replace("\n", " ")[:160]
                rows.append(dict(case=case, backend=backend, dtype=dtype, result=result))
    return rows


def _probe_one(spec: Spec, backend: str, oracle, naive, compare) -> str:
    grads = ["q", "k", "v"] + (["bias"] if spec.bias else [])
    inp = spec.make_inputs(requires_grad=True)
    out, _ = attention(inp.q, inp.k, inp.v, spec.config(), inp.key_padding_mask, inp.bias, backend=backend)
    got = [out, *torch.autograd.grad(out, [getattr(inp, n) for n in grads], inp.grad_out)]
    if spec.dropout_p > 0:
        return "ok (runs)" if all(torch.isfinite(t).all() for t in got) else "NaN"
    leaf = [getattr(inp, n).detach().double().requires_grad_() for n in grads]
    b64 = leaf[3] if spec.bias else None
    want_out, _ = oracle(*leaf[:3], spec.config(), inp.key_padding_mask, b64)
    want = [want_out, *torch.autograd.grad(want_out, leaf, inp.grad_out.double())]
    ref_in = spec.make_inputs(requires_grad=True)
    ref_out, _ = naive(ref_in.q, ref_in.k, ref_in.v, spec.config(), ref_in.key_padding_mask, ref_in.bias)
    ref = [ref_out, *torch.autograd.grad(ref_out, [getattr(ref_in, n) for n in grads], ref_in.grad_out)]
    worst = max(compare(n, g, w, r, spec.dtype).ratio for n, g, w, r in
                zip(["out"] + ["d" + n for n in grads], got, want, ref))
    return "ok" if worst <= 1 else f"WRONG x{worst:.3g}"


def _probe_table(rows: list[dict]) -> str:
    cols = [(b, d) for b in BACKENDS for d in ("float32", "float16", "bfloat16")]
    short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
    head = "| case | " + " | ".join(f"{b} {short[d]}" for b, d in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    cell = {(r["case"], r["backend"], r["dtype"]): r["result"] for r in rows}
    for case in PROBE_CASES:
        vals = []
        for b, d in cols:
            r = cell.get((case, b, d), "-")
            vals.append("ok" if r.startswith("ok") else ("ERR" if r.startswith("ERR") else r))
        lines.append(f"| {case} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    found = probe(device)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump(found, f, indent=1)
    for r in found:
        if r["result"].startswith("ERR") or r["result"].startswith("WRONG"):
            print(f"{r['case']:>16} {r['backend']:>9} {r['dtype']:>8}: {r['result']}")
    print(_probe_table(found))
