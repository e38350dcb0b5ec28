"""Composable mask functions for implementations, in FlexAttention's mask_mod style.

A mask_mod is `fn(b, h, q_idx, kv_idx) -> bool tensor` (True = visible), built from small
pieces and combined with and_masks. These serve implementations (naive, sdpa, flex, ...);
the oracle in oracles/dense.py deliberately does not use them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnbench.spec import Block, Config, Spec

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def and_masks(*mods: MaskMod) -> MaskMod:
    def mod(b, h, q, k):
        out = torch.ones_like(q, dtype=torch.bool) | torch.ones_like(k, dtype=torch.bool)
        for m in mods:
            out = out & m(b, h, q, k)
        return out

    return mod


def offset(Sq: int, Sk: int, align: str) -> int:
    """Absolute position of query 0: bottom-right aligns the last query with the last key."""
    return Sk - Sq if align == "bottom_right" else 0


def causal(off: int) -> MaskMod:
    return lambda b, h, q, k: k <= q + off


def sliding_window(left: int | None, right: int | None, off: int) -> MaskMod:
    def mod(b, h, q, k):
        p = q + off
        ok = torch.ones_like(k - p, dtype=torch.bool)
        if left is not None:
            ok = ok & (k >= p - left)
        if right is not None:
            ok = ok & (k <= p + right)
        return ok

    return mod


def blocked_window(block: Block, off: int) -> MaskMod:
    w = block.window_size

    def mod(b, h, q, k):
        bq = torch.div(q + off, w, rounding_mode="floor")
        bk = torch.div(k, w, rounding_mode="floor")
        return (bk >= bq - block.look_backward) & (bk <= bq + block.look_forward)

    return mod


def key_padding(mask: torch.Tensor) -> MaskMod:
    return lambda b, h, q, k: mask[b, k]


def document(doc_q: torch.Tensor, doc_k: torch.Tensor) -> MaskMod:
    """Key k is visible to query q only within one document: doc_q[b, q] == doc_k[b, k]."""
    return lambda b, h, q, k: doc_q[b, q] == doc_k[b, k]


def packed_sequences(bounds: list[tuple[int, int, int, int]], cfg: Config, device) -> MaskMod:
    """A packed batch as one sequence: query q and key k are both in sequence b (its (q start,
    q end, k start, k end) in `bounds`), and causal / sliding window hold between their
    positions within b, bottom-right aligned (query i of b at i + len_k - len_q)."""
    seq_q = torch.cat([torch.full((q1 - q0,), b) for b, (q0, q1, _, _) in enumerate(bounds)]).to(device)
    seq_k = torch.cat([torch.full((k1 - k0,), b) for b, (_, _, k0, k1) in enumerate(bounds)]).to(device)
    # a query's aligned position minus its index, and a key's start offset, per token
    q_shift = torch.cat([torch.full((q1 - q0,), (k1 - k0) - (q1 - q0) - q0) for q0, q1, k0, k1 in bounds]).to(device)
    k_shift = torch.cat([torch.full((k1 - k0,), -k0) for _, _, k0, k1 in bounds]).to(device)
    mods = [lambda b, h, q, k: seq_q[q] == seq_k[k]]
    relative = [causal(0)] if cfg.causal else []
    if cfg.window is not None:
        relative.append(sliding_window(*cfg.window, 0))
    for rel in relative:
        mods.append(lambda b, h, q, k, rel=rel: rel(b, h, q + q_shift[q], k + k_shift[k]))
    return and_masks(*mods)


def from_config(cfg: Config, Sq: int, Sk: int, key_padding_mask: torch.Tensor | None = None,
                document_ids: tuple[torch.Tensor, torch.Tensor] | None = None) -> MaskMod | None:
    """The mask_mod for a call, or None when every key is visible."""
    off = offset(Sq, Sk, cfg.align)
    mods = []
    if cfg.causal:
        mods.append(causal(off))
    if cfg.window is not None:
        mods.append(sliding_window(*cfg.window, off))
    if cfg.block is not None:
        mods.append(blocked_window(cfg.block, off))
    if key_padding_mask is not None:
        mods.append(key_padding(key_padding_mask.bool()))
    if document_ids is not None:
        mods.append(document(*document_ids))
    return and_masks(*mods) if mods else None


def materialize(mod: MaskMod | None, B: int, Sq: int, Sk: int, device) -> torch.Tensor | None:
    """Dense (B, 1, Sq, Sk) bool mask from a mask_mod (None stays None)."""
    if mod is None:
        return None
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(Sq, device=device).view(1, 1, Sq, 1)
    k = torch.arange(Sk, device=device).view(1, 1, 1, Sk)
    return mod(b, h, q, k).expand(B, 1, Sq, Sk)


def dense_mask(cfg: Config, B: int, Sq: int, Sk: int, key_padding_mask: torch.Tensor | None, device,
               document_ids: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    return materialize(from_config(cfg, Sq, Sk, key_padding_mask, document_ids), B, Sq, Sk, device)


def row_bounds(spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row i, the visible key interval [lo_i, hi_i] before key padding.

    Causal, sliding and blocked windows each cut an interval out of the keys, so their
    intersection is one interval too; hi < lo means an empty row.
    """
    p = torch.arange(spec.Sq, dtype=torch.int64)
    if spec.align == "bottom_right":
        p = p + (spec.Sk - spec.Sq)
    lo = torch.zeros_like(p)
    hi = torch.full_like(p, spec.Sk - 1)
    if spec.causal:
        hi = torch.minimum(hi, p)
    if spec.window is not None:
        left, right = spec.window
        if left is not None:
            lo = torch.maximum(lo, p - left)
        if right is not None:
            hi = torch.minimum(hi, p + right)
    if spec.block is not None:
        w = spec.block.window_size
        bucket = torch.div(p, w, rounding_mode="floor")
        lo = torch.maximum(lo, (bucket - spec.block.look_backward) * w)
        hi = torch.minimum(hi, (bucket + spec.block.look_forward + 1) * w - 1)
    return lo, hi


