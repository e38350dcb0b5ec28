"""Small pieces the seed modules share: norms, rotary/xpos, masks, head reshapes, kernel calls.

The modules take their attention kernel as an argument and never choose one: the
implementations in impls/ bind a kernel to a module. The module oracles in oracles/modules.py
deliberately use none of this.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attnbench.masks import dense_mask
from attnbench.spec import Config

Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


# -- kernels ---------------------------------------------------------------------------
def same_layout(module: nn.Module) -> dict[str, torch.Tensor]:
    """The white-box weight map of a module in the seed layout: every parameter by its own name."""
    return dict(module.named_parameters())


def accepts(fn: Callable, name: str) -> bool:
    """Does `fn` take keyword `name` (explicitly or through **kwargs)?"""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_kernel(kernel: object, owner: str) -> Kernel:
    if not callable(kernel):
        what = type(kernel).__name__
        raise TypeError(f"{owner}: kernel must be an attention function fn(q, k, v, cfg, ...), got {what}")
    return kernel


def dropout_config(cfg: Config, p: float, training: bool) -> Config:
    """cfg with attention dropout p when training (a fresh seed per call), else cfg."""
    if not training or p == 0:
        return cfg
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return Config(cfg.scale, cfg.causal, cfg.window, cfg.block, cfg.align, p, seed)


# -- shapes ----------------------------------------------------------------------------
def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H * D) -> (B, H, S, D)"""
    B, S, _ = t.shape
    return t.view(B, S, heads, -1).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H * D)"""
    B, H, S, D = t.shape
    return t.transpose(1, 2).reshape(B, S, H * D)


def check_input(x: object, name: str, dim: int, owner: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{owner}: {name} must have shape (batch, seq, {dim}), got {tuple(x.shape)}")
    return x


def keep_mask(mask: object, B: int, S: int, name: str, owner: str) -> torch.Tensor | None:
    """A (B, S) bool keep-mask (True = keep) from a bool or 0/1 tensor; None stays None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a (batch, seq) bool tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != (B, S):
        raise ValueError(f"{owner}: {name} must have shape ({B}, {S}) (True = keep), got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{owner}: {name} must be bool or hold only 0/1 (1 = keep)")
        return mask != 0
    raise TypeError(f"{owner}: {name} must be a bool tensor, got dtype {mask.dtype}")


def check_bias(bias: object, shape: tuple[int, int, int, int], name: str, owner: str) -> torch.Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a tensor, got {type(bias).__name__}")
    try:
        if bias.dim() > 4 or torch.broadcast_shapes(bias.shape, shape) != torch.Size(shape):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{owner}: {name} of shape {tuple(bias.shape)} does not broadcast to {shape}") from None
    return bias


# -- attention weights (materialized) --------------------------------------------------
def attention_weights(q, k, cfg: Config, key_padding_mask=None, bias=None) -> torch.Tensor:
    """Softmax probabilities (B, Hq, Sq, Sk) in float32 (float64 for float64 inputs), 0 on empty rows."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * cfg.scale
    if bias is not None:
        s = s + bias.to(acc)
    mask = dense_mask(cfg, B, Sq, Sk, key_padding_mask, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    empty = (s == float("-inf")).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1)
    return p.masked_fill(empty, 0.0)


# -- norms -----------------------------------------------------------------------------
def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(x.dtype)


class LowPrecisionLayerNorm(nn.LayerNorm):
    """LayerNorm that, under autocast, runs in the autocast dtype (input and weights cast down,
    autocast off) instead of being upcast to float32 (llm-foundry's LPLayerNorm). Outside
    autocast it is exactly nn.LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = _autocast_dtype(x.device.type)
        if low is None:
            return super().forward(x)
        w = None if self.weight is None else self.weight.to(low)
        b = None if self.bias is None else self.bias.to(low)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.to(low), self.normalized_shape, w, b, self.eps)


