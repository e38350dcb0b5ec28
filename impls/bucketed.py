"""bucketed: local attention in the look-around layout (lucidrains local-attention style).

Queries are cut into buckets of w consecutive absolute positions; bucket c reads the key
buckets c - nb ... c + nf (the look-around). Only (w x (nb + 1 + nf) * w) scores exist per
bucket, so memory is O(S * w), never O(S^2). Inside the look-around every constraint of the
contract is applied exactly (causal, sliding window, blocked window, key padding), so the
layout is an optimisation, never a change of meaning: keys that only exist to fill a bucket
(padding, positions outside [0, Sk)) are never visible.

Geometry:
- blocked window (window_size, look_backward, look_forward): w = window_size, nb =
  look_backward, nf = look_forward: the buckets are the blocks themselves.
- sliding window (left, right): w = max(left, right) (capped by the sequence span), nb =
  ceil(left / w), nf = ceil(right / w); a causal call has nf = 0.
Positions are absolute (p(i) = i + Sk - Sq bottom-right, i top-left) and buckets align to
multiples of w in absolute positions, so a blocked window's bucket(t) = t // w holds for keys
and queries alike, with Sq != Sk too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnbench.checks import check_call
from attnbench.impls._seed import seed_hooks, seed_module
from attnbench.modules.local_mha import LocalMHA
from attnbench.registry import Impl
from attnbench.spec import Config, Spec


@dataclass(frozen=True)
class Geometry:
    w: int  # bucket size
    nb: int  # key buckets looked at before the query's bucket
    nf: int  # key buckets looked at after it


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _offset(cfg: Config, Sq: int, Sk: int) -> int:
    return Sk - Sq if cfg.align == "bottom_right" else 0


def _reach(cfg: Config, Sq: int, Sk: int) -> tuple[int | None, int | None]:
    """How far back (left) and forward (right) of p(i) a visible key can be; None = unbounded."""
    left = right = None

    def tighter(a: int | None, b: int | None) -> int | None:
        return b if a is None else (a if b is None else min(a, b))

    if cfg.window is not None:
        left, right = cfg.window
    if cfg.block is not None:
        bw = cfg.block.window_size
        left = tighter(left, (cfg.block.look_backward + 1) * bw - 1)
        right = tighter(right, (cfg.block.look_forward + 1) * bw - 1)
    if cfg.causal:
        right = 0
    # Nothing lies further than the sequence itself: cap, so a window > S costs O(S^2) at most.
    off = _offset(cfg, Sq, Sk)
    if left is not None:
        left = max(0, min(left, off + Sq - 1))
    if right is not None:
        right = max(0, min(right, Sk - 1 - off))
    return left, right


def geometry(cfg: Config, Sq: int, Sk: int) -> Geometry:
    """The bucket size and look-around for a call (ValueError when the window is unbounded)."""
    left, right = _reach(cfg, Sq, Sk)
    if left is None or right is None:
        side = "left" if left is None else "right"
        raise ValueError(f"cfg.window: bucketed attention needs a bounded window; the {side} edge is unbounded")
    span = max(Sq, Sk)
    if cfg.block is not None and cfg.block.window_size <= span:
        b = cfg.block
        w = b.window_size
        nb, nf = b.look_backward, b.look_forward
        if cfg.window is not None or cfg.causal:  # a sliding window / causality may cut further
            nb = min(nb, _ceil_div(left, w))
            nf = min(nf, _ceil_div(right, w))
        return Geometry(w, nb, nf)
    w = max(left, right, 1)
    return Geometry(w, _ceil_div(left, w), _ceil_div(right, w))


def _pad_seq(t: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """Zero-pad dim -2 of t (sequence) by front / back rows."""
    shape = list(t.shape)
    parts = []
    if front:
        parts.append(t.new_zeros(shape[:-2] + [front, shape[-1]]))
    parts.append(t)
    if back:
        parts.append(t.new_zeros(shape[:-2] + [back, shape[-1]]))
    return torch.cat(parts, dim=-2) if len(parts) > 1 else t


def _key_window(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of t along dim -2, zero rows where the range leaves [0, S)."""
    S = t.shape[-2]
    lo, hi = min(max(start, 0), S), min(max(stop, 0), S)
    hi = max(hi, lo)
    return _pad_seq(t[..., lo:hi, :], lo - start, stop - hi)


def _look_around(kg: torch.Tensor, nq: int, g: Geometry) -> torch.Tensor:
    """(..., (nq + nb + nf) * w, E) -> (..., nq, (nb + 1 + nf) * w, E): each bucket with its neighbours."""
    *lead, _, E = kg.shape
    kb = kg.reshape(*lead, nq + g.nb + g.nf, g.w, E)
    # Concatenated shifted slices rather than unfold: the backward is plain copies (deterministic).
    shifted = [kb[..., s : s + nq, :, :] for s in range(g.nb + 1 + g.nf)]
    return torch.cat(shifted, dim=-2)


