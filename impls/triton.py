"""triton: attnbench's own fused attention kernel (FlashAttention-2 scheme), forward and backward.

One kernel call serves every mask the contract has (causal either alignment, sliding and
blocked windows), grouped heads without repeating K/V, a key padding mask, an additive bias
(with its gradient) and the score features: a logit soft cap, ALiBi from per-head slopes and
per-head sinks (with their gradient). Key blocks a query block cannot see are skipped by the loop bounds; masks
run only on edge blocks. The kernels live in impls/_triton_kernels.py.

Triton fixes compiled-vs-interpreted when a kernel is defined, so the kernel file is loaded
lazily, once per mode, with TRITON_INTERPRET read at call time: CPU tensors need
TRITON_INTERPRET=1 (and no bfloat16: the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from attnbench.checks import check_call, check_paged, check_varlen, no_keys
from attnbench.registry import Impl
from attnbench.spec import Config, Spec

BIG = 1 << 29  # an unbounded window edge; far beyond any sequence length
MAX_HEAD_DIM = 256
MAX_BLOCK_WINDOW = 1 << 24
FP8_MIN_K = 32  # the smallest K of an 8-bit tl.dot (Triton's min_dot_size); every fwd config has BLOCK_N >= 32
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNELS: dict[bool, ModuleType] = {}


def interpret_requested() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter (read now, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def kernels(interpret: bool | None = None) -> ModuleType:
    """The kernel module compiled for `interpret` (default: what TRITON_INTERPRET says now)."""
    interpret = interpret_requested() if interpret is None else interpret
    if interpret not in _KERNELS:
        name = f"attnbench.impls._triton_kernels_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_triton_kernels.py"))
        module = importlib.util.module_from_spec(spec)
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        finally:
            if saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved
        if module.INTERPRET != interpret:
            raise RuntimeError(f"triton: could not load the kernels with interpret={interpret} (triton.knobs override?)")
        _KERNELS[interpret] = module
    return _KERNELS[interpret]


# -- checks ---------------------------------------------------------------------------------
def _check(q, k, v, cfg: Config, key_padding_mask, bias, alibi_slopes=None, sinks=None) -> None:
    """The call convention (attnbench.checks), then this kernel's own limits."""
    check_call(q, k, v, cfg, key_padding_mask, bias, who="triton", alibi_slopes=alibi_slopes, sinks=sinks)
    if q.dtype not in DTYPES:
        raise TypeError(f"triton: q, k, v dtype must be float16, bfloat16 or float32, got {q.dtype}")
    D, Dv = q.shape[3], v.shape[3]
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"triton: head dims up to {MAX_HEAD_DIM}, got D={D}, Dv={Dv}")
    if cfg.dropout_p:
        raise ValueError(f"triton: cfg.dropout_p={cfg.dropout_p}: this kernel has no dropout")
    if cfg.block is not None and cfg.block.window_size > MAX_BLOCK_WINDOW:
        raise ValueError(f"triton: cfg.block.window_size must be in [1, {MAX_BLOCK_WINDOW}], got {cfg.block.window_size}")
    if q.device.type == "cpu" and not interpret_requested():
        raise ValueError("triton: cpu tensors need TRITON_INTERPRET=1 (the Triton interpreter)")


