"""Returns NaN everywhere."""

import torch
from fault_common import attention, fault


def fn(q, k, v, cfg, key_padding_mask=None, bias=None):
    out, lse = attention(q, k, v, cfg, key_padding_mask, bias)
    return out * torch.nan, lse


impl = fault("fault_nan", fn)
