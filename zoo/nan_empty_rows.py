"""NaN on empty rows: a plain softmax over a row whose logits are all -inf gives
exp(-inf - -inf) = NaN instead of out = 0, lse = -inf."""

import torch

from attnbench.zoo._base import Kernel, member


class NanEmptyRows(Kernel):
    def softmax(self, s, ok):
        s = s.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        return torch.softmax(s, dim=-1), lse


nan_empty_rows = member("nan_empty_rows", NanEmptyRows(), "fully masked rows give NaN instead of 0")
