"""The tolerance rule: one rule for every implementation, quantity, dtype and device.

    error(x)   = max |x - oracle|                   (flash-attention tests' convention)
    allowed(x) = K[x] * error(reference impl)       (naive, same dtype, same device)
               + ULPS[x] * eps(dtype) * scale(x)    (the error model of a correct kernel)
    ratio      = error(impl) / allowed               (<= 1 passes)

The oracle is float64 on the same (rounded) inputs. The reference is the registry's naive
implementation of the variant (`registry().reference(variant)`), run on the same inputs.

Why two terms. The reference term says "at most K times as far from the truth as the obvious
implementation"; it measures what the dtype's own rounding costs (in float16 / bfloat16 the
rounding of p and of the output dominates every kernel's error, and naive has the same). But
naive's error is one sample of one valid order of operations: where its rounding happens to
cancel, any other valid order is many times further from the oracle (scale-first
`(q * scale) @ k^T` was 0.29-4.1x naive's error over twelve seeds; a lone visible key gives
naive p = 1 exactly). So the rule does not rest on it: the second term bounds what any correct
order of operations costs, from the inputs alone, and alone passes every correct ordering.

The error model (`scale(x)`, computed by `term_scales` in float64; without it the oracle's
magnitude, at least 1). A correct kernel rounds in two places that matter:

1. the terms it sums into x: a few roundings of each, so an error of a few eps times the
   terms' magnitude T(x) (out: max P|V|; lse: max |s|; dv: max P^T|dO|; dq, dk, dbias: the
   softmax backward's terms, see `term_scales`). A result can cancel to ~0 while its terms are
   large, so T(x) is taken over the terms, not the result.
2. the logits: s_ij = scale * sum_d q_id k_jd (+ bias) is rounded at least once per product
   and sum, in whatever order the kernel picks (scale first or last, in base 2 with log2(e)
   folded in, in the input dtype or in float32), so a valid kernel's logit can be off by
   ~eps * L, with L = max over visible (i, j) of |scale| sum_d |q_id k_jd| + |bias_ij|. The
   softmax is shift invariant, so a logit error d_ij moves p_ij by p_ij (d_ij - sum_k p_ik d_ik):
   at most 2 eps L p_ij. Propagated to first order: out and dv by 2 eps L T(x), lse by eps L,
   dq / dk / dbias by about 4 eps L T(x) (p enters ds = p (dP - D) twice). With logits in the
   hundreds (magnitude 8) this term is 100x the first; the old rule had no such term and
   scaled its floor by 1024 eps in float64 to make up for it.

So scale(x) = T(x) + (LOGIT_GAIN[x] / ULPS[x]) * L * G(x), G(x) = T(x) except G(lse) = 1, and
the same constants hold for every dtype: eps carries the dtype (in float16 / bfloat16 a valid
kernel may round the logits or q * scale in the input dtype, as PyTorch's math backend does).

Calibration (python -m attnbench.properties.calibrate; evidence/tolerance_calibration.json):
four independently written correct orderings (properties/orderings.py), 752 distinct drawn
specs per dtype (float32, float16, bfloat16, float64), forward and backward: 69,000 verdicts,
no false alarm, the worst ratio 0.34 (float64 lse), 0.21 in float32 (the error model alone,
without the reference term, stays under 0.38). The old rule (3x naive + 2 to 1024 eps of the
terms) raised 8 false alarms on the same runs, all scale-first. Every zoo member is still
caught under the ci profile (tests/test_zoo.py). The constants are the first-order bounds
above with a factor 2 for a logit's own rounding (its products and sums, more than one eps),
and 4 eps per term (8 for gradients, which multiply two rounded factors).

The score features (soft cap, ALiBi slopes, sinks; `term_magnitudes` says how each enters the
model) were calibrated the same way with every spec using all three (`calibrate --use softcap
alibi sinks`, evidence/tolerance_calibration_score_features.json): 1560 distinct specs, the four
orderings extended with the features (exp2_folded folds log2(e) into the cap, slopes and
sinks; online adds the sink as a last block and carries d sink and the cap's derivative in its
hand-written backward), no false alarm, the worst ratio 0.28 (float64 lse).

fp8 (float8_e4m3fn q, k, v with descales, bfloat16 out; the rule's dtype FP8). The oracle is
float64 attention on the dequantized values; the reference is naive's fp8 path, which rounds where
FA3 / FA4 do (logits from the exact fp8 products in float32, the softmax in float32, the
unnormalized probabilities rounded to e4m3 before P @ V, the output to bfloat16). The error model
(`fp8_scales`, an absolute allowance: `model` takes it as it is) puts each rounding at its own eps:
out: FP8_P_ULPS eps(e4m3) T(out) (a probability rounded to e4m3 is off by at most half an e4m3
eps, 2^-4, in e4m3's normal range) + ULPS eps(bf16) T(out) (the output's rounding) + LOGIT_GAIN
eps_acc L T(out) (the logits); lse: ULPS eps(fp32) T(lse) + LOGIT_GAIN eps_acc L, the statistics
being float32. eps_acc (`fp8_logit_eps`) is the logits' accumulation error on fp8 tensor cores,
2^-13 per 32 products: Hopper keeps about 14 bits while it sums fp8 products, and a kernel
that leaves the accumulation there (Triton's default on Hopper, FA3's) has logits that far off
float32's (measured on an H200: lse off by up to 2^-12.96 L; with float32 logits the rule
allowed 2^-22 L and raised false alarms of 7-207x on a correct kernel). T and L are those of
the dequantized values, T at least 1 as above.
Calibrated (`calibrate --fp8 --cases 400`, evidence/tolerance_calibration_fp8.json): 391 distinct
fp8 specs at the GPU's sizes (up to 300 keys, one draw in 8 up to 4097), three orderings written
apart from naive (orderings.FP8_ORDERINGS: P kept in bfloat16 with dequantize-first logits; FA3's
online loop in base 2 with P in e4m3 against the running max; P normalized before its e4m3
rounding, V dequantized first), no false alarm, the worst ratio 0.46 (out, P normalized, 1535
keys at scale 0: every probability an e4m3 subnormal) and 0.34 (lse). The broken kernel of the
zoo's fp8_descale_in_p (v_descale folded into P before its rounding) exceeds the rule on 137 of
the 391 specs (worst ratio 8.2; 193 before the accumulation term, which covers it where logits
are large); under ci it is also caught bit for bit by the exact doubling of
v_descale (properties/test_fp8.py).

Non-finite values are never tolerated: a NaN anywhere in the result, a non-finite value where
the oracle is finite, or an infinity where the oracle differs (lse is -inf on empty rows and
must be exactly -inf there) makes the ratio infinite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# How many times the reference's error an implementation may have, per quantity.
# dx / dw: a seed module's gradients with respect to its input and to each of its parameters.
K: dict[str, float] = {"out": 3.0, "lse": 3.0, "dq": 4.0, "dk": 4.0, "dv": 4.0, "dbias": 4.0, "dsinks": 4.0, "dx": 4.0,
                       "dw": 4.0}
# The error model's roundings of the terms, in eps of the dtype, per quantity (term 1 above).
# dx / dw (modules) get no term scales from their properties, only the oracle's magnitude, and
# their chain (projections of length dim, the softmax, the output projection) rounds more terms
# than one attention call: 64 eps. Measured: FlashAttentionTwo on blockwise, float32, N=1,
# bucket size 1, dx / dw 22 eps off a float64 oracle of magnitude 1 while naive was exact (a
# correct kernel in another order; the ci run of the merged suite at f70043d). dw sums one term
# per token of either sign, so its terms are about sqrt(B N) times the sum: its scale is that
# times the magnitude (properties/test_modules.py) and its constant 32 (64 at B N = 4). Measured:
# the same module, float64, B=2 N=12, dw 72 eps off max |dw| < 1 with naive exact, a false
# alarm at 64 eps of the sum alone (fresh-clone CI, 2026-12-03).
ULPS: dict[str, float] = {"out": 4.0, "lse": 4.0, "dq": 8.0, "dk": 8.0, "dv": 8.0, "dbias": 8.0, "dsinks": 8.0, "dx": 64.0,
                          "dw": 32.0}
# The error model's logit term (term 2 above): eps * L moves x by LOGIT_GAIN * eps * L * G(x).
# 2 eps L per logit (two roundings) times the first-order gains 1 (lse), 2 (out, dv), 4 (dq, dk, dbias).
LOGIT_GAIN: dict[str, float] = {"out": 4.0, "lse": 2.0, "dq": 8.0, "dk": 8.0, "dv": 4.0, "dbias": 8.0, "dsinks": 8.0}

EPS: dict[str, float] = {
    "float64": torch.finfo(torch.float64).eps,
    "float32": torch.finfo(torch.float32).eps,
    "float16": torch.finfo(torch.float16).eps,
    "bfloat16": torch.finfo(torch.bfloat16).eps,
}
FP8 = "float8_e4m3fn"  # the rule's dtype for fp8 calls (bfloat16 out)
EPS[FP8] = 2.0**-3  # e4m3: 3 mantissa bits
FP8_P_ULPS = 0.5  # e4m3 eps per unit of T(out): the worst rounding of the probabilities, half an eps
QUANTITIES = tuple(K)


@dataclass(frozen=True)
class Verdict:
    quantity: str
    error: float  # max |impl - oracle| (inf when a non-finite value is wrong)
    allowed: float
    ratio: float  # error / allowed, the number reported
    detail: str = ""
    fp8: bool = False  # judged under the fp8 model (its allowance is absolute: fp8_scales)

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0

    def message(self) -> str:
        model_text = "the fp8 model's allowance" if self.fp8 else (
            f"{ULPS.get(self.quantity, '?')} x eps x scale, the error model's")
        text = (
            f"{self.quantity}: max error {self.error:.3g} > allowed {self.allowed:.3g} "
            f"(ratio {self.ratio:.3g}; allowed = K={K.get(self.quantity, '?')} x reference error "
            f"+ {model_text})"
        )
        return f"{text}; {self.detail}" if self.detail else text

    def require(self) -> float:
        """Raise AssertionError with the measured numbers unless the rule holds."""
        if not self.ok:
            raise AssertionError(self.message())
        return self.ratio


def _check_args(quantity: str, dtype: str) -> None:
    if quantity not in K:
        raise ValueError(f"tolerance quantity: unknown {quantity!r}; one of {QUANTITIES}")
    if dtype not in EPS:
        raise ValueError(f"tolerance dtype: unknown {dtype!r}; one of {sorted(EPS)}")


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, str]:
    """max |actual - expected| in float64 with the non-finite rules; (error, why-if-inf)."""
    if not isinstance(actual, torch.Tensor):
        raise TypeError(f"tolerance actual: expected a tensor, got {type(actual).__name__}")
    if tuple(actual.shape) != tuple(expected.shape):
        return math.inf, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    if a.numel() == 0:
        return 0.0, ""
    nan = torch.isnan(a)
    if nan.any():
        return math.inf, f"NaN at {_where(nan)}"
    finite = torch.isfinite(e)
    wrong_inf = finite & ~torch.isfinite(a)
    if wrong_inf.any():
        return math.inf, f"non-finite where the oracle is finite at {_where(wrong_inf)}"
    inf_mismatch = ~finite & (a != e)
    if inf_mismatch.any():
        return math.inf, f"oracle is {e[inf_mismatch][0].item()} but got {a[inf_mismatch][0].item()} at {_where(inf_mismatch)}"
    if not finite.any():
        return 0.0, ""
    diff = (a - e).abs()[finite]
    return float(diff.max()), ""


def _where(mask: torch.Tensor) -> str:
    idx = mask.nonzero()
    first = tuple(int(i) for i in idx[0])
    return f"index {first} ({len(idx)} of {mask.numel()} entries)"


def magnitude(expected: torch.Tensor) -> float:
    e = expected.detach().to(dtype=torch.float64)
    finite = e[torch.isfinite(e)]
    return max(1.0, float(finite.abs().max())) if finite.numel() else 1.0


def allowed(quantity: str, reference_error: float, dtype: str, scale: float = 1.0) -> float:
    """The allowed max error for `quantity` given the reference's own error and the error
    model's scale (`term_scales`; at least 1)."""
    _check_args(quantity, dtype)
    if not reference_error >= 0:
        raise ValueError(f"tolerance reference_error: must be >= 0, got {reference_error!r}")
    return K[quantity] * reference_error + model(quantity, dtype, scale)


