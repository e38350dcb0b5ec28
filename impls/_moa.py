"""What the routed-mixture implementations share (moa_loop.py, moa_batched.py, moa_flex.py): the
dense kernel of each call and the Impl factory. attnbench/modules/mixture.py holds the modules and
their routing; each strategy file holds how the experts attend.

Kernels: the experts (and the local branch) attend through the registry's dense kernels
(fn(q, k, v, cfg, key_padding_mask)). `kernel="name"` picks dense/<name>. `flash_attn=True`
requires dense/flash_attn and `use_triton=True` requires dense/triton: if that kernel is missing or
cannot run the call, the forward raises KernelUnavailable naming what to install. Never a silent
fallback. The seed documents default both flags to True; here they default to None ("auto"): on
CUDA the first of flash_attn, sdpa_flash, triton, sdpa_efficient, naive that can run the call, on
the CPU naive. A flag set to False removes that kernel from the automatic choice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from attnbench.modules.common import Kernel
from attnbench.modules.mixture import Experts
from attnbench.registry import Impl, registry

AUTO_CUDA_KERNELS = ("flash_attn", "sdpa_flash", "triton", "sdpa_efficient", "naive")
INSTALL_HINT = {
    "flash_attn": "install flash-attn (`pip install flash-attn`, CUDA only) or pass flash_attn=False",
    "triton": "install triton (`pip install attnbench[triton]`) and run on CUDA (or set TRITON_INTERPRET=1 "
    "on the CPU), or pass use_triton=False",
}
KERNEL_OPTIONS = ("kernel", "use_triton", "flash_attn")


class KernelUnavailable(RuntimeError):
    """The attention kernel a module was asked to use cannot run this call."""


class DenseKernels:
    """A mixture's `kernels` argument: the dense kernel for a call, chosen once per device, dtype
    and needed features (see the module docstring)."""

    def __init__(self, kernel: str | None = None, use_triton: bool | None = None, flash_attn: bool | None = None):
        for name, value in (("use_triton", use_triton), ("flash_attn", flash_attn)):
            if value not in (None, True, False):
                raise TypeError(f"{name}: must be None (auto), True (required) or False, got {value!r}")
        if use_triton and flash_attn:
            raise ValueError("use_triton=True and flash_attn=True both require a kernel; pass at most one")
        if kernel is not None and (use_triton or flash_attn):
            raise ValueError(f"kernel={kernel!r} conflicts with use_triton/flash_attn=True; pass one of them")
        if kernel is not None and not isinstance(kernel, str):
            raise TypeError(f"kernel: must be a dense implementation name (str) or None, got {kernel!r}")
        self.kernel, self.use_triton, self.flash_attn = kernel, use_triton, flash_attn
        self._chosen: dict[tuple, Impl] = {}

    def __repr__(self) -> str:
        return self.kernel or "auto"

    def __call__(self, x: torch.Tensor, needs: frozenset[str]) -> tuple[str, Kernel]:
        key = (x.device.type, x.dtype, needs)
        if key not in self._chosen:
            self._chosen[key] = self._choose(x.device.type, str(x.dtype).removeprefix("torch."), needs)
        impl = self._chosen[key]
        return impl.key, impl.fn

    def _choose(self, device: str, dtype: str, needs: frozenset[str]) -> Impl:
        reg = registry()

        def problem(impl) -> str | None:
            why = impl.unavailable()
            if why:
                return why
            if not impl.device_ok(device):
                return f"it does not run on {device}"
            if dtype not in impl.dtypes:
                return f"it does not support {dtype}"
            missing = needs - impl.features
            return f"it lacks features {sorted(missing)}" if missing else None

        required = [(f"kernel={self.kernel!r}", self.kernel)] if self.kernel else []
        required += [("flash_attn=True", "flash_attn")] if self.flash_attn else []
        required += [("use_triton=True", "triton")] if self.use_triton else []
        for label, name in required:
            hint = INSTALL_HINT.get(name, "pick another kernel")
            impl = reg.impls.get(f"dense/{name}")
            if impl is None:
                raise KernelUnavailable(f"{label}: no dense implementation named {name!r} is registered; {hint}")
            why = problem(impl)
            if why:
                raise KernelUnavailable(f"{label}: dense/{name} cannot run this call: {why}; {hint}")
            return impl
        flags = {"flash_attn": self.flash_attn, "triton": self.use_triton}
        names = [n for n in AUTO_CUDA_KERNELS if flags.get(n) is not False] if device == "cuda" else ["naive"]
        reasons = []
        for name in names:
            impl = reg.impls.get(f"dense/{name}")
            why = "not registered" if impl is None else problem(impl)
            if why is None:
                return impl
            reasons.append(f"{name}: {why}")
        raise KernelUnavailable(f"no dense kernel can run this call ({'; '.join(reasons)})")


def mixture(cls: type, experts: Experts, strategy: str, **fixed) -> Callable[..., nn.Module]:
    """The Impl factory of a routed mixture whose experts attend by `experts` (the strategy named
    `strategy`): cls(**ctor_kwargs) with the seed documents' constructor arguments, `kernel`,
    `use_triton` and `flash_attn` choosing the dense kernel (DenseKernels), and some arguments
    fixed by the implementation (a conflicting value is an error)."""
    fixed = {"strategy": strategy, **fixed}

    def make(**kwargs) -> nn.Module:
        for key, value in fixed.items():
            if key in kwargs and kwargs[key] != value:
                raise ValueError(f"{key}={kwargs[key]!r} conflicts with this implementation's {key}={value!r}")
        kwargs = {**kwargs, **fixed}
        del kwargs["strategy"]
        kernels = DenseKernels(**{k: kwargs.pop(k) for k in KERNEL_OPTIONS if k in kwargs})
        return cls(**kwargs, experts=experts, kernels=kernels)

    make.__name__ = f"make_{cls.__name__}"
    return make
