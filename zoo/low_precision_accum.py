"""Low-precision accumulation: P @ V summed block by block (4 keys at a time) into a
bfloat16 accumulator whatever the input dtype, as a kernel with a hard-coded half-precision
accumulator (or TF32-style downcasting) does to float32 inputs."""

import torch

from attnbench.zoo._base import Kernel, member

BLOCK = 4


class LowPrecisionAccum(Kernel):
    def combine(self, p, v):
        low = torch.bfloat16
        acc = torch.zeros(*p.shape[:-1], v.shape[-1], dtype=low, device=v.device)
        for j in range(0, p.shape[-1], BLOCK):
            acc = acc + (p[..., j : j + BLOCK].to(low) @ v[..., j : j + BLOCK, :].to(low))
        return acc.to(v.dtype)


low_precision_accum = member(
    "low_precision_accum", LowPrecisionAccum(), "P @ V accumulated in bfloat16 across key blocks"
)
