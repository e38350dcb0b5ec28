"""Ends the process: os._exit(3)."""

import os

from fault_common import fault


def fn(q, k, v, cfg, key_padding_mask=None, bias=None):
    os._exit(3)


impl = fault("fault_exits", fn)
