"""flex: torch.nn.attention.flex_attention with the contract built from small pieces.

Visibility is a mask_mod from attnbench.masks (causal, sliding window, blocked window, key
padding, combined with and_masks), turned into a BlockMask with create_block_mask so fully
invisible blocks are skipped. An additive bias is a score_mod that reads the bias tensor
(broadcast dims indexed at 0); a -inf bias entry gives a -inf score, which flex excludes.
Grouped heads use enable_gqa (head h reads kv head h // G). The logsumexp comes back through
return_aux=AuxRequest(lse=True) (return_lse=True on torch versions before it).

The score features: the soft cap and ALiBi are score_mods too, composed in the contract's order
(flex applies score_mod to the scaled score: cap, then the bias, then -slope * |p(i) - j|). A
sink is folded in after the call from flex's own lse (flex_eager only): lse' = logaddexp(lse,
sink), out' = out * exp(lse - lse'), which is exactly the sink's share taken out of each row
(an empty row: out 0, lse' = sink). The compiled flex does not declare sinks: its backward
would have to carry the gradient of lse, which it is not checked to do.

Two registrations:
- flex: torch.compile'd flex_attention on CUDA (the fused Triton kernel), forward and
  backward. The compiled function is built once; block masks without tensor inputs (no key
  padding) are cached per (config, Sq, Sk, device).
- flex_eager: the uncompiled flex_attention on the CPU. torch runs it as an unfused reference
  that materializes the scores, and it has no backward on the CPU ("FlexAttention does not
  support backward on CPU"), so it declares no backward.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch.nn.attention import flex_attention as _flex

from attnbench import masks
from attnbench.checks import check_call, check_document_ids, check_varlen, no_keys
from attnbench.modules.common import FLEX_MAIN_KERNEL, FLEX_MIN_HEAD_DIM, allow_recompiles
from attnbench.registry import Impl
from attnbench.spec import Block, Config, Spec

flex_attention = _flex.flex_attention
create_block_mask = _flex.create_block_mask
AuxRequest = getattr(_flex, "AuxRequest", None)  # torch >= 2.9; older ones use return_lse
DECODE_BELOW = 128  # Inductor lowers queries shorter than this with its flex-decoding kernel


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: Config,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    compiled: bool | None = None,
    document_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Sq, Dv), lse (B, Hq, Sq). compiled defaults to True on CUDA, False on the CPU.
    document_ids (doc_q, doc_k) adds a document mask_mod (masks.document)."""
    check_call(q, k, v, cfg, key_padding_mask, bias, who="flex", alibi_slopes=alibi_slopes, sinks=sinks)
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if document_ids is not None:
        check_document_ids(document_ids, B, Sq, Sk, who="flex")
    if sinks is not None:
        out, lse = attention(q, k, v, cfg, key_padding_mask, bias, compiled, document_ids, alibi_slopes=alibi_slopes)
        return with_sinks(out, lse, sinks)
    if Sk == 0:  # no keys: every row is empty (flex cannot build a block mask over zero keys)
        return no_keys(q, k, v, bias)
    if compiled is None:
        compiled = q.device.type == "cuda"
    if not compiled and not torch.is_grad_enabled():  # eager flex refuses inputs that require grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
        bias = bias.detach() if bias is not None else None
    block_mask = _block_mask(cfg, B, Sq, Sk, key_padding_mask, q.device, compiled, document_ids)
    score_mod = score_mods(
        softcap_mod(cfg.softcap) if cfg.softcap is not None else None,
        bias_mod(bias, B, Hq, Sq, Sk) if bias is not None else None,
        alibi_mod(alibi_slopes, masks.offset(Sq, Sk, cfg.align)) if alibi_slopes is not None else None,
    )
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=cfg.scale, enable_gqa=Hq != Hkv)
    if compiled and Hq != Hkv and block_mask is not None and Sq < DECODE_BELOW:
        kwargs["kernel_options"] = FLEX_MAIN_KERNEL  # the decoding kernel fails to lower here
    if AuxRequest is not None:
        kwargs["return_aux"] = AuxRequest(lse=True)
    else:
        kwargs["return_lse"] = True
    if compiled:
        out, aux = _compiled_flex()(q, k, v, **kwargs)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out, aux = flex_attention(q, k, v, **kwargs)
    lse = aux.lse if AuxRequest is not None else aux
    return out, lse


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the softmax over the keys, turned into those of the softmax over the keys
    and one sink logit per head: lse' = logaddexp(lse, sink), out' = out * exp(lse - lse')."""
    sink = sinks.to(lse.dtype).view(1, -1, 1).expand_as(lse)
    both = torch.logaddexp(lse, sink)
    share = torch.exp(lse - both)  # 0 on an empty row (lse = -inf)
    return (out * share[..., None].to(out.dtype)).to(out.dtype), both


def score_mods(*mods):
    """One score_mod applying `mods` (None entries skipped) in order; None when there are none."""
    mods = [m for m in mods if m is not None]
    if not mods:
        return None
    if len(mods) == 1:
        return mods[0]

    def mod(score, b, h, q_idx, kv_idx):
        for m in mods:
            score = m(score, b, h, q_idx, kv_idx)
        return score

    return mod


def softcap_mod(cap: float):
    """score_mod: cap * tanh(score / cap), on flex's scaled score."""

    def mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return mod


def alibi_mod(slopes: torch.Tensor, off: int):
    """score_mod: -slope[b, h] * |q_idx + off - kv_idx|; slopes (Hq,) or (B, Hq)."""
    per_batch = slopes.dim() == 2

    def mod(score, b, h, q_idx, kv_idx):
        slope = slopes[b, h] if per_batch else slopes[h]
        return score - slope.to(score.dtype) * (q_idx + off - kv_idx).abs().to(score.dtype)

    return mod


def bias_mod(bias: torch.Tensor, B: int, Hq: int, Sq: int, Sk: int):
    """score_mod adding a bias broadcastable to (B, Hq, Sq, Sk); size-1 dims are read at 0."""
    if bias.dim() > 4:
        raise ValueError(f"bias: at most 4 dims, got shape {tuple(bias.shape)}")
    bias4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    try:
        torch.broadcast_shapes(bias4.shape, (B, Hq, Sq, Sk))
    except RuntimeError:
        raise ValueError(f"bias: shape {tuple(bias.shape)} does not broadcast to {(B, Hq, Sq, Sk)}") from None
    wide = [n > 1 for n in bias4.shape]

    def mod(score, b, h, q_idx, kv_idx):
        idx = [i if w else 0 for i, w in zip((b, h, q_idx, kv_idx), wide)]
        return score + bias4[idx[0], idx[1], idx[2], idx[3]].to(score.dtype)

    return mod


def _block_mask(cfg: Config, B: int, Sq: int, Sk: int, kpm, device, compiled: bool, document_ids=None):
    if kpm is None and document_ids is None:
        return _cached_block_mask(cfg.causal, cfg.window, cfg.block, cfg.align, Sq, Sk, str(device), compiled)
    docs = None if document_ids is None else tuple(d.to(device) for d in document_ids)
    mod = masks.from_config(cfg, Sq, Sk, None if kpm is None else kpm.to(device=device), docs)
    return create_block_mask(mod, B, None, Sq, Sk, device=device, _compile=compiled)


@functools.lru_cache(maxsize=128)
def _cached_block_mask(causal: bool, window, block: Block | None, align: str, Sq: int, Sk: int, device: str,
                       compiled: bool):
    cfg = Config(scale=1.0, causal=causal, window=window, block=block, align=align)
    mod = masks.from_config(cfg, Sq, Sk)
    if mod is None:
        return None
    return create_block_mask(mod, None, None, Sq, Sk, device=device, _compile=compiled)


@functools.cache
def _compiled_flex():
    # One compiled kernel per shape/mask structure; a benchmark sweep recompiles often.
    allow_recompiles()
    # ATTNBENCH_FLEX_DYNAMIC=1 (opt-in, for cheap exploratory GPU property runs): torch's automatic
    # dynamic shapes, one size-generic kernel instead of one per shape; a different kernel from
    # the static ones the benchmarks time and gpu_verify.sh tests.
    dynamic = None if os.environ.get("ATTNBENCH_FLEX_DYNAMIC", "0") == "1" else False
    return torch.compile(flex_attention, dynamic=dynamic)


# Inductor's flex templates pad head dims to powers of two; in float32 the forward's smallest
# config then needs more shared memory than the H100 has once the two padded dims add up past
# 256 (torch 2.11, measured: D=160 -> 344 KB, D=96 / Dv=192 -> 246 KB, limit 227 KB; found by
# the GPU property rows). "No valid triton configs" is the error it raises.
FP32_PADDED_DIMS_MAX = 256
# Above this head dim a float32 flex kernel with a mask_mod beyond causal compiles for minutes
# (scripts/checks/flex_fp32_compile.py): declared, so properties and sweeps skip it.
FP32_FAST_COMPILE_DIM = 64
# In 16 bits Inductor sizes the tiles by D alone: forward (BLOCK_M, BLOCK_N, stages) from its H100
# table for D in {64, 128, 256}, (64, 64, 3) otherwise. _forward_smem_16bit reproduces the bytes
# Triton asked for in both forward failures seen (D=64 / Dv=192: 262144; D=160 with a bias:
# 245760). The backward tile of 64 <= D <= 128 needs WIDE_V_BACKWARD_SMEM once Dv pads past 128 (measured, torch
# 2.11 on the H100: a grid of D 16-256 x Dv up to 256, MHA / GQA, decode / main kernel; these were
# the only failures without a bias).
FWD_TILES_16BIT = {64: (128, 128, 3), 128: (128, 64, 3), 256: (64, 32, 3)}
SMEM_LIMIT = 232448  # bytes per block on the H100 (227 KB)
WIDE_V_FROM, WIDE_V_TO, WIDE_V_MAX = 64, 128, 128
WIDE_V_BACKWARD_SMEM = 246784


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _flex_limits(spec: Spec) -> str | None:
    if min(spec.D, spec.Dv) < FLEX_MIN_HEAD_DIM:
        return f"flex (compiled) needs head dims >= {FLEX_MIN_HEAD_DIM}, got D={spec.D}, Dv={spec.Dv}"
    if spec.dtype == "float32" and _pow2(spec.D) + _pow2(spec.Dv) > FP32_PADDED_DIMS_MAX:
        return (f"flex (compiled) in float32 with head dims D={spec.D}, Dv={spec.Dv} (padded {_pow2(spec.D)} + "
                f"{_pow2(spec.Dv)} > {FP32_PADDED_DIMS_MAX}): no kernel config fits the GPU's shared memory")
    if spec.dtype == "float32" and max(spec.D, spec.Dv) > FP32_FAST_COMPILE_DIM and (
            spec.window is not None or spec.block is not None or spec.has_padding):
        return (f"flex (compiled) in float32 with a head dim over {FP32_FAST_COMPILE_DIM} (D={spec.D}, Dv={spec.Dv}) "
                "and a window or key padding: ptxas takes minutes per shape (H100, torch 2.11, D=96: 292 s with "
                "a window, over 330 s with key padding; 110 s without a mask)")
    if spec.dtype != "float32":
        need = _forward_smem_16bit(spec.D, spec.Dv, spec.bias is not None)
        wide_v_backward = WIDE_V_FROM <= spec.D <= WIDE_V_TO and _pow2(spec.Dv) > WIDE_V_MAX
        if need > SMEM_LIMIT or wide_v_backward:
            where = f"forward needs {need} B" if need > SMEM_LIMIT else f"backward needs {WIDE_V_BACKWARD_SMEM} B"
            return (f"flex (compiled) in {spec.dtype} with D={spec.D}, Dv={spec.Dv}{', bias' if spec.bias else ''}: "
                    f"Inductor sizes its tiles by D alone, and its {where} of shared memory (GPU: {SMEM_LIMIT})")
    if spec.bias is not None and spec.Sq == spec.Sk == 1:
        return "flex (compiled) with a bias and Sq = Sk = 1: its backward fails to compile (upstream)"
    return None


def _forward_smem_16bit(D: int, Dv: int, bias: bool) -> int:
    """Shared memory of Inductor's default 16-bit flex forward tile (H100 table, torch 2.11): Q,
    plus num_stages K and V tiles, plus one float32 score tile when a score_mod reads a tensor."""
    bm, bn, stages = FWD_TILES_16BIT.get(D, (64, 64, 3))
    pd, pdv = _pow2(D), _pow2(Dv)
    return 2 * (bm * pd + stages * bn * (pd + pdv)) + (4 * bm * bn if bias else 0)


def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg: Config, return_lse: bool = True,
           compiled: bool | None = None):
    """The packed batch as one sequence of total_q queries and total_k keys, with a mask_mod that
    keeps each query to its own sequence's keys (masks.packed_sequences): exact, since an
    invisible key is left out of flex's softmax entirely. out (total_q, Hq, Dv), lse (Hq, total_q)."""
    bounds = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg, who="flex")
    Tq, Hq = q.shape[:2]
    if Tq == 0 or k.shape[0] == 0:
        out, lse = no_keys(q.transpose(0, 1)[None], k[:0].transpose(0, 1)[None], v[:0].transpose(0, 1)[None])
        return out[0].transpose(0, 1), lse[0]
    if compiled is None:
        compiled = q.device.type == "cuda"
    mod = masks.packed_sequences(bounds, cfg, q.device)
    block_mask = create_block_mask(mod, 1, None, Tq, k.shape[0], device=q.device, _compile=compiled)
    qb, kb, vb = (t.transpose(0, 1)[None] for t in (q, k, v))
    if not compiled and not torch.is_grad_enabled():
        qb, kb, vb = qb.detach(), kb.detach(), vb.detach()
    score_mod = softcap_mod(cfg.softcap) if cfg.softcap is not None else None
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=cfg.scale, enable_gqa=Hq != k.shape[1])
    if compiled and Hq != k.shape[1] and Tq < DECODE_BELOW:
        kwargs["kernel_options"] = FLEX_MAIN_KERNEL
    if AuxRequest is not None:
        kwargs["return_aux"] = AuxRequest(lse=True)
    else:
        kwargs["return_lse"] = True
    if compiled:
        out, aux = _compiled_flex()(qb, kb, vb, **kwargs)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out, aux = flex_attention(qb, kb, vb, **kwargs)
    lse = aux.lse if AuxRequest is not None else aux
    return out[0].transpose(0, 1), lse[0]


