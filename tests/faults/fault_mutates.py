"""Scales its input q in place before computing."""

from fault_common import attention, fault


def fn(q, k, v, cfg, key_padding_mask=None, bias=None):
    q.data.mul_(2.0)
    return attention(q, k, v, cfg, key_padding_mask, bias)


impl = fault("fault_mutates", fn)
