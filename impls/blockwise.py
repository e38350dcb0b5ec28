"""blockwise: the FlashAttention-2 algorithm in pure PyTorch.

Queries are cut into buckets of q_bucket_size and keys into buckets of k_bucket_size. The
forward pass runs an online softmax over key buckets (running max m, running sum l, rescaled
accumulator) and keeps only the logsumexp per query. The backward pass (a custom
torch.autograd.Function) recomputes each tile's probabilities from that logsumexp,
P = exp(S - lse), so no Sq x Sk tensor ever exists: memory is linear in sequence length
(tiles are q_bucket x k_bucket). Key buckets wholly outside the causal / window / block
visibility of a query bucket are skipped.

Grouped heads are handled without copying k and v: q is viewed as (B, Hkv, G, Sq, D), so the
G query heads of a group share one kv head (repeat_interleave order: h = kv_head * G + g).

The score features: the soft cap and the ALiBi bias (-slope * |p(i) - j|, from the slopes and
the tile's positions, never materialized beyond the tile) enter each tile's logits; the
backward multiplies dS by the cap's derivative 1 - tanh^2. A sink joins the online softmax as
one last logit after the key buckets (a rescale of the running sum and accumulator, no value);
the backward's P = exp(S - lse) then already carries the sink's share, and the sink's gradient
is -sum over rows of exp(sink - lse) * delta.

Dropout uses a counter-based hash of (seed, b, h, i, j), so the backward pass rebuilds the
same keep-mask tile by tile and the mask never depends on the bucket sizes. Its random
numbers differ from naive's torch.rand (dropout is checked statistically, not pointwise).
"""

from __future__ import annotations

import torch

from attnbench.checks import check_call
from attnbench.impls._seed import seed_hooks, seed_module
from attnbench.modules.flash_attention_two import FlashAttentionTwo
from attnbench.registry import Impl
from attnbench.spec import Config

NEG_INF = float("-inf")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: Config,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    q_bucket_size: int = 512,
    k_bucket_size: int = 1024,
    *,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Sq, Dv) in q's dtype and lse (B, Hq, Sq) (float32, float64 for float64)."""
    check_call(q, k, v, cfg, key_padding_mask, bias, who="blockwise", alibi_slopes=alibi_slopes, sinks=sinks)
    _check_buckets(q_bucket_size, k_bucket_size)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    return _Blockwise.apply(q, k, v, bias, key_padding_mask, cfg, int(q_bucket_size), int(k_bucket_size),
                            alibi_slopes, sinks)


def _check_buckets(qbs, kbs) -> None:
    for name, size in (("q_bucket_size", qbs), ("k_bucket_size", kbs)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}: must be a positive int, got {size!r}")


# -- geometry -------------------------------------------------------------------------


def _offset(cfg: Config, Sq: int, Sk: int) -> int:
    return Sk - Sq if cfg.align == "bottom_right" else 0


