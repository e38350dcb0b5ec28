"""Mask polarity inverted: key_padding_mask read as True = masked (the convention of
torch.nn.MultiheadAttention's key_padding_mask) where the contract says True = keep."""

from attnbench.zoo._base import Kernel, member


class MaskPolarity(Kernel):
    def padding(self, key_padding_mask):
        return ~key_padding_mask.bool()


mask_polarity = member("mask_polarity", MaskPolarity(), "key padding mask polarity inverted (True = masked)")
