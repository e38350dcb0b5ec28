"""Adapters for the PyPI package `local-attention` (lucidrains): LocalAttention and LocalMHA.

Optional: `pip install local-attention` (the `third-party` extra). Without it these Impls show
as unavailable ("local_attention not installed").

How the contract maps onto LocalAttention(window_size, causal, look_backward, look_forward,
exact_windowsize, autopad, scale) and its forward(q, k, v, mask) (shapes (..., S, D), mask
(B, S) True = keep):
- blocked window (w, lb, lf): window_size=w, look_backward=lb, look_forward=lf,
  exact_windowsize=False. A causal call passes look_forward=0 (the library refuses more;
  later buckets are invisible under causality anyway).
- sliding window (left, right): exact_windowsize=True limits a query to w*lb keys back and
  w*lf keys forward, so w = gcd(left, right), lb = left // w, lf = right // w; causal:
  w = left, lb = 1 (left = 0: w = 1, lb = 0).
- autopad=True (any length), scale=cfg.scale, no `dim` (so no rotary embedding is applied).
- grouped heads: the adapter repeats k / v heads (repeat_interleave); the library has none.
The adapter passes the caller's key_padding_mask through untouched (None stays None) and
works around nothing else: where the library's behaviour differs from the contract
(padding from autopad, empty rows), the suite reports it failing. See NOTES.md, "Local attention".
"""

from __future__ import annotations

import math

from attnbench.modules.common import same_layout
from attnbench.registry import Decoder, Impl
from attnbench.spec import Config, Spec


def _arguments(cfg: Config) -> dict:
    """LocalAttention constructor arguments for a call (ValueError when it cannot express it)."""
    if cfg.window is not None and cfg.block is not None:
        raise ValueError("cfg.window / cfg.block: local-attention takes one of them, not both")
    if cfg.block is not None:
        b = cfg.block
        return dict(window_size=b.window_size, causal=cfg.causal, look_backward=b.look_backward,
                    look_forward=0 if cfg.causal else b.look_forward, exact_windowsize=False)
    if cfg.window is None:
        raise ValueError("cfg.window / cfg.block: local-attention needs a sliding or blocked window")
    left, right = cfg.window
    if left is None:
        raise ValueError("cfg.window: local-attention needs a bounded left edge")
    if cfg.causal:
        w = max(left, 1)
        return dict(window_size=w, causal=True, look_backward=1 if left else 0, look_forward=0,
                    exact_windowsize=True)
    if right is None:
        raise ValueError("cfg.window: local-attention needs a bounded right edge when not causal")
    w = math.gcd(left, right) or 1
    return dict(window_size=w, causal=False, look_backward=left // w, look_forward=right // w,
                exact_windowsize=True)


def attention(q, k, v, cfg: Config, key_padding_mask=None, bias=None):
    from local_attention import LocalAttention

    if bias is not None:
        raise ValueError("bias: the local-attention adapter takes no dense additive bias")
    if cfg.dropout_p > 0:
        raise ValueError(f"cfg.dropout_p: the local-attention adapter has no seeded dropout, got {cfg.dropout_p}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q / k: local-attention needs Sq == Sk, got {q.shape[2]} and {k.shape[2]}")
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    attn = LocalAttention(autopad=True, scale=cfg.scale, **_arguments(cfg))
    return attn(q, k, v, mask=key_padding_mask), None


def _supports(spec: Spec) -> str | None:
    if spec.Sq != spec.Sk:
        return "local-attention needs Sq == Sk"
    try:
        _arguments(spec.config())
    except ValueError as exc:
        return str(exc)
    return None


local_attention = Impl(
    name="local_attention",
    variant="local",
    fn=attention,
    features={"causal", "sliding_window", "blocked_window", "gqa", "key_padding", "dv", "backward"},
    requires=("local_attention",),
    supports=_supports,
    description="lucidrains local-attention LocalAttention (look-around buckets, autopad)",
)


# -- LocalMHA ---------------------------------------------------------------------------------
def local_mha(**kwargs):
    """local-attention's LocalMHA built from the seed document's constructor arguments.

    The library always passes dim=dim_head to LocalAttention, which turns on a rotary embedding;
    the seed module has a positional embedding only with use_xpos, so the adapter passes
    use_rotary_pos_emb=use_xpos. xpos_scale_base defaults to sqrt(dim) as the seed document says
    (the library's own default is window_size // 2). attn_bias is not mapped: the library's is a
    per-window (heads, w, (lb+1+lf) w) tensor, not the seed's (batch, heads, seq, seq), so the
    adapter refuses it. Its parameters (to_qkv, to_out, norm, q_scale, k_scale) have the seed's
    names, so the white-box weights map is the identity.
    """
    from local_attention import LocalMHA

    class LucidrainsLocalMHA(LocalMHA):
        def __init__(self, *, dim, window_size, dim_head=64, heads=8, dropout=0.0, causal=False, prenorm=False,
                     qk_rmsnorm=False, qk_scale=8, use_xpos=False, xpos_scale_base=None, exact_windowsize=True):
            scale_base = math.sqrt(dim) if xpos_scale_base is None else xpos_scale_base
            super().__init__(dim=dim, window_size=window_size, dim_head=dim_head, heads=heads, dropout=dropout,
                             causal=causal, prenorm=prenorm, qk_rmsnorm=qk_rmsnorm, qk_scale=qk_scale,
                             use_xpos=use_xpos, xpos_scale_base=scale_base, exact_windowsize=exact_windowsize,
                             use_rotary_pos_emb=use_xpos)

        def forward(self, x, mask=None, attn_bias=None, cache=None, return_cache=False):
            if attn_bias is not None:
                raise ValueError("attn_bias: local-attention's LocalMHA takes a per-window bias, not (B, H, S, S)")
            return super().forward(x, mask=mask, cache=cache, return_cache=return_cache)

    return LucidrainsLocalMHA(**kwargs)


def decode_local_mha(module, x, cache, mask=None):
    """The library's cache: (k, v) stacked; a step with a cache takes exactly one token."""
    if mask is not None:
        raise ValueError("mask: local-attention's LocalMHA decodes without a mask")
    return module(x, cache=cache, return_cache=True)


local_attention_local_mha = Impl(
    name="local_attention",
    variant="LocalMHA",
    fn=local_mha,
    features={"causal", "sliding_window", "blocked_window", "key_padding", "backward"},
    dtypes=("float32", "float64"),
    weights=same_layout,
    decode=Decoder(decode_local_mha, max_chunk=1),
    requires=("local_attention",),
    description="lucidrains local-attention LocalMHA (rotary only with use_xpos; no attn_bias)",
)
