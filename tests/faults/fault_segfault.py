"""Segfaults: reads address 0 through ctypes."""

import ctypes

from fault_common import fault


def fn(q, k, v, cfg, key_padding_mask=None, bias=None):
    ctypes.string_at(0)


impl = fault("fault_segfault", fn)
