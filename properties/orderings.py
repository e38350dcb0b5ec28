"""Correct attention kernels that differ from the naive reference only in the order of their
floating-point operations. Test-only: never registered (the registry scans impls/ only).

They calibrate the tolerance rule (properties/calibrate.py) and pin it (tests/test_tolerance.py):
each one is a valid way to compute attention, so the rule must pass every one of them on every
spec, whichever order the naive reference happens to use.

- scale_first: (q * scale) @ k^T, with q * scale rounded to the input dtype.
- exp2_folded: logits in base 2, scale * log2(e) folded into one multiplier, exp2 and log2.
- fp32_inputs: q, k, v converted to float32 (float64 stays) before anything, one rounding at
  the end; the flash kernels' "fp32 accumulation of low-precision inputs".
- online: FlashAttention-2: key blocks of 5 with a running max and sum, and a hand-written
  backward that recomputes p = exp(s - lse) from the saved lse and takes
  D = rowsum(dO * O) from the rounded output, p and ds rounded to the input dtype for the
  gradient products (as the CUDA kernels do).

All take (q, k, v, cfg, key_padding_mask=None, bias=None, *, alibi_slopes=None, sinks=None)
-> (out, lse) like an Impl's fn, with the score features (soft cap, ALiBi slopes, sinks): in base
2, exp2_folded folds log2(e) into the cap, the slopes and the sinks too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from attnbench.masks import alibi_bias, dense_mask
from attnbench.spec import Config

LOG2E = 1.4426950408889634
BLOCK = 5  # keys per block in `online`: not a power of two, so blocks straddle every length edge


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = q.shape[1] // k.shape[1]
    return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)


def _masked(s: torch.Tensor, cfg: Config, q: torch.Tensor, k: torch.Tensor, kpm, bias, alibi=None,
            unit: float = 1.0) -> torch.Tensor:
    """The scaled scores s (in units of `unit`: log2(e) for base 2) capped, biased, ALiBi'd
    and masked."""
    if cfg.softcap is not None:
        cap = cfg.softcap * unit
        s = cap * torch.tanh(s / cap)
    if bias is not None:
        s = s + bias.to(s.dtype) * unit
    if alibi is not None:
        s = s + alibi_bias(alibi.to(s.dtype) * unit, q.shape[2], k.shape[2], cfg.align, s.dtype)
    mask = dense_mask(cfg, q.shape[0], q.shape[2], k.shape[2], kpm, q.device)
    return s if mask is None else s.masked_fill(~mask, -math.inf)


def _sink(sinks, s: torch.Tensor, unit: float = 1.0) -> torch.Tensor | None:
    return None if sinks is None else (sinks.to(s.dtype) * unit).view(1, -1, 1, 1)


def _softmax(s: torch.Tensor, exp: Callable, log: Callable, sink=None) -> tuple[torch.Tensor, torch.Tensor]:
    """p and lse (in the base of exp / log) of masked logits; empty rows give p = 0, lse = -inf
    (lse = the sink with one)."""
    m = s.amax(-1, keepdim=True) if s.shape[-1] else s.new_full((*s.shape[:-1], 1), -math.inf)
    if sink is not None:
        m = torch.maximum(m, sink)
    empty = m == -math.inf
    m = torch.where(empty, torch.zeros_like(m), m)
    p = exp(s - m)
    l = p.sum(-1, keepdim=True)
    if sink is not None:
        l = l + exp(sink - m)
    p = p / torch.where(empty, torch.ones_like(l), l)
    lse = torch.where(empty, torch.full_like(l, -math.inf), log(l) + m)
    return p, lse.squeeze(-1)


def scale_first(q, k, v, cfg: Config, key_padding_mask=None, bias=None, *, alibi_slopes=None, sinks=None):
    k, v = _expand(q, k, v)
    s = ((q * cfg.scale) @ k.transpose(-1, -2)).to(_acc(q.dtype))
    p, lse = _softmax(_masked(s, cfg, q, k, key_padding_mask, bias, alibi_slopes), torch.exp, torch.log,
                      _sink(sinks, s))
    return p.to(v.dtype) @ v, lse


def exp2_folded(q, k, v, cfg: Config, key_padding_mask=None, bias=None, *, alibi_slopes=None, sinks=None):
    k, v = _expand(q, k, v)
    s2 = (q @ k.transpose(-1, -2)).to(_acc(q.dtype)) * (cfg.scale * LOG2E)
    p, lse2 = _softmax(_masked(s2, cfg, q, k, key_padding_mask, bias, alibi_slopes, LOG2E), torch.exp2, torch.log2,
                       _sink(sinks, s2, LOG2E))
    return p.to(v.dtype) @ v, lse2 * math.log(2.0)


def fp32_inputs(q, k, v, cfg: Config, key_padding_mask=None, bias=None, *, alibi_slopes=None, sinks=None):
    acc = _acc(q.dtype)
    k, v = _expand(q, k, v)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    s = (qa @ ka.transpose(-1, -2)) * cfg.scale
    p, lse = _softmax(_masked(s, cfg, q, k, key_padding_mask, bias, alibi_slopes), torch.exp, torch.log,
                      _sink(sinks, s))
    return (p @ va).to(v.dtype), lse


def _logits(q, k, cfg: Config, kpm, bias, alibi=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked logits in the accumulation dtype, from inputs of any dtype (as a flash kernel's
    fp32 dot of low-precision tiles), and the soft cap's derivative 1 - tanh^2 (None without a cap)."""
    acc = _acc(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * cfg.scale
    dcap = None if cfg.softcap is None else 1 - torch.tanh(s / cfg.softcap) ** 2
    return _masked(s, cfg, q, k, kpm, bias, alibi), dcap


class _Online(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, sinks, cfg, kpm, alibi):
        ke, ve = _expand(q, k, v)
        s, _ = _logits(q, ke, cfg, kpm, bias, alibi)
        acc = s.dtype
        m = torch.full(s.shape[:-1], -math.inf, dtype=acc, device=s.device)
        l = torch.zeros_like(m)
        o = torch.zeros(*s.shape[:-1], v.shape[-1], dtype=acc, device=s.device)
        for j in range(0, s.shape[-1], BLOCK):
            blk = s[..., j : j + BLOCK]
            m_new = torch.maximum(m, blk.amax(-1))
            m_use = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
            p = torch.exp(blk - m_use[..., None])
            alpha = torch.exp(m - m_use)
            l = l * alpha + p.sum(-1)
            o = o * alpha[..., None] + p.to(v.dtype).to(acc) @ ve[..., j : j + BLOCK, :].to(acc)
            m = m_new
        if sinks is not None:  # the sink as one last block of one logit, with no value
            sink = sinks.to(acc).view(1, -1, 1).expand_as(m)
            m_new = torch.maximum(m, sink)
            alpha = torch.exp(m - m_new)
            l = l * alpha + torch.exp(sink - m_new)
            o = o * alpha[..., None]
            m = m_new
        empty = l == 0
        out = (o / torch.where(empty, torch.ones_like(l), l)[..., None]).to(v.dtype)
        lse = torch.where(empty, torch.full_like(l, -math.inf), torch.log(torch.where(empty, torch.ones_like(l), l)) + m)
        ctx.save_for_backward(q, k, v, bias, sinks, out, lse)
        ctx.cfg, ctx.kpm, ctx.alibi = cfg, kpm, alibi
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, bias, sinks, out, lse = ctx.saved_tensors
        cfg, dt = ctx.cfg, q.dtype
        ke, ve = _expand(q, k, v)
        s, dcap = _logits(q, ke, cfg, ctx.kpm, bias, ctx.alibi)
        acc = s.dtype
        lse_safe = torch.where(lse == -math.inf, torch.full_like(lse, math.inf), lse)
        p = torch.exp(s - lse_safe[..., None])  # FA2: recomputed from the saved lse
        do = dout.to(acc)
        delta = (do * out.to(acc)).sum(-1, keepdim=True)  # D from the rounded output
        if dlse is not None:
            delta = delta - dlse.to(acc)[..., None]
        dv = p.to(dt).to(acc).transpose(-1, -2) @ do
        dp = do @ ve.to(acc).transpose(-1, -2)
        ds = p * (dp - delta)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[4]:  # d sink = -sum over rows of p_sink * D
            p_sink = torch.exp(sinks.to(acc).view(1, -1, 1) - lse_safe)
            dsinks = -(p_sink * delta.squeeze(-1)).sum((0, 2)).to(sinks.dtype)
        dbias = None
        if bias is not None and ctx.needs_input_grad[3]:
            dbias = ds.sum_to_size(bias.shape).to(bias.dtype)
        if dcap is not None:  # through the cap: d/dx cap * tanh(x / cap) = 1 - tanh^2
            ds = ds * dcap
        dq = (ds.to(dt).to(acc) @ ke.to(acc)) * cfg.scale
        dk = (ds.to(dt).to(acc).transpose(-1, -2) @ q.to(acc)) * cfg.scale
        g = q.shape[1] // k.shape[1]

        def grouped(t):
            return t.view(t.shape[0], t.shape[1] // g, g, *t.shape[2:]).sum(2)

        return dq.to(dt), grouped(dk).to(dt), grouped(dv).to(dt), dbias, dsinks, None, None, None


def online(q, k, v, cfg: Config, key_padding_mask=None, bias=None, *, alibi_slopes=None, sinks=None):
    return _Online.apply(q, k, v, bias, sinks, cfg, key_padding_mask, alibi_slopes)


ORDERINGS: dict[str, Callable] = {
    "scale_first": scale_first,
    "exp2_folded": exp2_folded,
    "fp32_inputs": fp32_inputs,
    "online": online,
}


# -- fp8 (float8_e4m3fn q, k, v with descales; bfloat16 out): the tolerance rule's fp8 model ----
# Each rounds differently from naive's fp8 path (unnormalized P in e4m3, one row max) and is a
# valid way to compute attention on the dequantized values.
FP8 = torch.float8_e4m3fn


def _fp8_descale(d: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """A descale (None, () or (B, Hkv)) broadcastable to t (B, H, S, E), float32."""
    if d is None:
        return torch.ones((), dtype=torch.float32, device=t.device)
    return d if d.dim() == 0 else d.repeat_interleave(t.shape[1] // d.shape[1], dim=1)[:, :, None, None]


def _fp8_logits(q, k, cfg: Config, kpm, q_descale, k_descale) -> torch.Tensor:
    """Masked float32 logits from q and k dequantized first (each t * descale rounded to float32)."""
    qf = q.to(torch.float32) * _fp8_descale(q_descale, q)
    kf = k.to(torch.float32) * _fp8_descale(k_descale, q)
    return _masked((qf @ kf.transpose(-1, -2)) * cfg.scale, cfg, q, k, kpm, None)


def fp8_p_bf16(q, k, v, cfg: Config, key_padding_mask=None, bias=None, *, q_descale=None, k_descale=None,
               v_descale=None):
    """Dequantize-first logits; the unnormalized P kept in bfloat16 (not e4m3), V in fp8, the
    descale of V applied after the division by the row sum."""
    k, v = _expand(q, k, v)
    s = _fp8_logits(q, k, cfg, key_padding_mask, q_descale, k_descale)
    m = s.amax(-1, keepdim=True) if s.shape[-1] else s.new_full((*s.shape[:-1], 1), -math.inf)
    empty = m == -math.inf
    m = torch.where(empty, torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    safe = torch.where(empty, torch.ones_like(l), l)
    out = (p.to(torch.bfloat16).to(torch.float32) @ v.to(torch.float32)) / safe * _fp8_descale(v_descale, q)
    return out.to(torch.bfloat16), torch.where(empty, torch.full_like(l, -math.inf), torch.log(safe) + m).squeeze(-1)


def fp8_online(q, k, v, cfg: Config, key_padding_mask=None, bias=None, *, q_descale=None, k_descale=None,
               v_descale=None):
    """FA3's loop: key blocks of BLOCK with a running max, each block's exp2(s * log2 e - m)
    rounded to e4m3 against the running max, the accumulator rescaled; the scale and both
    logit descales folded into one float32 multiplier with log2(e); v_descale at the end."""
    k, v = _expand(q, k, v)
    mult = cfg.scale * LOG2E * _fp8_descale(q_descale, q) * _fp8_descale(k_descale, q)
    s2 = _masked((q.to(torch.float32) @ k.to(torch.float32).transpose(-1, -2)) * mult, cfg, q, k, key_padding_mask,
                 None)
    m = torch.full(s2.shape[:-1], -math.inf, dtype=torch.float32, device=s2.device)
    l = torch.zeros_like(m)
    o = torch.zeros(*s2.shape[:-1], v.shape[-1], dtype=torch.float32, device=s2.device)
    for j in range(0, s2.shape[-1], BLOCK):
        blk = s2[..., j : j + BLOCK]
        m_new = torch.maximum(m, blk.amax(-1))
        m_use = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        p = torch.exp2(blk - m_use[..., None])
        alpha = torch.exp2(m - m_use)
        l = l * alpha + p.sum(-1)
        o = o * alpha[..., None] + p.to(FP8).to(torch.float32) @ v[..., j : j + BLOCK, :].to(torch.float32)
        m = m_new
    empty = l == 0
    safe = torch.where(empty, torch.ones_like(l), l)
    out = o / safe[..., None] * _fp8_descale(v_descale, q)
    lse = torch.where(empty, torch.full_like(l, -math.inf), (torch.log2(safe) + m) * math.log(2.0))
    return out.to(torch.bfloat16), lse


def fp8_p_normalized(q, k, v, cfg: Config, key_padding_mask=None, bias=None, *, q_descale=None, k_descale=None,
                     v_descale=None):
    """The probabilities normalized first (p / l, float32) and then rounded to e4m3 for P @ V,
    V dequantized to float32 (v * v_descale) for the product."""
    k, v = _expand(q, k, v)
    s = _fp8_logits(q, k, cfg, key_padding_mask, q_descale, k_descale)
    p, lse = _softmax(s, torch.exp, torch.log)
    vf = v.to(torch.float32) * _fp8_descale(v_descale, q)
    return (p.to(FP8).to(torch.float32) @ vf).to(torch.bfloat16), lse


FP8_ORDERINGS: dict[str, Callable] = {
    "fp8_p_bf16": fp8_p_bf16,
    "fp8_online": fp8_online,
    "fp8_p_normalized": fp8_p_normalized,
}
