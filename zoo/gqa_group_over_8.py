"""Grouped heads handled eight query heads per kv head at a time: in a group of more than 8,
the query heads past the eighth get the eighth's output (a per-program head loop that stops
at 8). Right for groups of 8 or fewer."""

import torch

from attnbench.zoo._base import Kernel, member

MAX_GROUP = 8


class GqaGroupOver8(Kernel):
    def __call__(self, q, k, v, cfg, key_padding_mask=None, bias=None):
        out, lse = super().__call__(q, k, v, cfg, key_padding_mask, bias)
        group = q.shape[1] // k.shape[1]
        if group <= MAX_GROUP:
            return out, lse
        h = torch.arange(q.shape[1], device=q.device)
        first = h - h % group
        src = torch.where(h % group < MAX_GROUP, h, first + MAX_GROUP - 1)  # BUG: heads past 8 repeat the 8th
        return out[:, src], lse[:, src]


gqa_group_over_8 = member(
    "gqa_group_over_8", GqaGroupOver8(), "GQA groups over 8: query heads past the eighth repeat its output"
)
