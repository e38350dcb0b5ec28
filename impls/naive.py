"""naive: materialized scores in PyTorch; any dtype, any device. The tolerance reference.

fp8 inputs (float8_e4m3fn q, k, v with descales) are computed where FA3 / FA4 round: the logits
from the exact products of the fp8 values in float32, times scale * q_descale * k_descale; the
softmax in float32; the unnormalized probabilities exp(s - m) rounded to e4m3 for P @ V (in
float32, exact products again); then divided by the float32 row sum, times v_descale, and
rounded to bfloat16."""

from __future__ import annotations

import torch

from attnbench.checks import check_call, check_document_ids, check_paged, check_varlen
from attnbench.impls._seed import seed_hooks, seed_module
from attnbench.masks import alibi_bias, dense_mask, softcap
from attnbench.modules.flash_attention_two import FlashAttentionTwo
from attnbench.modules.local_mha import LocalMHA
from attnbench.modules.multi_query import MultiQueryAttention
from attnbench.registry import Impl
from attnbench.spec import FP8, Config


def attention(q, k, v, cfg: Config, key_padding_mask=None, bias=None, return_lse: bool = True, document_ids=None, *,
              alibi_slopes=None, sinks=None, q_descale=None, k_descale=None, v_descale=None):
    check_call(q, k, v, cfg, key_padding_mask, bias, who="naive", alibi_slopes=alibi_slopes, sinks=sinks,
               q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    B, Hq, Sq, _ = q.shape
    fp8 = q.dtype == FP8
    logit_scale, v_scale = cfg.scale, None
    if fp8:  # e4m3 values are exact in float32; the descales join the scale (logits) and the output
        q, k, v = (t.to(torch.float32) for t in (q, k, v))
        logit_scale = cfg.scale * _per_head(q_descale, B, Hq) * _per_head(k_descale, B, Hq)
        v_scale = _per_head(v_descale, B, Hq)
    Hkv, Sk = k.shape[1], k.shape[2]
    if document_ids is not None:
        check_document_ids(document_ids, B, Sq, Sk, who="naive")
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # softmax in fp32 at least
    s = softcap((q @ k.transpose(-1, -2)).to(acc) * logit_scale, cfg.softcap)
    if bias is not None:
        s = s + bias.to(s.dtype)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, Sq, Sk, cfg.align, s.dtype)
    mask = dense_mask(cfg, B, Sq, Sk, key_padding_mask, q.device, document_ids)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    # Empty rows (every logit -inf, or Sk = 0): exclude them from the softmax so they give 0, not NaN.
    m = s.amax(-1, keepdim=True) if Sk else s.new_full((*s.shape[:-1], 1), float("-inf"))
    sink = None if sinks is None else sinks.to(acc).view(1, Hq, 1, 1)
    if sink is not None:  # the sink's logit joins the row maximum and the denominator, never the values
        m = torch.maximum(m, sink)
    empty = m == float("-inf")
    m = torch.where(empty, torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    if sink is not None:
        l = l + torch.exp(sink - m)
    lse = torch.where(empty, torch.full_like(l, float("-inf")), torch.log(l) + m).squeeze(-1)
    if fp8:
        pv = p.to(FP8).to(torch.float32) @ v  # P rounded to e4m3 before the second product, as FA3 / FA4 do
        out = pv / torch.where(empty, torch.ones_like(l), l) * v_scale
        return out.to(torch.bfloat16), lse
    p = p / torch.where(empty, torch.ones_like(l), l)
    if cfg.dropout_p > 0:
        gen = torch.Generator(device=q.device).manual_seed(cfg.dropout_seed)
        keep = torch.rand(p.shape, generator=gen, device=q.device) >= cfg.dropout_p
        p = p * keep / (1 - cfg.dropout_p)
    out = (p.to(v.dtype) @ v)
    return out, lse


def _per_head(descale: torch.Tensor | None, B: int, Hq: int) -> torch.Tensor | float:
    """An fp8 descale broadcastable to (B, Hq, 1, 1): () as it is, (B, Hkv) repeated per group; None is 1."""
    if descale is None:
        return 1.0
    if descale.dim() == 2:
        return descale.repeat_interleave(Hq // descale.shape[1], dim=1)[:, :, None, None]
    return descale


def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg: Config, return_lse: bool = True):
    """The packed batch as a loop over its sequences, each a dense call (B = 1)."""
    bounds = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg, who="naive")
    outs, lses = [], []
    for q0, q1, k0, k1 in bounds:
        qb, kb, vb = (t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        out, lse = attention(qb, kb, vb, cfg)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def paged(q, k_cache, v_cache, block_table, cache_seqlens, cfg: Config, return_lse: bool = True):
    """Each sequence's cached tokens gathered through its block table into a contiguous
    (1, Hkv, cache_seqlens[b], D) K / V, then a dense call (B = 1) on its queries."""
    lengths = check_paged(q, k_cache, v_cache, block_table, cache_seqlens, cfg, who="naive")
    outs, lses = [], []
    size = k_cache.shape[1]
    for b, n in enumerate(lengths):
        t = torch.arange(n, device=q.device)
        blocks = block_table[b].to(q.device).long()[t // size]
        kb, vb = (c[blocks, t % size].permute(1, 0, 2)[None] for c in (k_cache, v_cache))
        out, lse = attention(q[b : b + 1], kb, vb, cfg)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 0)


naive = Impl(
    name="naive",
    variant="dense",
    fn=attention,
    features={
        "causal", "sliding_window", "blocked_window", "gqa", "cross", "key_padding", "bias",
        "bias_grad", "dropout", "top_left", "dv", "backward", "lse", "deterministic", "varlen", "document",
        "paged_kv", "softcap", "alibi", "sinks", "fp8",
    },
    varlen=varlen,
    paged=paged,
    reference=True,
    description="materialized scores in PyTorch (fp32 softmax for low precision); the tolerance reference",
)

naive_local = naive.for_variant("local", "dense band mask over materialized scores")


# -- the seed modules on the naive kernel --------------------------------------------------
# Module Impls are factories fn(**ctor_kwargs) -> nn.Module.
flash_attention_two = seed_module(FlashAttentionTwo, attention)
multi_query_attention = seed_module(MultiQueryAttention, attention, attn_impl="torch")
local_mha = seed_module(LocalMHA, attention)

_MODULE_DTYPES = ("float64", "float32", "float16", "bfloat16")

naive_flash_attention_two = Impl(
    name="naive",
    variant="FlashAttentionTwo",
    fn=flash_attention_two,
    features={"causal", "cross", "key_padding", "backward", "deterministic"},
    dtypes=_MODULE_DTYPES,
    reference=True,
    **seed_hooks("FlashAttentionTwo"),
    description="FlashAttentionTwo module on the naive kernel (bucket sizes ignored)",
)

naive_multi_query_attention = Impl(
    name="naive",
    variant="MultiQueryAttention",
    fn=multi_query_attention,
    features={"causal", "gqa", "cross", "key_padding", "bias", "bias_grad", "dropout", "backward", "deterministic"},
    dtypes=_MODULE_DTYPES,
    reference=True,
    **seed_hooks("MultiQueryAttention"),
    description="MultiQueryAttention (attn_impl='torch') on the naive kernel; KV cache, GQA, ALiBi bias",
)

naive_local_mha = Impl(
    name="naive",
    variant="LocalMHA",
    fn=local_mha,
    features={
        "causal", "sliding_window", "blocked_window", "key_padding", "bias", "bias_grad", "dropout", "backward",
        "deterministic",
    },
    dtypes=_MODULE_DTYPES,
    reference=True,
    **seed_hooks("LocalMHA"),
    description="LocalMHA on the naive kernel (dense band mask)",
)
