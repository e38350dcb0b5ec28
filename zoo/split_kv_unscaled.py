"""A split-KV path for long key sequences (more than 1024 keys, as kernels switch to for
decoding): the keys are cut in two halves, each half's softmax is taken against its own row
maximum, and the halves are merged by their partial sums without rescaling them to a common
maximum. Right for 1024 keys or fewer."""

import torch

from attnbench.zoo._base import Kernel, member

THRESHOLD = 1024


class SplitKvUnscaled(Kernel):
    def softmax(self, s, ok):
        if s.shape[-1] <= THRESHOLD:
            return super().softmax(s, ok)
        s = s.masked_fill(~ok, float("-inf"))
        half = s.shape[-1] // 2
        parts, sums = [], []
        for part in (s[..., :half], s[..., half:]):
            m = part.amax(-1, keepdim=True)
            m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
            p = torch.exp(part - m)
            parts.append(p)
            sums.append(p.sum(-1, keepdim=True))
        l = sums[0] + sums[1]  # BUG: partial sums against different maxima, never rescaled
        empty = l == 0
        p = torch.cat(parts, dim=-1) / torch.where(empty, torch.ones_like(l), l)
        m = s.amax(-1, keepdim=True)
        lse = torch.where(empty, torch.full_like(l, float("-inf")), torch.log(l) + torch.where(empty, 0, m))
        return p, lse.squeeze(-1)


split_kv_unscaled = member(
    "split_kv_unscaled", SplitKvUnscaled(), "long keys: split-KV halves merged without rescaling to one maximum"
)
