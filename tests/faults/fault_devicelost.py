"""Fails with a sticky CUDA error's message, as a kernel that faults on the device does: after
it, every call in the process would fail the same way, so the test process must end and the
remaining tests run in a fresh one."""

from fault_common import fault


def fn(q, k, v, cfg, key_padding_mask=None, bias=None):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


impl = fault("fault_devicelost", fn)
