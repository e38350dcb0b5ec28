"""moa_loop: the routed mixtures with one attention-kernel call per expert (plain loop).

Also declares the "naive" implementation of both mixture variants: the loop strategy with the
naive dense kernel, the tolerance reference for the other mixture implementations.
"""

from __future__ import annotations

from attnbench.modules.hooks import seed_hooks
from attnbench.modules.mixture import MixtureOfAttention, MixtureOfAutoregressiveAttention, factory
from attnbench.registry import Impl

MOA_FEATURES = frozenset({"backward", "cross", "key_padding", "dropout"})
AR_FEATURES = frozenset({"backward", "causal", "key_padding", "dropout"})
MOA_DTYPES = ("float64", "float32", "float16", "bfloat16")
MOA_HOOKS = dict(dtypes=MOA_DTYPES, **seed_hooks("MixtureOfAttention"))
AR_HOOKS = dict(dtypes=MOA_DTYPES, **seed_hooks("MixtureOfAutoregressiveAttention"))

loop = Impl(
    name="loop",
    variant="MixtureOfAttention",
    fn=factory(MixtureOfAttention, strategy="loop"),
    features=MOA_FEATURES,
    **MOA_HOOKS,
    description="per-expert loop: gather, project, one dense-kernel call per expert (kernel chosen by the module)",
)

loop_ar = Impl(
    name="loop",
    variant="MixtureOfAutoregressiveAttention",
    fn=factory(MixtureOfAutoregressiveAttention, strategy="loop"),
    features=AR_FEATURES,
    **AR_HOOKS,
    description="per-expert loop over causal windowed routing; windows folded into the batch",
)

naive = Impl(
    name="naive",
    variant="MixtureOfAttention",
    fn=factory(MixtureOfAttention, strategy="loop", kernel="naive"),
    features=MOA_FEATURES,
    **MOA_HOOKS,
    reference=True,
    description="per-expert loop with the naive dense kernel (materialized scores); the tolerance reference",
)

naive_ar = Impl(
    name="naive",
    variant="MixtureOfAutoregressiveAttention",
    fn=factory(MixtureOfAutoregressiveAttention, strategy="loop", kernel="naive"),
    features=AR_FEATURES,
    **AR_HOOKS,
    reference=True,
    description="per-expert loop with the naive dense kernel; the tolerance reference",
)
