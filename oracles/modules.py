"""Float64 oracles for the seed modules.

Each oracle takes a module, reads ITS parameters and settings, casts the parameters to float64
(the cast is differentiable, so gradients with respect to the parameters flow back to them) and
recomputes the forward from the module's definition in the seed documents: projections, norms,
rotary/xpos written out here, attention through attnbench.oracles.dense.attention. Nothing is
shared with the modules' own code. Arguments mirror each module's forward.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping

import torch

from attnbench.oracles.dense import attention as dense_attention
from attnbench.spec import Block, Config

F64 = torch.float64


# -- plain float64 pieces ----------------------------------------------------------------
def _p(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(F64)


def _linear(x: torch.Tensor, layer) -> torch.Tensor:
    y = torch.einsum("bsi,oi->bso", x, _p(layer.weight))
    return y if layer.bias is None else y + _p(layer.bias)


def _layer_norm(x: torch.Tensor, norm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + norm.eps)
    if norm.weight is not None:
        y = y * _p(norm.weight)
    if getattr(norm, "bias", None) is not None:
        y = y + _p(norm.bias)
    return y


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.eps) * _p(norm.weight)


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    B, S, HD = t.shape
    return t.reshape(B, S, h, HD // h).permute(0, 2, 1, 3)


def _unheads(t: torch.Tensor) -> torch.Tensor:
    B, H, S, D = t.shape
    return t.permute(0, 2, 1, 3).reshape(B, S, H * D)


def _keep(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask != 0


# -- FlashAttentionTwo ---------------------------------------------------------------------
def flash_attention_two_reference(module, x, context=None, mask=None, q_bucket_size=None, k_bucket_size=None):
    """out = to_out(attention(to_q(x), to_kv(context))), scale dim_head^-0.5; bucket sizes and
    parallel/mixed precision do not change the math."""
    x = x.to(F64)
    context = x if context is None else context.to(F64)
    h = module.heads
    q = _heads(_linear(x, module.to_q), h)
    kv = _linear(context, module.to_kv)
    inner = kv.shape[-1] // 2
    k, v = _heads(kv[..., :inner], h), _heads(kv[..., inner:], h)
    cfg = Config(scale=module.dim_head**-0.5, causal=module.causal)
    out, _ = dense_attention(q, k, v, cfg, key_padding_mask=_keep(mask))
    return _linear(_unheads(out), module.to_out)


# -- MultiQueryAttention -------------------------------------------------------------------
def _mqa_norm(x: torch.Tensor, norm, norm_type: str) -> torch.Tensor:
    # In float64 there is no autocast, so the low-precision norms are the plain ones.
    return _rms_norm(x, norm) if "rmsnorm" in norm_type else _layer_norm(x, norm)


def _crop(bias: torch.Tensor | None, Sq: int, Sk: int) -> torch.Tensor | None:
    if bias is None:
        return None
    bias = bias.to(F64)
    if bias.dim() == 4:
        rows = bias.shape[2] if bias.shape[2] == 1 else Sq
        cols = bias.shape[3] if bias.shape[3] == 1 else Sk
        bias = bias[:, :, bias.shape[2] - rows :, bias.shape[3] - cols :]
    return bias


def multi_query_reference(module, x, past_key_value=None, bias=None, mask=None, causal=True, needs_weights=False):
    """(out, weights or None, (k, v)) in float64. Query head h reads kv head h // (heads/kv_heads);
    causal is bottom-right aligned; the weights are the oracle's probabilities (computed as the
    oracle's output with identity values)."""
    x = x.to(F64)
    d, hd, hkv = module.dim, module.head_dim, module.kv_heads
    qkv = _linear(x, module.Wqkv)
    if module.clip_qkv is not None:
        qkv = qkv.clamp(-module.clip_qkv, module.clip_qkv)
    q, k, v = qkv[..., :d], qkv[..., d : d + hkv * hd], qkv[..., d + hkv * hd :]
    if module.qk_ln:
        q = _mqa_norm(q, module.q_ln, module.norm_type)
        k = _mqa_norm(k, module.k_ln, module.norm_type)
    q, k, v = _heads(q, module.heads), _heads(k, hkv), _heads(v, hkv)
    if past_key_value is not None:
        k = torch.cat((past_key_value[0].to(F64), k), dim=2)
        v = torch.cat((past_key_value[1].to(F64), v), dim=2)
    Sq, Sk = q.shape[2], k.shape[2]
    bias = _crop(bias, Sq, Sk)
    cfg = Config(scale=module.softmax_scale, causal=bool(causal))
    out, _ = dense_attention(q, k, v, cfg, key_padding_mask=_keep(mask), bias=bias)
    weights = None
    if needs_weights:
        eye = torch.eye(Sk, dtype=F64, device=q.device).expand(q.shape[0], hkv, Sk, Sk)
        weights, _ = dense_attention(q, k, eye, cfg, key_padding_mask=_keep(mask), bias=bias)
    return _linear(_unheads(out), module.out_proj), weights, (k, v)


