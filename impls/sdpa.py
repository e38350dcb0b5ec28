"""sdpa: torch.nn.functional.scaled_dot_product_attention, one registration per backend.

Each registration pins its backend with torch.nn.attention.sdpa_kernel, so a backend that
cannot take an input fails loudly instead of silently running another kernel.

How the contract maps onto SDPA:
- causal, no other mask: SDPA's is_causal is TOP-LEFT aligned, and flash refuses it unless
  Sq == Sk, so it is only ever called square. Top-left with Sq != Sk: keys past Sq - 1 are
  cut (Sq < Sk), or the first Sk queries run square-causal and the rest see every key
  (Sq > Sk). Bottom-right with Sq > Sk: the first Sq - Sk queries see no key, so they are
  zeros and the last Sk queries run square-causal. Bottom-right with Sq < Sk:
  torch.nn.attention.bias.causal_lower_right on flash / efficient (checked to run on the
  pinned backend), an explicit mask elsewhere.
- windows, blocks, key padding, bias: one explicit mask (bool, or float = bias with -inf on
  invisible keys). Flash takes no mask, so it declares none of these.
- keys no query may see are zeroed before the call: SDPA adds the mask to the logits, and
  NaN + -inf is NaN, so garbage in padding would otherwise poison every row (the contract
  excludes invisible logits entirely).
- empty rows: SDPA's fused backends give NaN for a row with no visible key, and a NaN
  anywhere in the softmax poisons dk and dv of every key in the backward pass. So empty rows
  are opened up (all keys visible, finite logits) before the call and their output is then
  replaced by 0 with torch.where: their grad_out is 0, so they add exactly 0 to every gradient.
- grouped heads: enable_gqa where the backend has it (math, flash), else repeat_interleave.
- dropout: SDPA's own dropout, drawn under torch.manual_seed(cfg.dropout_seed) inside a
  forked RNG state (the caller's RNG stream is left untouched).
SDPA's public API returns no logsumexp, so these declare no "lse".
Packed batches are not declared: with jagged nested tensors (torch 2.13, CPU) SDPA runs the
non-causal case, but refuses is_causal ("Nested tensors for query / key are not supported when
is_causal=True") and takes no window, so the varlen call could not honour its config. There is
no paged KV cache and no document mask beyond an explicit dense mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPAParams, SDPBackend, can_use_efficient_attention, can_use_flash_attention, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from attnbench.checks import check_call, no_keys
from attnbench.masks import dense_mask, visible_counts
from attnbench.registry import Impl
from attnbench.rng import dropout_rng
from attnbench.spec import Config, Spec

BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
NATIVE_GQA = {"math", "flash"}  # enable_gqa runs natively; others get repeat_interleave'd k, v
TAKES_MASK = {"math", "efficient", "cudnn"}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: Config,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "math",
) -> tuple[torch.Tensor, None]:
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown SDPA backend {backend!r}; one of {sorted(BACKENDS)}")
    check_call(q, k, v, cfg, key_padding_mask, bias, who=f"sdpa_{backend}")
    if k.shape[2] == 0:  # no keys: every row is empty, which the fused backends are not asked
        return no_keys(q, k, v, bias)[0], None
    Hq, Hkv = q.shape[1], k.shape[1]
    gqa = Hq != Hkv
    if gqa and backend not in NATIVE_GQA:
        k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
        gqa = False
    kw = dict(scale=cfg.scale, dropout_p=cfg.dropout_p, enable_gqa=gqa)
    masked = cfg.window is not None or cfg.block is not None or key_padding_mask is not None or bias is not None
    if masked and backend not in TAKES_MASK:
        raise ValueError(f"sdpa_{backend}: the {backend} backend takes no attention mask or bias")
    with sdpa_kernel(BACKENDS[backend]), dropout_rng(cfg, q.device):
        if masked:
            return _masked(q, k, v, cfg, key_padding_mask, bias, kw, backend), None
        return _unmasked(q, k, v, cfg, backend, kw), None


def _unmasked(q, k, v, cfg: Config, backend: str, kw: dict) -> torch.Tensor:
    Sq, Sk = q.shape[2], k.shape[2]
    if not cfg.causal:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    if Sq == Sk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    if cfg.align == "top_left":
        return _top_left_causal(q, k, v, kw)
    if Sq > Sk:  # bottom-right: queries 0 .. Sq-Sk-1 sit before key 0 and see nothing
        tail = F.scaled_dot_product_attention(q[:, :, Sq - Sk :], k, v, is_causal=True, **kw)
        head = torch.zeros(*tail.shape[:2], Sq - Sk, tail.shape[3], dtype=tail.dtype, device=tail.device)
        return torch.cat([head, tail], dim=2)
    if _lower_right_runs(q, k, v, cfg, backend, kw["enable_gqa"]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Sq, Sk), **kw)
    if backend == "flash":
        raise RuntimeError(f"sdpa_flash: flash attention cannot run bottom-right causal for q {tuple(q.shape)}")
    return _masked(q, k, v, cfg, None, None, kw, backend)


def _top_left_causal(q, k, v, kw: dict) -> torch.Tensor:
    """Top-left causal with Sq != Sk as square-causal calls (flash refuses is_causal unless
    Sq == Sk): query i sees keys 0..i."""
    Sq, Sk = q.shape[2], k.shape[2]
    if Sq < Sk:  # keys Sq.. are never visible
        return F.scaled_dot_product_attention(q, k[:, :, :Sq], v[:, :, :Sq], is_causal=True, **kw)
    head = F.scaled_dot_product_attention(q[:, :, :Sk], k, v, is_causal=True, **kw)
    tail = F.scaled_dot_product_attention(q[:, :, Sk:], k, v, **kw)  # queries Sk.. see every key
    return torch.cat([head, tail], dim=2)


def _lower_right_runs(q, k, v, cfg: Config, backend: str, gqa: bool) -> bool:
    """Will causal_lower_right dispatch to exactly this backend's fused kernel?"""
    if backend not in ("flash", "efficient") or q.device.type != "cuda":
        return False
    params = SDPAParams(q, k, v, None, cfg.dropout_p, False, gqa)
    flash = can_use_flash_attention(params, False)
    if backend == "flash":
        return flash
    return not flash and can_use_efficient_attention(params, False)


