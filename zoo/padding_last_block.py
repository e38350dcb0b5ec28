"""Key padding ignored in the last partial block: the mask is applied block by block
(blocks of 16 keys), and the tail block past the last full one is treated as unpadded."""

from attnbench.zoo._base import Kernel, member

BLOCK = 16


class PaddingLastBlock(Kernel):
    def padding(self, key_padding_mask):
        keep = key_padding_mask.bool().clone()
        full = (keep.shape[1] // BLOCK) * BLOCK
        keep[:, full:] = True
        return keep


padding_last_block = member(
    "padding_last_block", PaddingLastBlock(), "key padding ignored in the last partial key block"
)
