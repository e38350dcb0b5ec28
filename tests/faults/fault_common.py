"""What every fault shares: the naive kernel and a narrow declaration (dense, causal, float32),
so each fault runs on few cells. Never registered: tests load them with PYTHONPATH=tests/faults
and `--impl fault_<name>:impl`."""

from attnbench.impls.naive import attention
from attnbench.registry import Impl

FEATURES = {"causal"}


def causal_only(spec):
    """One benchmark cell per fault in the quick sweep (each crash costs a process start)."""
    return None if spec.causal else "fault zoo: causal cells only"


def fault(name: str, fn) -> Impl:
    return Impl(name=name, variant="dense", fn=fn, features=FEATURES, dtypes=("float32",), supports=causal_only,
                description=f"fault zoo: {name}")


__all__ = ["attention", "fault"]
