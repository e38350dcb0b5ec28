"""Float64 oracles for routed attention (oracles/CONTRACT.md "Routed attention").

Written from the contract with plain per-batch, per-expert (and per-window) loops over exactly
the routed tokens, so no key padding is needed; the attention itself runs through
`attnbench.oracles.dense.attention`. Only the module's parameters are read (cast to float64);
the constants of the contract (score scale 1/sqrt(dim), attention scale 1/sqrt(dim_head), the
local branch's buckets, the coordinate-descent schedule) are written here again on purpose.

- route_is_valid(scores, selected, k, mask, atol): is `selected` a top-k set of `scores`?
- routed_attention(module, x, context, q_sets, kv_sets): the experts' summed outputs and counts.
- mixture_reference(module, x, context, mask, context_mask, routing) -> out (float64)
- autoregressive_mixture_reference(module, x, mask, routing) -> out (float64)
`routing` (a module's Routing) fixes the selected sets; weights are always recomputed here.
"""

from __future__ import annotations

import math

import torch

from attnbench.oracles.dense import attention
from attnbench.spec import Block, Config

F64 = torch.float64
# coordinate-descent soft top-k schedule (CoLT5 router defaults)
CD_ITERS, CD_EPS, CD_EPS_INIT, CD_EPS_DECAY = 20, 0.03, 4.0, 0.7

Sets = list[list[torch.Tensor]]  # [batch][expert] -> positions (long, ascending)


# -- routing validity ---------------------------------------------------------------------------


def route_problem(scores: torch.Tensor, selected: torch.Tensor, k: int, mask: torch.Tensor | None = None,
                  atol: float = 0.0) -> str | None:
    """Why `selected` is not a valid top-k set of the 1-D `scores` (None when it is).

    Valid: distinct in-range unmasked positions, min(k, #unmasked) of them, and no unselected
    unmasked score above a selected one by more than atol (ties within atol go either way).
    """
    s = scores.detach().to(F64).cpu().reshape(-1)
    n = s.numel()
    keep = torch.ones(n, dtype=torch.bool) if mask is None else mask.detach().cpu().bool().reshape(-1)
    sel = [int(i) for i in selected.detach().cpu().reshape(-1)]
    if len(set(sel)) != len(sel):
        return f"duplicate positions in {sel}"
    bad = [i for i in sel if not 0 <= i < n]
    if bad:
        return f"positions {bad} outside [0, {n})"
    masked = [i for i in sel if not keep[i]]
    if masked:
        return f"masked positions {masked} were selected"
    want = min(k, int(keep.sum()))
    if len(sel) != want:
        return f"selected {len(sel)} tokens, expected min(k={k}, unmasked={int(keep.sum())}) = {want}"
    rest = keep.clone()
    rest[sel] = False
    if sel and rest.any():
        lo = min(sel, key=lambda i: float(s[i]))
        hi = int(torch.nonzero(rest).reshape(-1)[s[rest].argmax()])
        if s[hi] > s[lo] + atol:
            return f"position {hi} (score {float(s[hi]):.6g}) left out while {lo} (score {float(s[lo]):.6g}) selected"
    return None


def route_is_valid(scores: torch.Tensor, selected: torch.Tensor, k: int, mask: torch.Tensor | None = None,
                   atol: float = 0.0) -> bool:
    """True if `selected` is a top-k set of `scores` under float64, ties within atol either way."""
    return route_problem(scores, selected, k, mask, atol) is None


# -- the contract's pieces, in float64 -----------------------------------------------------------


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(F64)


