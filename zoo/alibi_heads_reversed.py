"""ALiBi slopes in reversed head order: head h gets the slope of head Hq - 1 - h (a slope
table built from the smallest slope up). Right for one head, or slopes symmetric in h."""

from attnbench.zoo._base import FEATURES, Kernel, member


class AlibiHeadsReversed(Kernel):
    def slopes(self, slopes):
        return super().slopes(slopes).flip(-1)  # BUG: reversed head order


alibi_heads_reversed = member(
    "alibi_heads_reversed", AlibiHeadsReversed(), "ALiBi slopes applied in reversed head order", features=FEATURES,
)
