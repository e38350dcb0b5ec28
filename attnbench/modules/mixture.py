"""Routed mixtures of attention experts: MixtureOfAttention and MixtureOfAutoregressiveAttention.

The contract is oracles/CONTRACT.md "Routed attention"; the float64 oracles in oracles/routed.py are
its executable form. Each module is split into `route(...) -> Routing` (which tokens each expert
takes, and their weights) and `attend(..., routing) -> out`, so routing and attention are
verified separately.

Shared by both modules:
- Expert g scores token t with s_g(t) = <x_t, w_g> / sqrt(dim) (its own query router w_g and
  key/value router); scores are computed in float32 at least.
- Hard selection is the top-k tokens by score (masked tokens never selected). If the sequence is
  not longer than k, every unmasked token is routed with weight 1.
- Router weights (differentiable, so the router learns):
  - "straight_through" (default): weight = sigmoid(s). The hard top-k passes no gradient; the
    router learns through the weights that scale the routed values and outputs. A weight depends
    on its own token only, which keeps batch independence and causality trivial.
  - "coor_descent": the CoLT5 coordinate-descent soft top-k of the whole score row (weights in
    [0, 1] summing to about k over unmasked tokens), gathered at the top-k tokens (the soft
    weights are monotone in s, so the selection is the same). Not allowed in the causal variant.
- Expert g: RMSNorm (its own gain) when prenorm, its own q/k/v/out projections, its own null key
  and value per head (always visible, never weighted). Values are multiplied by the key/value
  router weights; expert outputs by the query router weights. Attention is non-causal over the
  routed keys plus the null key, scale 1/sqrt(dim_head).
- Outputs are scattered back to token positions and summed over experts; with average_routed
  they are divided by the number of experts that routed the token (the local branch counts as
  one more expert). Tokens masked by `mask` output 0.

The module takes how its experts attend as two arguments and chooses neither (impls/ binds them,
one strategy per file: moa_loop.py, moa_batched.py, moa_flex.py):
- `experts(module, xq, xc, kv_weight, kv_valid) -> out`: the expert attention of the routed tokens
  (the strategy), from the module's parameters;
- `kernels(x, needs) -> (name, fn)`: the dense kernel (fn(q, k, v, cfg, key_padding_mask)) for a
  call with these features (impls/_moa.py's DenseKernels picks it). A call needs key padding only
  when some routed slot is invalid (checked on the host: one sync), so unpadded calls can take
  kernels without masks. The kernel actually used is in `module.last_kernel`
  (`last_local_kernel` for the local branch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnbench.spec import Block, Config

from .common import Kernel

ROUTERS = ("straight_through", "coor_descent")
# experts(module, xq, xc, kv_weight, kv_valid) -> each expert's output-projected slots (B, E, W, kq, dim)
Experts = Callable[..., torch.Tensor]
# kernels(x, needs) -> (name, dense kernel) for a call on x's device and dtype with these features
Kernels = Callable[[torch.Tensor, frozenset], tuple[str, Kernel]]


@dataclass
class Routing:
    """Which tokens each expert routes, with what weight.

    Shapes are (B, E, *W, k): batch, experts, query windows (autoregressive variant only), slots.
    index: token positions (long). valid: False for a slot that carries no token (fewer unmasked
    tokens than slots, or a causal window that routed fewer queries); its weight is 0.
    q_scores / kv_scores: the raw router scores (B, E, N) / (B, E, M), for validity checks.
    """

    q_index: torch.Tensor
    q_weight: torch.Tensor
    q_valid: torch.Tensor
    kv_index: torch.Tensor
    kv_weight: torch.Tensor
    kv_valid: torch.Tensor
    q_scores: torch.Tensor
    kv_scores: torch.Tensor


# -- small pieces ------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """x / ||x|| * sqrt(dim) * gain (a zero row stays zero, its gradient stays finite).

    The norm is taken in float32 at least: F.normalize's eps (1e-12) underflows to 0 in float16,
    so a zero row (the padding of the autoregressive variant's last window, which empty routing
    slots point at) would give 0/0 = NaN in the output and the gradient.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    return (F.normalize(x.to(acc), dim=-1) * math.sqrt(x.shape[-1])).to(x.dtype) * gain


