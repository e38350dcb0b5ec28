"""Dropout without the 1/(1-p) rescaling of the kept probabilities."""

from attnbench.zoo._base import Kernel, member


class DropoutNotRescaled(Kernel):
    def dropout(self, p, cfg):
        return p if cfg.dropout_p <= 0 else p * self.keep(p, cfg)


dropout_not_rescaled = member("dropout_not_rescaled", DropoutNotRescaled(), "dropout not rescaled by 1/(1-p)")
