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

All take (q, k, v, cfg, key_padding_mask=None, bias=None) -> (out, lse) like an Impl's fn.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from attnbench.masks import dense_mask
from attnbench.spec import Config

LOG2E = 1.4426950408889634
BLOCK = 5  # keys per block in `online`: not a power of two, so blocks straddle every length edge


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = q.shape[1] // k.shape[1]
    return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)


def _masked(s: torch.Tensor, cfg: Config, q: torch.Tensor, k: torch.Tensor, kpm, bias) -> torch.Tensor:
    if bias is not None:
        s = s + bias.to(s.dtype)
    mask = dense_mask(cfg, q.shape[0], q.shape[2], k.shape[2], kpm, q.device)
    return s if mask is None else s.masked_fill(~mask, -math.inf)


def _softmax(s: torch.Tensor, exp: Callable, log: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """p and lse (in the base of exp / log) of masked logits; empty rows give p = 0, lse = -inf."""
    m = s.amax(-1, keepdim=True)
    empty = m == -math.inf
    m = torch.where(empty, torch.zeros_like(m), m)
    p = exp(s - m)
    l = p.sum(-1, keepdim=True)
    p = p / torch.where(empty, torch.ones_like(l), l)
    lse = torch.where(empty, torch.full_like(l, -math.inf), log(l) + m)
    return p, lse.squeeze(-1)


def scale_first(q, k, v, cfg: Config, key_padding_mask=None, bias=None):
    k, v = _expand(q, k, v)
    s = ((q * cfg.scale) @ k.transpose(-1, -2)).to(_acc(q.dtype))
    p, lse = _softmax(_masked(s, cfg, q, k, key_padding_mask, bias), torch.exp, torch.log)
    return p.to(v.dtype) @ v, lse


def exp2_folded(q, k, v, cfg: Config, key_padding_mask=None, bias=None):
    k, v = _expand(q, k, v)
    s2 = (q @ k.transpose(-1, -2)).to(_acc(q.dtype)) * (cfg.scale * LOG2E)
    if bias is not None:
        bias = bias * LOG2E
    p, lse2 = _softmax(_masked(s2, cfg, q, k, key_padding_mask, bias), torch.exp2, torch.log2)
    return p.to(v.dtype) @ v, lse2 * math.log(2.0)


def fp32_inputs(q, k, v, cfg: Config, key_padding_mask=None, bias=None):
    acc = _acc(q.dtype)
    k, v = _expand(q, k, v)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    s = (qa @ ka.transpose(-1, -2)) * cfg.scale
    p, lse = _softmax(_masked(s, cfg, q, k, key_padding_mask, bias), torch.exp, torch.log)
    return (p @ va).to(v.dtype), lse


def _logits(q, k, cfg: Config, kpm, bias) -> torch.Tensor:
    """Masked logits in the accumulation dtype, from inputs of any dtype (as a flash kernel's
    fp32 dot of low-precision tiles)."""
    acc = _acc(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * cfg.scale
    return _masked(s, cfg, q, k, kpm, bias)


class _Online(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, cfg, kpm):
        ke, ve = _expand(q, k, v)
        s = _logits(q, ke, cfg, kpm, bias)
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
        empty = l == 0
        out = (o / torch.where(empty, torch.ones_like(l), l)[..., None]).to(v.dtype)
        lse = torch.where(empty, torch.full_like(l, -math.inf), torch.log(torch.where(empty, torch.ones_like(l), l)) + m)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.cfg, ctx.kpm = cfg, kpm
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        cfg, dt = ctx.cfg, q.dtype
        ke, ve = _expand(q, k, v)
        s = _logits(q, ke, cfg, ctx.kpm, bias)
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
        dq = (ds.to(dt).to(acc) @ ke.to(acc)) * cfg.scale
        dk = (ds.to(dt).to(acc).transpose(-1, -2) @ q.to(acc)) * cfg.scale
        g = q.shape[1] // k.shape[1]

        def grouped(t):
            return t.view(t.shape[0], t.shape[1] // g, g, *t.shape[2:]).sum(2)

        dbias = None
        if bias is not None and ctx.needs_input_grad[3]:
            dbias = ds.sum_to_size(bias.shape).to(bias.dtype)
        return dq.to(dt), grouped(dk).to(dt), grouped(dv).to(dt), dbias, None, None


def online(q, k, v, cfg: Config, key_padding_mask=None, bias=None):
    return _Online.apply(q, k, v, bias, cfg, key_padding_mask)


ORDERINGS: dict[str, Callable] = {
    "scale_first": scale_first,
    "exp2_folded": exp2_folded,
    "fp32_inputs": fp32_inputs,
    "online": online,
}