def _visibility(cfg: Config, Sq: int, Sk: int, qb0: int, nq: int, g: Geometry, device) -> torch.Tensor:
    """Bool (nq, w, K): may the query at bucket c, slot a see look-around key t? (padding excluded)."""
    off = _offset(cfg, Sq, Sk)
    K = (g.nb + 1 + g.nf) * g.w
    c = torch.arange(nq, device=device).view(nq, 1, 1)
    p = (qb0 + c) * g.w + torch.arange(g.w, device=device).view(1, g.w, 1)  # query absolute positions
    j = (qb0 + c - g.nb) * g.w + torch.arange(K, device=device).view(1, 1, K)  # key absolute positions
    ok = (j >= 0) & (j < Sk) & (p - off >= 0) & (p - off < Sq)
    if cfg.causal:
        ok &= j <= p
    if cfg.window is not None:
        left, right = cfg.window
        if left is not None:
            ok &= j >= p - left
        if right is not None:
            ok &= j <= p + right
    if cfg.block is not None:
        bw = cfg.block.window_size
        bq, bk = torch.div(p, bw, rounding_mode="floor"), torch.div(j, bw, rounding_mode="floor")
        ok &= (bk >= bq - cfg.block.look_backward) & (bk <= bq + cfg.block.look_forward)
    return ok


def attention(q, k, v, cfg: Config, key_padding_mask=None, bias=None, geom: Geometry | None = None):
    """Look-around local attention; returns (out, lse). `geom` overrides the bucket geometry."""
    check_call(q, k, v, cfg, key_padding_mask, bias, who="bucketed")
    if bias is not None:
        raise ValueError("bias: bucketed attention does not take an additive bias")
    if cfg.dropout_p > 0:
        raise ValueError(f"cfg.dropout_p: bucketed attention has no dropout, got {cfg.dropout_p}")
    if cfg.window is None and cfg.block is None:
        raise ValueError("cfg.window / cfg.block: bucketed attention needs a sliding or blocked window")
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    g = geom or geometry(cfg, Sq, Sk)
    off = _offset(cfg, Sq, Sk)

    # Query buckets: only those holding real queries (absolute positions off ... off + Sq - 1).
    qb0 = math.floor(off / g.w)
    nq = (off + Sq - 1) // g.w - qb0 + 1
    qfront = off - qb0 * g.w
    qg = _pad_seq(q, qfront, nq * g.w - Sq - qfront)
    qg = qg.reshape(B, Hkv, G, nq, g.w, D)  # query head h = kv head h // G

    kstart, kstop = (qb0 - g.nb) * g.w, (qb0 + nq + g.nf) * g.w
    kl = _look_around(_key_window(k, kstart, kstop), nq, g).unsqueeze(2)  # (B, Hkv, 1, nq, K, D)
    vl = _look_around(_key_window(v, kstart, kstop), nq, g).unsqueeze(2)

    vis = _visibility(cfg, Sq, Sk, qb0, nq, g, q.device)  # (nq, w, K)
    if key_padding_mask is not None:
        keep = _key_window(key_padding_mask.bool().unsqueeze(-1), kstart, kstop)  # (B, Ng, 1)
        keep = _look_around(keep, nq, g).squeeze(-1)  # (B, nq, K)
        vis = vis & keep[:, None, None, :, None, :]  # (B, 1, 1, nq, w, K)

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # softmax in fp32 at least
    s = (qg @ kl.transpose(-1, -2)).to(acc) * cfg.scale
    s = s.masked_fill(~vis, float("-inf"))
    # Empty rows (no visible key): exclude them from the softmax so they give 0, not NaN.
    m = s.amax(-1, keepdim=True)
    empty = m == float("-inf")
    m = torch.where(empty, torch.zeros_like(m), m).detach()
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    p = p / torch.where(empty, torch.ones_like(l), l)
    out = p.to(v.dtype) @ vl  # (B, Hkv, G, nq, w, Dv)
    lse = torch.where(empty, torch.full_like(l, float("-inf")), torch.log(l) + m)

    out = out.reshape(B, Hq, nq * g.w, Dv)[:, :, qfront : qfront + Sq]
    lse = lse.reshape(B, Hq, nq * g.w)[:, :, qfront : qfront + Sq]
    return out, lse


def _supports(spec: Spec) -> str | None:
    if spec.window is None and spec.block is None:
        return "needs a sliding or blocked window"
    try:
        geometry(spec.config(), spec.Sq, spec.Sk)
    except ValueError as exc:
        return str(exc)
    return None


bucketed = Impl(
    memory="linear",
    name="bucketed",
    variant="local",
    fn=attention,
    features={
        "causal", "sliding_window", "blocked_window", "gqa", "cross", "key_padding", "top_left", "dv",
        "backward", "lse", "deterministic",
    },
    supports=_supports,
    description="look-around buckets in PyTorch: O(S*w) scores, exact masking inside the look-around",
)


bucketed_local_mha = Impl(
    name="bucketed",
    variant="LocalMHA",
    fn=seed_module(LocalMHA, attention),
    features={"causal", "sliding_window", "blocked_window", "key_padding", "backward", "deterministic"},
    dtypes=("float64", "float32", "float16", "bfloat16"),
    memory="linear",
    **seed_hooks("LocalMHA"),
    description="LocalMHA on the bucketed look-around kernel",
)
