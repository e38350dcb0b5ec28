"""Work models: how many floating-point operations and bytes an attention call needs.

FLOPs count only the work the contract asks for: the (query, key) pairs that are visible,
counted exactly from the index arithmetic of oracles/CONTRACT.md (causal about halves it; windows
and routing keep only what a query can see). Per visible pair and head: 2*D for q.k and
2*Dv for p.v. Backward is 2.5x the forward (dq, dk, dv and the recomputed scores), so
forward + backward is 3.5x, the usual FlashAttention convention.

Bytes are the fewest a call must move through device memory: each input read once, each
output written once (the softmax statistics, lse, in float32 where the backward needs them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from attnbench.masks import visible_counts
from attnbench.packing import PagedSpec, VarlenSpec
from attnbench.spec import Spec

MODES = ("fwd", "bwd", "fwdbwd")
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: unknown mode {mode!r}; one of {MODES}")
    return mode


def visible_pairs(spec: Spec, key_padding_mask: torch.Tensor | None = None) -> int:
    """Visible (query, key) pairs of one head, summed over the batch.

    Key padding from `key_lengths` is exact without the mask; a spec with `key_drop`
    (random padding) needs its actual mask (Inputs.key_padding_mask).
    """
    if key_padding_mask is None and spec.key_drop > 0:
        raise ValueError("key_padding_mask: a spec with key_drop > 0 needs its mask to count visible pairs")
    return int(visible_counts(spec, key_padding_mask).sum())


def attention_flops(spec: Spec, mode: str = "fwd", key_padding_mask: torch.Tensor | None = None) -> float:
    """FLOPs of one call: 2 * Hq * pairs * (D + Dv) forward, times 2.5 (bwd) or 3.5 (fwdbwd)."""
    fwd = 2.0 * spec.Hq * visible_pairs(spec, key_padding_mask) * (spec.D + spec.Dv)
    return fwd * MODE_FACTOR[check_mode(mode)]


def element_size(dtype: str) -> int:
    from attnbench.spec import DTYPES

    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def bias_numel(spec: Spec) -> int:
    B, H, Sq, Sk = spec.B, spec.Hq, spec.Sq, spec.Sk
    return {
        None: 0,
        "full": B * H * Sq * Sk,
        "per_head": H * Sq * Sk,
        "alibi": H * Sq * Sk,
        "per_key": B * Sk,
    }[spec.bias]


def attention_bytes(spec: Spec, mode: str = "fwd") -> float:
    """The fewest bytes a call moves: inputs read once, outputs written once (fp8: q, k, v one
    byte an element, the output in the spec's dtype, bfloat16)."""
    e = element_size(spec.dtype)
    e_in = 1 if getattr(spec, "fp8", False) else e
    q = spec.B * spec.Hq * spec.Sq * spec.D * e_in
    k = spec.B * spec.Hkv * spec.Sk * spec.D * e_in
    v = spec.B * spec.Hkv * spec.Sk * spec.Dv * e_in
    out = spec.B * spec.Hq * spec.Sq * spec.Dv * e
    lse = spec.B * spec.Hq * spec.Sq * 4
    extra = bias_numel(spec) * e + (spec.B * spec.Sk if spec.has_padding else 0)
    reads = q + k + v + extra
    fwd = reads + out
    bwd = reads + out + out + lse + q + k + v  # read q, k, v, out, dout, lse; write dq, dk, dv
    return float({"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + lse + bwd}[check_mode(mode)])


def packed_flops(spec: VarlenSpec | PagedSpec, mode: str = "fwd") -> float:
    """FLOPs of a packed batch or paged step: the sum over its sequences' dense problems (each
    sequence sees only its own keys, so the visible pairs add up per sequence)."""
    return sum(attention_flops(s, mode) for s in spec.dense_specs())


def packed_bytes(spec: VarlenSpec | PagedSpec, mode: str = "fwd") -> float:
    """The fewest bytes of a packed batch or paged step: the sum over its sequences (a paged step
    reads each sequence's cached keys and values once; the block table is negligible)."""
    return sum(attention_bytes(s, mode) for s in spec.dense_specs())


# -- module variants --------------------------------------------------------------------------
# The seed modules' useful work: their projections (2 * tokens * in * out each) plus their
# attention core. Routed modules are charged for what they route, read off the module's own
# routing (`module.route(x)`): every routed query times (its expert's routed keys + the null
# key), and the q / out projections of routed queries, k / v projections of routed keys.


def _dense_module(B: int, S: int, dim: int, heads: int, dim_head: int) -> float:
    """q, k, v and out projections of a multi-head module over B * S tokens."""
    return 8.0 * B * S * dim * heads * dim_head


def _local_spec(B: int, S: int, heads: int, dim_head: int, window: int, causal: bool, exact: bool) -> Spec:
    if exact:
        return Spec(B=B, Hq=heads, Sq=S, D=dim_head, causal=causal, window=(window, 0 if causal else window))
    return Spec(B=B, Hq=heads, Sq=S, D=dim_head, causal=causal, block=(window, 1, 0 if causal else 1))


def _routed_flops(routing, B: int, S: int, dim: int, heads: int, dim_head: int, experts: int) -> float:
    nq = routing.q_valid.sum(-1).to(torch.float64)  # (B, E, *windows) routed queries
    nkv = routing.kv_valid.sum(-1).to(torch.float64)
    while nkv.dim() < nq.dim():
        nkv = nkv.unsqueeze(-1)
    pairs = float((nq * (nkv + 1)).sum())  # + 1: the expert's null key
    inner = heads * dim_head
    attention = 2.0 * heads * pairs * 2 * dim_head
    projections = 2.0 * float(nq.sum()) * dim * inner * 2 + 2.0 * float(nkv.sum()) * dim * inner * 2
    routers = 2.0 * B * S * dim * experts * 2
    return attention + projections + routers


def module_flops(variant: str, kwargs: dict, x: torch.Tensor, module=None, mode: str = "fwd") -> float | None:
    """Forward FLOPs (times 2.5 / 3.5 for bwd / fwdbwd) of a seed module on x (B, S, dim);
    None when the variant has no model here."""
    B, S, dim = x.shape
    heads, dim_head = kwargs.get("heads", 8), kwargs.get("dim_head", 64)
    if variant == "FlashAttentionTwo":
        spec = Spec(B=B, Hq=heads, Sq=S, D=dim_head, causal=kwargs.get("causal", False))
        fwd = _dense_module(B, S, dim, heads, dim_head) + attention_flops(spec)
    elif variant == "MultiQueryAttention":
        D, kv_heads = dim // heads, kwargs.get("kv_heads", 1)
        spec = Spec(B=B, Hq=heads, Hkv=kv_heads, Sq=S, D=D, causal=True)
        fwd = 2.0 * B * S * dim * (dim + 2 * kv_heads * D) + 2.0 * B * S * dim * dim + attention_flops(spec)
    elif variant == "LocalMHA":
        spec = _local_spec(B, S, heads, dim_head, kwargs["window_size"], kwargs.get("causal", False),
                           kwargs.get("exact_windowsize", True))
        fwd = _dense_module(B, S, dim, heads, dim_head) + attention_flops(spec)
    elif variant in ("MixtureOfAttention", "MixtureOfAutoregressiveAttention") and hasattr(module, "route"):
        with torch.no_grad():
            routing = module.route(x)
        fwd = _routed_flops(routing, B, S, dim, heads, dim_head, kwargs.get("num_experts", 2))
        causal = variant == "MixtureOfAutoregressiveAttention"
        if causal or kwargs.get("local_attn"):
            spec = _local_spec(B, S, heads, dim_head, kwargs["local_attn_window_size"], causal, exact=False)
            fwd += _dense_module(B, S, dim, heads, dim_head) + attention_flops(spec)
    else:
        return None
    return fwd * MODE_FACTOR[check_mode(mode)]


def module_bytes(x: torch.Tensor, out: torch.Tensor, params: Iterable[torch.Tensor]) -> float:
    """Input read once, parameters read once, output written once."""
    return float(sum(t.numel() * t.element_size() for t in (x, out, *params)))


def tflops(flops: float | None, ms: float | None) -> float | None:
    if flops is None or not ms or not math.isfinite(ms):
        return None
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float | None, ms: float | None) -> float | None:
    if nbytes is None or not ms or not math.isfinite(ms):
        return None
    return nbytes / (ms * 1e-3) / 1e9