def _masked(q, k, v, cfg: Config, key_padding_mask, bias, kw: dict, backend: str = "math") -> torch.Tensor:
    B, Sq, Sk = q.shape[0], q.shape[2], k.shape[2]
    vis = dense_mask(cfg, B, Sq, Sk, key_padding_mask, q.device)  # (B, 1, Sq, Sk) or None
    if vis is not None:
        # SDPA adds the mask to the logits, so a NaN in a key no query may see (garbage in
        # padding or an unused cache slot) would still reach every row: zero such keys first,
        # and their values (p = 0 times an inf value, or dP = dO v^T overflowing in fp16, is NaN).
        dead = ~vis.any(-2, keepdim=True).transpose(-1, -2)  # (B, 1, Sk, 1)
        k, v = k.masked_fill(dead, 0.0), v.masked_fill(dead, 0.0)
    if bias is None:
        empty = ~vis.any(-1, keepdim=True)
        mask = vis | empty
        if backend == "cudnn":
            # cuDNN (9.19, torch 2.11) treats a bool mask like a large finite negative bias: a
            # masked key with logits near 1e4-1e5 leaks through (measured on the H100). -inf does not.
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    else:
        mask = bias.to(q.dtype)
        if vis is not None:
            mask = torch.where(vis, mask, float("-inf"))
        empty = ~(mask > float("-inf")).any(-1, keepdim=True)
        mask = torch.where(empty, 0.0, mask)  # finite logits in empty rows: no NaN anywhere
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    return torch.where(empty, 0.0, out)



def _fn(backend: str) -> Callable:
    def fn(q, k, v, cfg: Config, key_padding_mask=None, bias=None):
        return attention(q, k, v, cfg, key_padding_mask, bias, backend=backend)

    fn.__name__ = fn.__qualname__ = f"sdpa_{backend}"
    return fn


def _head_dim_limit(most: int, multiple: int = 1) -> Callable[[Spec], str | None]:
    def supports(spec: Spec) -> str | None:
        for name, d in (("D", spec.D), ("Dv", spec.Dv)):
            if d > most:
                return f"head dim {name}={d} > {most}"
            if d % multiple:
                return f"head dim {name}={d} is not a multiple of {multiple}"
        return None

    return supports


def _scale_zero(spec: Spec) -> str | None:
    # Measured on the H100 (torch 2.11, cuDNN 9.19): with scale=0 the flash and cuDNN kernels
    # give NaN under is_causal and silently skip dropout (kept fraction 1.0 at p=0.5).
    # Upstream bugs; canaries in tests/test_impls_dense.py fail once torch fixes them.
    return "scale=0 (upstream bug: NaN with causal, dropout not applied)" if spec.scale == 0 else None


def _all(*checks: Callable[[Spec], str | None]) -> Callable[[Spec], str | None]:
    def supports(spec: Spec) -> str | None:
        return next((why for why in (c(spec) for c in checks) if why), None)

    return supports


