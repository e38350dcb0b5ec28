"""Sixth session: the cuDNN padding row failed with NaN dq on a causal spec, which the fifth
session's declaration claimed (it refused non-causal masks only). Does cuDNN's backward give NaN
when a causal attn_mask with key padding leaves a row one key? Runs the adapter forward and
backward on a grid of such specs (and, for contrast, the same shapes without the one-key row) and
counts NaNs in out, dq, dk, dv. The adapter's declaration is bypassed: impl.fn is called directly.

    python3 scripts/diag/cudnn_causal_padding.py [--out DIR]     (CUDA only; writes cudnn_causal_padding.jsonl)
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
    with open(os.path.join(args.out, "cudnn_causal_padding.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    bad = [r for r in rows if r.get("dq") or r.get("dk") or r.get("dv")]
    print(f"NaN gradients in {len(bad)} of {len(rows)} runs; with a one-key row: "
          f"{sum(1 for r in bad if r['one_key_rows'])}, without: {sum(1 for r in bad if not r['one_key_rows'])}")


if __name__ == "__main__":
    main()
