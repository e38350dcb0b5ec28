"""Wrong default scale: the kernel is handed 'default' and derives it from the value head
dim, 1/sqrt(Dv), instead of the query/key head dim, 1/sqrt(D) (only visible when Dv != D)."""

import math

from attnbench.zoo._base import Kernel, member


class ScaleFromDv(Kernel):
    def scale(self, cfg, D, Dv):
        is_default = math.isclose(cfg.scale, D**-0.5, rel_tol=1e-12)
        return Dv**-0.5 if is_default else cfg.scale


scale_from_dv = member("scale_from_dv", ScaleFromDv(), "wrong default scale: 1/sqrt(Dv) instead of 1/sqrt(D)")
