"""naive: materialized scores in PyTorch; any dtype, any device. The tolerance reference."""

from __future__ import annotations

import torch

from attnbench.masks import dense_mask
from attnbench.registry import Impl
from attnbench.spec import Config


def attention(q, k, v, cfg: Config, key_padding_mask=None, bias=None, return_lse: bool = True):
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # softmax in fp32 at least
    s = (q @ k.transpose(-1, -2)).to(acc) * cfg.scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    mask = dense_mask(cfg, B, Sq, Sk, key_padding_mask, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    # Empty rows (every logit -inf): exclude them from the softmax so they give 0, not NaN.
    m = s.amax(-1, keepdim=True)
    empty = m == float("-inf")
    m = torch.where(empty, torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    p = p / torch.where(empty, torch.ones_like(l), l)
    if cfg.dropout_p > 0:
        gen = torch.Generator(device=q.device).manual_seed(cfg.dropout_seed)
        keep = torch.rand(p.shape, generator=gen, device=q.device) >= cfg.dropout_p
        p = p * keep / (1 - cfg.dropout_p)
    out = (p.to(v.dtype) @ v)
    lse = torch.where(empty, torch.full_like(l, float("-inf")), torch.log(l) + m).squeeze(-1)
    return out, lse


naive = Impl(
    name="naive",
    variant="dense",
    fn=attention,
    features={
        "causal", "sliding_window", "blocked_window", "gqa", "cross", "key_padding", "bias",
        "bias_grad", "dropout", "top_left", "dv", "backward", "lse", "deterministic",
    },
    reference=True,
    description="materialized scores in PyTorch (fp32 softmax for low precision); the tolerance reference",
)

naive_local = Impl(
    name="naive",
    variant="local",
    fn=attention,
    features=naive.features,
    reference=True,
    description="dense band mask over materialized scores",
)
