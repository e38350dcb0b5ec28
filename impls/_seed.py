"""What the implementations built on the project's own seed modules share (attnbench/modules/).

- `seed_module(cls, kernel)`: the Impl factory `fn(**ctor_kwargs) -> nn.Module` of a seed module
  on one attention kernel (the modules never pick a kernel themselves);
- `seed_hooks(variant)`: the module-property hooks (attnbench.registry.Impl's `weights`, `route`
  and `decode`): the seed layout maps onto itself, the mixtures expose their routing,
  MultiQueryAttention and LocalMHA decode through their caches;
- `multi_query(attn_impl=...)`: MultiQueryAttention on the kernel its `attn_impl` names
  (llm-foundry's way of choosing), looked up in the registry.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from attnbench.modules.common import same_layout
from attnbench.modules.multi_query import ATTN_IMPLS, NAME, MultiQueryAttention
from attnbench.registry import Decoder, registry


def seed_module(cls: type[nn.Module], kernel: Callable, **defaults) -> Callable[..., nn.Module]:
    """The factory of `cls` on `kernel`; `defaults` fill constructor arguments the caller leaves out."""

    def make(**kwargs) -> nn.Module:
        return cls(**{**defaults, **kwargs}, kernel=kernel)

    make.__name__ = f"{cls.__name__}_on_{getattr(kernel, '__module__', 'kernel').rsplit('.', 1)[-1]}"
    return make


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


# -- MultiQueryAttention's attn_impl -------------------------------------------------------------
def multi_query(dim: int, heads: int, attn_impl: str = "triton", **kwargs) -> MultiQueryAttention:
    """MultiQueryAttention on the kernel registered for `attn_impl`, or a clear error naming what
    to install."""
    return MultiQueryAttention(dim, heads, attn_impl=attn_impl, kernel=resolve_attn_impl(attn_impl), **kwargs)


def resolve_attn_impl(attn_impl: str) -> Callable:
    """The kernel function registered for attn_impl, or a clear error naming what to install."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"{NAME}: attn_impl must be one of {sorted(ATTN_IMPLS)}, got {attn_impl!r}")
    key, need = ATTN_IMPLS[attn_impl]
    reg = registry()
    try:
        impl = reg.get(key)
    except KeyError:
        broken = [b.reason for b in reg.broken if b.origin.rsplit(".", 1)[-1] in key]
        why = f"; loading it failed: {broken[0]}" if broken else f"; no implementation {key!r} is registered"
        raise ImportError(f"{NAME}: {need}{why}") from None
    reason = impl.unavailable()
    if reason is None and attn_impl == "triton" and not torch.cuda.is_available() and not triton_interpreted():
        reason = "no CUDA device and TRITON_INTERPRET is not set"
    if reason is not None:
        raise ImportError(f"{NAME}: {need} ({key}: {reason})")
    return impl.fn


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