def model(quantity: str, dtype: str, scale: float = 1.0) -> float:
    """What a correct kernel's rounding may cost on `quantity`, whatever its order of operations.
    For FP8, `scale` is that cost already (fp8_scales)."""
    _check_args(quantity, dtype)
    if dtype == FP8:
        return scale
    return ULPS[quantity] * EPS[dtype] * max(1.0, scale)


def compare(
    quantity: str,
    actual: torch.Tensor,
    oracle: torch.Tensor,
    reference: torch.Tensor,
    dtype: str,
    scale: float | None = None,
) -> Verdict:
    """Judge `actual` against the float64 `oracle`, given the reference impl's result.

    scale: the magnitude the floor is relative to (see `term_scales`); default max |oracle|.
    """
    _check_args(quantity, dtype)
    ref_error, ref_why = max_error(reference, oracle)
    if not math.isfinite(ref_error):
        # The rule measures against the reference; a spec on which the reference itself is
        # not finite is outside the rule's domain, and the strategy that drew it is wrong.
        raise AssertionError(f"{quantity}: the reference implementation itself fails here ({ref_why})")
    if dtype == FP8 and scale is None:
        raise ValueError("tolerance scale: an fp8 comparison needs the error model's allowance (fp8_scales)")
    limit = allowed(quantity, ref_error, dtype, scale if dtype == FP8 else max(magnitude(oracle), scale or 0.0))
    error, why = max_error(actual, oracle)
    ratio = error / limit
    detail = why or f"reference error {ref_error:.3g}"
    return Verdict(quantity, error, limit, ratio, detail, fp8=dtype == FP8)


