"""The module-property hooks of the project's own seed modules (attnbench.registry.Impl's
`weights`, `route` and `decode`): the seed layout maps onto itself, the mixtures expose their
routing, MultiQueryAttention and LocalMHA decode through their caches."""

from __future__ import annotations

import torch

from attnbench.modules.common import same_layout
from attnbench.registry import Decoder


def route_mixture(module, x: torch.Tensor, context=None, mask=None, context_mask=None):
    return module.route(x, context, mask=mask, context_mask=context_mask)


def route_autoregressive(module, x: torch.Tensor, context=None, mask=None, context_mask=None):
    if context is not None:
        raise ValueError("context: MixtureOfAutoregressiveAttention is self-attention only")
    return module.route(x, mask=mask)


def decode_multi_query(module, x: torch.Tensor, cache, mask=None):
    out, _, cache = module(x, past_key_value=cache, mask=mask, causal=True)
    return out, cache


def decode_local_mha(module, x: torch.Tensor, cache, mask=None):
    return module(x, mask=mask, cache=cache, return_cache=True)


def seed_hooks(variant: str) -> dict:
    """Impl keyword arguments for an implementation built on the seed module of `variant`."""
    hooks: dict = {"weights": same_layout}
    if variant == "MixtureOfAttention":
        hooks["route"] = route_mixture
    elif variant == "MixtureOfAutoregressiveAttention":
        hooks["route"] = route_autoregressive
    elif variant == "MultiQueryAttention":
        hooks["decode"] = Decoder(decode_multi_query, mask=True)
    elif variant == "LocalMHA":
        hooks["decode"] = Decoder(decode_local_mha, mask=True)
    return hooks
