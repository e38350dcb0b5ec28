"""Re-checks the declared cuDNN one-key limit (impls/sdpa.py, `_cudnn_single_key`): cuDNN's
backward gives NaN dq / dk / dv, on some inputs, for a row that sees exactly one key through an
explicit attn_mask (key padding, a window, or causal with padding). Runs the adapter's kernel
(impl.fn, past its declarations) forward and backward on a grid of causal specs with key padding,
plus shapes without a one-key row for contrast, and counts NaNs in out, dq, dk, dv.

    python3 scripts/checks/cudnn_one_key_nan.py [--out DIR]     (CUDA only; writes cudnn_one_key_nan.jsonl)

Expected while the limit holds: NaN gradients only in runs with one_key_rows > 0.
Evidence: evidence/h100/runs/s6-diag/call2-cudnn_causal_padding.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from attnbench.masks import visible_counts
from attnbench.registry import registry
from attnbench.spec import Spec


def nans(**tensors: torch.Tensor) -> dict:
    return {n: int(t.isnan().sum()) for n, t in tensors.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    impl = registry().get("dense/sdpa_cudnn")
    rows = []
    shapes = [  # (Sq, Sk, key_lengths, align, window); one_key_rows in the output says which leave a row one key
        (1, 64, (1,), "bottom_right", None), (2, 64, (1,), "bottom_right", None), (4, 4, (4,), "bottom_right", None),
        (3, 8, (8,), "top_left", None), (16, 16, (16,), "bottom_right", None), (2, 64, (2,), "top_left", None),
        (4, 6, (6,), "bottom_right", None),  # no one-key row
        (16, 16, None, "bottom_right", (3, 0)),  # a causal window without padding: claimed, row 0 sees one key
    ]
    for (Sq, Sk, lengths, align, window), D, mag, seed in itertools.product(shapes, (16, 64), (1.0, 3.0), range(4)):
        spec = Spec(Sq=Sq, Sk=Sk, D=D, dtype="float16", device="cuda", causal=True, align=align,
                    key_lengths=lengths, window=window, magnitude=mag, seed=seed)
        ones = int((visible_counts(spec) == 1).sum())
        x = spec.make_inputs(requires_grad=True)
        try:
            out, _ = impl.fn(x.q, x.k, x.v, spec.config(), x.key_padding_mask, x.bias)
            dq, dk, dv = torch.autograd.grad(out, (x.q, x.k, x.v), x.grad_out)
            row = dict(spec=spec.short(), one_key_rows=ones, **nans(out=out, dq=dq, dk=dk, dv=dv))
        except RuntimeError as exc:
            row = dict(spec=spec.short(), one_key_rows=ones, error=str(exc).splitlines()[0][:200])
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cudnn_one_key_nan.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    bad = [r for r in rows if r.get("dq") or r.get("dk") or r.get("dv")]
    print(f"NaN gradients in {len(bad)} of {len(rows)} runs; with a one-key row: "
          f"{sum(1 for r in bad if r['one_key_rows'])}, without: {sum(1 for r in bad if not r['one_key_rows'])}")


if __name__ == "__main__":
    main()