def visible_counts(spec: Spec, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Sq) keys each query row sees. Padding counts through `key_padding_mask` when given,
    else through the mask spec.make_inputs gives (exact for key_drop too: spec.padding_keep)."""
    lo, hi = row_bounds(spec)
    keep = key_padding_mask if key_padding_mask is not None else spec.padding_keep()
    if keep is None:
        keep = torch.ones(spec.B, spec.Sk, dtype=torch.int64)
    keep = keep.detach().to("cpu", torch.int64)
    if tuple(keep.shape) != (spec.B, spec.Sk):
        raise ValueError(f"key_padding_mask: expected shape ({spec.B}, {spec.Sk}), got {tuple(keep.shape)}")
    # kept keys in [lo, hi] from a prefix sum: c[hi + 1] - c[lo]
    c = torch.nn.functional.pad(keep.cumsum(-1), (1, 0))
    lo_c, hi_c = lo.clamp(0, spec.Sk), (hi + 1).clamp(0, spec.Sk)
    return (c[:, hi_c] - c[:, lo_c]) * (hi >= lo)


def alibi_bias(slopes: torch.Tensor, Sq: int, Sk: int, align: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ALiBi bias -slope[b, h] * |i + off - j| materialized as (B or 1, Hq, Sq, Sk) on the
    slopes' device, for kernels that hold the whole score matrix anyway; slopes (Hq,) or (B, Hq)."""
    dev = slopes.device
    i = torch.arange(Sq, device=dev, dtype=dtype).view(Sq, 1) + offset(Sq, Sk, align)
    j = torch.arange(Sk, device=dev, dtype=dtype).view(1, Sk)
    s = slopes.to(dtype)
    s = s.view(1, -1) if s.dim() == 1 else s
    return -s[:, :, None, None] * (i - j).abs()


def softcap(s: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(s / cap), or s itself without a cap."""
    return s if cap is None else cap * torch.tanh(s / cap)
