"""Declares "deterministic" but is not: P @ V is summed over key blocks in a different
order each call (what atomic adds across thread blocks do), so runs differ in the last bits."""

import torch

from attnbench.zoo._base import Kernel, member

BLOCK = 2


class NondeterministicSum(Kernel):
    def combine(self, p, v):
        p = p.to(torch.float32 if v.dtype != torch.float64 else v.dtype)
        vf = v.to(p.dtype)
        acc = torch.zeros(*p.shape[:-1], v.shape[-1], dtype=p.dtype, device=v.device)
        starts = list(range(0, p.shape[-1], BLOCK))
        for idx in torch.randperm(len(starts)).tolist():
            j = starts[idx]
            acc = acc + p[..., j : j + BLOCK] @ vf[..., j : j + BLOCK, :]
        return acc.to(v.dtype)


nondeterministic_sum = member(
    "nondeterministic_sum", NondeterministicSum(), "claims deterministic, sums key blocks in a random order"
)
