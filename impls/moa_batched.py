"""moa_batched: every expert's routed tokens gathered at once, experts folded into the batch,
ONE dense-kernel call for all experts (and all causal windows)."""

from __future__ import annotations

import torch

from attnbench.impls._moa import mixture
from attnbench.impls.moa_loop import AR_FEATURES, AR_HOOKS, MOA_FEATURES, MOA_HOOKS
from attnbench.modules.mixture import MixtureOfAttention, MixtureOfAutoregressiveAttention
from attnbench.registry import Impl


def batched_experts(m, xq, xc, kv_weight, kv_valid) -> torch.Tensor:
    """Batched projections (einsum), then experts and windows folded into the batch: one kernel call."""
    q, k, v, keep = m.fold_experts(xq, xc, kv_weight, kv_valid)
    B, E, W, kq, H, dh = q.shape
    fold = lambda t: t.permute(0, 1, 2, 4, 3, 5).reshape(B * E * W, H, t.shape[3], dh)
    kernel, padded = m.expert_kernel(xq, kv_valid)
    o, _ = kernel(fold(q), fold(k), fold(v), m.expert_config(xq),
                  key_padding_mask=keep.reshape(B * E * W, k.shape[3]) if padded else None)
    return m.unfold_experts(o.view(B, E, W, H, kq, dh).permute(0, 1, 2, 4, 3, 5))


batched = Impl(
    name="batched",
    variant="MixtureOfAttention",
    fn=mixture(MixtureOfAttention, batched_experts, "batched"),
    features=MOA_FEATURES,
    **MOA_HOOKS,
    description="experts folded into the batch: batched projections (einsum) and one fused kernel call",
)

batched_ar = Impl(
    name="batched",
    variant="MixtureOfAutoregressiveAttention",
    fn=mixture(MixtureOfAutoregressiveAttention, batched_experts, "batched"),
    features=AR_FEATURES,
    **AR_HOOKS,
    description="experts and windows folded into the batch: one fused kernel call",
)