# -- launches -------------------------------------------------------------------------------
def _mask_args(cfg: Config, Sq: int, Sk: int) -> tuple[dict, bool]:
    """Every mask as the interval lo(p) <= j <= hi(p) (see _triton_kernels.py)."""
    off = Sk - Sq if cfg.align == "bottom_right" else 0
    left, right = cfg.window if cfg.window is not None else (None, None)
    left = BIG if left is None else min(int(left), BIG)
    right = BIG if right is None else min(int(right), BIG)
    if cfg.causal:
        right = min(right, 0)
    W, lb, lf = 1, 0, 0
    if cfg.block is not None:
        W = cfg.block.window_size
        cap = (Sq + Sk) // W + 2  # looking further than this many buckets changes nothing
        lb, lf = min(cfg.block.look_backward, cap), min(cfg.block.look_forward, cap)
    shift_b = -(-max(0, -off) // W) + 1  # buckets to shift so that p + shift_b * W > 0
    return dict(off=off, left=left, right=right, W=W, LB=lb, LF=lf, SHIFT_B=shift_b), cfg.block is not None


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _strides(t: torch.Tensor | None, n: int) -> list[int]:
    return list(t.stride()[:n]) if t is not None else [0] * n


def autotune_enabled() -> bool:
    """ATTNBENCH_TRITON_AUTOTUNE=0 takes the first fitting config instead of benchmarking them."""
    return os.environ.get("ATTNBENCH_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _launch(kind: str, length: int, block: str, heads: int, interpret: bool, **kwargs) -> None:
    """Launch kernel `kind` over (cdiv(length, block size), heads)."""
    ker = kernels(interpret)
    if interpret:
        sizes = ker.INTERPRET_CONFIG
        ker.RAW[kind][(_cdiv(length, sizes[block]), heads)](**kwargs, **sizes)
        return
    # float32 is the accuracy path: no mul+add contraction, so the backward's recomputed logits
    # round exactly like the forward's (with fusion, s * scale - m became one FMA in one kernel
    # and two roundings in the other: p = 1 + 1e-5 for a lone key, dv off by |s| eps)
    kwargs["enable_fp_fusion"] = kwargs["DOT_PREC"] != "ieee"
    if not autotune_enabled():
        _launch_first_that_fits(ker, kind, length, block, heads, kwargs)
        return
    key = _pick_key(ker, kind, kwargs)
    config = _PICKS.get(key)
    if config is None:  # first call with this key: the autotuner tunes (or finds its pick), then we keep it
        tuner = ker.TUNED[kind]
        tuner[lambda meta: (_cdiv(length, meta[block]), heads)](**kwargs)
        _PICKS[key] = tuner.best_config
    else:
        _run(ker, kind, (_cdiv(length, config.kwargs[block]), heads), kwargs, config.all_kwargs())


# The autotuner's pick per tuning key. A repeat call launches the pick directly: the Autotuner's
# own dispatch rebuilds dicts of all ~45 arguments on every call (host time, see NOTES.md).
_PICKS: dict[tuple, object] = {}


def _pick_key(ker: ModuleType, kind: str, kwargs: dict) -> tuple:
    """What the autotuner keys on: its key arguments and the tensors' dtypes (here: q's, the
    bias's and the padding mask's; the rest follow q), plus the device."""
    q = kwargs["Q"]
    return (kind, q.device, q.dtype, kwargs["Bias"].dtype, kwargs["KPM"].dtype, kwargs.get("STORE_DBIAS"),
            *(kwargs[name] for name in ker.TUNE_KEY))


# Launch plans: the compiled kernel per specialization, called directly. Triton's JIT launch binds
# ~50 keyword arguments and recomputes their specialization on every call (49-60 us of host time
# on an H100 host: evidence/h100/runs/s7/call5-triton_host.json); the compiled kernel's own
# launcher takes the arguments as they are.
_PLANS: dict[tuple, tuple] = {}
_MAX_PLANS = 4096
PLAN_STATS = {"built": 0, "hits": 0}


def plans_enabled() -> bool:
    """ATTNBENCH_TRITON_PLANS=0 launches every call through Triton's JIT (for comparison)."""
    return os.environ.get("ATTNBENCH_TRITON_PLANS", "1").strip().lower() not in ("0", "false", "no", "off")


def _plan_key(kind: str, args: dict) -> tuple:
    """Everything Triton specializes a compiled kernel on: every non-tensor argument's exact value
    (stricter than Triton, which keys ints on == 1 and % 16), and per tensor its dtype, device and
    whether its address is 16-byte aligned (Triton's pointer specialization)."""
    values = [(v.dtype, v.device, not v.data_ptr() % 16) if isinstance(v, torch.Tensor) else v for v in args.values()]
    return kind, tuple(args), tuple(values)


def _run(ker: ModuleType, kind: str, grid: tuple, kwargs: dict, meta: dict) -> None:
    """Launch RAW[kind] over grid with kwargs and meta (a config's block sizes and options). The
    first launch of a specialization goes through Triton's JIT, which compiles (or finds) and
    returns the compiled kernel; later launches with the same plan key call that kernel directly."""
    args = {**kwargs, **meta}
    if not plans_enabled():
        ker.RAW[kind][grid](**args)
        return
    key = _plan_key(kind, args)
    plan = _PLANS.get(key)
    if plan is not None:
        compiled, names = plan
        compiled[(grid[0], grid[1], 1)](*[args[n] for n in names])
        PLAN_STATS["hits"] += 1
        return
    compiled = ker.RAW[kind][grid](**args)
    if compiled is not None and hasattr(compiled, "__getitem__"):
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = (compiled, list(ker.RAW[kind].arg_names))
        PLAN_STATS["built"] += 1


def _launch_first_that_fits(ker: ModuleType, kind: str, length: int, block: str, heads: int, kwargs: dict) -> None:
    """Without the autotuner (which skips configs that run out of shared memory), try the
    pruner's choices in order, then every other config, smallest estimate first: the estimate
    is rough (measured: D=256 + bias in float16 needed 234 KB where 200 KB was estimated)."""
    from triton.runtime.errors import OutOfResources

    first = ker.PRUNE[kind](ker.CONFIGS[kind], {}, **kwargs)

    def rest():  # only built when a config was refused
        pool = ker.FP32_CONFIGS[kind] if kwargs["Q"].element_size() == 4 else ker.CONFIGS[kind]
        others = [c for c in pool if all(c is not f for f in first)]
        yield from sorted(others, key=lambda c: ker.smem_estimate(kind, c, kwargs))

    error = None
    for config in itertools.chain(first, rest()):
        grid = (_cdiv(length, config.kwargs[block]), heads)
        try:
            _run(ker, kind, grid, kwargs, {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages})
            return
        except OutOfResources as exc:  # raised when the kernel is loaded, before it runs
            error = exc
    raise error


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _common(q, k, v, cfg, kpm, bias_full, slopes, sinks) -> dict:
    """The arguments every kernel takes. Slopes / Sinks stand in as q when absent (read, unused)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    masks, has_block = _mask_args(cfg, Sq, Sk)
    sbb, sbh, sbm, sbn = _strides(bias_full, 4)
    ssb, ssh = (0, 0) if slopes is None else (0, slopes.stride(0)) if slopes.dim() == 1 else slopes.stride()
    args = dict(
        Q=q, K=k, V=v, Bias=bias_full if bias_full is not None else q, KPM=kpm if kpm is not None else q,
        Slopes=slopes if slopes is not None else q, Sinks=sinks if sinks is not None else q, ssb=ssb, ssh=ssh,
        cap2=(cfg.softcap if cfg.softcap is not None else 1.0) * 1.4426950408889634,
        HAS_SOFTCAP=cfg.softcap is not None, HAS_ALIBI=slopes is not None, HAS_SINKS=sinks is not None,
        sqb=q.stride(0), sqh=q.stride(1), sqm=q.stride(2),
        skb=k.stride(0), skh=k.stride(1), skn=k.stride(2),
        svb=v.stride(0), svh=v.stride(1), svn=v.stride(2),
        sbb=sbb, sbh=sbh, sbm=sbm, sbn=sbn, spb=kpm.stride(0) if kpm is not None else 0,
        Sq=Sq, Sk=Sk, D=D, DV=Dv, GROUP=Hq // Hkv,
        qk_scale=cfg.scale * 1.4426950408889634, **masks,
        HAS_BIAS=bias_full is not None, HAS_KPM=kpm is not None, HAS_BLOCK=has_block,
        EVEN_D=D == _pow2(D), EVEN_DV=Dv == _pow2(Dv), BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return args


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else _Null()


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _forward(q, k, v, cfg, kpm, bias_full, slopes=None, sinks=None, descales=None):
    """descales: fp8's (q, k, v) descales, each float32 (B, Hkv) contiguous; out is then bfloat16."""
    B, Hq, Sq, _ = q.shape
    Sk, Dv = k.shape[2], v.shape[3]
    out = torch.empty(B, Hq, Sq, Dv, dtype=torch.bfloat16 if descales else q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    # what the backward reads: row max (base 2) and 1 / row sum; +inf and 0 on empty rows
    m2, inv_l = torch.empty_like(lse), torch.empty_like(lse)
    if out.numel() == 0 or Sk == 0:
        return out.zero_(), lse.fill_(-math.inf), (m2.fill_(math.inf), inv_l.zero_())
    interpret = interpret_requested()
    args = _common(q, k, v, cfg, kpm, bias_full, slopes, sinks)
    args.update(Out=out, LSE=lse, M2=m2, INVL=inv_l, sob=out.stride(0), soh=out.stride(1), som=out.stride(2), Hq=Hq)
    qds, kds, vds = descales or (q, q, q)  # stand-ins without fp8 (unread)
    args.update(QDS=qds, KDS=kds, VDS=vds, IS_FP8=bool(descales))
    if descales:  # an 8-bit tl.dot needs K >= 32 on NVIDIA: q . k runs over a head dim padded to 32 at least
        args.update(BLOCK_D=max(FP8_MIN_K, args["BLOCK_D"]), EVEN_D=q.shape[3] == max(FP8_MIN_K, args["BLOCK_D"]))
    with _device_ctx(q):
        _launch("fwd", Sq, "BLOCK_M", B * Hq, interpret, **args)
    return out, lse, (m2, inv_l)


def _backward(q, k, v, out, stats, dout, dlse, cfg, kpm, bias_full, want_dbias, slopes=None, sinks=None):
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = torch.zeros(B, Hq, Sq, Sk, dtype=torch.float32, device=q.device) if want_dbias else None
    if q.numel() == 0 or Sk == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias, None
    interpret = interpret_requested()
    ker = kernels(interpret)
    delta = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    common = _common(q, k, v, cfg, kpm, bias_full, slopes, sinks)
    grads = dict(DO=dout, M2=stats[0], INVL=stats[1], Delta=delta, sdb=dout.stride(0), sdh=dout.stride(1), sdm=dout.stride(2))
    with _device_ctx(q):
        block_m = 64 if not interpret else 16
        ker.bwd_preprocess[(_cdiv(Sq, block_m), B * Hq)](
            out, dout, dlse if dlse is not None else delta, delta,
            out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            Hq, Sq, Dv, HAS_DLSE=dlse is not None, BLOCK_M=block_m, BLOCK_DV=_pow2(Dv),
        )
        _launch(
            "dkdv", Sk, "BLOCK_N", B * Hkv, interpret, **common, **grads, DK=dk, DVal=dv,
            sdkb=dk.stride(0), sdkh=dk.stride(1), sdkn=dk.stride(2),
            sdvb=dv.stride(0), sdvh=dv.stride(1), sdvn=dv.stride(2), Hq=Hq, Hkv=Hkv, sm_scale=cfg.scale,
        )
        _launch(
            "dq", Sq, "BLOCK_M", B * Hq, interpret, **common, **grads, DQ=dq, DBias=dbias if want_dbias else q,
            sdqb=dq.stride(0), sdqh=dq.stride(1), sdqm=dq.stride(2), Hq=Hq, sm_scale=cfg.scale,
            STORE_DBIAS=want_dbias,
        )
    dsinks = None
    if sinks is not None:  # d sink_h = -sum over (b, i) of p_sink * delta, p_sink = exp2(sink2 - m2) / l
        p_sink = torch.exp2(sinks.float().view(1, Hq, 1) * 1.4426950408889634 - stats[0]) * stats[1]
        dsinks = -(p_sink * delta).sum((0, 2))
    return dq, dk, dv, dbias, dsinks


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a (B, Hq, Sq, Sk) gradient to the shape the bias was broadcast from."""
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, key_padding_mask, cfg, slopes, sinks):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        B, Hq, Sq, _ = q.shape
        Sk = k.shape[2]
        bias_full = None if bias is None else bias.expand(B, Hq, Sq, Sk)
        kpm = None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
        out, lse, (m2, inv_l) = _forward(q, k, v, cfg, kpm, bias_full, slopes, sinks)
        ctx.save_for_backward(q, k, v, out, m2, inv_l, bias_full, kpm, slopes, sinks)
        ctx.cfg = cfg
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, m2, inv_l, bias_full, kpm, slopes, sinks = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.to(out.dtype).contiguous()
        dlse = None if dlse is None else dlse.float().contiguous()
        want_dbias = bias_full is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias, dsinks = _backward(q, k, v, out, (m2, inv_l), dout, dlse, ctx.cfg, kpm, bias_full, want_dbias,
                                              slopes, sinks)
        if dbias is not None:
            dbias = _sum_to(dbias, ctx.bias_shape).to(ctx.bias_dtype)
        if dsinks is not None and ctx.needs_input_grad[7]:
            dsinks = dsinks.to(sinks.dtype)
        else:
            dsinks = None
        return dq, dk, dv, dbias, None, None, None, dsinks


def attention(q, k, v, cfg: Config, key_padding_mask=None, bias=None, *, alibi_slopes=None,
              sinks=None, q_descale=None, k_descale=None, v_descale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Sq, Dv) in q's dtype and lse (B, Hq, Sq) float32 (-inf on empty rows; the
    sink on empty rows with sinks). fp8 q, k, v (with descales) give bfloat16 out: `fp8_forward`."""
    if q.dtype == torch.float8_e4m3fn:
        return fp8_forward(q, k, v, cfg, key_padding_mask, bias, q_descale=q_descale, k_descale=k_descale,
                           v_descale=v_descale)
    _check(q, k, v, cfg, key_padding_mask, bias, alibi_slopes, sinks)
    if k.shape[2] == 0:  # no keys: every row is empty (no key block to launch over)
        if sinks is None:
            return no_keys(q, k, v, bias)
        out, lse = no_keys(q, k, v, bias)  # the sink alone: out 0, lse = sink, d sink = 0
        return out, lse + sinks.to(lse.dtype).view(1, -1, 1)
    slopes = None if alibi_slopes is None else alibi_slopes.contiguous()
    return _Attention.apply(q, k, v, bias, key_padding_mask, cfg, slopes, sinks)


def fp8_forward(q, k, v, cfg: Config, key_padding_mask=None, bias=None, *, q_descale=None, k_descale=None,
                v_descale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 attention, forward only: the forward kernel with IS_FP8 (tl.dot of e4m3 q and k, P
    rounded to e4m3 for the dot with v, the descales folded into the scale and the output);
    bfloat16 out. On CUDA (Hopper's tl.dot takes fp8e4nv operands) and in the interpreter."""
    descales = dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    check_call(q, k, v, cfg, key_padding_mask, bias, who="triton", **descales)
    if q.device.type == "cpu" and not interpret_requested():
        raise ValueError("triton: cpu tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
    if bias is not None or cfg.softcap is not None or cfg.dropout_p:
        raise ValueError("triton: fp8 takes no bias, soft cap or dropout")
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"triton: head dims up to {MAX_HEAD_DIM}, got D={q.shape[3]}, Dv={v.shape[3]}")
    if any(t.requires_grad for t in (q, k, v)):
        raise ValueError("triton: fp8 is forward only")
    B, Hq, Sq, _ = q.shape
    Hkv = k.shape[1]
    if k.shape[2] == 0:  # no keys: every row is empty
        return (torch.zeros(B, Hq, Sq, v.shape[3], dtype=torch.bfloat16, device=q.device),
                torch.full((B, Hq, Sq), -math.inf, dtype=torch.float32, device=q.device))
    per_head = tuple(torch.ones((), dtype=torch.float32, device=q.device).expand(B, Hkv).contiguous() if d is None
                     else d.expand(B, Hkv).contiguous() for d in descales.values())
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
    out, lse, _ = _forward(q, k, v, cfg, kpm, None, descales=per_head)
    return out, lse


# -- paged KV cache -----------------------------------------------------------------------------
PAGED_BLOCKS = {"interpret": (16, 16), "compiled": (16, 64)}  # (BLOCK_M, BLOCK_N) of paged_fwd


def paged(q, k_cache, v_cache, block_table, cache_seqlens, cfg: Config, return_lse: bool = True):
    """The paged-cache forward (attnbench.packing's convention): one launch of the paged_fwd
    kernel, which walks each sequence's block table; no split-KV. out (B, Hq, Sq, Dv) in q's
    dtype, lse (B, Hq, Sq) float32."""
    check_paged(q, k_cache, v_cache, block_table, cache_seqlens, cfg, who="triton")
    if q.dtype not in DTYPES:
        raise TypeError(f"triton: q, k, v dtype must be float16, bfloat16 or float32, got {q.dtype}")
    B, Hq, Sq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"triton: head dims up to {MAX_HEAD_DIM}, got D={D}, Dv={Dv}")
    if q.device.type == "cpu" and not interpret_requested():
        raise ValueError("triton: cpu tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
    q, k_cache, v_cache = (_last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    out = torch.empty(B, Hq, Sq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    left, right = cfg.window if cfg.window is not None else (None, None)
    left = BIG if left is None else min(int(left), BIG)
    right = BIG if right is None else min(int(right), BIG)
    if cfg.causal:
        right = min(right, 0)
    interpret = interpret_requested()
    block_m, block_n = PAGED_BLOCKS["interpret" if interpret else "compiled"]
    lens = cache_seqlens.contiguous()
    with _device_ctx(q):
        kernels(interpret).paged_fwd[(_cdiv(Sq, block_m), B * Hq)](
            q, k_cache, v_cache, block_table, lens, out, lse,
            q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0), block_table.stride(1),
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            Hq, Sq, D, Dv, Hq // Hkv, k_cache.shape[1], cfg.scale * 1.4426950408889634, left, right,
            (cfg.softcap if cfg.softcap is not None else 1.0) * 1.4426950408889634,
            HAS_SOFTCAP=cfg.softcap is not None, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
        )
    return out, lse


# -- packed (varlen) batches ----------------------------------------------------------------
def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg: Config, return_lse: bool = True):
    """The varlen convention (attnbench.packing) on the dense kernel: one forward (and backward)
    launch per sequence, on strided views of the packed tensors at the offsets cu_seqlens gives
    (no copies). Not a single varlen launch: B launches per call. out (total_q, Hq, Dv), lse
    (Hq, total_q) float32."""
    bounds = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg, who="triton")
    outs, lses = [], []
    for q0, q1, k0, k1 in bounds:
        qb, kb, vb = (t[a:z].transpose(0, 1)[None] for t, a, z in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        out, lse = attention(qb, kb, vb, cfg)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


# -- registration ---------------------------------------------------------------------------
def supports(spec: Spec) -> str | None:
    if spec.device.split(":")[0] == "cpu":
        if not interpret_requested():
            return "cpu needs TRITON_INTERPRET=1"
        if spec.dtype == "bfloat16" and not spec.fp8:  # fp8's dots are e4m3 x e4m3; only the store is bf16
            return "bfloat16 on cpu: the Triton interpreter's bf16 dot is wrong"
    if max(spec.D, spec.Dv) > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM}"
    if spec.block is not None and spec.block.window_size > MAX_BLOCK_WINDOW:
        return f"blocked window_size up to {MAX_BLOCK_WINDOW}"
    return None


def tuning() -> dict:
    """The autotuner's pick per kernel and tuning key so far (compiled kernels only)."""
    ker = _KERNELS.get(False)
    if ker is None or not autotune_enabled():
        return {}
    picks = {}
    for kind, tuner in ker.TUNED.items():
        names = list(getattr(tuner, "keys", ker.TUNE_KEY))
        for key, config in getattr(tuner, "cache", {}).items():
            label = ",".join(f"{n}={v}" for n, v in zip(names, key))
            picks[f"{kind}[{label}]"] = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return picks


FEATURES = frozenset({
    "causal", "sliding_window", "blocked_window", "gqa", "cross", "key_padding", "bias", "bias_grad",
    "top_left", "dv", "backward", "lse", "deterministic", "softcap", "alibi", "sinks",
})

triton_dense = Impl(
    name="triton",
    variant="dense",
    fn=attention,
    features=FEATURES | {"paged_kv", "varlen", "fp8"},
    paged=paged,
    varlen=varlen,
    devices=("cuda", "cpu"),
    dtypes=("float32", "float16", "bfloat16"),
    requires=("triton",),
    supports=supports,
    compiles=True,
    tuning=tuning,
    description="attnbench's fused Triton kernel (FA2 scheme): block-skipping windows, GQA without repeat, "
    "padding, bias with gradient; cpu only under TRITON_INTERPRET=1",
)

triton_local = triton_dense.for_variant("local", "the same fused kernel; sliding windows skip key blocks outside the band")
