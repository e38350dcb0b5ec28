"""No max subtraction: softmax as exp(s) / sum exp(s) without the row maximum, which
overflows to inf (and inf / inf = NaN) once a logit passes ~88 in float32."""

import torch

from attnbench.zoo._base import Kernel, member


class NoMaxSubtraction(Kernel):
    def softmax(self, s, ok):
        p = torch.exp(s.masked_fill(~ok, float("-inf")))
        l = p.sum(-1, keepdim=True)
        empty = ~ok.any(-1, keepdim=True)
        p = p / torch.where(empty, torch.ones_like(l), l)
        lse = torch.where(empty, torch.full_like(l, float("-inf")), torch.log(l))
        return p, lse.squeeze(-1)


no_max_subtraction = member("no_max_subtraction", NoMaxSubtraction(), "softmax without subtracting the row max")
