"""Input validation for the kernel call convention, shared by the oracle and the implementations.

fn(q, k, v, cfg, key_padding_mask=None, bias=None): q (B, Hq, Sq, D), k (B, Hkv, Sk, D),
v (B, Hkv, Sk, Dv), one floating dtype and one device for all three, Hq a multiple of Hkv,
key_padding_mask (B, Sk) bool (True = keep), bias floating and broadcastable to (B, Hq, Sq, Sk).
Kernels that declare the score features also take alibi_slopes= (float32, (Hq,) or (B, Hq)) and
sinks= ((Hq,), q's dtype or float32), keyword only.
Nothing is broadcast silently and nothing is upcast silently: a call that breaks the convention
gets a one-line ValueError naming the argument. The checks read shapes and dtypes only, so they
cost no device synchronization.

`check_result` is the other side of the convention: what a kernel must return.
`no_keys` is the contract's answer when Sk = 0 (every row empty), for kernels that cannot
compute it themselves.
"""

from __future__ import annotations

import torch

from attnbench.spec import Config


def check_call(q: object, k: object, v: object, cfg: object, key_padding_mask: object = None,
               bias: object = None, who: str = "attention", *, alibi_slopes: object = None,
               sinks: object = None) -> None:
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
    if out.dtype != q.dtype:
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