def scores64(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """(B, N, d) tokens, (E, d) router -> (B, E, N) scores <x_t, w_g> / sqrt(d)."""
    return torch.einsum("bnd,ed->ben", x.to(F64), router.to(F64)) / math.sqrt(x.shape[-1])


def _rms(x: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    if gain is None:
        return x
    norm = torch.sqrt((x * x).sum(-1, keepdim=True)).clamp(min=1e-12)
    return x * math.sqrt(x.shape[-1]) / norm * gain.to(F64)


def _top_k_set(s: torch.Tensor, k: int, keep: torch.Tensor) -> torch.Tensor:
    """Positions of the top-k unmasked scores of a row (all unmasked ones if the row is <= k long)."""
    pos = torch.nonzero(keep.cpu()).reshape(-1)
    if s.numel() > k:
        order = torch.sort(s.detach().cpu()[pos], descending=True, stable=True).indices
        pos = pos[order[:k]]
    return pos.sort().values


def _soft_top_k(s: torch.Tensor, k: int) -> torch.Tensor:
    """CoLT5 coordinate descent on one row of unmasked scores: weights in [0, 1], sum ~ k."""
    logk = math.log(k)
    b = -s
    eps = max(CD_EPS_INIT, CD_EPS)
    for _ in range(CD_ITERS):
        a = eps * (logk - torch.logsumexp((s + b) / eps, dim=-1))
        b = -torch.relu(s + a)
        eps = max(eps * CD_EPS_DECAY, CD_EPS)
    return torch.exp((s + a + b) / eps)


def route_weights(module, s: torch.Tensor, sel: torch.Tensor, k: int, keep: torch.Tensor) -> torch.Tensor:
    """Router weights of the selected positions of one score row (float64, differentiable)."""
    if s.numel() <= k:
        return torch.ones(len(sel), dtype=F64, device=s.device)
    if module.router == "straight_through":
        return torch.sigmoid(s[sel])
    pos = torch.nonzero(keep.cpu()).reshape(-1).to(s.device)
    full = torch.zeros_like(s).index_put((pos,), _soft_top_k(s[pos], k))
    return full[sel]


def _sets_from(index: torch.Tensor, valid: torch.Tensor) -> Sets:
    """A module Routing's (B, E, k) index / valid -> positions per batch and expert."""
    return [[index[b, g][valid[b, g]].detach().cpu().sort().values for g in range(index.shape[1])]
            for b in range(index.shape[0])]


def expert_attention(module, g: int, xq: torch.Tensor, xc: torch.Tensor, wq: torch.Tensor,
                     wkv: torch.Tensor) -> torch.Tensor:
    """Expert g on its routed queries xq (nq, d) and key/values xc (nk, dc) -> (nq, dim), float64."""
    H, dh = module.heads, module.dim_head
    norm = None if module.norm is None else module.norm[g]
    cnorm = None if module.context_norm is None else module.context_norm[g]
    hq, hc = _rms(xq, norm), _rms(xc, cnorm)
    q = (hq @ module.to_q[g].to(F64)).view(-1, H, dh).transpose(0, 1)
    k = (hc @ module.to_k[g].to(F64)).view(-1, H, dh).transpose(0, 1)
    v = ((hc @ module.to_v[g].to(F64)) * wkv[:, None]).view(-1, H, dh).transpose(0, 1)
    k = torch.cat((module.null_k[g].to(F64)[:, None], k), dim=1)  # the null key comes first
    v = torch.cat((module.null_v[g].to(F64)[:, None], v), dim=1)
    out, _ = attention(q[None], k[None], v[None], Config(scale=dh**-0.5))
    out = out[0].transpose(0, 1).reshape(len(xq), H * dh) @ module.to_out[g].to(F64)
    return out * wq[:, None]


def routed_attention(module, x: torch.Tensor, context: torch.Tensor | None, q_sets: Sets, kv_sets: Sets,
                     mask: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Given a routing (positions per batch and expert), the experts' summed outputs (B, N, dim)
    and the number of experts that routed each token (B, N), in float64."""
    x = x.to(F64)
    ctx = x if context is None else context.to(F64)
    B, N, _ = x.shape
    keep = _keep(mask, x)
    ckeep = keep if context is None else _keep(context_mask, ctx)
    sq, skv = scores64(x, module.q_router), scores64(ctx, module.kv_router)
    rows, counts = [], torch.zeros(B, N, dtype=F64)
    for b in range(B):
        row = torch.zeros(N, module.dim, dtype=F64, device=x.device)
        for g in range(module.num_experts):
            qi, ki = q_sets[b][g].to(x.device), kv_sets[b][g].to(x.device)
            if len(qi) == 0:
                continue
            wq = route_weights(module, sq[b, g], qi, module.num_routed_queries, keep[b])
            wkv = route_weights(module, skv[b, g], ki, module.num_routed_key_values, ckeep[b])
            out = expert_attention(module, g, x[b, qi], ctx[b, ki], wq, wkv)
            row = row.index_add(0, qi, out)
            counts[b, qi.cpu()] += 1
        rows.append(row)
    return torch.stack(rows), counts.to(x.device)


def _keep(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()


def _local(module, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """The local branch: LocalMHA buckets; (prev, own, next) non-causal, (prev, own) causal."""
    loc = module.local
    B, N, _ = x.shape
    H, dh = module.heads, module.dim_head
    h = _rms(x, loc.norm)
    q, k, v = ((h @ w.to(F64)).view(B, N, H, dh).transpose(1, 2) for w in (loc.to_q, loc.to_k, loc.to_v))
    block = Block(loc.window_size, 1, 0 if causal else 1)
    out, _ = attention(q, k, v, Config(scale=dh**-0.5, causal=causal, block=block), key_padding_mask=mask)
    return out.transpose(1, 2).reshape(B, N, H * dh) @ loc.to_out.to(F64)


def _combine(module, x, total, counts, mask, causal: bool, null_token) -> torch.Tensor:
    if module.local is not None:
        total = total + _local(module, x, mask, causal)
        counts = counts + 1
    if module.average_routed:
        total = total / counts.clamp(min=1)[..., None]
    if null_token is not None:
        total = torch.where(counts[..., None] == 0, null_token.to(F64), total)
    return torch.where(_keep(mask, x)[..., None], total, torch.zeros((), dtype=F64, device=x.device))


def _require(module, name: str) -> None:
    if type(module).__name__ != name or not hasattr(module, "q_router"):
        raise TypeError(f"this oracle reads attnbench {name} parameters; got {type(module).__name__}")


# -- the module oracles ---------------------------------------------------------------------------


def mixture_reference(module, x: torch.Tensor, context: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                      routing=None) -> torch.Tensor:
    """MixtureOfAttention's output in float64 from its parameters (oracles/CONTRACT.md "Routed attention")."""
    _require(module, "MixtureOfAttention")
    x64 = x.to(F64)
    ctx = x64 if context is None else context.to(F64)
    keep = _keep(mask, x64)
    ckeep = keep if context is None else _keep(context_mask, ctx)
    if routing is None:
        sq, skv = scores64(x64, module.q_router), scores64(ctx, module.kv_router)
        B, E = x.shape[0], module.num_experts
        q_sets = [[_top_k_set(sq[b, g], module.num_routed_queries, keep[b]) for g in range(E)] for b in range(B)]
        kv_sets = [[_top_k_set(skv[b, g], module.num_routed_key_values, ckeep[b]) for g in range(E)]
                   for b in range(B)]
    else:
        q_sets, kv_sets = _sets_from(routing.q_index, routing.q_valid), _sets_from(routing.kv_index, routing.kv_valid)
    total, counts = routed_attention(module, x64, context, q_sets, kv_sets, mask, context_mask)
    return _combine(module, x64, total, counts, mask, False, module.null_routed_token)


def autoregressive_sets(module, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[list, list]:
    """The causal routing, one decision at a time: sets[b][g][i] for query windows i = 1 .. nw - 1."""
    x = x.to(F64)
    B, N, _ = x.shape
    R, kq, kk = module.routed_window_size, module.num_routed_queries, module.num_routed_key_values
    keep = _keep(mask, x).cpu()
    sq, skv = scores64(x, module.q_router).detach().cpu(), scores64(x, module.kv_router).detach().cpu()
    q_sets = [[[] for _ in range(module.num_experts)] for _ in range(B)]
    kv_sets = [[[] for _ in range(module.num_experts)] for _ in range(B)]
    for b in range(B):
        for g in range(module.num_experts):
            for start in range(R, N, R):
                window = range(start, min(start + R, N))
                if R <= kq:
                    chosen = [t for t in window if keep[b, t]]
                else:
                    prev = sorted((float(sq[b, g, t]) for t in range(start - R, start) if keep[b, t]), reverse=True)
                    threshold = prev[kq - 1] if len(prev) >= kq else -math.inf
                    chosen = []
                    for t in window:
                        if keep[b, t] and float(sq[b, g, t]) > threshold and len(chosen) < kq:
                            chosen.append(t)
                q_sets[b][g].append(torch.tensor(chosen, dtype=torch.long))
                past = keep[b].clone()
                past[start:] = False
                kv_sets[b][g].append(_top_k_set(skv[b, g, :start], kk, past[:start]))
    return q_sets, kv_sets


def autoregressive_mixture_reference(module, x: torch.Tensor, mask: torch.Tensor | None = None,
                                     routing=None) -> torch.Tensor:
    """MixtureOfAutoregressiveAttention's output in float64 (the causal semantics in its docstring)."""
    _require(module, "MixtureOfAutoregressiveAttention")
    x64 = x.to(F64)
    B, N, _ = x64.shape
    R, kq, kk = module.routed_window_size, module.num_routed_queries, module.num_routed_key_values
    if routing is None:
        q_sets, kv_sets = autoregressive_sets(module, x64, mask)
    else:
        nwin = routing.q_index.shape[2]
        q_sets = [[[routing.q_index[b, g, i][routing.q_valid[b, g, i]].cpu() for i in range(nwin)]
                   for g in range(module.num_experts)] for b in range(B)]
        kv_sets = [[[routing.kv_index[b, g, i][routing.kv_valid[b, g, i]].cpu() for i in range(nwin)]
                    for g in range(module.num_experts)] for b in range(B)]
    sq, skv = scores64(x64, module.q_router), scores64(x64, module.kv_router)
    rows, counts = [], torch.zeros(B, N, dtype=F64)
    for b in range(B):
        row = torch.zeros(N, module.dim, dtype=F64, device=x.device)
        for g in range(module.num_experts):
            for i, (qi, ki) in enumerate(zip(q_sets[b][g], kv_sets[b][g]), start=1):
                if len(qi) == 0:
                    continue
                qi, ki = qi.to(x.device), ki.to(x.device)
                wq = torch.ones(len(qi), dtype=F64, device=x.device) if R <= kq else torch.sigmoid(sq[b, g, qi])
                wkv = torch.ones(len(ki), dtype=F64, device=x.device) if i * R <= kk else torch.sigmoid(skv[b, g, ki])
                out = expert_attention(module, g, x64[b, qi], x64[b, ki], wq, wkv)
                row = row.index_add(0, qi, out)
                counts[b, qi.cpu()] += 1
        rows.append(row)
    total = torch.stack(rows)
    return _combine(module, x64, total, counts.to(x.device), mask, True, None)


# -- how far the routing is from a tie ------------------------------------------------------------


def _cut_gap(s: torch.Tensor, k: int) -> float:
    """The gap between the k-th and the (k+1)-th largest of a 1-D score row (inf if <= k of them)."""
    if s.numel() <= k:
        return math.inf
    top = torch.topk(s, k + 1).values
    return float(top[k - 1] - top[k])


def decision_margin(q_router: torch.Tensor, kv_router: torch.Tensor, x: torch.Tensor, context: torch.Tensor | None,
                    mask: torch.Tensor | None, context_mask: torch.Tensor | None, kq: int, kk: int,
                    window: int | None = None) -> float:
    """The smallest score gap any routing decision rests on, in float64: how far the scores are
    from a tie that could send a token either way. `window` set: the autoregressive decisions
    (key/values: top-kk of each prefix [0, i R); queries: score against the previous window's
    threshold), else the top-k cuts of the whole rows."""
    x = x.detach().to(F64)
    ctx = x if context is None else context.detach().to(F64)
    keep = _keep(mask, x).cpu()
    ckeep = keep if context is None else _keep(context_mask, ctx).cpu()
    sq, skv = scores64(x, q_router.detach()).cpu(), scores64(ctx, kv_router.detach()).cpu()
    B, E, N = sq.shape
    gaps = [math.inf]
    for b in range(B):
        for g in range(E):
            if window is None:
                gaps += [_cut_gap(sq[b, g][keep[b]], kq), _cut_gap(skv[b, g][ckeep[b]], kk)]
                continue
            for start in range(window, N, window):
                past = keep[b, :start]
                gaps.append(_cut_gap(skv[b, g, :start][past], kk))
                prev = torch.sort(sq[b, g, start - window : start][keep[b, start - window : start]], descending=True).values
                if window > kq and len(prev) >= kq:
                    t = torch.arange(start, min(start + window, N))
                    near = (sq[b, g, t] - prev[kq - 1]).abs()[keep[b, t]]
                    gaps += [float(near.min())] if near.numel() else []
    return min(gaps)
