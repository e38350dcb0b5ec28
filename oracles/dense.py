"""The float64 oracle for the dense attention core, written straight from oracles/CONTRACT.md.

Visibility is computed here from index arithmetic alone and shares no code with any
implementation's mask builders: an oracle that shares a kernel's bug proves nothing.
"""

from __future__ import annotations

import torch

from attnbench.checks import check_call, check_document_ids
from attnbench.spec import Block, Config, Inputs, Spec

NEG_INF = float("-inf")


def visible(
    B: int,
    Sq: int,
    Sk: int,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    block: Block | None = None,
    align: str = "bottom_right",
    key_padding_mask: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    document_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Boolean (B, Sq, Sk): may query i of batch b see key j? With `rows` (query indices),
    (B, len(rows), Sk) for those queries only. With document_ids (doc_q (B, Sq), doc_k (B, Sk)),
    only keys of the query's own document."""
    i = (torch.arange(Sq) if rows is None else rows.cpu()).view(-1, 1)
    j = torch.arange(Sk).view(1, Sk)
    p = i + (Sk - Sq) if align == "bottom_right" else i  # the query's absolute position
    ok = torch.ones(i.shape[0], Sk, dtype=torch.bool)
    if causal:
        ok &= j <= p
    if window is not None:
        left, right = window
        if left is not None:
            ok &= j >= p - left
        if right is not None:
            ok &= j <= p + right
    if block is not None:
        bq = torch.div(p, block.window_size, rounding_mode="floor")
        bk = torch.div(j, block.window_size, rounding_mode="floor")
        ok &= (bk >= bq - block.look_backward) & (bk <= bq + block.look_forward)
    ok = ok.expand(B, i.shape[0], Sk).clone()
    if key_padding_mask is not None:
        ok &= key_padding_mask.cpu().bool().view(B, 1, Sk)
    if document_ids is not None:
        doc_q, doc_k = (d.cpu().long() for d in document_ids)
        if rows is not None:
            doc_q = doc_q[:, rows.cpu()]
        ok &= doc_q[:, :, None] == doc_k[:, None, :]
    return ok


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: Config,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    document_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Sq, Dv) and lse (B, Hq, Sq), in float64, differentiable by autograd.
    With `rows` (query indices), (B, Hq, len(rows), Dv) and (B, Hq, len(rows)) for those
    queries only: memory and time O(len(rows) * Sk), exact for any Sq.

    Inputs follow the call convention (attnbench.checks; ValueError otherwise), in any one
    floating dtype; Sk = 0 gives empty rows (out 0, lse -inf, zero gradients).

    The score features (CONTRACT.md, "Score features"): cfg.softcap caps the scaled logit
    before the bias, `alibi_slopes` adds -slope * |p(i) - j| after the bias, `sinks` adds
    exp(sink) to every row's softmax denominator (the lse includes it; an empty row has lse = sink).

    fp8 (CONTRACT.md, "fp8"): float8_e4m3fn q, k, v with float32 descales (shape () or (B, Hkv);
    None is 1) are attention on the dequantized values t * t_descale, computed in float64.

    Dropout is not part of the oracle: properties check it statistically instead.
    """
    descales = dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    check_call(q, k, v, cfg, key_padding_mask, bias, who="oracle", alibi_slopes=alibi_slopes, sinks=sinks,
               **descales)
    if q.dtype == torch.float8_e4m3fn:
        q, k, v = (dequantize(t, d) for t, d in zip((q, k, v), descales.values()))
    B, Hq, Sq, D = q.shape
    if document_ids is not None:
        check_document_ids(document_ids, B, Sq, k.shape[2], who="oracle")
    if rows is not None:
        q = q[:, :, rows.to(q.device)]
        if bias is not None and bias.dim() >= 2 and bias.shape[-2] == Sq:
            bias = bias[..., rows.to(bias.device), :]
    Hkv, Sk = k.shape[1], k.shape[2]
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    group = Hq // Hkv
    k = k.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)

    # Invisible keys are excluded entirely (oracles/CONTRACT.md), so whatever they hold, NaN included,
    # must not reach the output or a gradient: compute with non-finite entries zeroed, then give
    # a non-finite key a NaN logit and a non-finite value a NaN output wherever it is visible.
    k_bad = ~torch.isfinite(k).all(-1)[:, :, None, :]  # (B, Hq, 1, Sk)
    v_bad = ~torch.isfinite(v).all(-1)[:, :, None, :]
    k = torch.where(torch.isfinite(k), k, torch.zeros((), dtype=k.dtype, device=k.device))
    v = torch.where(torch.isfinite(v), v, torch.zeros((), dtype=v.dtype, device=v.device))

    s = cfg.scale * (q @ k.transpose(-1, -2))
    if cfg.softcap is not None:
        s = cfg.softcap * torch.tanh(s / cfg.softcap)
    s = torch.where(k_bad, torch.full((), float("nan"), dtype=s.dtype, device=s.device), s)
    if bias is not None:
        s = s + bias.to(torch.float64)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, Sq, Sk, cfg.align, rows).to(s.device)
    vis = visible(
        B, Sq, Sk, causal=cfg.causal, window=cfg.window, block=cfg.block, align=cfg.align,
        key_padding_mask=key_padding_mask, rows=rows, document_ids=document_ids,
    ).to(q.device)[:, None]
    # A -inf logit (from the bias) carries zero weight; treat it like an invisible key so
    # that a row whose visible logits are all -inf is an empty row. NaN logits stay visible.
    vis = vis & ~(s == NEG_INF)
    poisoned = (vis & v_bad).any(-1, keepdim=True)

    # Fill invisible logits with 0 *before* any exp, so that no inf or NaN (from masked keys
    # or bias) reaches the backward pass through torch.where.
    s = torch.where(vis, s, torch.zeros((), dtype=s.dtype, device=s.device))
    empty = ~vis.any(-1, keepdim=True)  # with Sk = 0 every row is empty
    if Sk:
        m = torch.where(vis, s, torch.full((), NEG_INF, dtype=s.dtype, device=s.device)).amax(-1, keepdim=True)
    else:
        m = torch.zeros_like(empty, dtype=s.dtype)
    m = torch.where(empty, torch.zeros_like(m), m).detach()
    sink = None
    if sinks is not None:  # the sink joins the denominator only: a logit with a zero value
        sink = sinks.to(torch.float64).view(1, Hq, 1, 1)
        m = torch.where(empty, sink, torch.maximum(m, sink)).detach()
    p = torch.where(vis, torch.exp(s - m), torch.zeros((), dtype=s.dtype, device=s.device))
    denom = p.sum(-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - m)
        empty = torch.zeros_like(empty)  # no row is empty: out = 0 and lse = sink follow from the sums
    safe = torch.where(empty, torch.ones_like(denom), denom)
    out = (p / safe) @ v
    out = torch.where(empty, torch.zeros_like(out), out)
    out = torch.where(poisoned, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)
    lse = torch.where(empty, torch.full_like(denom, NEG_INF), torch.log(safe) + m).squeeze(-1)
    return out, lse


def dequantize(t: torch.Tensor, descale: torch.Tensor | None) -> torch.Tensor:
    """t (B, H, S, E) in float64 times its descale: () per tensor, or (B, Hkv) per batch element
    and kv head, of which query head h of H reads column h // (H / Hkv)."""
    t = t.to(torch.float64)
    if descale is None:
        return t
    d = descale.to(device=t.device, dtype=torch.float64)
    if d.dim() == 2:
        d = d.repeat_interleave(t.shape[1] // d.shape[1], dim=1)[:, :, None, None]
    return t * d


def alibi_bias(slopes: torch.Tensor, Sq: int, Sk: int, align: str = "bottom_right",
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """The ALiBi bias -slope[b, h] * |p(i) - j| in float64, (B or 1, Hq, Sq or len(rows), Sk),
    with p(i) the aligned query position; slopes (Hq,) or (B, Hq)."""
    i = (torch.arange(Sq) if rows is None else rows.cpu()).view(-1, 1).to(torch.float64)
    j = torch.arange(Sk, dtype=torch.float64).view(1, Sk)
    p = i + (Sk - Sq) if align == "bottom_right" else i
    slopes = slopes.detach().cpu().to(torch.float64)
    slopes = slopes.view(1, -1) if slopes.dim() == 1 else slopes
    return -slopes[:, :, None, None] * (p - j).abs()


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: Config,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    chunk: int = 256,
    *,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention` over `rows` (default every row) in chunks of `chunk` query rows: memory
    O(chunk * Sk) for any Sq, on the inputs' device (the GPU for GPU runs)."""
    if rows is None:
        rows = torch.arange(q.shape[2])
    parts = [attention(q, k, v, cfg, key_padding_mask, bias, rows=rows[n : n + chunk], alibi_slopes=alibi_slopes,
                       sinks=sinks)
             for n in range(0, len(rows), chunk)]
    return torch.cat([o for o, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2)


def reference(spec: Spec, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle on a spec's inputs (any dtype/device; computed in float64)."""
    return attention(
        inputs.q, inputs.k, inputs.v, spec.config(),
        key_padding_mask=inputs.key_padding_mask, bias=inputs.bias, document_ids=inputs.document_ids,
        **inputs.score_kwargs(),
    )