def _cudnn_keys(spec: Spec) -> str | None:
    # measured: "No available kernel" for Sk=1 (Sq=1 and Sk=2 run), fp16 and bf16. Top-left causal
    # with Sq < Sk and no other mask hands SDPA only the first Sq keys (_top_left_causal).
    if spec.Sk < 2:
        return f"Sk={spec.Sk}: cuDNN has no kernel for a single key"
    if spec.Sq < 2 and _explicit_mask(spec) is None and spec.causal and spec.align == "top_left" and spec.Sq < spec.Sk:
        return "top-left causal with Sq=1 runs on the first key alone: cuDNN has no kernel for a single key"
    return None


def _explicit_mask(spec: Spec) -> str | None:
    """What makes the adapter call SDPA with an attn_mask (cuDNN), or None for the is_causal / no-mask paths."""
    if spec.window is not None or spec.block is not None:
        return "a window"
    if spec.has_padding:
        return "key padding"
    if spec.causal and spec.align == "bottom_right" and spec.Sq < spec.Sk:
        return "bottom-right causal with Sq < Sk"
    return None


def _cudnn_single_key(spec: Spec) -> str | None:
    # Measured (H100, torch 2.11, cuDNN 9.19): NaN dq, dk, dv for a row that sees exactly one key
    # through the -inf attn_mask, on some inputs: Sq=1 and Sq=23 (GQA) with Sk=64, window (0, None),
    # D=16, fp16, magnitude 3 (the last row sees only the last key); Sq=2, Sk=64, one unpadded key;
    # and a causal spec with key padding. Other inputs of those shapes gave no NaN,
    # so it is input-dependent and declared by structure. Causal windows without padding leave
    # row 0 one key too; their rows pass everywhere (every causal window property row, and the
    # window benchmarks), so they stay claimed. Padding counts through the mask make_inputs draws.
    mask = _explicit_mask(spec)
    if spec.Sk < 2 or mask is None or (spec.causal and not spec.has_padding):
        return None
    if bool((visible_counts(spec) == 1).any()):
        return f"{mask} leaves some row one key: cuDNN's backward gives NaN there on some inputs (upstream)"
    return None


def _efficient_head_dims(spec: Spec) -> str | None:
    # its kernels need 16-byte aligned rows: D, Dv multiples of 8 in half precision (measured:
    # D=12 has no kernel in float16/bfloat16, runs in float32), of 4 in float32
    multiple = 4 if spec.dtype == "float32" else 8
    for name, d in (("D", spec.D), ("Dv", spec.Dv)):
        if d % multiple:
            return f"head dim {name}={d} is not a multiple of {multiple} ({spec.dtype})"
    return None


MASKS = {"sliding_window", "blocked_window", "key_padding", "bias"}
CORE = {"causal", "gqa", "cross", "top_left", "backward", "dropout"}

sdpa_math = Impl(
    name="sdpa_math",
    variant="dense",
    fn=_fn("math"),
    features=CORE | MASKS | {"bias_grad", "dv", "deterministic"},
    description="torch SDPA, math backend (reference composite; any dtype and device)",
)
sdpa_flash = Impl(
    memory="linear",
    name="sdpa_flash",
    variant="dense",
    fn=_fn("flash"),
    features=CORE,
    devices=("cuda",),
    dtypes=("float16", "bfloat16"),
    supports=_all(_head_dim_limit(256), _scale_zero),
    description="torch SDPA, FlashAttention-2 backend (no mask or bias; bottom-right causal via causal_lower_right)",
)
sdpa_efficient = Impl(
    name="sdpa_efficient",
    variant="dense",
    fn=_fn("efficient"),
    features=CORE | MASKS | {"bias_grad", "dv"},
    devices=("cuda",),
    dtypes=("float32", "float16", "bfloat16"),
    supports=_efficient_head_dims,
    description="torch SDPA, memory-efficient (xformers) backend; masks as a dense attn_mask",
)
sdpa_cudnn = Impl(
    name="sdpa_cudnn",
    variant="dense",
    fn=_fn("cudnn"),
    features=(CORE | MASKS | {"dv"}) - {"bias"},
    devices=("cuda",),
    dtypes=("float16", "bfloat16"),
    supports=_all(_head_dim_limit(256, 8), _scale_zero, _cudnn_keys, _cudnn_single_key),
    description="torch SDPA, cuDNN backend; windows and padding as a dense -inf float attn_mask (no bias)",
)

# Windowed attention through the same calls (an explicit band mask).
sdpa_math_local = sdpa_math.for_variant("local", "torch SDPA math backend with a dense band mask")
sdpa_efficient_local = sdpa_efficient.for_variant("local", "torch SDPA memory-efficient backend with a dense band mask")
sdpa_cudnn_local = sdpa_cudnn.for_variant("local", "torch SDPA cuDNN backend with a dense band mask")