class LowPrecisionRMSNorm(RMSNorm):
    """RMSNorm that, under autocast, runs in the autocast dtype (see LowPrecisionLayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = _autocast_dtype(x.device.type)
        if low is None:
            return super().forward(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(low)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(low)


NORMS: dict[str, type[nn.Module]] = {
    "low_precision_layernorm": LowPrecisionLayerNorm,
    "layernorm": nn.LayerNorm,
    "rmsnorm": RMSNorm,
    "low_precision_rmsnorm": LowPrecisionRMSNorm,
}


# torch.compile'd FlexAttention: its kernel refuses head dims under this.
FLEX_MIN_HEAD_DIM = 16

# kernel_options for compiled FlexAttention that keep it on its main kernel. Inductor lowers
# queries shorter than 128 with a flex-decoding kernel which, on torch 2.11 (H100), fails to
# lower with grouped heads and a block mask (NoValidChoicesError) and gives wrong rows, leaking
# across batch elements, with a score_mod that reads a captured per-batch tensor (MoA flex).
# Canary: tests/test_impls_dense.py::test_flex_decoding_with_gqa_and_a_mask_still_fails_upstream.
FLEX_MAIN_KERNEL = {"FORCE_USE_FLEX_ATTENTION": True}


def allow_recompiles(limit: int = 4096) -> None:
    """Raise dynamo's recompile limits (default 8 per frame, 256 in all) to `limit`: a compiled
    attention sees a new static shape per problem, and a property run sees hundreds. Past the
    limit dynamo would silently run the eager path instead, so hitting it is made an error: a
    run never reports the eager kernel under the compiled one's name."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


def l2norm(t: torch.Tensor) -> torch.Tensor:
    # In float32 at least: F.normalize's eps (1e-12) underflows to 0 in float16, so a zero row
    # (a padded position) would give NaN and a tiny one an infinite gradient.
    acc = torch.promote_types(t.dtype, torch.float32)
    return F.normalize(t.to(acc), dim=-1).to(t.dtype)


# -- rotary embedding with xpos scaling ------------------------------------------------
class RotaryXPos(nn.Module):
    """Rotary embedding (rotate-half layout, theta 10000) with xpos length-extrapolation:
    q at position t is scaled by zeta^((t - c) / scale_base), k by zeta^(-(t - c) / scale_base),
    zeta_m = (2m + 0.4 D) / (1.4 D). The centre c = S // 2 cancels in q.k; it only keeps the
    powers small."""

    def __init__(self, dim_head: int, scale_base: float, theta: float = 10000.0) -> None:
        super().__init__()
        if dim_head % 2:
            raise ValueError(f"use_xpos needs an even dim_head, got {dim_head}")
        if not scale_base > 0:
            raise ValueError(f"xpos_scale_base must be > 0, got {scale_base!r}")
        self.dim_head = dim_head
        self.scale_base = float(scale_base)
        self.theta = float(theta)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys sit at positions 0 .. Sk-1 and queries at the last Sq of them (a decoding step
        with a cache has Sq < Sk)."""
        Sq, Sk, D = q.shape[-2], k.shape[-2], self.dim_head
        calc = torch.float64 if q.dtype == torch.float64 else torch.float32
        half = torch.arange(0, D, 2, device=q.device, dtype=calc)
        inv_freq = 1.0 / self.theta ** (half / D)
        zeta = (half + 0.4 * D) / (1.4 * D)

        def tables(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            freqs = t[:, None] * inv_freq[None]
            freqs = torch.cat((freqs, freqs), dim=-1)
            scale = zeta[None] ** ((t - Sk // 2)[:, None] / self.scale_base)
            return freqs.cos(), freqs.sin(), torch.cat((scale, scale), dim=-1)

        t = torch.arange(Sk, device=q.device, dtype=calc)
        cos, sin, scale = tables(t)
        k_out = (k.to(calc) * cos + rotate_half(k.to(calc)) * sin) / scale
        cos, sin, scale = cos[Sk - Sq :], sin[Sk - Sq :], scale[Sk - Sq :]
        q_out = (q.to(calc) * cos + rotate_half(q.to(calc)) * sin) * scale
        return q_out.to(q.dtype), k_out.to(k.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def positive_int(value: object, name: str, owner: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return value


def probability(value: object, name: str, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}: {name} must be a float in [0, 1), got {value!r}")
    return float(value)


def finite_scale(value: object, name: str, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    return float(value)