def _key_range(cfg: Config, p_lo: int, p_hi: int, Sk: int) -> tuple[int, int]:
    """[lo, hi): keys that positions p_lo..p_hi could see under causal/window/block."""
    lo, hi = 0, Sk
    if cfg.causal:
        hi = min(hi, p_hi + 1)
    if cfg.window is not None:
        left, right = cfg.window
        if left is not None:
            lo = max(lo, p_lo - left)
        if right is not None:
            hi = min(hi, p_hi + right + 1)
    if cfg.block is not None:
        w = cfg.block.window_size
        lo = max(lo, (p_lo // w - cfg.block.look_backward) * w)
        hi = min(hi, (p_hi // w + cfg.block.look_forward + 1) * w)
    return lo, hi


def _visible(cfg: Config, pos: torch.Tensor, j: torch.Tensor) -> torch.Tensor | None:
    """(qb, kb) positional visibility, or None when nothing positional applies."""
    p, j = pos[:, None], j[None, :]
    ok = None

    def both(a, b):
        return b if a is None else a & b

    if cfg.causal:
        ok = both(ok, j <= p)
    if cfg.window is not None:
        left, right = cfg.window
        if left is not None:
            ok = both(ok, j >= p - left)
        if right is not None:
            ok = both(ok, j <= p + right)
    if cfg.block is not None:
        w = cfg.block.window_size
        bq, bk = torch.div(p, w, rounding_mode="floor"), torch.div(j, w, rounding_mode="floor")
        ok = both(ok, (bk >= bq - cfg.block.look_backward) & (bk <= bq + cfg.block.look_forward))
    return ok


# Counter-based dropout: splitmix64-style mixing of a global element index, in int64.
# torch integer arithmetic wraps on overflow; right shifts are arithmetic, so each shift is
# masked to act as a logical one.
_M1, _M2, _GOLD = -4658895280553007687, -7723592293110705685, -7046029254386353131


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x >> n) & ((1 << (64 - n)) - 1)


def _keep(seed: int, b, h, i, j, Hq: int, Sq: int, Sk: int, p: float) -> torch.Tensor:
    x = ((b * Hq + h) * Sq + i) * Sk + j
    salt = ((seed + 1) * _GOLD) % (1 << 64)  # wrap to int64 in Python, where ints never overflow
    x = x + (salt - (1 << 64) if salt >= 1 << 63 else salt)
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    x = x ^ _shr(x, 31)
    u = (x & ((1 << 24) - 1)).to(torch.float32) / float(1 << 24)
    return u >= p


class _Tiles:
    """Everything one tile (q bucket x k bucket) needs, shared by forward and backward."""

    def __init__(self, q, k, v, bias, kpm, cfg: Config, qbs: int, kbs: int, alibi=None):
        B, Hq, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        self.B, self.Hq, self.Hkv, self.G, self.Sq, self.Sk = B, Hq, Hkv, Hq // Hkv, Sq, Sk
        self.cfg, self.qbs, self.kbs = cfg, qbs, kbs
        self.acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.off = _offset(cfg, Sq, Sk)
        self.q5 = q.reshape(B, Hkv, self.G, Sq, D)
        self.k, self.v, self.kpm = k, v, kpm
        self.bias5 = None if bias is None else _bias5(bias, Hkv, self.G)
        # slopes (Hq,) or (B, Hq) as (B or 1, Hkv, G, 1, 1)
        self.slopes5 = None if alibi is None else alibi.to(self.acc).reshape(-1, Hkv, self.G, 1, 1)
        self.dev = q.device

    def buckets(self):
        """Yield (qs, qe, [(ks, ke), ...]) with only the key buckets that can be visible."""
        for qs in range(0, self.Sq, self.qbs):
            qe = min(qs + self.qbs, self.Sq)
            lo, hi = _key_range(self.cfg, qs + self.off, qe - 1 + self.off, self.Sk)
            start = (lo // self.kbs) * self.kbs
            kb = [(ks, min(ks + self.kbs, self.Sk)) for ks in range(start, hi, self.kbs)] if lo < hi else []
            yield qs, qe, kb

    def scores(self, qs, qe, ks, ke):
        """Logits s (B, Hkv, G, qb, kb) in the accumulation dtype, the visibility mask and the
        soft cap's derivative 1 - tanh^2 (None without a cap)."""
        s = torch.einsum("bhgqd,bhkd->bhgqk", self.q5[:, :, :, qs:qe], self.k[:, :, ks:ke]).to(self.acc)
        s = s * self.cfg.scale
        dcap = None
        if self.cfg.softcap is not None:
            t = torch.tanh(s / self.cfg.softcap)
            s, dcap = self.cfg.softcap * t, 1 - t * t
        if self.bias5 is not None:
            s = s + _slice(self.bias5, qs, qe, ks, ke).to(self.acc)
        pos = torch.arange(qs, qe, device=self.dev) + self.off
        j = torch.arange(ks, ke, device=self.dev)
        if self.slopes5 is not None:
            s = s - self.slopes5 * (pos[:, None] - j[None, :]).abs().to(self.acc)
        vis = _visible(self.cfg, pos, j)
        vis = s > NEG_INF if vis is None else vis & (s > NEG_INF)
        if self.kpm is not None:
            vis = vis & self.kpm[:, None, None, None, ks:ke]
        return s, vis, dcap

    def keep(self, qs, qe, ks, ke) -> torch.Tensor:
        d = self.dev
        b = torch.arange(self.B, device=d).view(-1, 1, 1, 1, 1)
        h = (torch.arange(self.Hkv, device=d).view(1, -1, 1, 1, 1) * self.G
             + torch.arange(self.G, device=d).view(1, 1, -1, 1, 1))
        i = torch.arange(qs, qe, device=d).view(1, 1, 1, -1, 1)
        j = torch.arange(ks, ke, device=d).view(1, 1, 1, 1, -1)
        return _keep(self.cfg.dropout_seed, b, h, i, j, self.Hq, self.Sq, self.Sk, self.cfg.dropout_p)


def _bias5(bias: torch.Tensor, Hkv: int, G: int) -> torch.Tensor:
    """Bias viewed as (Bb, Hkv|1, G|1, Sqb, Skb), keeping broadcast dims at size 1."""
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    Bb, Hb, Sqb, Skb = bias.shape
    if Hb == 1:
        return bias.unsqueeze(2)
    return bias.reshape(Bb, Hkv, G, Sqb, Skb)


def _slice(b5: torch.Tensor, qs, qe, ks, ke) -> torch.Tensor:
    rows = slice(qs, qe) if b5.shape[3] > 1 else slice(None)
    cols = slice(ks, ke) if b5.shape[4] > 1 else slice(None)
    return b5[:, :, :, rows, cols]


def _reduce_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum a broadcast gradient tile back down to `shape` (dims of size 1)."""
    dims = [d for d, n in enumerate(shape) if n == 1 and t.shape[d] != 1]
    return t.sum(dims, keepdim=True) if dims else t


class _Blockwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, kpm, cfg: Config, qbs: int, kbs: int, alibi, sinks):
        t = _Tiles(q, k, v, bias, kpm, cfg, qbs, kbs, alibi)
        B, Hkv, G, Sq, Dv = t.B, t.Hkv, t.G, t.Sq, v.shape[-1]
        sink = None if sinks is None else sinks.to(t.acc).view(1, Hkv, G, 1)
        out = torch.zeros(B, Hkv, G, Sq, Dv, dtype=q.dtype, device=q.device)
        lse = torch.full((B, Hkv, G, Sq), NEG_INF, dtype=t.acc, device=q.device)
        drop = cfg.dropout_p > 0
        for qs, qe, kbuckets in t.buckets():
            m = torch.full((B, Hkv, G, qe - qs), NEG_INF, dtype=t.acc, device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros(B, Hkv, G, qe - qs, Dv, dtype=t.acc, device=q.device)
            for ks, ke in kbuckets:
                s, vis, _ = t.scores(qs, qe, ks, ke)
                m_new = torch.maximum(m, torch.where(vis, s, NEG_INF).amax(-1))
                m_safe = torch.where(m_new == NEG_INF, 0.0, m_new)  # all-invisible so far
                p = torch.where(vis, torch.exp(s - m_safe[..., None]), 0.0)
                alpha = torch.exp(m - m_safe)  # exp(-inf) = 0 clears an empty start
                l = alpha * l + p.sum(-1)
                if drop:
                    p = p * t.keep(qs, qe, ks, ke) / (1 - cfg.dropout_p)
                pv = torch.einsum("bhgqk,bhkd->bhgqd", p.to(v.dtype), v[:, :, ks:ke]).to(t.acc)
                acc = alpha[..., None] * acc + pv
                m = m_new
            if sink is not None:  # the sink: one more logit, in the denominator only
                m_new = torch.maximum(m, sink)
                alpha = torch.exp(m - m_new)
                l = alpha * l + torch.exp(sink - m_new)
                acc = alpha[..., None] * acc
                m = m_new
            empty = l == 0
            safe = torch.where(empty, 1.0, l)
            out[:, :, :, qs:qe] = (acc / safe[..., None]).to(q.dtype)  # empty rows: acc = 0
            lse[:, :, :, qs:qe] = torch.where(empty, NEG_INF, torch.log(safe) + m)
        ctx.save_for_backward(q, k, v, bias, kpm, out, lse, alibi, sinks)
        ctx.cfg, ctx.qbs, ctx.kbs = cfg, qbs, kbs
        ctx.mark_non_differentiable(lse)
        return out.reshape(B, t.Hq, Sq, Dv), lse.reshape(B, t.Hq, Sq)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, bias, kpm, out5, lse, alibi, sinks = ctx.saved_tensors
        cfg = ctx.cfg
        t = _Tiles(q, k, v, bias, kpm, cfg, ctx.qbs, ctx.kbs, alibi)
        B, Hkv, G, Sq, Dv = t.B, t.Hkv, t.G, t.Sq, v.shape[-1]
        do5 = dout.reshape(B, Hkv, G, Sq, Dv)
        # delta_i = sum_j P_ij dP_ij = <dO_i, O_i> (holds with dropout too)
        delta = (do5.to(t.acc) * out5.to(t.acc)).sum(-1)
        lse_safe = torch.where(lse == NEG_INF, 0.0, lse)
        dq = torch.zeros(t.q5.shape, dtype=t.acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=t.acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=t.acc, device=q.device)
        need_db = bias is not None and ctx.needs_input_grad[3]
        db = torch.zeros(t.bias5.shape, dtype=t.acc, device=q.device) if need_db else None
        drop, scale = cfg.dropout_p > 0, cfg.scale
        for qs, qe, kbuckets in t.buckets():
            q_t, do_t = t.q5[:, :, :, qs:qe], do5[:, :, :, qs:qe]
            for ks, ke in kbuckets:
                s, vis, dcap = t.scores(qs, qe, ks, ke)
                p = torch.where(vis, torch.exp(s - lse_safe[:, :, :, qs:qe, None]), 0.0)
                dp = torch.einsum("bhgqd,bhkd->bhgqk", do_t, v[:, :, ks:ke]).to(t.acc)
                pd = p
                if drop:
                    z = t.keep(qs, qe, ks, ke).to(t.acc) / (1 - cfg.dropout_p)  # bool / float is float32
                    pd, dp = p * z, dp * z
                dv[:, :, ks:ke] += torch.einsum("bhgqk,bhgqd->bhkd", pd.to(v.dtype), do_t).to(t.acc)
                ds = p * (dp - delta[:, :, :, qs:qe, None])
                if need_db:
                    _slice(db, qs, qe, ks, ke).add_(_reduce_to(ds, db.shape))
                if dcap is not None:  # through the cap (the bias and ALiBi are added after it)
                    ds = ds * dcap
                ds_in = ds.to(q.dtype)
                dq[:, :, :, qs:qe] += scale * torch.einsum("bhgqk,bhkd->bhgqd", ds_in, k[:, :, ks:ke]).to(t.acc)
                dk[:, :, ks:ke] += scale * torch.einsum("bhgqk,bhgqd->bhkd", ds_in, q_t).to(t.acc)
        dbias = None
        if need_db:
            dbias = db.reshape(_bias_shape4(bias)).reshape(bias.shape).to(bias.dtype)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[9]:  # d sink = -sum over (b, i) of exp(sink - lse) * delta
            p_sink = torch.exp(sinks.to(t.acc).view(1, Hkv, G, 1) - lse)
            dsinks = -(p_sink * delta).sum((0, 3)).reshape(-1).to(sinks.dtype)
        return (dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, None, None, None, None, None,
                dsinks)


def _bias_shape4(bias: torch.Tensor) -> tuple[int, ...]:
    return (1,) * (4 - bias.dim()) + tuple(bias.shape)


FEATURES = {
    "causal", "sliding_window", "blocked_window", "gqa", "cross", "key_padding", "bias",
    "bias_grad", "dropout", "top_left", "dv", "backward", "lse", "deterministic", "softcap", "alibi", "sinks",
}

blockwise = Impl(
    memory="linear",
    name="blockwise",
    variant="dense",
    fn=attention,
    features=FEATURES,
    description="FlashAttention-2 in pure PyTorch: online softmax over q/k buckets, backward recomputes "
    "P from the saved logsumexp (memory linear in S), skips invisible key buckets",
)

blockwise_local = blockwise.for_variant("local", "blockwise FlashAttention-2; key buckets outside the window are skipped")


blockwise_flash_attention_two = Impl(
    name="blockwise",
    variant="FlashAttentionTwo",
    fn=seed_module(FlashAttentionTwo, attention),  # the module passes its bucket sizes to this kernel
    features={"causal", "cross", "key_padding", "backward", "deterministic"},
    dtypes=("float64", "float32", "float16", "bfloat16"),
    memory="linear",
    **seed_hooks("FlashAttentionTwo"),
    description="FlashAttentionTwo on the blockwise kernel (q_bucket_size / k_bucket_size honoured)",
)
