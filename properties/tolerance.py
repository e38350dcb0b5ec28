"""The tolerance rule: one rule for every implementation, quantity, dtype and device.

    error(x)   = max |x - oracle|                   (flash-attention tests' convention)
    allowed(x) = K[x] * error(reference impl)       (naive, same dtype, same device)
               + FLOOR[x] * FLOOR_ULPS[dtype] * eps(dtype) * max(1, max |oracle|)
    ratio      = error(impl) / allowed               (<= 1 passes)

The oracle is float64 on the same (rounded) inputs. The reference is the registry's naive
implementation of the variant (`registry().reference(variant)`), run on the same inputs, so
`K` says "at most K times as far from the truth as the obvious implementation" and the floor
keeps the rule meaningful when the reference happens to be exact.

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
K: dict[str, float] = {"out": 3.0, "lse": 3.0, "dq": 4.0, "dk": 4.0, "dv": 4.0, "dbias": 4.0, "dx": 4.0, "dw": 4.0}
# The floor per quantity, in units of FLOOR_ULPS[dtype] * eps(dtype) * max(1, max |oracle|).
FLOOR: dict[str, float] = {"out": 1.0, "lse": 1.0, "dq": 2.0, "dk": 2.0, "dv": 2.0, "dbias": 2.0, "dx": 2.0, "dw": 2.0}
# Per dtype, how many eps the floor is worth. In float16 / bfloat16 the rounding of inputs and
# outputs dominates every implementation's error and the naive reference measures it well, so
# the floor stays small (2 eps) and K does the work. In float64 (and nearly in float32) the
# naive reference performs the oracle's own arithmetic, so its error (often exactly 0)
# understates what a correct kernel with another summation order gets, and the floor carries
# the rule: 1024 eps is 2.3e-13 of the term magnitude in float64, room for any summation
# order with logits in the hundreds (softmax error grows like eps * |s|), yet far below what
# any real bug produces. float32's naive has rounding of its own; 16 eps covers the rest.
FLOOR_ULPS: dict[str, float] = {"float64": 1024.0, "float32": 16.0, "float16": 2.0, "bfloat16": 2.0}

EPS: dict[str, float] = {
    "float64": torch.finfo(torch.float64).eps,
    "float32": torch.finfo(torch.float32).eps,
    "float16": torch.finfo(torch.float16).eps,
    "bfloat16": torch.finfo(torch.bfloat16).eps,
}
QUANTITIES = tuple(K)


@dataclass(frozen=True)
class Verdict:
    quantity: str
    error: float  # max |impl - oracle| (inf when a non-finite value is wrong)
    allowed: float
    ratio: float  # error / allowed, the number reported
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0

    def message(self) -> str:
        text = (
            f"{self.quantity}: max error {self.error:.3g} > allowed {self.allowed:.3g} "
            f"(ratio {self.ratio:.3g}; allowed = K={K.get(self.quantity, '?')} x reference error "
            f"+ floor {FLOOR.get(self.quantity, '?')} x FLOOR_ULPS[dtype] x eps x magnitude)"
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
    """The allowed max error for `quantity` given the reference's own error."""
    _check_args(quantity, dtype)
    if not reference_error >= 0:
        raise ValueError(f"tolerance reference_error: must be >= 0, got {reference_error!r}")
    return K[quantity] * reference_error + FLOOR[quantity] * FLOOR_ULPS[dtype] * EPS[dtype] * max(1.0, scale)


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
    limit = allowed(quantity, ref_error, dtype, max(magnitude(oracle), scale or 0.0))
    error, why = max_error(actual, oracle)
    ratio = error / limit
    detail = why or f"reference error {ref_error:.3g}"
    return Verdict(quantity, error, limit, ratio, detail)


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
    return Verdict(quantity, error, limit, error / limit, why)


def term_scales(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    cfg,
    key_padding_mask: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> dict[str, float]:
    """The magnitude of the terms each quantity sums, in float64: the scale a correct
    kernel's rounding error is proportional to (a result can cancel to ~0 while its terms
    are large: a one-hot softmax has dq ~ 0, yet every FlashAttention-style backward rounds
    D_i = rowsum(dO * O) and carries eps * |D_i| * |scale| * |k| into dq).

    With P the softmax, dP = dO V^T, D_i = rowsum(P * dP) and A = P * (|dP| + |D|):
    out: max P|V| · lse: max |s| over visible logits · dv: max P^T|dO| ·
    dq: |scale| max A|K| · dk: |scale| max A^T|Q| · dbias: max A (summed to the bias shape).
    """
    from attnbench.oracles.dense import visible

    f64 = dict(dtype=torch.float64, device="cpu")
    q, k, v, do = (t.detach().to(**f64) for t in (q, k, v, grad_out))
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = cfg.scale * (q @ k.transpose(-1, -2))
    if bias is not None:
        s = s + bias.detach().to(**f64)
    vis = visible(B, Sq, Sk, causal=cfg.causal, window=cfg.window, block=cfg.block, align=cfg.align,
                  key_padding_mask=key_padding_mask)[:, None] & (s > -math.inf)
    s = torch.where(vis, s, torch.zeros((), **f64))
    m = torch.where(vis, s, torch.full((), -math.inf, **f64)).amax(-1, keepdim=True).clamp_min(-1e300)
    p = torch.where(vis, torch.exp(s - m), torch.zeros((), **f64))
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    dp = do @ v.transpose(-1, -2)
    d = (p * dp).sum(-1, keepdim=True)
    a = p * (dp.abs() + d.abs())

    def top(t: torch.Tensor) -> float:
        return float(t.max()) if t.numel() else 0.0

    def grouped(t: torch.Tensor) -> torch.Tensor:  # (B, Hq, Sk, E) -> (B, Hkv, Sk, E)
        return t.view(B, Hkv, Hq // Hkv, *t.shape[2:]).sum(2)

    scales = {
        "out": top(p @ v.abs()),
        "lse": top(torch.where(vis, s.abs(), torch.zeros((), **f64))),
        "dv": top(grouped(p.transpose(-1, -2) @ do.abs())),
        "dq": abs(cfg.scale) * top(a @ k.abs()),
        "dk": abs(cfg.scale) * top(grouped(a.transpose(-1, -2) @ q.abs())),
    }
    if bias is not None:
        scales["dbias"] = top(a.sum_to_size(bias.shape))
    return scales
