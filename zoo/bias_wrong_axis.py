"""Bias broadcast on the wrong axis: a per-key bias (size 1 on the query axis) is laid out
along the queries when the score matrix is square, the classic ALiBi / key-bias mix-up."""

from attnbench.zoo._base import Kernel, member


class BiasWrongAxis(Kernel):
    def bias(self, bias, Sq, Sk):
        if bias.shape[-2] == 1 and Sq == Sk:
            return bias.transpose(-1, -2)
        return bias


bias_wrong_axis = member("bias_wrong_axis", BiasWrongAxis(), "per-key bias broadcast along the query axis")
