"""Runs out of host memory: asks the CPU allocator for 1 PiB (refused at once, nothing touched)."""

import torch
from fault_common import fault


def fn(q, k, v, cfg, key_padding_mask=None, bias=None):
    torch.empty(2**50, dtype=torch.uint8)


impl = fault("fault_oom", fn)
