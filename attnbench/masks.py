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


def from_config(cfg: Config, Sq: int, Sk: int, key_padding_mask: torch.Tensor | None = None) -> MaskMod | None:
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


def dense_mask(cfg: Config, B: int, Sq: int, Sk: int, key_padding_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    return materialize(from_config(cfg, Sq, Sk, key_padding_mask), B, Sq, Sk, device)


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
