"""MultiQueryAttention (llm-foundry style): one fused qkv projection, `kv_heads` shared key/value
heads (1 = multi-query, heads = multi-head), optional qk norm, clipping, ALiBi-style bias and a
KV cache. The attention kernel is an argument (`kernel=`); `attn_impl` is the seed document's
name for it, checked and kept (impls/_seed.py's multi_query looks the kernel up by it)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from attnbench.modules.common import (
    NORMS,
    Kernel,
    attention_weights,
    check_bias,
    check_input,
    check_kernel,
    dropout_config,
    finite_scale,
    keep_mask,
    merge_heads,
    positive_int,
    probability,
    split_heads,
)
from attnbench.spec import Config, alibi_slopes

NAME = "MultiQueryAttention"

# attn_impl -> (registry key of its kernel, what to install when it is unavailable)
ATTN_IMPLS = {
    "torch": ("dense/naive", "attn_impl='torch' needs attnbench's naive implementation (impls/naive.py)"),
    "triton": ("dense/triton", "attn_impl='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1)"),
    "flash": ("dense/flash_attn", "attn_impl='flash' needs flash-attn: pip install flash-attn"),
}
FC_TYPES = ("torch",)


def build_alibi_bias(
    heads: int,
    seq_len_q: int,
    seq_len_k: int,
    *,
    full: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive ALiBi bias of shape (1, heads, seq_len_q, seq_len_k), slopes from
    attnbench.spec.alibi_slopes.

    full=True: -slope * |j - p(i)| with p(i) = i + seq_len_k - seq_len_q (bottom-right, as in
    the contract). full=False: -slope * (seq_len_k - 1 - j), llm-foundry's causal form; it differs
    from the full form by a constant per row on the causal part, so under causal attention both
    give the same softmax.
    """
    for name, value in (("heads", heads), ("seq_len_q", seq_len_q), ("seq_len_k", seq_len_k)):
        positive_int(value, name, "build_alibi_bias")
    j = torch.arange(seq_len_k, dtype=torch.float64)
    if full:
        p = torch.arange(seq_len_q, dtype=torch.float64) + (seq_len_k - seq_len_q)
        dist = (j[None, :] - p[:, None]).abs()
    else:
        dist = (seq_len_k - 1 - j)[None, :].expand(seq_len_q, seq_len_k)
    bias = -alibi_slopes(heads)[:, None, None] * dist[None]
    return bias[None].to(device=device, dtype=dtype)


