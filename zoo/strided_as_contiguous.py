"""Strided inputs read as if contiguous: the kernel indexes q, k and v with the strides of a
contiguous (B, H, S, D) tensor, ignoring the tensor's own strides (a (B, S, H, D) view, a slice
of a packed qkv projection, a window of a KV cache or an expanded K/V). Right for contiguous
inputs only."""

import torch

from attnbench.zoo._base import Kernel, member


def as_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t's storage from its offset on, read with contiguous strides (what a kernel computing
    offsets as ((b * H + h) * S + s) * D + d does)."""
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.insert(0, step)
        step *= size
    return torch.as_strided(t, t.shape, strides, t.storage_offset())


class StridedAsContiguous(Kernel):
    def __call__(self, q, k, v, cfg, key_padding_mask=None, bias=None):
        return super().__call__(as_contiguous(q), as_contiguous(k), as_contiguous(v), cfg, key_padding_mask, bias)


strided_as_contiguous = member(
    "strided_as_contiguous", StridedAsContiguous(), "strided q, k, v read with contiguous strides"
)
