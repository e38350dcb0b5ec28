"""Raises on every call."""

from fault_common import fault


def fn(q, k, v, cfg, key_padding_mask=None, bias=None):
    raise RuntimeError("fault: kernel exploded")


impl = fault("fault_raises", fn)