def router_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, N, d) x (E, d) -> (B, E, N) scores, in float32 at least."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return torch.einsum("bnd,ed->ben", x.to(acc), weight.to(acc)) / math.sqrt(x.shape[-1])


def top_k_slots(scores: torch.Tensor, k: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard top-k over the last dim: (index sorted by position, valid). Masked tokens never valid."""
    n = scores.shape[-1]
    mask = mask.expand(scores.shape)
    if n <= k:
        return torch.arange(n, device=scores.device).expand(scores.shape), mask
    index = scores.masked_fill(~mask, float("-inf")).topk(k, dim=-1).indices.sort(dim=-1).values
    return index, mask.gather(-1, index)


def soft_top_k(
    s: torch.Tensor, k: float, mask: torch.Tensor, n_iters: int = 20, eps: float = 0.03,
    eps_init: float = 4.0, eps_decay: float = 0.7,
) -> torch.Tensor:
    """Coordinate-descent soft top-k (Wright 2015, as in CoLT5) with eps-scaling.

    Solves max <s, w> + eps * H(w) s.t. sum(w) = k, 0 <= w <= 1 over unmasked entries by
    alternating the dual variables: a (the sum constraint) and b = -relu(s + a) (the w <= 1
    constraint), so that w = exp(min(s + a, 0) / eps).
    """
    mask = mask.expand(s.shape)
    live = mask | ~mask.any(-1, keepdim=True)  # an all-masked row is solved as unmasked, then zeroed
    neg = torch.finfo(s.dtype).min
    logk = math.log(k)
    a = torch.zeros_like(s[..., :1])
    z = torch.zeros_like(s)  # (s + b) / eps with the initial b = -s
    for i in range(n_iters):
        e = max(eps_init * eps_decay**i, eps)
        if i:
            z = torch.minimum(s, -a) / e
        a = e * (logk - torch.where(live, z, neg).logsumexp(-1, keepdim=True))
    e = max(eps_init * eps_decay**n_iters, eps)
    w = torch.exp((s + a).clamp(max=0) / e)
    return torch.where(mask, w, torch.zeros_like(w))


def gather_tokens(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """src (B, N, d), index (B, *rest) -> (B, *rest, d)."""
    B, d = src.shape[0], src.shape[-1]
    flat = index.reshape(B, -1, 1).expand(-1, -1, d)
    return src.gather(1, flat).reshape(*index.shape, d)


def scatter_slots(
    out: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum slot outputs (B, S, d) into positions (B, n, d); invalid slots land in a dropped row.

    Returns (sum, count) with count (B, n) the number of valid slots per position.
    """
    B, S, d = out.shape
    idx = torch.where(valid, index, torch.full_like(index, n))
    total = out.new_zeros(B, n + 1, d).scatter_add(1, idx[..., None].expand(B, S, d), out)
    count = torch.zeros(B, n + 1, device=out.device).scatter_add(1, idx, valid.float())
    return total[:, :n], count[:, :n]


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return value


# -- the local branch ---------------------------------------------------------------------------


class LocalBranch(nn.Module):
    """LocalMHA-style blocked-window attention (bucket = t // window_size): non-causal sees the
    previous, own and next bucket; causal sees the previous and own bucket, causally."""

    def __init__(self, dim: int, window_size: int, dim_head: int, heads: int, prenorm: bool, causal: bool):
        super().__init__()
        inner = dim_head * heads
        self.window_size, self.heads, self.dim_head, self.causal = window_size, heads, dim_head, causal
        self.look_backward, self.look_forward = 1, (0 if causal else 1)
        self.norm = nn.Parameter(torch.ones(dim)) if prenorm else None
        self.to_q = nn.Parameter(torch.randn(dim, inner) / math.sqrt(dim))
        self.to_k = nn.Parameter(torch.randn(dim, inner) / math.sqrt(dim))
        self.to_v = nn.Parameter(torch.randn(dim, inner) / math.sqrt(dim))
        self.to_out = nn.Parameter(torch.randn(inner, dim) / math.sqrt(inner))

    def config(self, dropout_p: float = 0.0, seed: int = 0) -> Config:
        block = Block(self.window_size, self.look_backward, self.look_forward)
        return Config(scale=self.dim_head**-0.5, causal=self.causal, block=block, dropout_p=dropout_p,
                      dropout_seed=seed)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kernel: Callable, cfg: Config) -> torch.Tensor:
        B, N, _ = x.shape
        h = rms_norm(x, self.norm) if self.norm is not None else x
        q, k, v = ((h @ w).view(B, N, self.heads, self.dim_head).transpose(1, 2) for w in (self.to_q, self.to_k,
                                                                                            self.to_v))
        out, _ = kernel(q, k, v, cfg, key_padding_mask=mask)
        return out.transpose(1, 2).reshape(B, N, -1) @ self.to_out


