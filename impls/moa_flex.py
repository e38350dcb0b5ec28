"""moa_flex: the routed mixtures on torch FlexAttention, experts folded into the heads, invalid
routed keys masked by a score_mod (compiled; CUDA only: flex has no CPU backward)."""

from __future__ import annotations

from attnbench.impls.moa_loop import AR_FEATURES, MOA_FEATURES
from attnbench.modules.hooks import seed_hooks
from attnbench.modules.mixture import MixtureOfAttention, MixtureOfAutoregressiveAttention, factory
from attnbench.registry import Impl

FLEX_DTYPES = ("float32", "float16", "bfloat16")

flex = Impl(
    name="flex",
    variant="MixtureOfAttention",
    fn=factory(MixtureOfAttention, strategy="flex"),
    features=MOA_FEATURES - {"dropout"},  # flex has no attention dropout
    **seed_hooks("MixtureOfAttention"),
    devices=("cuda",),
    dtypes=FLEX_DTYPES,
    compiles=True,
    description="compiled FlexAttention over the gathered tokens, experts as heads, null key prepended",
)

flex_ar = Impl(
    name="flex",
    variant="MixtureOfAutoregressiveAttention",
    fn=factory(MixtureOfAutoregressiveAttention, strategy="flex"),
    features=AR_FEATURES - {"dropout"},
    **seed_hooks("MixtureOfAutoregressiveAttention"),
    devices=("cuda",),
    dtypes=FLEX_DTYPES,
    compiles=True,
    description="compiled FlexAttention, experts as heads and windows as batch",
)
