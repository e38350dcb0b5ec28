"""moa_flex: the routed mixtures on torch FlexAttention, experts folded into the heads, invalid
routed keys masked by a score_mod (compiled; CUDA only: flex has no CPU backward). The local
branch of the autoregressive mixture runs through the dense kernel (impls/_moa.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attnbench.impls._moa import KERNEL_OPTIONS, KernelUnavailable, mixture
from attnbench.impls._seed import seed_hooks
from attnbench.impls.moa_loop import AR_FEATURES, MOA_FEATURES
from attnbench.modules.common import FLEX_MAIN_KERNEL, FLEX_MIN_HEAD_DIM, allow_recompiles
from attnbench.modules.mixture import MixtureOfAttention, MixtureOfAutoregressiveAttention
from attnbench.registry import Impl

try:  # imported here, not inside the compiled function: an import there breaks the graph
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # torch < 2.5: strategy="flex" is unavailable
    flex_attention = None

FLEX_DTYPES = ("float32", "float16", "bfloat16")
_FLEX = {}


def _flex_routed(q, k, v, valid, heads_per_expert: int):
    """FlexAttention over routed tokens; heads h of expert h // heads_per_expert; invalid keys -inf.
    Head dims under 16 are zero-padded (q.k and p @ v unchanged; the padded outputs are cut)."""
    dim, dim_v = q.shape[-1], v.shape[-1]
    if min(dim, dim_v) < FLEX_MIN_HEAD_DIM:
        pad = max(0, FLEX_MIN_HEAD_DIM - dim)
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
        v = F.pad(v, (0, max(0, FLEX_MIN_HEAD_DIM - dim_v)))

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(valid[b, h // heads_per_expert, kv_idx], score, float("-inf"))

    # Routed sets are short: on CUDA keep flex off its decoding kernel (see FLEX_MAIN_KERNEL).
    options = FLEX_MAIN_KERNEL if q.is_cuda else None
    return flex_attention(q, k, v, score_mod=score_mod, scale=dim ** -0.5, kernel_options=options)[..., :dim_v]


def _flex_core(device: torch.device) -> Callable:
    """Compiled once on CUDA (the score_mod closure is made inside the compiled function, so a
    new closure per call does not recompile); eager on the CPU (forward only)."""
    if flex_attention is None:
        raise KernelUnavailable("strategy='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention)")
    if device.type != "cuda":
        return _flex_routed
    if "cuda" not in _FLEX:
        # Static shapes always. Automatic dynamic shapes (tried for the GPU property runs, where
        # every example has new routed sizes) gave wrong outputs on the H100, torch 2.11: errors
        # up to 4.6 and batch elements leaking into each other, at 1-2 routed tokens. Above the
        # recompile limit dynamo would run the eager path instead, so the limit is raised.
        allow_recompiles()
        _FLEX["cuda"] = torch.compile(_flex_routed, dynamic=False)
    return _FLEX["cuda"]


def flex_experts(m, xq, xc, kv_weight, kv_valid) -> torch.Tensor:
    """Batched projections, then FlexAttention with experts folded into the heads; invalid keys
    get -inf through a score_mod."""
    if m.training and m.dropout > 0:
        raise ValueError("strategy='flex' has no attention dropout; use strategy='batched' or dropout=0")
    q, k, v, keep = m.fold_experts(xq, xc, kv_weight, kv_valid)
    B, E, W, kq, H, dh = q.shape
    fold = lambda t: t.permute(0, 2, 1, 4, 3, 5).reshape(B * W, E * H, t.shape[3], dh)
    valid = keep.permute(0, 2, 1, 3).reshape(B * W, E, k.shape[3])
    o = _flex_core(q.device)(fold(q), fold(k), fold(v), valid, H)
    m.last_kernel = "flex_attention"
    return m.unfold_experts(o.view(B, W, E, H, kq, dh).permute(0, 2, 1, 4, 3, 5))


def flex_mixture(cls: type) -> Callable[..., nn.Module]:
    """The flex factory: the experts take no dense kernel (the local branch picks its own)."""
    make_mixture = mixture(cls, flex_experts, "flex")

    def make(**kwargs) -> nn.Module:
        if any(kwargs.get(k) for k in KERNEL_OPTIONS):
            raise ValueError("strategy='flex' runs torch FlexAttention; it takes no kernel / use_triton / flash_attn")
        return make_mixture(**kwargs)

    make.__name__ = make_mixture.__name__
    return make


flex = Impl(
    name="flex",
    variant="MixtureOfAttention",
    fn=flex_mixture(MixtureOfAttention),
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
    fn=flex_mixture(MixtureOfAutoregressiveAttention),
    features=AR_FEATURES - {"dropout"},
    **seed_hooks("MixtureOfAutoregressiveAttention"),
    devices=("cuda",),
    dtypes=FLEX_DTYPES,
    compiles=True,
    description="compiled FlexAttention, experts as heads and windows as batch",
)
