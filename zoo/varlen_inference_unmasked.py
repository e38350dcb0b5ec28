"""The varlen inference call takes its own path: with return_lse=False (no lse to write, so a
"faster" kernel) the causal mask and the sliding window are dropped. The training call
(return_lse=True) is right."""

import dataclasses

import attnbench.impls.naive as _naive
from attnbench.registry import Impl
from attnbench.zoo._base import BASE_FEATURES, Kernel


def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg, return_lse=True):
    if not return_lse:
        cfg = dataclasses.replace(cfg, causal=False, window=None)  # BUG: the inference path forgets the masks
        out, _ = _naive.varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg)
        return out, None
    return _naive.varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg)


varlen_inference_unmasked = Impl(
    name="varlen_inference_unmasked",
    variant="dense",
    fn=Kernel(),
    features=BASE_FEATURES | {"varlen"},
    varlen=varlen,
    bug="varlen: the return_lse=False path drops the causal mask and the window",
)