class MultiQueryAttention(nn.Module):
    """Multi-query / grouped-query self-attention with a KV cache.

    forward(x, past_key_value=None, bias=None, mask=None, causal=True, needs_weights=False)
      -> (out, attn_weights or None, (k, v))
    past_key_value: (k, v), each (batch, kv_heads, past_len, head_dim); the new keys/values are
      appended and the full cache is returned (always, so decoding can start from None).
    causal: bottom-right aligned, so decoding token by token equals the full causal forward.
    mask: (batch, past_len + seq) key padding mask, True = keep.
    bias: additive, broadcastable to (batch, heads, seq, past_len + seq); a larger one is
      cropped to its bottom-right corner (as llm-foundry does), so one ALiBi bias built for the
      longest length serves every decoding step.
    needs_weights: also return the softmax probabilities (batch, heads, seq, past_len + seq),
      materialized separately in float32 (before dropout).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        attn_impl: str = "triton",
        clip_qkv: float | None = None,
        qk_ln: bool = False,
        softmax_scale: float | None = None,
        attn_pdrop: float = 0.0,
        norm_type: str = "low_precision_layernorm",
        fc_type: str = "torch",
        verbose: int = 0,
        device=None,
        kv_heads: int = 1,
        *,
        kernel: Kernel,
    ) -> None:
        super().__init__()
        positive_int(dim, "dim", NAME)
        positive_int(heads, "heads", NAME)
        positive_int(kv_heads, "kv_heads", NAME)
        if dim % heads:
            raise ValueError(f"{NAME}: dim={dim} is not divisible by heads={heads}")
        if heads % kv_heads:
            raise ValueError(f"{NAME}: heads={heads} is not divisible by kv_heads={kv_heads}")
        if clip_qkv is not None and not (finite_scale(clip_qkv, "clip_qkv", NAME) > 0):
            raise ValueError(f"{NAME}: clip_qkv must be > 0 or None, got {clip_qkv!r}")
        if softmax_scale is not None:
            finite_scale(softmax_scale, "softmax_scale", NAME)
        if not isinstance(norm_type, str) or norm_type.lower() not in NORMS:
            raise ValueError(f"{NAME}: norm_type must be one of {sorted(NORMS)}, got {norm_type!r}")
        if fc_type not in FC_TYPES:
            raise ValueError(f"{NAME}: fc_type must be one of {list(FC_TYPES)}, got {fc_type!r}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"{NAME}: attn_impl must be one of {sorted(ATTN_IMPLS)}, got {attn_impl!r}")
        self.attn_impl = attn_impl
        self.kernel = check_kernel(kernel, NAME)

        self.dim, self.heads, self.kv_heads = dim, heads, kv_heads
        self.head_dim = dim // heads
        self.clip_qkv = clip_qkv
        self.qk_ln = bool(qk_ln)
        self.softmax_scale = self.head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
        self.attn_pdrop = probability(attn_pdrop, "attn_pdrop", NAME)
        self.norm_type = norm_type.lower()
        self.fc_type = fc_type
        self.verbose = verbose
        kv_dim = kv_heads * self.head_dim
        self.Wqkv = nn.Linear(dim, dim + 2 * kv_dim, device=device)
        if self.qk_ln:
            norm = NORMS[self.norm_type]
            self.q_ln = norm(dim, device=device)
            self.k_ln = norm(kv_dim, device=device)
        self.out_proj = nn.Linear(dim, dim, device=device)
        if verbose:
            how = getattr(self.kernel, "__module__", "?") + "." + getattr(self.kernel, "__name__", "?")
            warnings.warn(f"{NAME}: attn_impl={attn_impl!r}, kernel {how}, kv_heads={kv_heads}", stacklevel=2)

    def forward(self, x, past_key_value=None, bias=None, mask=None, causal=True, needs_weights=False):
        x = check_input(x, "x", self.dim, NAME)
        B, S, _ = x.shape
        qkv = self.Wqkv(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        kv_dim = self.kv_heads * self.head_dim
        q, k, v = qkv.split([self.dim, kv_dim, kv_dim], dim=-1)
        if self.qk_ln:
            q = self.q_ln(q).to(qkv.dtype)
            k = self.k_ln(k).to(qkv.dtype)
        q = split_heads(q, self.heads)
        k = split_heads(k, self.kv_heads)
        v = split_heads(v, self.kv_heads)
        if past_key_value is not None:
            past_k, past_v = self._check_past(past_key_value, x)
            k = torch.cat((past_k.to(k.dtype), k), dim=2)
            v = torch.cat((past_v.to(v.dtype), v), dim=2)
        Sk = k.shape[2]
        mask = keep_mask(mask, B, Sk, "mask", NAME)
        bias = check_bias(crop_bias(bias, S, Sk), (B, self.heads, S, Sk), "bias", NAME)

        cfg = Config(scale=self.softmax_scale, causal=bool(causal))
        run_cfg = dropout_config(cfg, self.attn_pdrop, self.training)
        out = self.kernel(q, k, v, run_cfg, key_padding_mask=mask, bias=bias)[0]
        weights = attention_weights(q, k, cfg, mask, bias) if needs_weights else None
        return self.out_proj(merge_heads(out)), weights, (k, v)

    def _check_past(self, past, x) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(past, (tuple, list)) and len(past) == 2 and all(isinstance(t, torch.Tensor) for t in past)):
            raise TypeError(f"{NAME}: past_key_value must be a (k, v) pair of tensors")
        past_k, past_v = past
        want = (x.shape[0], self.kv_heads, past_k.shape[2] if past_k.dim() == 4 else -1, self.head_dim)
        for name, t in (("k", past_k), ("v", past_v)):
            if t.dim() != 4 or tuple(t.shape) != want:
                raise ValueError(
                    f"{NAME}: past_key_value {name} must have shape (batch={x.shape[0]}, kv_heads={self.kv_heads}, "
                    f"past_len, head_dim={self.head_dim}) matching each other, got {tuple(t.shape)}"
                )
        return past_k, past_v


def crop_bias(bias, Sq: int, Sk: int):
    """Keep the bottom-right (Sq, Sk) corner of a 4-d bias larger than needed."""
    if isinstance(bias, torch.Tensor) and bias.dim() == 4:
        i0 = max(0, bias.shape[2] - Sq) if bias.shape[2] > 1 else 0
        j0 = max(0, bias.shape[3] - Sk) if bias.shape[3] > 1 else 0
        bias = bias[:, :, i0:, j0:]
    return bias
