"""Off by one at a cu_seqlens boundary: each sequence's keys are read up to cu_seqlens_k[b + 1]
inclusive, so a sequence's queries also see the next sequence's first key (which, bottom-right
aligned, becomes the key every causal query is placed against)."""

import torch

import attnbench.impls.naive as _naive
from attnbench.checks import check_varlen
from attnbench.registry import Impl
from attnbench.zoo._base import BASE_FEATURES, Kernel


def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg, return_lse=True):
    bounds = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg, who="zoo")
    outs, lses = [], []
    for q0, q1, k0, k1 in bounds:
        k1 = min(k1 + 1, k.shape[0])  # the bug: one key past the sequence's end
        qb, kb, vb = (t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        out, lse = _naive.attention(qb, kb, vb, cfg)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


varlen_boundary = Impl(
    name="varlen_boundary",
    variant="dense",
    fn=Kernel(),
    features=BASE_FEATURES | {"varlen"},
    varlen=varlen,
    bug="varlen: off by one at a cu_seqlens boundary (a sequence sees the next one's first key)",
)