def compare_runs(
    quantity: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    reference_error: float,
    dtype: str,
    scale: float = 1.0,
) -> Verdict:
    """Judge two runs of the same implementation that should agree (an invariance): each
    may be off the oracle by `allowed`, so they may differ from each other by twice that."""
    _check_args(quantity, dtype)
    limit = 2.0 * allowed(quantity, reference_error, dtype, scale)
    error, why = max_error(actual, expected)
    if torch.isnan(expected.detach()).any():
        error, why = math.inf, f"NaN in the run compared against at {_where(torch.isnan(expected.detach().cpu()))}"
    return Verdict(quantity, error, limit, error / limit, why, fp8=dtype == FP8)


def term_scales(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    cfg,
    key_padding_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> dict[str, float]:
    """The error model's scale per quantity (what `compare` takes as `scale`): the terms'
    magnitude T(x) plus the logits' term, as the module docstring derives; "logits" holds L."""
    terms, logits = term_magnitudes(q, k, v, grad_out, cfg, key_padding_mask, bias, alibi_slopes, sinks)
    return {**{name: scale_of(name, t, logits) for name, t in terms.items()}, "logits": logits}


def scale_of(quantity: str, terms: float, logits: float) -> float:
    """scale(x) = T(x) + (LOGIT_GAIN[x] / ULPS[x]) * L * G(x), with G(lse) = 1, else T(x)."""
    t = max(1.0, terms)
    gain = 1.0 if quantity == "lse" else t
    return t + LOGIT_GAIN[quantity] / ULPS[quantity] * logits * gain


def term_magnitudes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    cfg,
    key_padding_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[dict[str, float], float]:
    """T(x), the magnitude of the terms each quantity sums, and L, the magnitude of the terms
    each logit sums; in float64. T is taken over the terms because a result can cancel to ~0
    while its terms are large: a one-hot softmax has dq ~ 0, yet every FlashAttention-style
    backward rounds D_i = rowsum(dO * O) and carries eps * |D_i| * |scale| * |k| into dq.

    With P the softmax, dP = dO V^T, D_i = rowsum(P * dP) and A = P * (|dP| + |D|):
    out: max P|V| · lse: max |s| over visible logits · dv: max P^T|dO| ·
    dq: |scale| max A|K| · dk: |scale| max A^T|Q| · dbias: max A (summed to the bias shape) ·
    dsinks: max over heads of sum over (b, i) of P_sink |dO_i| . |O_i| (the rounded D_i of each row).
    L: max over visible (i, j) of |scale| sum_d |q_id k_jd| + |bias_ij| + |alibi_ij|.

    The score features. A soft cap s -> cap * tanh(s / cap) is 1-Lipschitz: a rounding error d
    in the scaled logit leaves at most |d| in the capped one, and tanh's own rounding is eps
    times |cap * tanh(s / cap)| <= |s|; so L (taken before the cap) still bounds the logit error,
    while P, |s| and the terms come from the capped logits, as the kernel sums them. Its backward
    multiplies dS by 1 - tanh^2 <= 1, so A bounds dq and dk unchanged. ALiBi is a bias computed in
    the kernel: its magnitude joins L like a bias's. A sink joins each row's denominator: P is
    normalized over the visible keys and the sink, and |sink| joins lse's terms.
    """
    from attnbench.oracles.dense import alibi_bias, visible

    f64 = dict(dtype=torch.float64, device="cpu")
    q, k, v, do = (t.detach().to(**f64) for t in (q, k, v, grad_out))
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = cfg.scale * (q @ k.transpose(-1, -2))
    if getattr(cfg, "softcap", None) is not None:
        s = cfg.softcap * torch.tanh(s / cfg.softcap)
    s_terms = abs(cfg.scale) * (q.abs() @ k.abs().transpose(-1, -2))
    if bias is not None:
        b = bias.detach().to(**f64)
        s = s + b
        s_terms = s_terms + torch.where(torch.isfinite(b), b.abs(), torch.zeros((), **f64))
    if alibi_slopes is not None:
        b = alibi_bias(alibi_slopes, Sq, Sk, cfg.align)
        s = s + b
        s_terms = s_terms + b.abs()
    vis = visible(B, Sq, Sk, causal=cfg.causal, window=cfg.window, block=cfg.block, align=cfg.align,
                  key_padding_mask=key_padding_mask)[:, None] & (s > -math.inf)
    s = torch.where(vis, s, torch.zeros((), **f64))
    m = torch.where(vis, s, torch.full((), -math.inf, **f64)).amax(-1, keepdim=True).clamp_min(-1e300)
    sink = None if sinks is None else sinks.detach().to(**f64).view(1, Hq, 1, 1)
    if sink is not None:
        m = torch.maximum(m, sink)
    p = torch.where(vis, torch.exp(s - m), torch.zeros((), **f64))
    denom = p.sum(-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - m)
    p = p / denom.clamp_min(1e-300)
    dp = do @ v.transpose(-1, -2)
    d = (p * dp).sum(-1, keepdim=True)
    a = p * (dp.abs() + d.abs())

    def top(t: torch.Tensor) -> float:
        return float(t.max()) if t.numel() else 0.0

    def grouped(t: torch.Tensor) -> torch.Tensor:  # (B, Hq, Sk, E) -> (B, Hkv, Sk, E)
        return t.view(B, Hkv, Hq // Hkv, *t.shape[2:]).sum(2)

    lse_terms = torch.where(vis, s.abs(), torch.zeros((), **f64))
    if sink is not None:
        lse_terms = torch.maximum(lse_terms.amax(-1, keepdim=True) if Sk else sink.abs(), sink.abs())
    terms = {
        "out": top(p @ v.abs()),
        "lse": top(lse_terms),
        "dv": top(grouped(p.transpose(-1, -2) @ do.abs())),
        "dq": abs(cfg.scale) * top(a @ k.abs()),
        "dk": abs(cfg.scale) * top(grouped(a.transpose(-1, -2) @ q.abs())),
    }
    if bias is not None:
        terms["dbias"] = top(a.sum_to_size(bias.shape))
    if sink is not None:  # d sink = -sum over (b, i) of P_sink * (dO_i . O_i)
        p_sink = (torch.exp(sink - m) / denom.clamp_min(1e-300)).squeeze(-1)  # (B, Hq, Sq)
        o_abs = p @ v.abs()
        terms["dsinks"] = top((p_sink * (do.abs() * o_abs).sum(-1)).sum((0, 2)))
    logits = top(torch.where(vis, s_terms, torch.zeros((), **f64)))
    return terms, logits


def fp8_logit_eps(head_dim: int) -> float:
    """The relative error of an fp8 logit q . k as fp8 tensor cores accumulate it: about 14
    significant bits per accumulation step (DeepSeek-V3 technical report, 3.3.2, on Hopper's FP8
    GEMM), one step per 32 products (one k32 MMA instruction), so 2^-13 per ceil(D / 32) steps.
    Measured on an H200 (Triton's tl.dot on e4m3, its default imprecise accumulation): lse off by
    up to 2^-12.96 L at D = 64 and 2^-13.9 L at D = 128, where float32 logits allowed 2^-22 L
    (evidence/h200/features-2026-12-03/gpu_units.txt)."""
    return 2.0**-13 * max(1, math.ceil(head_dim / 32))


def fp8_scales(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg, key_padding_mask: torch.Tensor | None,
               q_descale: torch.Tensor | None = None, k_descale: torch.Tensor | None = None,
               v_descale: torch.Tensor | None = None) -> dict[str, float]:
    """The fp8 error model's allowance for out and lse (the module docstring), from the
    dequantized inputs; "logits" holds L."""
    from attnbench.oracles.dense import dequantize

    q, k, v = (dequantize(t.detach(), d) for t, d in ((q, q_descale), (k, k_descale), (v, v_descale)))
    zeros = torch.zeros((*q.shape[:3], v.shape[3]), dtype=torch.float64)
    terms, logits = term_magnitudes(q, k, v, zeros, cfg, key_padding_mask, None)
    eps32, bf16 = EPS["float32"], EPS["bfloat16"]
    acc = fp8_logit_eps(q.shape[-1])
    t_out, t_lse = max(1.0, terms["out"]), max(1.0, terms["lse"])  # at least 1, as scale_of takes them
    return {
        "out": (FP8_P_ULPS * EPS[FP8] + ULPS["out"] * bf16 + LOGIT_GAIN["out"] * acc * logits) * t_out,
        "lse": ULPS["lse"] * eps32 * t_lse + LOGIT_GAIN["lse"] * acc * logits,
        "logits": logits,
    }
