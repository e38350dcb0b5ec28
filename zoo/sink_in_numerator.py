"""The attention sink counted as a key: its exp() is added to the denominator and also to
the first visible key's weight (a sink stored as an extra key 0 that was given key 0's value).
Right without sinks."""

import torch

from attnbench.zoo._base import FEATURES, Kernel, member


class SinkInNumerator(Kernel):
    def softmax(self, s, ok, sink=None):
        p, lse = super().softmax(s, ok, sink)
        if sink is None:
            return p, lse
        first = (ok.cumsum(-1) == 1) & ok  # each row's first visible key
        share = torch.exp(sink - lse[..., None])  # the sink's probability
        return p + torch.where(first, share, torch.zeros((), dtype=p.dtype, device=p.device)), lse  # BUG


sink_in_numerator = member(
    "sink_in_numerator", SinkInNumerator(), "attention sink counted in the numerator (its weight on key 0's value)",
    features=FEATURES,
)
