"""scale = 0 treated as 'use the default' (`scale or 1/sqrt(D)`): an explicit 0, uniform
attention, silently becomes 1/sqrt(D)."""

from attnbench.zoo._base import Kernel, member


class ScaleZeroDefault(Kernel):
    def scale(self, cfg, D, Dv):
        return cfg.scale or D**-0.5


scale_zero_default = member("scale_zero_default", ScaleZeroDefault(), "scale 0 replaced by the default 1/sqrt(D)")