# -- the shared expert machinery ----------------------------------------------------------------


class _RoutedExperts(nn.Module):
    def __init__(
        self, dim: int, dim_context: int, *, num_routed_queries: int, num_routed_key_values: int,
        num_experts: int, dim_head: int, heads: int, dropout: float, prenorm: bool, average_routed: bool,
        router: str, experts: Experts, kernels: Kernels,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("dim_context", dim_context), ("num_routed_queries", num_routed_queries),
                            ("num_routed_key_values", num_routed_key_values), ("num_experts", num_experts),
                            ("dim_head", dim_head), ("heads", heads)):
            _positive_int(name, value)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {dropout!r}")
        if router not in ROUTERS:
            raise ValueError(f"router: unknown router {router!r}; one of {ROUTERS}")
        for name, value in (("experts", experts), ("kernels", kernels)):
            if not callable(value):
                raise TypeError(f"{name}: must be a function (see attnbench.modules.mixture), got {type(value).__name__}")

        self.dim, self.dim_context = dim, dim_context
        self.num_routed_queries, self.num_routed_key_values = num_routed_queries, num_routed_key_values
        self.num_experts, self.heads, self.dim_head = num_experts, heads, dim_head
        self.dropout, self.average_routed, self.router = dropout, average_routed, router
        self.experts, self.kernels = experts, kernels
        self.last_kernel: str | None = None
        self.last_local_kernel: str | None = None

        E, inner = num_experts, heads * dim_head
        self.q_router = nn.Parameter(torch.randn(E, dim))
        self.kv_router = nn.Parameter(torch.randn(E, dim_context))
        self.norm = nn.Parameter(torch.ones(E, dim)) if prenorm else None
        self.context_norm = nn.Parameter(torch.ones(E, dim_context)) if prenorm else None
        self.to_q = nn.Parameter(torch.randn(E, dim, inner) / math.sqrt(dim))
        self.to_k = nn.Parameter(torch.randn(E, dim_context, inner) / math.sqrt(dim_context))
        self.to_v = nn.Parameter(torch.randn(E, dim_context, inner) / math.sqrt(dim_context))
        self.to_out = nn.Parameter(torch.randn(E, inner, dim) / math.sqrt(inner))
        self.null_k = nn.Parameter(torch.randn(E, heads, dim_head))
        self.null_v = nn.Parameter(torch.randn(E, heads, dim_head))
        self.local: LocalBranch | None = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, experts={self.num_experts}, routed_q={self.num_routed_queries}, "
                f"routed_kv={self.num_routed_key_values}, router={self.router}, "
                f"experts={getattr(self.experts, '__name__', self.experts)}, kernels={self.kernels}")

    # -- kernels -------------------------------------------------------------------------------
    def _kernel(self, x: torch.Tensor, needs: set[str], local: bool = False) -> Kernel:
        """The dense kernel for this call, from `kernels`: the features asked for, plus backward
        when gradients are on and dropout when training with it."""
        needs = set(needs)
        if torch.is_grad_enabled():
            needs.add("backward")
        if self.training and self.dropout > 0:
            needs.add("dropout")
        name, fn = self.kernels(x, frozenset(needs))
        if local:
            self.last_local_kernel = name
        else:
            self.last_kernel = name
        return fn

    def expert_kernel(self, x: torch.Tensor, kv_valid: torch.Tensor) -> tuple[Kernel, bool]:
        """(kernel, padded) for the experts' attention: key padding is needed only when some
        routed key slot is empty."""
        padded = not bool(kv_valid.all())
        return self._kernel(x, {"cross", "key_padding"} if padded else {"cross"}), padded

    def expert_config(self, x: torch.Tensor) -> Config:
        """The experts' attention config: scale 1/sqrt(dim_head), dropout when training."""
        p = self.dropout if self.training else 0.0
        seed = int(torch.randint(0, 2**31 - 1, ())) if p > 0 else 0
        return Config(scale=self.dim_head**-0.5, dropout_p=p, dropout_seed=seed)

    # -- routing weights -----------------------------------------------------------------------
    def _weights(self, scores, k, mask, index, valid) -> torch.Tensor:
        if scores.shape[-1] <= k:
            w = torch.ones_like(scores)
        elif self.router == "straight_through":
            w = torch.sigmoid(scores)
        else:
            w = soft_top_k(scores, k, mask)
        w = w.gather(-1, index)
        return torch.where(valid, w, torch.zeros_like(w))

    # -- expert attention ----------------------------------------------------------------------
    def _expert_slots(self, xq_src: torch.Tensor, xc_src: torch.Tensor, r: Routing) -> torch.Tensor:
        """Weighted expert outputs per query slot: (B, E, *W, kq, dim)."""
        B, E = xq_src.shape[0], self.num_experts
        kq, kk = r.q_index.shape[-1], r.kv_index.shape[-1]
        qi, ki = r.q_index.reshape(B, E, -1, kq), r.kv_index.reshape(B, E, -1, kk)
        xq, xc = gather_tokens(xq_src, qi), gather_tokens(xc_src, ki)  # (B, E, W, k, d)
        kv_weight = r.kv_weight.reshape(B, E, -1, kk).to(xc.dtype)
        kv_valid = r.kv_valid.reshape(B, E, -1, kk)
        out = self.experts(self, xq, xc, kv_weight, kv_valid)
        out = out * r.q_weight.reshape(B, E, -1, kq, 1).to(out.dtype)
        return out.reshape(*r.q_index.shape, self.dim)

    def fold_experts(self, xq, xc, kv_weight, kv_valid):
        """Every expert's projections at once: q (B, E, W, kq, H, dh), k and v with the null key
        first (B, E, W, kk + 1, H, dh), and keep (B, E, W, kk + 1), the valid key slots."""
        B, E, W, kq, _ = xq.shape
        kk, H, dh = xc.shape[3], self.heads, self.dim_head
        if self.norm is not None:
            xq = rms_norm(xq, self.norm[None, :, None, None])
            xc = rms_norm(xc, self.context_norm[None, :, None, None])
        q = torch.einsum("bewkd,edf->bewkf", xq, self.to_q).view(B, E, W, kq, H, dh)
        k = torch.einsum("bewkd,edf->bewkf", xc, self.to_k).view(B, E, W, kk, H, dh)
        v = (torch.einsum("bewkd,edf->bewkf", xc, self.to_v) * kv_weight[..., None]).view(B, E, W, kk, H, dh)
        null_k = self.null_k[None, :, None, None].expand(B, E, W, 1, H, dh).to(k.dtype)
        null_v = self.null_v[None, :, None, None].expand(B, E, W, 1, H, dh).to(v.dtype)
        k, v = torch.cat((null_k, k), dim=3), torch.cat((null_v, v), dim=3)
        keep = torch.cat((kv_valid.new_ones(B, E, W, 1), kv_valid), dim=3)
        return q, k, v, keep

    def unfold_experts(self, o: torch.Tensor) -> torch.Tensor:
        """Attention outputs (B, E, W, kq, H, dh) through each expert's output projection."""
        B, E, W, kq, H, dh = o.shape
        return torch.einsum("bewkf,efd->bewkd", o.reshape(B, E, W, kq, H * dh), self.to_out)

    def _combine(self, total, count, x, mask, mask_given, null_token) -> torch.Tensor:
        """Add the local branch, average, fill unrouted tokens, zero masked ones."""
        if self.local is not None:
            p = self.dropout if self.training else 0.0
            cfg = self.local.config(p, int(torch.randint(0, 2**31 - 1, ())) if p > 0 else 0)
            needs = {"blocked_window"} | ({"causal"} if self.local.causal else set())
            needs |= {"key_padding"} if mask_given else set()
            total = total + self.local(x, mask if mask_given else None, self._kernel(x, needs, local=True), cfg)
            count = count + 1
        if self.average_routed:
            total = total / count.clamp(min=1)[..., None].to(total.dtype)
        if null_token is not None:
            total = torch.where(count[..., None] == 0, null_token.to(total.dtype), total)
        return total.masked_fill(~mask[..., None], 0.0)

    def _check_x(self, x: torch.Tensor, mask: torch.Tensor | None, name: str = "x", dim: int | None = None):
        dim = self.dim if dim is None else dim
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != dim:
            raise ValueError(f"{name}: expected a (batch, seq, {dim}) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: must be a floating-point tensor, got {x.dtype}")
        if mask is None:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"{name} mask: expected shape {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{name} mask: must be a bool tensor (True = keep), got {mask.dtype}")
        return mask