def multi_query_decode_reference(module, x, bias=None, mask=None):
    """The oracle for KV-cache decoding: the full causal forward over all tokens x (batch, S, dim).
    Decoding tokens start..S-1 one at a time (or in chunks) with a cache of tokens 0..start-1
    must give rows start..S-1 of this output, and the final cache must equal the returned (k, v)."""
    out, _, cache = multi_query_reference(module, x, bias=bias, mask=mask, causal=True)
    return out, cache


# -- LocalMHA ------------------------------------------------------------------------------
def _xpos_rotary(q: torch.Tensor, k: torch.Tensor, scale_base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary as complex rotation of the pairs (x_m, x_{m + D/2}) by angle t * 10000^(-2m/D),
    q scaled by zeta_m^(t / scale_base), k by zeta_m^(-t / scale_base), zeta_m = (2m + 0.4D) / 1.4D."""
    S, D = q.shape[-2], q.shape[-1]
    half = D // 2
    m = torch.arange(half, dtype=F64, device=q.device)
    t = torch.arange(S, dtype=F64, device=q.device)[:, None]
    angle = t * torch.exp(-math.log(10000.0) * 2 * m / D)
    rot = torch.polar(torch.ones_like(angle), angle)
    zeta = (2 * m + 0.4 * D) / (1.4 * D)
    grow = zeta ** (t / scale_base)

    def turn(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        z = torch.complex(x[..., :half], x[..., half:]) * rot * gain
        return torch.cat((z.real, z.imag), dim=-1)

    return turn(q, grow), turn(k, 1 / grow)


def local_mha_reference(module, x, mask=None, attn_bias=None):
    """float64 LocalMHA: exact window (W, 0) causal / (W, W) otherwise, or the blocked window
    bucket(t) = t // W looking one bucket back and (non-causal) one forward."""
    x = x.to(F64)
    if module.norm is not None:
        x = _layer_norm(x, module.norm)
    qkv = _linear(x, module.to_qkv)
    inner = qkv.shape[-1] // 3
    q, k, v = (_heads(qkv[..., i * inner : (i + 1) * inner], module.heads) for i in range(3))
    scale = module.dim_head**-0.5
    if module.qk_rmsnorm:
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12) * _p(module.q_scale)
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12) * _p(module.k_scale)
        scale = float(module.qk_scale)
    if module.use_xpos:
        q, k = _xpos_rotary(q, k, module.xpos_scale_base)
    W, causal = module.window_size, module.causal
    if module.exact_windowsize:
        cfg = Config(scale=scale, causal=causal, window=(W, 0 if causal else W))
    else:
        cfg = Config(scale=scale, causal=causal, block=Block(W, 1, 0 if causal else 1))
    out, _ = dense_attention(q, k, v, cfg, key_padding_mask=_keep(mask), bias=_p(attn_bias))
    return _linear(_unheads(out), module.to_out)


# -- the table -----------------------------------------------------------------------------
class _Oracles(Mapping):
    """variant -> oracle fn(module, *forward args); "pkg.mod:attr" entries import on first use."""

    def __init__(self, entries: dict[str, Callable | str]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, variant: str) -> Callable:
        fn = self._entries[variant]
        if isinstance(fn, str):
            mod, _, attr = fn.partition(":")
            try:
                fn = getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as exc:
                raise KeyError(f"module oracle for {variant!r} ({fn}) is not available: {exc}") from exc
            self._entries[variant] = fn
        return fn

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


MODULE_ORACLES: Mapping[str, Callable] = _Oracles(
    {
        "FlashAttentionTwo": flash_attention_two_reference,
        "MultiQueryAttention": multi_query_reference,
        "LocalMHA": local_mha_reference,
        "MixtureOfAttention": "attnbench.oracles.routed:mixture_reference",
        "MixtureOfAutoregressiveAttention": "attnbench.oracles.routed:autoregressive_mixture_reference",
    }
)
