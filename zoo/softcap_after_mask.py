"""Soft cap applied after the mask: the masked scores are filled with a large negative number
first and capped afterwards, so every masked key gets the finite logit -softcap and a share of
the softmax (no NaN, no inf: just wrong). Right without masks."""

import torch

from attnbench.zoo._base import FEATURES, Kernel, member

MASKED = -1e4  # the "large negative number" a kernel fills masked scores with


class SoftcapAfterMask(Kernel):
    capped = False  # whether the call being run has a cap (set per call; calls run one at a time)

    def __call__(self, q, k, v, cfg, key_padding_mask=None, bias=None, **score):
        self.capped = cfg.softcap is not None
        return super().__call__(q, k, v, cfg, key_padding_mask, bias, **score)

    def softcap(self, s, cap, ok):
        if cap is None:
            return s
        return cap * torch.tanh(s.masked_fill(~ok, MASKED) / cap)  # BUG: masked keys become -cap

    def softmax(self, s, ok, sink=None):
        if self.capped:  # the mask was folded into the scores before the cap, so it is not applied again
            ok = torch.ones_like(ok)
        return super().softmax(s, ok, sink)


softcap_after_mask = member(
    "softcap_after_mask", SoftcapAfterMask(), "soft cap applied after the mask: masked keys get the logit -softcap",
    features=FEATURES,
)