FORWARD = {"causal", "sliding_window", "blocked_window", "gqa", "cross", "key_padding", "bias", "top_left", "dv", "lse",
           "softcap", "alibi"}
# A document mask is a mask_mod over two index tensors; a packed batch is one sequence with a
# per-sequence mask_mod. Not expressed: the paged KV cache (flex reads K / V as dense (B, H, S, D)
# tensors; a block table would need its own gather first, which is not a flex kernel).
SEQUENCES = {"document", "varlen"}

flex = Impl(
    memory="linear",
    compiles=True,
    name="flex",
    variant="dense",
    fn=attention,
    features=FORWARD | SEQUENCES | {"backward", "bias_grad"},
    varlen=varlen,
    devices=("cuda",),
    dtypes=("float32", "float16", "bfloat16"),
    supports=_flex_limits,
    description="torch.compile'd FlexAttention: mask_mod block mask + bias score_mod, lse via return_aux",
)
flex_local = flex.for_variant(
    "local", "compiled FlexAttention with a window mask_mod (block-sparse: skips blocks outside the band)"
)


def _eager(q, k, v, cfg: Config, key_padding_mask=None, bias=None, document_ids=None, *, alibi_slopes=None,
           sinks=None):
    return attention(q, k, v, cfg, key_padding_mask, bias, compiled=False, document_ids=document_ids,
                     alibi_slopes=alibi_slopes, sinks=sinks)


def _eager_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg: Config, return_lse=True):
    return varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg, compiled=False)


flex_eager = Impl(
    name="flex_eager",
    variant="dense",
    fn=_eager,
    features=FORWARD | SEQUENCES | {"sinks"},
    varlen=_eager_varlen,
    devices=("cpu",),
    compiles=True,  # flex_attention outside torch.compile still traces through dynamo (backend "eager") per shape
    description="uncompiled FlexAttention on the CPU (unfused reference path; forward only)",
)
flex_eager_local = flex_eager.for_variant(
    "local", "uncompiled FlexAttention on the CPU with a window mask_mod (forward only)"
)
