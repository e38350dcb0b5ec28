"""moa_batched: every expert's routed tokens gathered at once, experts folded into the batch,
ONE dense-kernel call for all experts (and all causal windows)."""

from __future__ import annotations

from attnbench.impls.moa_loop import AR_FEATURES, AR_HOOKS, MOA_FEATURES, MOA_HOOKS
from attnbench.modules.mixture import MixtureOfAttention, MixtureOfAutoregressiveAttention, factory
from attnbench.registry import Impl

batched = Impl(
    name="batched",
    variant="MixtureOfAttention",
    fn=factory(MixtureOfAttention, strategy="batched"),
    features=MOA_FEATURES,
    **MOA_HOOKS,
    description="experts folded into the batch: batched projections (einsum) and one fused kernel call",
)

batched_ar = Impl(
    name="batched",
    variant="MixtureOfAutoregressiveAttention",
    fn=factory(MixtureOfAutoregressiveAttention, strategy="batched"),
    features=AR_FEATURES,
    **AR_HOOKS,
    description="experts and windows folded into the batch: one fused kernel call",
)
