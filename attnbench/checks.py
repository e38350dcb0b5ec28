"""Input validation for the kernel call convention, shared by the oracle and the implementations.

fn(q, k, v, cfg, key_padding_mask=None, bias=None): q (B, Hq, Sq, D), k (B, Hkv, Sk, D),
v (B, Hkv, Sk, Dv), one floating dtype and one device for all three, Hq a multiple of Hkv,
key_padding_mask (B, Sk) bool (True = keep), bias floating and broadcastable to (B, Hq, Sq, Sk).
Kernels that declare the score features also take alibi_slopes= (float32, (Hq,) or (B, Hq)) and
sinks= ((Hq,), q's dtype or float32), keyword only. Kernels that declare fp8 take float8_e4m3fn
q, k, v with q_descale= / k_descale= / v_descale= (float32, shape () or (B, Hkv); None means 1),
keyword only, and return bfloat16 out.
Nothing is broadcast silently and nothing is upcast silently: a call that breaks the convention
gets a one-line ValueError naming the argument. The checks read shapes and dtypes only, so they
cost no device synchronization.

`check_result` is the other side of the convention: what a kernel must return.
`no_keys` is the contract's answer when Sk = 0 (every row empty), for kernels that cannot
compute it themselves.
"""

from __future__ import annotations

import torch

from attnbench.spec import FP8, Config


