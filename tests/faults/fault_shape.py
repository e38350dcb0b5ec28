"""Returns an output with one query row too few."""

from fault_common import attention, fault


def fn(q, k, v, cfg, key_padding_mask=None, bias=None):
    out, lse = attention(q, k, v, cfg, key_padding_mask, bias)
    return out[:, :, :-1], lse


impl = fault("fault_shape", fn)
