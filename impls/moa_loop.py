"""moa_loop: the routed mixtures with one attention-kernel call per expert (plain loop).

Also declares the "naive" implementation of both mixture variants: the loop strategy with the
naive dense kernel, the tolerance reference for the other mixture implementations.
"""

from __future__ import annotations

import torch

from attnbench.impls._moa import mixture
from attnbench.impls._seed import seed_hooks
from attnbench.modules.mixture import MixtureOfAttention, MixtureOfAutoregressiveAttention, rms_norm
from attnbench.registry import Impl

MOA_FEATURES = frozenset({"backward", "cross", "key_padding", "dropout"})
AR_FEATURES = frozenset({"backward", "causal", "key_padding", "dropout"})
MOA_DTYPES = ("float64", "float32", "float16", "bfloat16")
MOA_HOOKS = dict(dtypes=MOA_DTYPES, **seed_hooks("MixtureOfAttention"))
AR_HOOKS = dict(dtypes=MOA_DTYPES, **seed_hooks("MixtureOfAutoregressiveAttention"))


def loop_experts(m, xq, xc, kv_weight, kv_valid) -> torch.Tensor:
    """Expert by expert: project the routed tokens, prepend the null key, one kernel call each
    (windows folded into the batch)."""
    B, E, W, kq, _ = xq.shape
    kk, H, dh = xc.shape[3], m.heads, m.dim_head
    (kernel, padded), cfg = m.expert_kernel(xq, kv_valid), m.expert_config(xq)
    outs = []
    for g in range(E):
        hq, hc = xq[:, g], xc[:, g]  # (B, W, k, d)
        if m.norm is not None:
            hq, hc = rms_norm(hq, m.norm[g]), rms_norm(hc, m.context_norm[g])
        q = (hq @ m.to_q[g]).view(B * W, kq, H, dh).transpose(1, 2)
        k = (hc @ m.to_k[g]).view(B * W, kk, H, dh).transpose(1, 2)
        v = ((hc @ m.to_v[g]) * kv_weight[:, g, ..., None]).view(B * W, kk, H, dh).transpose(1, 2)
        k = torch.cat((m.null_k[g][None, :, None].expand(B * W, H, 1, dh).to(k.dtype), k), dim=2)
        v = torch.cat((m.null_v[g][None, :, None].expand(B * W, H, 1, dh).to(v.dtype), v), dim=2)
        keep = torch.cat((kv_valid.new_ones(B * W, 1), kv_valid[:, g].reshape(B * W, kk)), dim=1)
        o, _ = kernel(q, k, v, cfg, key_padding_mask=keep if padded else None)
        outs.append(o.transpose(1, 2).reshape(B, W, kq, H * dh) @ m.to_out[g])
    return torch.stack(outs, dim=1)


loop = Impl(
    name="loop",
    variant="MixtureOfAttention",
    fn=mixture(MixtureOfAttention, loop_experts, "loop"),
    features=MOA_FEATURES,
    **MOA_HOOKS,
    description="per-expert loop: gather, project, one dense-kernel call per expert (kernel chosen by the module)",
)

loop_ar = Impl(
    name="loop",
    variant="MixtureOfAutoregressiveAttention",
    fn=mixture(MixtureOfAutoregressiveAttention, loop_experts, "loop"),
    features=AR_FEATURES,
    **AR_HOOKS,
    description="per-expert loop over causal windowed routing; windows folded into the batch",
)

naive = Impl(
    name="naive",
    variant="MixtureOfAttention",
    fn=mixture(MixtureOfAttention, loop_experts, "loop", kernel="naive"),
    features=MOA_FEATURES,
    **MOA_HOOKS,
    reference=True,
    description="per-expert loop with the naive dense kernel (materialized scores); the tolerance reference",
)

naive_ar = Impl(
    name="naive",
    variant="MixtureOfAutoregressiveAttention",
    fn=mixture(MixtureOfAutoregressiveAttention, loop_experts, "loop", kernel="naive"),
    features=AR_FEATURES,
    **AR_HOOKS,
    reference=True,
    description="per-expert loop with the naive dense kernel; the tolerance reference",
)
