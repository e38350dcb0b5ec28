"""LocalMHA (lucidrains local-attention style): multi-head attention restricted to a window,
either an exact sliding window or LocalAttention's blocked window (buckets of window_size
looking one bucket back and, unless causal, one forward). Its kernel (an argument) is a "local"
variant kernel."""

from __future__ import annotations

import math

import torch
from torch import nn

from attnbench.modules.common import (
    Kernel,
    RotaryXPos,
    check_bias,
    check_input,
    check_kernel,
    dropout_config,
    finite_scale,
    keep_mask,
    l2norm,
    merge_heads,
    positive_int,
    probability,
    split_heads,
)
from attnbench.spec import Block, Config

NAME = "LocalMHA"


def window_config(window_size: int, causal: bool, exact_windowsize: bool, scale: float) -> Config:
    """exact: sliding window (W, 0) causal / (W, W) otherwise; else blocked window of W-buckets."""
    if exact_windowsize:
        window = (window_size, 0) if causal else (window_size, window_size)
        return Config(scale=scale, causal=causal, window=window)
    block = Block(window_size, look_backward=1, look_forward=0 if causal else 1)
    return Config(scale=scale, causal=causal, block=block)


class LocalMHA(nn.Module):
    """Local multi-head self-attention.

    mask: (batch, seq) keep-mask, True = keep. (The seed document says "True values will be
      masked"; lucidrains' local-attention and this suite's contract use True = keep, and so does
      this module. See NOTES.md, Modules.)
    attn_bias: additive, broadcastable to (batch, heads, seq, seq).
    qk_rmsnorm: q and k l2-normalized per head, times learned per-dim scales, softmax scale qk_scale.
    use_xpos: rotary embedding with xpos scaling (scale base xpos_scale_base, default sqrt(dim));
      without it no positional embedding is applied.
    Lengths need not be multiples of window_size.
    """

    def __init__(
        self,
        *,
        dim: int,
        window_size: int,
        dim_head: int = 64,
        heads: int = 8,
        dropout: float = 0.0,
        causal: bool = False,
        prenorm: bool = False,
        qk_rmsnorm: bool = False,
        qk_scale: float = 8,
        use_xpos: bool = False,
        xpos_scale_base: float | None = None,
        exact_windowsize: bool = True,
        kernel: Kernel,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("window_size", window_size), ("dim_head", dim_head), ("heads", heads)):
            positive_int(value, name, NAME)
        self.dim, self.window_size, self.dim_head, self.heads = dim, window_size, dim_head, heads
        self.dropout = probability(dropout, "dropout", NAME)
        self.causal = bool(causal)
        self.exact_windowsize = bool(exact_windowsize)
        self.qk_rmsnorm = bool(qk_rmsnorm)
        self.qk_scale = finite_scale(qk_scale, "qk_scale", NAME)
        self.use_xpos = bool(use_xpos)
        self.xpos_scale_base = math.sqrt(dim) if xpos_scale_base is None else finite_scale(
            xpos_scale_base, "xpos_scale_base", NAME
        )
        self.kernel = check_kernel(kernel, NAME)

        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim) if prenorm else None
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        if self.qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(dim_head))
            self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.rotary = RotaryXPos(dim_head, self.xpos_scale_base) if self.use_xpos else None
        self.to_out = nn.Linear(inner, dim, bias=False)
        scale = self.qk_scale if self.qk_rmsnorm else dim_head**-0.5
        self.cfg = window_config(window_size, self.causal, self.exact_windowsize, scale)

    @property
    def prenorm(self) -> bool:
        return self.norm is not None

    def forward(self, x, mask=None, attn_bias=None, cache=None, return_cache=False):
        """cache: (k, v) of the tokens before x, each (batch, heads, past, dim_head), as a call with
        return_cache=True returns it (keys before rotary); x then holds the next tokens, always
        causal (`mask` and `attn_bias` cover all past + new tokens: (batch, past + seq) and
        (batch, heads, seq, past + seq)). return_cache: also return the (k, v) of every token so far."""
        x = check_input(x, "x", self.dim, NAME)
        B, S, _ = x.shape
        if self.norm is not None:
            x = self.norm(x)
        q, k, v = (split_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        if self.qk_rmsnorm:
            q = l2norm(q) * self.q_scale
            k = l2norm(k) * self.k_scale
        cfg = self.cfg
        if cache is not None:
            if not self.causal:
                raise ValueError(f"{NAME}: cache: decoding through a cache needs causal=True")
            past_k, past_v = self._check_cache(cache, B, k)
            k, v = torch.cat((past_k.to(k.dtype), k), dim=2), torch.cat((past_v.to(v.dtype), v), dim=2)
        Sk = k.shape[2]
        mask = keep_mask(mask, B, Sk, "mask", NAME)
        attn_bias = check_bias(attn_bias, (B, self.heads, S, Sk), "attn_bias", NAME)
        qr, kr = (q, k) if self.rotary is None else self.rotary(q, k)
        cfg = dropout_config(cfg, self.dropout, self.training)
        out = self.to_out(merge_heads(self.kernel(qr, kr, v, cfg, key_padding_mask=mask, bias=attn_bias)[0]))
        return (out, (k, v)) if return_cache else out

    def _check_cache(self, cache, B: int, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(cache, (tuple, list)) and len(cache) == 2 and all(isinstance(t, torch.Tensor) for t in cache)):
            raise TypeError(f"{NAME}: cache must be a (k, v) pair of tensors")
        want = (B, self.heads, self.dim_head)
        for name, t in zip("kv", cache):
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != want:
                raise ValueError(f"{NAME}: cache {name} must have shape (batch, {self.heads}, past, {self.dim_head}), "
                                 f"got {tuple(t.shape)}")
        if cache[0].shape != cache[1].shape:
            shapes = f"{tuple(cache[0].shape)} and {tuple(cache[1].shape)}"
            raise ValueError(f"{NAME}: cache k and v must have one shape, got {shapes}")
        return cache[0], cache[1]
