"""Padding of batch element 0 applied to every batch element (the mask indexed [0] or
broadcast from (1, Sk)), so each sequence is cut at the first one's length."""

from attnbench.zoo._base import Kernel, member


class PaddingBatch0(Kernel):
    def padding(self, key_padding_mask):
        keep = key_padding_mask.bool()
        return keep[:1].expand_as(keep)


padding_batch0 = member("padding_batch0", PaddingBatch0(), "key padding of batch 0 used for every batch element")
