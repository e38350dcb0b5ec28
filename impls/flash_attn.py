"""flash_attn: adapter for the flash-attn package (FlashAttention-2, Dao-AILab).

Available only where `flash_attn.flash_attn_func` exists: FlashAttention-4 (impls/flash_attn4.py)
installs a `flash_attn` namespace package holding only `flash_attn.cute`, which must not make
this adapter look available.

UNTESTED: flash-attn cannot be installed on this project's machines (the CPU box or the lent
H100 image), so this file has never run. The mapping is written from flash-attn's documented
API (flash_attn_interface.py, v2.6+); the registry lists it as unavailable, "flash_attn not
installed", wherever the package is missing.

Convention map (contract -> flash-attn):
- layout: contract tensors are (B, H, S, D); flash-attn takes (B, S, H, D). transpose(1, 2)
  is a view with a contiguous last dim, which is all flash-attn requires.
- causal and sliding windows are bottom-right aligned in flash-attn >= 2.1, like the contract:
  key j is visible iff p(i) - left <= j <= p(i) + right with p(i) = i + Sk - Sq.
  window (left, right) maps to window_size, None -> -1 (unbounded). top_left is not offered.
- grouped heads: native (query head h reads kv head h // G), same order as the contract.
- scale: softmax_scale is only defaulted when None, so scale = 0 passes through.
- key padding: any mask pattern, through flash_attn_varlen_func on the kept keys only. This
  is exact only when no positional mask applies (gathering keys renumbers positions, and
  varlen aligns causal to each sequence's own length), so padding + causal/window is declined.
- lse: softmax_lse is (B, H, Sq) (varlen: (H, total_q)), natural log, float32. flash-attn
  writes +inf for a row with no visible key; the contract says -inf, so inf maps to -inf.
  It is only available through return_attn_probs=True, which with dropout > 0 also builds
  the (B, H, Sq, Sk) probability matrix; so with dropout the adapter returns lse=None.
- dropout: flash-attn's own, drawn under torch.manual_seed(cfg.dropout_seed) in a forked RNG.
Not offered: arbitrary bias (flash-attn only has alibi_slopes), blocked windows, Dv != D,
float32/float64, head dims over 256.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from attnbench.registry import Impl
from attnbench.rng import dropout_rng
from attnbench.spec import Config, Spec

NEG_INF = float("-inf")


def _flash():
    import flash_attn  # imported lazily: the registry must load this file without the package

    return flash_attn


@functools.cache
def unavailable() -> str | None:
    """None where flash-attn 2 imports and has flash_attn_func (cached: the import loads its
    CUDA extension)."""
    try:
        module = _flash()
    except Exception as exc:
        return f"flash_attn does not import: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    if not callable(getattr(module, "flash_attn_func", None)):
        return "flash_attn has no flash_attn_func (not flash-attn 2; FlashAttention-4 is impls/flash_attn4.py)"
    return None


def _window(cfg: Config) -> tuple[int, int]:
    if cfg.window is None:
        return (-1, -1)
    left, right = cfg.window
    return (-1 if left is None else left, -1 if right is None else right)


def _contract_lse(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), NEG_INF, lse)


def _check(q, k, v, cfg: Config, key_padding_mask, bias) -> None:
    if bias is not None:
        raise ValueError("bias: flash-attn takes no arbitrary additive bias")
    if cfg.block is not None:
        raise ValueError("cfg.block: flash-attn has no blocked windows")
    if cfg.align != "bottom_right":
        raise ValueError(f"cfg.align: flash-attn is bottom-right aligned only, got {cfg.align!r}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k: Hq={q.shape[1]} is not divisible by Hkv={k.shape[1]}")
    if key_padding_mask is not None and (cfg.causal or cfg.window is not None):
        raise ValueError("key_padding_mask: with causal/window the varlen path would renumber key positions")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: Config,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check(q, k, v, cfg, key_padding_mask, bias)
    with dropout_rng(cfg, q.device):
        if key_padding_mask is not None:
            return _varlen(q, k, v, cfg, key_padding_mask)
        want_lse = cfg.dropout_p == 0
        res = _flash().flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=cfg.dropout_p, softmax_scale=cfg.scale, causal=cfg.causal,
            window_size=_window(cfg), return_attn_probs=want_lse,
        )
    if not want_lse:
        return res.transpose(1, 2), None
    out, lse = res[0], res[1]
    return out.transpose(1, 2), _contract_lse(lse[..., : q.shape[2]])


def _varlen(q, k, v, cfg: Config, kpm: torch.Tensor):
    """Key padding without positional masks: attend over the kept keys of each batch element."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    kept = kpm.to(device=q.device, dtype=torch.bool)
    lens = kept.sum(1, dtype=torch.int32)
    cu_k = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * Sq
    idx = kept.reshape(-1).nonzero().squeeze(1)
    q_flat = q.transpose(1, 2).reshape(B * Sq, Hq, D)
    k_flat = k.transpose(1, 2).reshape(B * Sk, Hkv, D)[idx]
    v_flat = v.transpose(1, 2).reshape(B * Sk, Hkv, v.shape[3])[idx]
    want_lse = cfg.dropout_p == 0
    res = _flash().flash_attn_varlen_func(
        q_flat, k_flat, v_flat, cu_q, cu_k, Sq, max(1, int(lens.max())),
        dropout_p=cfg.dropout_p, softmax_scale=cfg.scale, causal=False, return_attn_probs=want_lse,
    )
    out = (res[0] if want_lse else res).reshape(B, Sq, Hq, -1).transpose(1, 2)
    if not want_lse:
        return out, None
    lse = res[1]
    if lse.dim() == 2:  # (Hq, total_q)
        lse = lse.reshape(Hq, B, Sq).transpose(0, 1)
    return out, _contract_lse(lse[..., :Sq])


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | int,
    scale: float | None = None,
    causal: bool = True,
    window: tuple[int | None, int | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KV-cache attention through flash_attn_with_kvcache (forward only).

    q (B, Hq, Sq, D); k_cache, v_cache (B, Hkv, S_cache, D) in the contract layout; keys
    j < cache_seqlens[b] are valid. Query i sits at cache_seqlens[b] - Sq + i: the contract
    with Sk = cache_seqlens[b] per batch element. Returns out (B, Hq, Sq, D), lse (B, Hq, Sq).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    cfg = Config(scale=scale, causal=causal, window=window)
    out, lse = _flash().flash_attn_with_kvcache(
        q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
        cache_seqlens=cache_seqlens.to(torch.int32), softmax_scale=scale, causal=causal,
        window_size=_window(cfg), return_softmax_lse=True,
    )
    return out.transpose(1, 2), _contract_lse(lse)



def _supports(spec: Spec) -> str | None:
    if spec.D > 256:
        return f"head dim D={spec.D} > 256"
    if spec.has_padding and (spec.causal or spec.window is not None):
        return "key padding with causal/window: varlen renumbers key positions"
    return None


FEATURES = {"causal", "sliding_window", "gqa", "cross", "key_padding", "dropout", "backward", "lse"}

flash_attn = Impl(
    name="flash_attn",
    variant="dense",
    fn=attention,
    features=FEATURES,
    devices=("cuda",),
    dtypes=("float16", "bfloat16"),
    requires=("flash_attn",),
    available=unavailable,
    supports=_supports,
    description="flash-attn 2 adapter (flash_attn_func / varlen for key padding); UNTESTED here",
)
flash_attn_local = flash_attn.for_variant("local", "flash-attn 2 sliding-window (window_size) adapter; UNTESTED here")