def check_call(q: object, k: object, v: object, cfg: object, key_padding_mask: object = None,
               bias: object = None, who: str = "attention", *, alibi_slopes: object = None,
               sinks: object = None, q_descale: object = None, k_descale: object = None,
               v_descale: object = None) -> None:
    """Raise ValueError("<who>: <problem>") unless the arguments follow the call convention."""

    def bad(why: str) -> None:
        raise ValueError(f"{who}: {why}")

    if not isinstance(cfg, Config):
        bad(f"cfg must be an attnbench Config, got {type(cfg).__name__}")
    names = ("q", "k", "v")
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            bad(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "(B, Hq, Sq, D)" if name == "q" else "(B, Hkv, Sk, D)" if name == "k" else "(B, Hkv, Sk, Dv)"
            bad(f"{name} must be 4-D {layout}, got {t.dim()}-D shape {tuple(t.shape)}")
        if not t.is_floating_point():
            bad(f"{name} must be a floating tensor, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        bad(f"q, k and v must share one dtype (no silent upcast), got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        bad(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Sq, D = q.shape
    if not k.shape[0] == v.shape[0] == B:
        bad(f"batch sizes differ (no silent broadcast): q {B}, k {k.shape[0]}, v {v.shape[0]}")
    Hkv, Sk = k.shape[1], k.shape[2]
    if v.shape[1] != Hkv or v.shape[2] != Sk:
        bad(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} in (Hkv, Sk)")
    if k.shape[3] != D:
        bad(f"k head dim {k.shape[3]} != q head dim {D}")
    if Hkv < 1 or Hq % Hkv:
        bad(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            bad(f"key_padding_mask must be a bool tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            bad(f"key_padding_mask must be bool (True = keep), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Sk):
            bad(f"key_padding_mask must have shape (B, Sk) = {(B, Sk)}, got {tuple(key_padding_mask.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            bad(f"bias must be a tensor, got {type(bias).__name__}")
        if not bias.is_floating_point():
            bad(f"bias must be a floating tensor, got {bias.dtype}")
        full = (B, Hq, Sq, Sk)
        # broadcastable to exactly `full`: each trailing dim 1 or equal (torch.broadcast_shapes costs
        # ~0.7 ms a call on the CPU, more than a small kernel call itself)
        fits = bias.dim() <= 4 and all(b in (1, f) for b, f in zip(reversed(bias.shape), reversed(full)))
        if not fits:
            bad(f"bias shape {tuple(bias.shape)} does not broadcast to (B, Hq, Sq, Sk) = {full}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            bad(f"alibi_slopes must be a tensor, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            bad(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
            bad(f"alibi_slopes must have shape (Hq,) = {(Hq,)} or (B, Hq) = {(B, Hq)}, got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            bad(f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor):
            bad(f"sinks must be a tensor, got {type(sinks).__name__}")
        if sinks.dtype not in (q.dtype, torch.float32):
            bad(f"sinks must be in q's dtype ({q.dtype}) or float32, got {sinks.dtype}")
        if tuple(sinks.shape) != (Hq,):
            bad(f"sinks must have shape (Hq,) = {(Hq,)}, got {tuple(sinks.shape)}")
        if sinks.device != q.device:
            bad(f"sinks must be on q's device {q.device}, got {sinks.device}")
    descales = {"q_descale": q_descale, "k_descale": k_descale, "v_descale": v_descale}
    for name, t in descales.items():
        if t is None:
            continue
        if q.dtype != FP8:
            bad(f"{name} is for float8_e4m3fn inputs, got {q.dtype}")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            bad(f"{name} must be a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) not in ((), (B, Hkv)):
            bad(f"{name} must have shape () or (B, Hkv) = {(B, Hkv)}, got {tuple(t.shape)}")
        if t.device != q.device:
            bad(f"{name} must be on q's device {q.device}, got {t.device}")


class ContractError(AssertionError):
    """An implementation broke the call contract (result dtype, shape or device; inputs
    unchanged; finite results for finite inputs); the message names the broken clause."""


def check_result(who: str, result: object, q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, lse) after checking the kernel convention's types, dtypes, shapes and devices:
    out (B, Hq, Sq, Dv) in q's dtype on q's device; lse None or (B, Hq, Sq) float32 / float64."""
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ContractError(f"contract: {who} returned {type(result).__name__}, expected (out, lse_or_None)")
    out, lse = result
    B, Hq, Sq, _ = q.shape
    want = (B, Hq, Sq, v.shape[3])
    if not isinstance(out, torch.Tensor):
        raise ContractError(f"contract: {who} returned {type(out).__name__} for out, expected a tensor")
    if out.dtype != out_dtype(q.dtype):
        raise ContractError(f"contract: {who} returned {dtype_name(out.dtype)} out for {dtype_name(q.dtype)} inputs")
    if tuple(out.shape) != want:
        raise ContractError(f"contract: {who} returned out of shape {tuple(out.shape)}, expected (B, Hq, Sq, Dv) = {want}")
    if out.device != q.device:
        raise ContractError(f"contract: {who} returned out on {out.device} for inputs on {q.device}")
    if lse is not None:
        if not isinstance(lse, torch.Tensor):
            raise ContractError(f"contract: {who} returned {type(lse).__name__} for lse, expected a tensor or None")
        if lse.dtype not in (torch.float32, torch.float64):
            raise ContractError(f"contract: {who} returned {dtype_name(lse.dtype)} lse for {dtype_name(q.dtype)} inputs "
                                "(lse is float32 or float64)")
        if tuple(lse.shape) != want[:3]:
            raise ContractError(f"contract: {who} returned lse of shape {tuple(lse.shape)}, expected (B, Hq, Sq) = {want[:3]}")
        if lse.device != q.device:
            raise ContractError(f"contract: {who} returned lse on {lse.device} for inputs on {q.device}")
    return out, lse


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The output dtype of a call on inputs of `dtype`: the same, bfloat16 for float8_e4m3fn."""
    return torch.bfloat16 if dtype == FP8 else dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def no_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Sq, Dv) zeros in q's dtype and lse -inf (float32; float64 for float64) for
    Sk = 0. Sums over the empty inputs keep it differentiable in q, k, v and bias with exactly
    zero gradients, and no value of q can leak into it (an empty sum is 0, whatever q holds)."""
    B, Hq, Sq, _ = q.shape
    zero = q[..., :0].sum(-1, keepdim=True) + k.sum() + v.sum()  # (B, Hq, Sq, 1), all 0
    if bias is not None:
        zero = zero + bias[..., :0].sum()
    out = zero + q.new_zeros(B, Hq, Sq, v.shape[3])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=acc, device=q.device)
    return out.to(q.dtype), lse


def check_document_ids(document_ids: object, B: int, Sq: int, Sk: int, who: str = "attention") -> None:
    """Raise ValueError unless document_ids is (doc_q (B, Sq), doc_k (B, Sk)), integer tensors."""
    if not (isinstance(document_ids, tuple) and len(document_ids) == 2):
        raise ValueError(f"{who}: document_ids must be a pair (doc_q, doc_k), got {type(document_ids).__name__}")
    for name, t, shape in (("doc_q", document_ids[0], (B, Sq)), ("doc_k", document_ids[1], (B, Sk))):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{who}: document_ids {name} must be an integer tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{who}: document_ids {name} must have shape {shape}, got {tuple(t.shape)}")


def _check_heads(who: str, q: object, k: object, v: object, dims: int, layout: tuple[str, str, str]) -> None:
    for name, t, shape in zip(("q", "k", "v"), (q, k, v), layout):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{who}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{who}: {name} must be {dims}-D {shape}, got {t.dim()}-D shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{who}: {name} must be a floating tensor, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"{who}: q, k and v must share one dtype (no silent upcast), got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"{who}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")


def _check_index(who: str, name: str, t: object, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
        raise ValueError(f"{who}: {name} must be an int32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{who}: {name} must have shape {shape}, got {tuple(t.shape)}")


def _check_sequence_config(cfg: object, who: str) -> None:
    """The packed and paged conventions align bottom-right per sequence and take neither blocked
    windows nor dropout."""
    if not isinstance(cfg, Config):
        raise ValueError(f"{who}: cfg must be an attnbench Config, got {type(cfg).__name__}")
    if cfg.align != "bottom_right":
        raise ValueError(f"{who}: packed and paged calls align bottom-right per sequence, got align={cfg.align!r}")
    if cfg.block is not None or cfg.dropout_p:
        raise ValueError(f"{who}: packed and paged calls take no blocked window and no dropout")


def check_varlen(q: object, k: object, v: object, cu_seqlens_q: object, cu_seqlens_k: object, max_seqlen_q: object,
                 max_seqlen_k: object, cfg: object, who: str = "attention") -> list[tuple[int, int, int, int]]:
    """Raise ValueError unless the arguments follow the varlen convention (attnbench.packing);
    return each sequence's (q start, q end, k start, k end). Reads cu_seqlens (one host copy)."""
    _check_sequence_config(cfg, who)
    _check_heads(who, q, k, v, 3, ("(total_q, Hq, D)", "(total_k, Hkv, D)", "(total_k, Hkv, Dv)"))
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"{who}: v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} in (total_k, Hkv)")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{who}: k head dim {k.shape[2]} != q head dim {q.shape[2]}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{who}: Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}")
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1 or len(cu_seqlens_q) < 2:
        raise ValueError(f"{who}: cu_seqlens_q must be a 1-D tensor of B + 1 >= 2 offsets")
    n = len(cu_seqlens_q)
    _check_index(who, "cu_seqlens_q", cu_seqlens_q, (n,))
    _check_index(who, "cu_seqlens_k", cu_seqlens_k, (n,))
    bounds = []
    for name, cu, total, most in (("q", cu_seqlens_q, q.shape[0], max_seqlen_q), ("k", cu_seqlens_k, k.shape[0],
                                                                                   max_seqlen_k)):
        offsets = cu.tolist()
        lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        if offsets[0] != 0 or min(lengths) < 0 or offsets[-1] != total:
            raise ValueError(f"{who}: cu_seqlens_{name} must rise from 0 to total_{name}={total}, got {offsets}")
        if isinstance(most, bool) or not isinstance(most, int) or most < max(lengths):
            raise ValueError(f"{who}: max_seqlen_{name} must be an int >= the longest sequence ({max(lengths)}), "
                             f"got {most!r}")
        bounds.append(offsets)
    return [(bounds[0][b], bounds[0][b + 1], bounds[1][b], bounds[1][b + 1]) for b in range(n - 1)]


def check_paged(q: object, k_cache: object, v_cache: object, block_table: object, cache_seqlens: object, cfg: object,
                who: str = "attention", capturable: bool = False) -> list[int] | None:
    """Raise ValueError unless the arguments follow the paged convention (attnbench.packing);
    return cache_seqlens as a list. Reads cache_seqlens (one host copy); the table's entries
    are the caller's promise and are not read here. With `capturable`, a call inside a CUDA
    graph capture, where no host copy is possible, checks the shapes only (not cache_seqlens'
    range) and returns None: decoding steps are captured so (vLLM; flash-attn's kvcache kernels
    never read the lengths on the host)."""
    _check_sequence_config(cfg, who)
    _check_heads(who, q, k_cache, v_cache, 4, ("(B, Hq, Sq, D)", "(num_blocks, block_size, Hkv, D)",
                                               "(num_blocks, block_size, Hkv, Dv)"))
    B, Hq, Sq, D = q.shape
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"{who}: v_cache shape {tuple(v_cache.shape)} does not match k_cache shape "
                         f"{tuple(k_cache.shape)} in (num_blocks, block_size, Hkv)")
    if k_cache.shape[3] != D:
        raise ValueError(f"{who}: k_cache head dim {k_cache.shape[3]} != q head dim {D}")
    if k_cache.shape[2] < 1 or Hq % k_cache.shape[2]:
        raise ValueError(f"{who}: Hq={Hq} is not a multiple of Hkv={k_cache.shape[2]}")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"{who}: block_table must be a (B={B}, max_blocks) tensor, got "
                         f"{tuple(getattr(block_table, 'shape', ()))}")
    _check_index(who, "block_table", block_table, (B, block_table.shape[1]))
    _check_index(who, "cache_seqlens", cache_seqlens, (B,))
    if capturable and cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    lengths = cache_seqlens.tolist()
    room = block_table.shape[1] * k_cache.shape[1]
    if lengths and (min(lengths) < 0 or max(lengths) > room):
        raise ValueError(f"{who}: cache_seqlens must be in [0, max_blocks * block_size = {room}], got {lengths}")
    return lengths


def check_varlen_result(who: str, result: object, q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, lse) after checking the varlen convention's result: out (total_q, Hq, Dv) in q's
    dtype and device, lse None or (Hq, total_q) float32 / float64."""
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ContractError(f"contract: {who} returned {type(result).__name__}, expected (out, lse_or_None)")
    out, lse = result
    want = (q.shape[0], q.shape[1], v.shape[2])
    if not isinstance(out, torch.Tensor) or out.dtype != q.dtype or tuple(out.shape) != want or out.device != q.device:
        got = (type(out).__name__ if not isinstance(out, torch.Tensor)
               else f"{dtype_name(out.dtype)} {tuple(out.shape)} on {out.device}")
        raise ContractError(f"contract: {who} returned out {got}, expected {dtype_name(q.dtype)} (total_q, Hq, Dv) "
                            f"= {want} on {q.device}")
    if lse is not None:
        ok = (isinstance(lse, torch.Tensor) and lse.dtype in (torch.float32, torch.float64)
              and tuple(lse.shape) == (want[1], want[0]) and lse.device == q.device)
        if not ok:
            got = (type(lse).__name__ if not isinstance(lse, torch.Tensor)
                   else f"{dtype_name(lse.dtype)} {tuple(lse.shape)} on {lse.device}")
            raise ContractError(f"contract: {who} returned lse {got}, expected float32/float64 (Hq, total_q) = "
                                f"{(want[1], want[0])} on {q.device}")
    return out, lse
