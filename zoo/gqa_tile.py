"""Grouped heads expanded by tiling (repeat) instead of interleaving (repeat_interleave):
query head h reads kv head h % Hkv instead of h // G."""

from attnbench.zoo._base import Kernel, member


class GqaTile(Kernel):
    def expand(self, t, group):
        return t.repeat(1, group, 1, 1)


gqa_tile = member("gqa_tile", GqaTile(), "GQA: K/V heads tiled instead of interleaved")
