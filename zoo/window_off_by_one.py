"""Sliding window off by one: the left edge compares with > instead of >=, so window (W, 0)
sees W keys instead of W + 1 (the key exactly W before the query is dropped)."""

from attnbench.zoo._base import Kernel, member


class WindowOffByOne(Kernel):
    def in_window(self, p, j, left, right):
        ok = super().in_window(p, j, None, right)
        return ok if left is None else ok & (j > p - left)


window_off_by_one = member(
    "window_off_by_one", WindowOffByOne(), "sliding window off by one: left edge uses > instead of >="
)