# -- MixtureOfAttention -------------------------------------------------------------------------


class MixtureOfAttention(_RoutedExperts):
    """Routed mixture of attention experts (CoLT5-style), self- or cross-attention.

    forward(x (B, N, dim), context (B, M, dim_context) = None, mask (B, N) = None,
    context_mask (B, M) = None) -> (B, N, dim). Masks are bool, True = keep. Without context,
    keys/values come from x and context_mask is mask. The local branch (local_attn=True, self
    attention only) is LocalMHA-style: buckets of local_attn_window_size, each query sees its own,
    the previous and the next bucket. Without it, a token no expert routed gets null_routed_token.
    """

    def __init__(
        self, dim: int, *, num_routed_queries: int, num_routed_key_values: int, dim_context: int | None = None,
        local_attn: bool = False, local_attn_window_size: int | None = None, num_experts: int = 2,
        dim_head: int = 64, heads: int = 8, dropout: float = 0.0, prenorm: bool = True, average_routed: bool = False,
        router: str = "straight_through", experts: Experts, kernels: Kernels,
    ):
        super().__init__(
            dim, dim if dim_context is None else dim_context, num_routed_queries=num_routed_queries,
            num_routed_key_values=num_routed_key_values, num_experts=num_experts, dim_head=dim_head, heads=heads,
            dropout=dropout, prenorm=prenorm, average_routed=average_routed, router=router, experts=experts,
            kernels=kernels,
        )
        if local_attn:
            if local_attn_window_size is None:
                raise ValueError("local_attn_window_size: required when local_attn=True")
            _positive_int("local_attn_window_size", local_attn_window_size)
            self.local = LocalBranch(dim, local_attn_window_size, dim_head, heads, prenorm, causal=False)
            self.null_routed_token = None
        else:
            self.null_routed_token = nn.Parameter(torch.randn(dim))

    def _inputs(self, x, context, mask, context_mask):
        mask_given = mask is not None
        mask = self._check_x(x, mask)
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask: given without context")
            return x, mask, mask_given, x, mask
        if self.local is not None:
            raise ValueError("context: the local attention branch is self-attention only; pass no context "
                             "or build the module with local_attn=False")
        context_mask = self._check_x(context, context_mask, "context", self.dim_context)
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context: batch {context.shape[0]} differs from x's batch {x.shape[0]}")
        return x, mask, mask_given, context, context_mask

    def route(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              context_mask: torch.Tensor | None = None) -> Routing:
        x, mask, _, context, context_mask = self._inputs(x, context, mask, context_mask)
        kq, kk = self.num_routed_queries, self.num_routed_key_values
        sq, skv = router_scores(x, self.q_router), router_scores(context, self.kv_router)
        qmask, kvmask = mask[:, None], context_mask[:, None]
        q_index, q_valid = top_k_slots(sq, kq, qmask)
        kv_index, kv_valid = top_k_slots(skv, kk, kvmask)
        return Routing(
            q_index, self._weights(sq, kq, qmask, q_index, q_valid), q_valid,
            kv_index, self._weights(skv, kk, kvmask, kv_index, kv_valid), kv_valid, sq, skv,
        )

    def attend(self, x: torch.Tensor, context: torch.Tensor | None, routing: Routing,
               mask: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask, mask_given, context, _ = self._inputs(x, context, mask, context_mask)
        B, N, _ = x.shape
        slots = self._expert_slots(x, context, routing)  # (B, E, kq, dim)
        total, count = scatter_slots(slots.flatten(1, 2), routing.q_index.flatten(1), routing.q_valid.flatten(1), N)
        return self._combine(total, count, x, mask, mask_given, self.null_routed_token)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(x, context, self.route(x, context, mask, context_mask), mask, context_mask)


# -- MixtureOfAutoregressiveAttention -----------------------------------------------------------


class MixtureOfAutoregressiveAttention(_RoutedExperts):
    """The strictly causal routed mixture: out[t] depends only on x[<= t], routing included.

    forward(x (B, N, dim), mask (B, N) = None) -> (B, N, dim).

    Semantics, with R = routed_window_size (default local_attn_window_size), window i holding
    positions [i*R, (i+1)*R), kq = num_routed_queries, kk = num_routed_key_values:
    - Local branch (always on): causal LocalMHA-style attention, buckets of local_attn_window_size,
      a query sees its own bucket up to itself and the whole previous bucket.
    - Routed part, for each expert g and each window i >= 1 (window 0 is local only):
      - key/values: the top-kk tokens of positions [0, i*R) by the expert's key/value score
        (masked tokens never); if i*R <= kk, all of them with weight 1.
      - queries: if R <= kq, every unmasked token of the window with weight 1. Otherwise a token t
        of window i is routed iff its query score is strictly above the threshold of window i
        (the kq-th largest unmasked query score of window i - 1; -inf if it has fewer than kq
        unmasked tokens) and fewer than kq tokens of window i before t were routed. Top-k inside
        a window would let later tokens evict earlier ones (non-causal); the threshold is the
        causal estimate of that top-k cut and caps the work at kq queries per window.
      - a routed query attends (non-causally within the routed set, which lies wholly in the
        past) over those key/values plus the expert's null key; weights are sigmoid(score).
    - Sum of the local branch and the routed experts (averaged over 1 + the experts that routed
      the token with average_routed); masked tokens output 0. No null_routed_token: the local
      branch reaches every token. Decisions never depend on the sequence length N.
    Only router="straight_through": a soft top-k weight depends on the whole row (non-causal).
    """

    def __init__(
        self, dim: int, *, num_routed_queries: int, num_routed_key_values: int, local_attn_window_size: int,
        routed_window_size: int | None = None, num_experts: int = 2, dim_head: int = 64, heads: int = 8,
        dropout: float = 0.0, prenorm: bool = True, average_routed: bool = False, router: str = "straight_through",
        experts: Experts, kernels: Kernels,
    ):
        if router != "straight_through":
            raise ValueError(f"router: {router!r} is not causal (a soft top-k weight depends on the whole "
                             "window); MixtureOfAutoregressiveAttention takes only 'straight_through'")
        super().__init__(
            dim, dim, num_routed_queries=num_routed_queries, num_routed_key_values=num_routed_key_values,
            num_experts=num_experts, dim_head=dim_head, heads=heads, dropout=dropout, prenorm=prenorm,
            average_routed=average_routed, router=router, experts=experts, kernels=kernels,
        )
        _positive_int("local_attn_window_size", local_attn_window_size)
        self.routed_window_size = _positive_int(
            "routed_window_size", local_attn_window_size if routed_window_size is None else routed_window_size)
        self.local = LocalBranch(dim, local_attn_window_size, dim_head, heads, prenorm, causal=True)

    def route(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> Routing:
        mask = self._check_x(x, mask)
        B, N, _ = x.shape
        E, R, kq, kk = self.num_experts, self.routed_window_size, self.num_routed_queries, self.num_routed_key_values
        nw = -(-N // R)
        wq, pad = nw - 1, nw * R - N
        sq, skv = router_scores(x, self.q_router), router_scores(x, self.kv_router)
        mask_p = F.pad(mask, (0, pad), value=False)
        dev = x.device

        # queries, per window 1 .. nw-1
        mw = mask_p.view(B, 1, nw, R)
        cur = F.pad(sq, (0, pad)).view(B, E, nw, R)[:, :, 1:]
        if R <= kq:
            q_local = torch.arange(R, device=dev).expand(B, E, wq, R)
            q_valid = mw[:, :, 1:].expand(B, E, wq, R)
            q_weight = q_valid.to(cur.dtype)
        else:
            prev = F.pad(sq, (0, pad)).view(B, E, nw, R)[:, :, :-1].masked_fill(~mw[:, :, :-1], float("-inf"))
            threshold = prev.topk(kq, dim=-1).values[..., -1:]
            passed = (cur > threshold) & mw[:, :, 1:]
            passed = passed & (passed.cumsum(-1) <= kq)  # capacity: the first kq that pass
            q_local = torch.sort((~passed).to(torch.int8), dim=-1, stable=True).indices[..., :kq]
            q_valid = passed.gather(-1, q_local)
            q_weight = torch.where(q_valid, torch.sigmoid(cur).gather(-1, q_local), torch.zeros((), device=dev))
        q_index = q_local + R * torch.arange(1, nw, device=dev).view(1, 1, wq, 1)

        # key/values: top-kk of everything before the window
        ends = R * torch.arange(1, nw, device=dev)  # window i sees positions < i * R
        live = (torch.arange(nw * R, device=dev) < ends[:, None]) & mask_p[:, None, None, :]  # (B, 1, wq, Np)
        scores = F.pad(skv, (0, pad))[:, :, None].expand(B, E, wq, nw * R)
        slots = min(kk, wq * R)
        kv_index = scores.masked_fill(~live, float("-inf")).topk(slots, dim=-1).indices.sort(dim=-1).values
        kv_valid = live.expand(B, E, wq, nw * R).gather(-1, kv_index)
        every = (ends <= kk).view(1, 1, wq, 1)
        kv_weight = torch.where(every, torch.ones((), device=dev), torch.sigmoid(scores).gather(-1, kv_index))
        kv_weight = torch.where(kv_valid, kv_weight, torch.zeros((), device=dev))
        return Routing(q_index, q_weight, q_valid, kv_index, kv_weight, kv_valid, sq, skv)

    def attend(self, x: torch.Tensor, routing: Routing, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask_given = mask is not None
        mask = self._check_x(x, mask)
        B, N, _ = x.shape
        R = self.routed_window_size
        total, count = x.new_zeros(B, N, self.dim), torch.zeros(B, N, device=x.device)
        if routing.q_index.shape[2] > 0:
            nw = routing.q_index.shape[2] + 1
            x_p = F.pad(x, (0, 0, 0, nw * R - N))
            slots = self._expert_slots(x_p, x_p, routing)  # (B, E, W, kq, dim)
            total, count = scatter_slots(slots.flatten(1, 3), routing.q_index.flatten(1),
                                         routing.q_valid.flatten(1), N)
        return self._combine(total, count, x, mask, mask_given, None)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(x, self.route(x, mask), mask)
