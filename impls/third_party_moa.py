"""third_party_moa: lucidrains' `mixture-of-attention` (PyPI), adapted to the seed constructors.

An optional extra (`pip install attnbench[third-party]`); unavailable when the package is absent.
Its own conventions, kept (the adapter declares them rather than bending the suite):
- routing is CoLT5 coordinate descent with straight-through weights (forward value exactly 1);
  use_triton selects its triton coordinate descent (CUDA), flash_attn torch SDPA. None -> False.
- its forward router weights are exactly 1, not the contract's, so no `weights` map is declared:
  it is verified by the black-box tier (batch independence, causality, masks, padding, the null
  output its outputs imply), not against mixture_reference (the white-box tier reports it
  unsupported).
Known disagreements with oracles/CONTRACT.md: minimal counterexamples in NOTES.md, tests in
tests/test_mixture.py.
"""

from __future__ import annotations

import torch
from torch import nn

from attnbench.registry import Impl

OURS_ONLY = ("router", "kernel", "strategy")
DTYPES = ("float32", "float64")  # checked on the CPU; float16 / bfloat16 untested (the AR variant refuses them)


def _upstream_kwargs(kwargs: dict) -> dict:
    for key in OURS_ONLY:
        if kwargs.pop(key, None) not in (None, "coor_descent"):
            raise ValueError(f"{key}: the upstream mixture-of-attention has no such option")
    for flag in ("use_triton", "flash_attn"):
        kwargs[flag] = bool(kwargs.get(flag))
    return kwargs


class UpstreamMixture(nn.Module):
    """forward(x, context=None, mask=None, context_mask=None) around the upstream module."""

    def __init__(self, **kwargs):
        super().__init__()
        from mixture_of_attention import MixtureOfAttention

        self.inner = MixtureOfAttention(**_upstream_kwargs(kwargs))

    def forward(self, x: torch.Tensor, context=None, mask=None, context_mask=None) -> torch.Tensor:
        return self.inner(x, context=context, mask=mask, context_mask=context_mask)


class UpstreamAutoregressive(nn.Module):
    """forward(x, mask=None); the upstream module takes no mask, so a mask is refused."""

    def __init__(self, **kwargs):
        super().__init__()
        from mixture_of_attention import MixtureOfAutoregressiveAttention

        self.inner = MixtureOfAutoregressiveAttention(**_upstream_kwargs(kwargs))

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        if mask is not None:
            raise ValueError("mask: the upstream MixtureOfAutoregressiveAttention takes no mask")
        return self.inner(x)


# Declared limits: the seed's router="straight_through" has no upstream counterpart (upstream
# routes by coordinate descent only), so cases draw router="coor_descent" alone.
OPTIONS = {"router": ("coor_descent",)}
# The autoregressive variant crashes (a torch.cat size mismatch) whenever its routed window is no
# longer than num_routed_queries and the sequence spans more than two windows (NOTES.md): cases
# draw num_routed_queries 1..2 and windows of 3..4 only, so that every window routes.
AR_OPTIONS = {**OPTIONS, "num_routed_queries": (1, 2), "local_attn_window_size": (3, 4), "routed_window_size": (None, 3)}

lucidrains = Impl(
    name="lucidrains",
    variant="MixtureOfAttention",
    fn=UpstreamMixture,
    features={"backward", "cross", "key_padding", "dropout"},
    dtypes=DTYPES,
    options=OPTIONS,
    requires=("mixture_of_attention",),
    description="lucidrains/mixture-of-attention (PyPI); coordinate-descent routing, straight-through weights",
)

lucidrains_ar = Impl(
    name="lucidrains",
    variant="MixtureOfAutoregressiveAttention",
    fn=UpstreamAutoregressive,
    features={"backward", "causal", "dropout"},
    dtypes=DTYPES,
    options=AR_OPTIONS,
    requires=("mixture_of_attention",),
    description="lucidrains/mixture-of-attention autoregressive variant (no mask)",
)
