"""attnbench's fused attention kernels (FlashAttention-2 scheme), in Triton.

Not scanned by the registry (leading underscore): impls/triton.py loads this file lazily,
once per mode (compiled or TRITON_INTERPRET), because triton.jit fixes the mode when a
kernel is defined.

Visibility. Every mask the contract allows (causal, sliding window, blocked window, both
alignments) is one interval of keys per query: with p = i + off the query's absolute position,
key j is visible iff lo(p) <= j <= hi(p), where

    lo(p) = max(p - left, (bucket(p) - LB) * W, 0)
    hi(p) = min(p + right, (bucket(p) + LF + 1) * W - 1, Sk - 1)

(causal is folded into right <= 0 by the host; an unbounded edge is a large sentinel). lo and
hi never decrease with p, so a block of queries sees the key interval [lo(first), hi(last)]
and is fully visible on [lo(last), hi(first)]; the kernels loop only over the first interval
and apply masks only outside the second. The key padding mask and the bias come on top.

Scores are kept in base 2: s2 = log2(e) * (scale * q.k + bias), so softmax uses exp2.

Score features, in base 2 as well: the soft cap is cap2 * tanh(s2 / cap2) with cap2 = log2(e) *
cap (the same tanh(scale q.k / cap)), applied before the bias; ALiBi subtracts log2(e) * slope *
|p - j| after it, from the tile's positions (never materialized); a sink joins the online
softmax after the last key block as one more logit with no value, so the saved m2 and 1/l (and
the backward's recomputed p) already carry its share. The backward multiplies dS by the cap's
derivative 1 - tanh^2 (dbias is taken before, the bias being added after the cap); the sink's
own gradient is a per-row sum the host takes from m2, 1/l and delta. The
returned lse is natural log (float32), -inf for rows that see nothing. For the backward the
forward saves the row max m2 (base 2) and 1/l instead, and the backward recomputes
p = exp2(s2 - m2) * (1/l): exp2(s2 - lse2) would lose |lse2| * eps of accuracy in every p
(5-8x naive's gradient error once logits reach ~100). Empty rows save m2 = +inf, 1/l = 0.

Packed batches (IS_VARLEN, a constexpr: the dense specialization compiles without any of it).
The host passes the packed (total, H, D) tensors as (N, H, total, D) views with batch stride 0,
Sq = total_q and Sk = total_k, and CuQ / CuK, the int32 cu_seqlens; the stats (lse, m2, 1/l,
delta) are (Hq, total_q). A program's batch index b is sequence b: it reads the sequence's first
rows q0, k0 and its lengths from CuQ / CuK, shifts the base pointers by q0 / k0 rows, aligns
bottom-right within the sequence (off = Sk - Sq of its own lengths) and returns at once when its
block lies past the sequence's end (the grid is sized by max_seqlen). Stats row r of head h is
h * total_q + r. Without IS_VARLEN CuQ / CuK are stand-ins, never read.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

try:
    from triton import knobs

    INTERPRET = bool(knobs.runtime.interpret)
except ImportError:  # triton < 3.4
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# -- visibility helpers ----------------------------------------------------------------------
@triton.jit
def _bucket(p, W, SHIFT_B):
    # floor(p / W) for p that may be negative: shift by SHIFT_B buckets so the division is exact.
    return (p + SHIFT_B * W) // W - SHIFT_B


@triton.jit
def _key_lo(p, left, W, LB, SHIFT_B, HAS_BLOCK: tl.constexpr):
    lo = p - left
    if HAS_BLOCK:
        lo = tl.maximum(lo, (_bucket(p, W, SHIFT_B) - LB) * W)
    return tl.maximum(lo, 0)


@triton.jit
def _key_hi(p, right, Sk, W, LF, SHIFT_B, HAS_BLOCK: tl.constexpr):
    hi = p + right
    if HAS_BLOCK:
        hi = tl.minimum(hi, (_bucket(p, W, SHIFT_B) + LF + 1) * W - 1)
    return tl.minimum(hi, Sk - 1)


@triton.jit
def _query_lo(j, right, W, LF, HAS_BLOCK: tl.constexpr):
    # smallest position p with hi(p) >= j (j >= 0)
    p = j - right
    if HAS_BLOCK:
        p = tl.maximum(p, (j // W - LF) * W)
    return p


@triton.jit
def _query_hi(j, left, W, LB, HAS_BLOCK: tl.constexpr):
    # largest position p with lo(p) <= j (j >= 0)
    p = j + left
    if HAS_BLOCK:
        p = tl.minimum(p, (j // W + LB + 1) * W - 1)
    return p


@triton.jit
def _stages(first, full_lo, full_hi, last, BLOCK: tl.constexpr):
    """Split [first rounded down, last) into masked / unmasked / masked block ranges.

    full_lo, full_hi: the (unclamped, unrounded) interval where no mask is needed."""
    start = (first // BLOCK) * BLOCK
    end = tl.maximum(last, start)
    f_lo = tl.cdiv(tl.maximum(full_lo, 0), BLOCK) * BLOCK
    f_hi = (tl.maximum(full_hi, 0) // BLOCK) * BLOCK
    f_lo = tl.minimum(tl.maximum(f_lo, start), end)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), end)
    return start, f_lo, f_hi, end


@triton.jit
def _sequence(Cu, b):
    """Sequence b of a packed batch: its first row (int64) and its length, from cu_seqlens."""
    start = tl.load(Cu + b)
    return start.to(tl.int64), tl.load(Cu + b + 1) - start


@triton.jit
def _query_block_of(CuQ, CuK, b, h, total_q, BLOCK_M: tl.constexpr):
    """For a query-block program (forward, dq) of packed sequence b, head h: the sequence's first
    query and key rows, its query and key lengths, its first row in the (Hq, total_q) stats, and
    this program's query block, longest rows first (negative past the sequence's last block)."""
    q0, Sq = _sequence(CuQ, b)
    k0, Sk = _sequence(CuK, b)
    start_m = (tl.cdiv(Sq, BLOCK_M) - 1 - tl.program_id(0)) * BLOCK_M
    return q0, k0, Sq, Sk, h * total_q + q0, start_m


# -- score features --------------------------------------------------------------------------
@triton.jit
def _softcap(s, cap):
    """(cap * tanh(s / cap), 1 - tanh^2(s / cap)), each to a few ulps relative to itself: a
    Taylor polynomial below |y| = 0.4 (where 1 - e^-2|y| would cancel), (1 - e) / (1 + e) and
    4e / (1 + e)^2 with e = exp(-2|y|) above (no cancellation: e < 0.45)."""
    y = s / cap
    a = tl.abs(y)
    e = tl.math.exp2(-2.8853900817779268 * a)  # exp(-2|y|)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(y < 0, -big, big)
    ys = tl.minimum(tl.maximum(y, -0.4), 0.4)  # the polynomial's branch only: no overflow where it is unused
    y2 = ys * ys
    small = ys * (1.0 + y2 * (-0.3333333333333333 + y2 * (0.13333333333333333 + y2 * (-0.05396825396825397 + y2 * (
        0.021869488536155203 + y2 * (-0.008863235529902197 + y2 * (0.003592128036572481
                                                                   + y2 * -0.0014558343870513183)))))))
    t = tl.where(a < 0.4, small, big)
    dt = tl.where(a < 0.4, 1.0 - small * small, 4.0 * e / ((1.0 + e) * (1.0 + e)))
    return cap * t, dt


# -- forward ---------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, bias_base, kpm_base,
    skn, svn, sbm, sbn,
    offs_m, offs_d, offs_dv, lo_i, hi_i,
    n_lo, n_hi, Sq, Sk, D, DV, qk_scale, cap2, slope2, off,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[:, None] * skn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * svn + offs_dv[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(offs_n[:, None] < Sk) & (offs_d[None, :] < D), other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < D, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_SOFTCAP:
            s, _ = _softcap(s, cap2)
        if HAS_BIAS:
            b_ptrs = bias_base + offs_m[:, None] * sbm + offs_n[None, :] * sbn
            bias = tl.load(b_ptrs, mask=(offs_m[:, None] < Sq) & (offs_n[None, :] < Sk), other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        if HAS_ALIBI:
            s -= slope2 * tl.abs(offs_m[:, None] + off - offs_n[None, :]).to(tl.float32)
        if MASKED:
            vis = (offs_n[None, :] >= lo_i[:, None]) & (offs_n[None, :] <= hi_i[:, None])
            s = tl.where(vis, s, float("-inf"))
        if HAS_KPM:
            keep = tl.load(kpm_base + offs_n, mask=offs_n < Sk, other=0) != 0
            s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_BIAS or HAS_KPM:
            # a row with nothing visible so far keeps m = -inf; subtract 0 instead (no NaN)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < Sk) & (offs_dv[None, :] < DV), other=0.0)
        elif EVEN_DV:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd(
    Q, K, V, Bias, KPM, Out, LSE, M2, INVL, Slopes, Sinks, QDS, KDS, VDS,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    sbb, sbh, sbm, sbn, spb, sob, soh, som, ssb, ssh,
    Hq, Sq, Sk, D, DV, GROUP,
    qk_scale, cap2, off, left, right, W, LB, LF, SHIFT_B, CuQ, CuK,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BLOCK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, IS_VARLEN: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FP8: tl.constexpr,
):
    num_m = tl.cdiv(Sq, BLOCK_M)
    start_m = (num_m - 1 - tl.program_id(0)) * BLOCK_M  # longest rows (causal) launch first
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP
    if IS_VARLEN:  # b is a sequence: see "Packed batches" above
        q0, k0, Sq, Sk, stat0, start_m = _query_block_of(CuQ, CuK, b, h, Sq, BLOCK_M)
        off = Sk - Sq
        if start_m < 0:  # past this sequence's last query block
            return
        Q += q0 * sqm
        Out += q0 * som
        K += k0 * skn
        V += k0 * svn

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    bias_base = Bias + b * sbb + h * sbh
    kpm_base = KPM + b * spb
    # the head's ALiBi slope in base 2 (Slopes is a stand-in tensor, read and unused, without ALiBi)
    slope2 = tl.load(Slopes + b * ssb + h * ssh).to(tl.float32) * 1.4426950408889634
    if IS_FP8:  # fp8: the (B, Hkv) descales of q and k join the scale (the dots multiply e4m3 values exactly)
        kv = b * (Hq // GROUP) + hk
        qk_scale = qk_scale * tl.load(QDS + kv) * tl.load(KDS + kv)

    p_rows = offs_m + off
    lo_i = _key_lo(p_rows, left, W, LB, SHIFT_B, HAS_BLOCK)
    hi_i = _key_hi(p_rows, right, Sk, W, LF, SHIFT_B, HAS_BLOCK)
    p_first = start_m + off
    p_last = tl.minimum(start_m + BLOCK_M, Sq) - 1 + off
    n0, f_lo, f_hi, n1 = _stages(
        _key_lo(p_first, left, W, LB, SHIFT_B, HAS_BLOCK),
        _key_lo(p_last, left, W, LB, SHIFT_B, HAS_BLOCK),
        _key_hi(p_first, right, Sk, W, LF, SHIFT_B, HAS_BLOCK) + 1,
        _key_hi(p_last, right, Sk, W, LF, SHIFT_B, HAS_BLOCK) + 1,
        BLOCK_N,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, bias_base, kpm_base, skn, svn, sbm, sbn,
        offs_m, offs_d, offs_dv, lo_i, hi_i, n0, f_lo, Sq, Sk, D, DV, qk_scale, cap2, slope2, off,
        True, HAS_BIAS, HAS_KPM, HAS_SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PREC, BLOCK_N,
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, bias_base, kpm_base, skn, svn, sbm, sbn,
        offs_m, offs_d, offs_dv, lo_i, hi_i, f_lo, f_hi, Sq, Sk, D, DV, qk_scale, cap2, slope2, off,
        False, HAS_BIAS, HAS_KPM, HAS_SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PREC, BLOCK_N,
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, bias_base, kpm_base, skn, svn, sbm, sbn,
        offs_m, offs_d, offs_dv, lo_i, hi_i, f_hi, n1, Sq, Sk, D, DV, qk_scale, cap2, slope2, off,
        True, HAS_BIAS, HAS_KPM, HAS_SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PREC, BLOCK_N,
    )

    if HAS_SINKS:  # the sink: one more logit after the last key block, in the denominator only
        sink2 = tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m_i, sink2)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.math.exp2(sink2 - m_new)
        acc = acc * alpha[:, None]
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if IS_FP8:  # P was rounded to e4m3 for the second dot (p.to(v.dtype)); v's descale scales the output
        out = out * tl.load(VDS + b * (Hq // GROUP) + hk)
    safe_l = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(safe_l)) * 0.6931471805599453)
    row_ok = offs_m < Sq
    if IS_VARLEN:
        row = stat0 + offs_m
    else:
        row = bh.to(tl.int64) * Sq + offs_m
    tl.store(LSE + row, lse, mask=row_ok)
    tl.store(M2 + row, tl.where(empty, float("inf"), m_i), mask=row_ok)
    tl.store(INVL + row, tl.where(empty, 0.0, 1.0 / safe_l), mask=row_ok)
    o_ptrs = Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


# -- backward --------------------------------------------------------------------------------
@triton.jit
def attn_bwd_preprocess(
    Out, DO, DLSE, Delta,
    sob, soh, som, sdb, sdh, sdm,
    Hq, Sq, DV,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse: the softmax-backward correction per query row."""
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < Sq) & (offs_dv[None, :] < DV)
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = bh.to(tl.int64) * Sq + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < Sq, other=0.0)
    tl.store(Delta + row, delta, mask=offs_m < Sq)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_row, bias_base,
    sqm, sdm, sbm, sbn,
    offs_n, offs_d, offs_dv,
    m_lo, m_hi, Sq, Sk, D, DV, qk_scale, cap2, slope2, off, left, right, W, LB, LF, SHIFT_B,
    M2, INVL, Delta,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BLOCK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(m_lo, m_hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q_ptrs = q_base + offs_m[:, None] * sqm + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * sdm + offs_dv[None, :]
        if MASKED:
            row_ok = offs_m < Sq
            q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            m2 = tl.load(M2 + lse_row + offs_m, mask=row_ok, other=float("inf"))
            inv_l = tl.load(INVL + lse_row + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(Delta + lse_row + offs_m, mask=row_ok, other=0.0)
        else:
            if EVEN_D:
                q = tl.load(q_ptrs)
            else:
                q = tl.load(q_ptrs, mask=offs_d[None, :] < D, other=0.0)
            if EVEN_DV:
                do = tl.load(do_ptrs)
            else:
                do = tl.load(do_ptrs, mask=offs_dv[None, :] < DV, other=0.0)
            m2 = tl.load(M2 + lse_row + offs_m)
            inv_l = tl.load(INVL + lse_row + offs_m)
            delta = tl.load(Delta + lse_row + offs_m)
        if DOT_PREC == "ieee":
            # float32: the logits as the forward computed them, q @ k^T, then transposed. p is
            # exp2(s - m2) with the forward's m2, exact for the row's top key only if s rounds as
            # in the forward; k @ q^T sums in another order on some backends (numpy's OpenBLAS
            # under the interpreter), and |s| * eps of error then lands on p = 1.
            s_t = tl.trans(tl.dot(q, tl.trans(k), input_precision=DOT_PREC)) * qk_scale  # (BLOCK_N, BLOCK_M)
        else:
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        if HAS_SOFTCAP:
            s_t, dcap_t = _softcap(s_t, cap2)
        if HAS_BIAS:
            b_ptrs = bias_base + offs_m[None, :] * sbm + offs_n[:, None] * sbn
            bias = tl.load(b_ptrs, mask=(offs_m[None, :] < Sq) & (offs_n[:, None] < Sk), other=0.0)
            s_t += bias.to(tl.float32) * 1.4426950408889634
        if HAS_ALIBI:
            s_t -= slope2 * tl.abs(offs_m[None, :] + off - offs_n[:, None]).to(tl.float32)
        p_t = tl.math.exp2(s_t - m2[None, :]) * inv_l[None, :]
        if MASKED:
            p_rows = offs_m + off
            lo = _key_lo(p_rows, left, W, LB, SHIFT_B, HAS_BLOCK)
            hi = _key_hi(p_rows, right, Sk, W, LF, SHIFT_B, HAS_BLOCK)
            vis = (offs_n[:, None] >= lo[None, :]) & (offs_n[:, None] <= hi[None, :])
            p_t = tl.where(vis, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * dcap_t
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def attn_bwd_dkdv(
    Q, K, V, Bias, KPM, DO, M2, INVL, Delta, DK, DVal, Slopes, Sinks,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    sbb, sbh, sbm, sbn, spb, sdb, sdh, sdm, ssb, ssh,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    Hq, Hkv, Sq, Sk, D, DV, GROUP,
    sm_scale, qk_scale, cap2, off, left, right, W, LB, LF, SHIFT_B, CuQ, CuK,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BLOCK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, IS_VARLEN: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key block, batch, kv head): dk, dv summed over the group's query heads."""
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    if IS_VARLEN:  # b is a sequence: see "Packed batches" above
        q0, Sq_b = _sequence(CuQ, b)
        k0, Sk = _sequence(CuK, b)
        if start_n >= Sk:  # past this sequence's last key block
            return
        rows = Sq  # the stats' row count per head, total_q
        Sq = Sq_b
        off = Sk - Sq
        Q += q0 * sqm
        DO += q0 * sdm
        K += k0 * skn
        V += k0 * svn
        DK += k0 * sdkn
        DVal += k0 * sdvn

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < Sk
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :],
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :],
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if HAS_KPM:
        kp = tl.load(KPM + b * spb + offs_n, mask=col_ok, other=0) != 0
    else:
        kp = col_ok

    # query rows that see any key of this block, and those that see all of it
    n_last = tl.minimum(start_n + BLOCK_N, Sk) - 1
    full_lo = _query_lo(n_last, right, W, LF, HAS_BLOCK) - off
    full_hi = _query_hi(start_n, left, W, LB, HAS_BLOCK) - off + 1
    full_hi = tl.minimum(full_hi, Sq)
    if start_n + BLOCK_N > Sk:
        full_hi = full_lo  # partial key block: masked only
    m0, f_lo, f_hi, m1 = _stages(
        tl.maximum(_query_lo(start_n, right, W, LF, HAS_BLOCK) - off, 0),
        full_lo, full_hi,
        tl.minimum(_query_hi(n_last, left, W, LB, HAS_BLOCK) - off + 1, Sq),
        BLOCK_M,
    )

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        bias_base = Bias + b * sbb + h * sbh
        if IS_VARLEN:
            lse_row = h * rows + q0
        else:
            lse_row = (b * Hq + h) * Sq
        slope2 = tl.load(Slopes + b * ssb + h * ssh).to(tl.float32) * 1.4426950408889634
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_row, bias_base, sqm, sdm, sbm, sbn,
            offs_n, offs_d, offs_dv, m0, f_lo, Sq, Sk, D, DV, qk_scale, cap2, slope2,
            off, left, right, W, LB, LF, SHIFT_B, M2, INVL, Delta,
            True, HAS_BIAS, HAS_KPM, HAS_BLOCK, HAS_SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PREC, BLOCK_M,
        )
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_row, bias_base, sqm, sdm, sbm, sbn,
            offs_n, offs_d, offs_dv, f_lo, f_hi, Sq, Sk, D, DV, qk_scale, cap2, slope2,
            off, left, right, W, LB, LF, SHIFT_B, M2, INVL, Delta,
            False, HAS_BIAS, HAS_KPM, HAS_BLOCK, HAS_SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PREC, BLOCK_M,
        )
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_row, bias_base, sqm, sdm, sbm, sbn,
            offs_n, offs_d, offs_dv, f_hi, m1, Sq, Sk, D, DV, qk_scale, cap2, slope2,
            off, left, right, W, LB, LF, SHIFT_B, M2, INVL, Delta,
            True, HAS_BIAS, HAS_KPM, HAS_BLOCK, HAS_SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PREC, BLOCK_M,
        )

    if HAS_KPM:
        # A padded key's p is 0 for every query, and p row j feeds only dk[j] and dv[j]: zero those
        # rows here instead of masking p in the loop. (Masking p_t with kp inside the loop made
        # Triton 3.6 fail in TritonGPURemoveLayoutConversions, "operand does not dominate this
        # use", for a bias + padding + lengths not multiple of 16, D=256; H100, 2026-11-23.)
        # tl.where, not a product: a padded key's own logit may overflow p to inf (or hold NaN).
        dk = tl.where(kp[:, None], dk, 0.0)
        dv = tl.where(kp[:, None], dv, 0.0)
    dk_ptrs = DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :]
    dv_ptrs = DVal + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(dv_ptrs, dv.to(DVal.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_inner(
    dq, q, do, m2, inv_l, delta, k_base, v_base, bias_base, kpm_base, dbias_base,
    skn, svn, sbm, sbn,
    offs_m, offs_d, offs_dv, lo_i, hi_i,
    n_lo, n_hi, Sq, Sk, D, DV, qk_scale, cap2, slope2, off,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, STORE_DBIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[:, None] * skn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * svn + offs_dv[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(offs_n[:, None] < Sk) & (offs_d[None, :] < D), other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < Sk) & (offs_dv[None, :] < DV), other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < D, other=0.0)
            if EVEN_DV:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_SOFTCAP:
            s, dcap = _softcap(s, cap2)
        tile_ok = (offs_m[:, None] < Sq) & (offs_n[None, :] < Sk)
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_m[:, None] * sbm + offs_n[None, :] * sbn, mask=tile_ok, other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        if HAS_ALIBI:
            s -= slope2 * tl.abs(offs_m[:, None] + off - offs_n[None, :]).to(tl.float32)
        p = tl.math.exp2(s - m2[:, None]) * inv_l[:, None]
        if MASKED:
            vis = (offs_n[None, :] >= lo_i[:, None]) & (offs_n[None, :] <= hi_i[:, None])
            p = tl.where(vis, p, 0.0)
        if HAS_KPM:
            keep = tl.load(kpm_base + offs_n, mask=offs_n < Sk, other=0) != 0
            p = tl.where(keep[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if STORE_DBIAS:
            tl.store(dbias_base + offs_m[:, None] * Sk + offs_n[None, :], ds, mask=tile_ok)
        if HAS_SOFTCAP:  # the bias is added after the cap: dbias above is taken before this
            ds = ds * dcap
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def attn_bwd_dq(
    Q, K, V, Bias, KPM, DO, M2, INVL, Delta, DQ, DBias, Slopes, Sinks,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    sbb, sbh, sbm, sbn, spb, sdb, sdh, sdm, sdqb, sdqh, sdqm, ssb, ssh,
    Hq, Sq, Sk, D, DV, GROUP,
    sm_scale, qk_scale, cap2, off, left, right, W, LB, LF, SHIFT_B, CuQ, CuK,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BLOCK: tl.constexpr, STORE_DBIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, IS_VARLEN: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query block, batch, query head): dq, and dbias = ds when asked."""
    num_m = tl.cdiv(Sq, BLOCK_M)
    start_m = (num_m - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP
    if IS_VARLEN:  # b is a sequence: see "Packed batches" above
        q0, k0, Sq, Sk, stat0, start_m = _query_block_of(CuQ, CuK, b, h, Sq, BLOCK_M)
        off = Sk - Sq
        if start_m < 0:  # past this sequence's last query block
            return
        Q += q0 * sqm
        DO += q0 * sdm
        DQ += q0 * sdqm
        K += k0 * skn
        V += k0 * svn

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if IS_VARLEN:
        row = stat0 + offs_m
    else:
        row = bh.to(tl.int64) * Sq + offs_m
    m2 = tl.load(M2 + row, mask=row_ok, other=float("inf"))  # padding rows: p = 0
    inv_l = tl.load(INVL + row, mask=row_ok, other=0.0)
    delta = tl.load(Delta + row, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    bias_base = Bias + b * sbb + h * sbh
    kpm_base = KPM + b * spb
    dbias_base = DBias + bh.to(tl.int64) * Sq * Sk
    slope2 = tl.load(Slopes + b * ssb + h * ssh).to(tl.float32) * 1.4426950408889634

    p_rows = offs_m + off
    lo_i = _key_lo(p_rows, left, W, LB, SHIFT_B, HAS_BLOCK)
    hi_i = _key_hi(p_rows, right, Sk, W, LF, SHIFT_B, HAS_BLOCK)
    p_first = start_m + off
    p_last = tl.minimum(start_m + BLOCK_M, Sq) - 1 + off
    n0, f_lo, f_hi, n1 = _stages(
        _key_lo(p_first, left, W, LB, SHIFT_B, HAS_BLOCK),
        _key_lo(p_last, left, W, LB, SHIFT_B, HAS_BLOCK),
        _key_hi(p_first, right, Sk, W, LF, SHIFT_B, HAS_BLOCK) + 1,
        _key_hi(p_last, right, Sk, W, LF, SHIFT_B, HAS_BLOCK) + 1,
        BLOCK_N,
    )

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(
        dq, q, do, m2, inv_l, delta, k_base, v_base, bias_base, kpm_base, dbias_base, skn, svn, sbm, sbn,
        offs_m, offs_d, offs_dv, lo_i, hi_i, n0, f_lo, Sq, Sk, D, DV, qk_scale, cap2, slope2, off,
        True, HAS_BIAS, HAS_KPM, STORE_DBIAS, HAS_SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PREC, BLOCK_N,
    )
    dq = _dq_inner(
        dq, q, do, m2, inv_l, delta, k_base, v_base, bias_base, kpm_base, dbias_base, skn, svn, sbm, sbn,
        offs_m, offs_d, offs_dv, lo_i, hi_i, f_lo, f_hi, Sq, Sk, D, DV, qk_scale, cap2, slope2, off,
        False, HAS_BIAS, HAS_KPM, STORE_DBIAS, HAS_SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PREC, BLOCK_N,
    )
    dq = _dq_inner(
        dq, q, do, m2, inv_l, delta, k_base, v_base, bias_base, kpm_base, dbias_base, skn, svn, sbm, sbn,
        offs_m, offs_d, offs_dv, lo_i, hi_i, f_hi, n1, Sq, Sk, D, DV, qk_scale, cap2, slope2, off,
        True, HAS_BIAS, HAS_KPM, STORE_DBIAS, HAS_SOFTCAP, HAS_ALIBI, EVEN_D, EVEN_DV, DOT_PREC, BLOCK_N,
    )

    dq_ptrs = DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


# -- launch configurations -------------------------------------------------------------------
def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# On the interpreter a single small config (blocks of 16 exercise multi-block paths on tiny shapes).
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}

# Each list is in order of preference: with autotuning off the first one that fits is used.
FWD_CONFIGS = [
    _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 64, 4, 3), _cfg(128, 32, 4, 4),
    _cfg(64, 64, 4, 3), _cfg(128, 128, 8, 2), _cfg(64, 32, 4, 2), _cfg(32, 32, 4, 2),
]
DKDV_CONFIGS = [
    _cfg(64, 128, 8, 3), _cfg(32, 128, 4, 3), _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 2), _cfg(16, 32, 4, 2),
]
DQ_CONFIGS = [
    _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3), _cfg(64, 32, 4, 2), _cfg(32, 16, 4, 2),
]
# float32 runs its dots in IEEE fp32 on the FMA units (tf32 misses the tolerance): large tiles
# unroll into huge code (30 s compiles, spills), so fp32 gets one small tile and no tuning.
FP32_CONFIGS = {
    "fwd": [_cfg(64, 32, 4, 2), _cfg(32, 32, 4, 2), _cfg(16, 16, 4, 1)],
    "dkdv": [_cfg(32, 32, 4, 2), _cfg(16, 32, 4, 2), _cfg(16, 16, 4, 1)],
    "dq": [_cfg(32, 32, 4, 2), _cfg(32, 16, 4, 2), _cfg(16, 16, 4, 1)],
}
TUNE_KEY = ["Sq", "Sk", "BLOCK_D", "BLOCK_DV", "left", "right", "HAS_BIAS", "HAS_KPM", "HAS_BLOCK", "HAS_SOFTCAP",
            "HAS_ALIBI", "HAS_SINKS"]
SMEM_BUDGET = 200 * 1024  # bytes per program; the H100 allows 227 KB, Triton needs some for layouts


def smem_estimate(kind: str, config: triton.Config, args: dict) -> int:
    """Rough shared memory of one program: resident tiles plus num_stages pipelined tiles."""
    bm, bn, st = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    bd, bdv, elt = args["BLOCK_D"], args["BLOCK_DV"], args["Q"].element_size()
    if kind == "fwd":
        tiles = bm * bd + st * bn * (bd + bdv)
    elif kind == "dkdv":
        tiles = bn * (bd + bdv) + st * bm * (bd + bdv) + 2 * bm * bn
    else:
        tiles = bm * (bd + bdv) + st * bn * (bd + bdv) + bm * bn
    if args.get("HAS_BIAS"):  # a pipelined (BLOCK_M, BLOCK_N) bias tile per stage
        tiles += st * bm * bn
    return tiles * elt


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        if args["Q"].element_size() == 4:
            configs = FP32_CONFIGS[kind]
        fits = [c for c in configs if smem_estimate(kind, c, args) <= SMEM_BUDGET]
        fits = fits or [min(configs, key=lambda c: smem_estimate(kind, c, args))]
        return fits[:1] if args["Q"].element_size() == 4 else fits

    return prune


CONFIGS = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}
RAW = {"fwd": attn_fwd, "dkdv": attn_bwd_dkdv, "dq": attn_bwd_dq}
PRUNE = {kind: _pruner(kind) for kind in CONFIGS}


def _tune_bench(kernel_call, quantiles):
    # The autotuner's default (25 ms warm-up + 100 ms per config, three kernels, up to ~10
    # configs each) made a first fwd+bwd call cost seconds; a config's rank needs far less.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


if INTERPRET:
    TUNED = dict(RAW)
else:
    TUNED = {
        kind: triton.autotune(
            CONFIGS[kind], key=TUNE_KEY + (["STORE_DBIAS"] if kind == "dq" else []),
            prune_configs_by={"early_config_prune": PRUNE[kind]}, do_bench=_tune_bench,
        )(RAW[kind])
        for kind in CONFIGS
    }
bwd_preprocess = attn_bwd_preprocess


# -- paged KV cache: decoding / chunked prefill forward ----------------------------------------
@triton.jit
def paged_fwd(
    Q, KC, VC, Table, Lens, Out, LSE,
    sqb, sqh, sqm, skc_blk, skc_slot, skc_h, svc_blk, svc_slot, svc_h, stb, stn,
    sos, sob, soh, som, sls, slb, slh,
    Hkv, Sq, D, DV, GROUP, block_size, qk_scale, left, right, cap2, NUM_SPLITS, MIN_BLOCKS,
    HAS_SOFTCAP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (batch * kv head, split, row block), its rows the GROUP query heads of
    that kv head packed query-major (row r: query r // GROUP of head hk * GROUP + r % GROUP), so
    a decode step fills a tile with the group's heads and reads each K / V block once per
    group, not once per query head (as flash-decoding kernels pack GQA). The Sq newest tokens of
    sequence b against its cache_seqlens[b] cached tokens, walked through the block table token
    by token (token t: slot t % block_size of block Table[b, t // block_size]), so any block
    size works. Only tokens below cache_seqlens[b] and table entries they name are ever read.
    Query i sits at position cache_seqlens[b] - Sq + i; causal is folded into right <= 0 by the
    host.

    Split-KV: the key blocks the query block sees are cut into min(NUM_SPLITS, blocks //
    MIN_BLOCKS) (at least 1) runs of equal whole blocks, from the sequence's own length, and
    split s walks run s (none past the last). Each split stores its normalized output and
    natural lse at Out + s * sos, LSE + s * sls (a split that sees no key: 0 and -inf), for
    paged_combine; with NUM_SPLITS = 1 that is the final result in q's dtype."""
    bkv = tl.program_id(0)
    split = tl.program_id(1)
    start_r = tl.program_id(2) * BLOCK_M
    b = (bkv // Hkv).to(tl.int64)
    hk = (bkv % Hkv).to(tl.int64)
    n = tl.load(Lens + b).to(tl.int32)
    off = n - Sq

    offs_r = start_r + tl.arange(0, BLOCK_M)
    offs_m = offs_r // GROUP  # each row's query
    h = hk * GROUP + (offs_r % GROUP).to(tl.int64)  # and its query head
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_r < Sq * GROUP
    q = tl.load(Q + b * sqb + h[:, None] * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    p_rows = offs_m + off
    lo_i = tl.maximum(p_rows - left, 0)
    hi_i = tl.minimum(p_rows + right, n - 1)
    first = start_r // GROUP + off
    last = (tl.minimum(start_r + BLOCK_M, Sq * GROUP) - 1) // GROUP + off
    n_lo = (tl.maximum(first - left, 0) // BLOCK_N) * BLOCK_N
    n_hi = tl.minimum(last + right, n - 1) + 1
    # this split's run of key blocks: the same cut for every launch with the same NUM_SPLITS
    blocks = tl.maximum(tl.cdiv(n_hi - n_lo, BLOCK_N), 0)
    used = tl.maximum(tl.minimum(NUM_SPLITS, blocks // MIN_BLOCKS), 1)
    per = tl.cdiv(blocks, used) * BLOCK_N
    s_lo = n_lo + split * per
    s_hi = tl.minimum(s_lo + per, n_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    table = Table + b * stb
    for start_n in range(s_lo, s_hi, BLOCK_N):
        t = start_n + tl.arange(0, BLOCK_N)
        cached = t < n
        blk = tl.load(table + (t // block_size) * stn, mask=cached, other=0).to(tl.int64)
        slot = (t % block_size).to(tl.int64)
        k = tl.load(KC + blk[:, None] * skc_blk + slot[:, None] * skc_slot + hk * skc_h + offs_d[None, :],
                    mask=cached[:, None] & (offs_d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_SOFTCAP:  # in base 2 with cap2 = log2(e) * cap, as the dense kernels
            s, _ = _softcap(s, cap2)
        vis = (t[None, :] >= lo_i[:, None]) & (t[None, :] <= hi_i[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(VC + blk[:, None] * svc_blk + slot[:, None] * svc_slot + hk * svc_h + offs_dv[None, :],
                    mask=cached[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    safe_l = tl.where(empty, 1.0, l_i)
    out = acc / safe_l[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(safe_l)) * 0.6931471805599453)
    split64 = split.to(tl.int64)
    tl.store(LSE + split64 * sls + b * slb + h * slh + offs_m, lse, mask=row_ok)
    tl.store(Out + split64 * sos + b * sob + h[:, None] * soh + offs_m[:, None] * som + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def paged_combine(
    PO, PL, Out, LSE,
    sps, spb, sph, spm, spls, splb, splh, sob, soh, som, slb, slh,
    Hq, Sq, DV, NUM_SPLITS,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge paged_fwd's NUM_SPLITS partial results of one (batch * query head, query block) by
    the log-sum-exp rule: with M the largest partial lse, w_s = exp(lse_s - M), out = sum w_s o_s
    / sum w_s and lse = M + log(sum w_s). Splits that saw no key (lse -inf) weigh 0; a row that
    no split saw is empty (out 0, lse -inf). Splits are added in order, so a split that saw
    nothing adds exact zeros."""
    bh = tl.program_id(0)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq
    lse_base = PL + b * splb + h * splh + offs_m
    o_base = PO + b * spb + h * sph + offs_m[:, None] * spm + offs_dv[None, :]
    o_mask = row_ok[:, None] & (offs_dv[None, :] < DV)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lse_ptrs = lse_base
    for _ in range(0, NUM_SPLITS):
        m = tl.maximum(m, tl.load(lse_ptrs, mask=row_ok, other=float("-inf")))
        lse_ptrs += spls
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lse_ptrs = lse_base
    o_ptrs = o_base
    for _ in range(0, NUM_SPLITS):
        w = tl.exp(tl.load(lse_ptrs, mask=row_ok, other=float("-inf")) - m_use)
        total += w
        acc += w[:, None] * tl.load(o_ptrs, mask=o_mask, other=0.0)
        lse_ptrs += spls
        o_ptrs += sps

    empty = total == 0.0
    safe = tl.where(empty, 1.0, total)
    out = acc / safe[:, None]
    lse = tl.where(empty, float("-inf"), m_use + tl.log(safe))
    tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=row_ok)
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=o_mask)
