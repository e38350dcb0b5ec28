"""ALiBi distances computed in bfloat16: |p(i) - j| is exact only up to 256 there (past it bfloat16
holds even integers only, past 512 multiples of 4), so far keys get a bias off by up to one
slope per step of rounding. Right for short sequences, wrong on every long one."""

import torch

from attnbench.zoo._base import FEATURES, Kernel, member


class AlibiDistanceBf16(Kernel):
    def alibi(self, slopes, cfg, Sq, Sk):
        i = torch.arange(Sq, device=slopes.device).view(Sq, 1) + self.offset(cfg, Sq, Sk)
        j = torch.arange(Sk, device=slopes.device).view(1, Sk)
        distance = (i - j).abs().to(torch.bfloat16).double()  # BUG: the distance rounded to bfloat16
        return -self.slopes(slopes).double()[:, :, None, None] * distance


alibi_distance_bf16 = member(
    "alibi_distance_bf16", AlibiDistanceBf16(), "ALiBi: key distances rounded to bfloat16 (wrong past 256)",
    features=FEATURES,
)
