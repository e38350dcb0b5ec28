"""lse in the wrong base: the kernel works with exp2 (as Triton kernels do) and returns the
base-2 logsumexp without converting it back to natural log."""

import math

from attnbench.zoo._base import Kernel, member


class LseBase2(Kernel):
    def softmax(self, s, ok):
        p, lse = super().softmax(s, ok)
        return p, lse * (1 / math.log(2))


lse_base2 = member("lse_base2", LseBase2(), "lse returned in base 2")
