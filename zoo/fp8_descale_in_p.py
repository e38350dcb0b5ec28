"""fp8: the value descale folded into the probabilities before they are rounded to e4m3, so
P * v_descale (about amax(v) / 448, far below 1) falls into e4m3's subnormals, a few steps of
2^-9: most probabilities round to 0 or to a step, and the output loses most of its digits (no
NaN, no inf: just wrong). The descale belongs on the float32 accumulator. Right without fp8."""

import torch

import attnbench.impls.naive as _naive
from attnbench.zoo._base import Kernel, member

FP8 = torch.float8_e4m3fn
# what a forward-only fp8 kernel (FA3 / FA4's) declares: no backward, bias or dropout
FP8_FEATURES = frozenset({"causal", "sliding_window", "gqa", "cross", "key_padding", "dv", "lse", "deterministic",
                          "fp8"})


class DescaleInP(Kernel):
    def __call__(self, q, k, v, cfg, key_padding_mask=None, bias=None, *, q_descale=None, k_descale=None,
                 v_descale=None, **score):
        if q.dtype != FP8:
            return super().__call__(q, k, v, cfg, key_padding_mask, bias, **score)
        B, Hq, Sq, _ = q.shape
        Sk = k.shape[2]
        k, v = (self.expand(t.to(torch.float32), Hq // k.shape[1]) for t in (k, v))
        logit_scale = cfg.scale * _naive._per_head(q_descale, B, Hq) * _naive._per_head(k_descale, B, Hq)
        s = (q.to(torch.float32) @ k.transpose(-1, -2)) * logit_scale
        p, lse = self.softmax(s, self.visible(cfg, B, Sq, Sk, key_padding_mask, q.device))
        p8 = (p * _naive._per_head(v_descale, B, Hq)).to(FP8)  # BUG: the descale scales P before its rounding
        return (p8.to(torch.float32) @ v).to(torch.bfloat16), lse


fp8_descale_in_p = member(
    "fp8_descale_in_p", DescaleInP(), "fp8: v_descale folded into P before P is rounded to e4m3 (it underflows)",
    features=FP8_FEATURES,
)
