"""Top-left instead of bottom-right causal alignment when Sq != Sk: query i is placed at
position i whatever the key count (what torch SDPA's is_causal does), so a decoding query
(Sq = 1) sees only the first key of the cache."""

from attnbench.zoo._base import Kernel, member


class CausalTopLeft(Kernel):
    def offset(self, cfg, Sq, Sk):
        return 0


causal_top_left = member(
    "causal_top_left", CausalTopLeft(), "top-left instead of bottom-right alignment when Sq != Sk"
)
