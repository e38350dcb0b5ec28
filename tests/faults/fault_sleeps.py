"""Hangs: sleeps far past any deadline."""

import time

from fault_common import fault


def fn(q, k, v, cfg, key_padding_mask=None, bias=None):
    time.sleep(3600)


impl = fault("fault_sleeps", fn)
