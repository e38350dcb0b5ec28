"""triton: attnbench's own fused attention kernel (FlashAttention-2 scheme), forward and backward.

One kernel call serves every mask the contract has (causal either alignment, sliding and
blocked windows), grouped heads without repeating K/V, a key padding mask, an additive bias
(with its gradient) and the score features: a logit soft cap, ALiBi from per-head slopes and
per-head sinks (with their gradient). Key blocks a query block cannot see are skipped by the loop bounds; masks
run only on edge blocks. A packed (varlen) batch runs on the same kernels, one launch each for all its
sequences (their IS_VARLEN specialization). The kernels live in impls/_triton_kernels.py.

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
import zlib
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

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
    _check_limits(q, q.shape[3], v.shape[3], cfg)


def _check_limits(q: torch.Tensor, D: int, Dv: int, cfg: Config) -> None:
    """The kernel's own limits: dtype, head dims, no dropout, blocked window size, cpu only interpreted."""
    if q.dtype not in DTYPES:
        raise TypeError(f"triton: q, k, v dtype must be float16, bfloat16 or float32, got {q.dtype}")
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


def tune_mode() -> str:
    """How the Triton kernels pick a launch config (ATTNBENCH_TRITON_AUTOTUNE):
    "tune" (1, the default): benchmark the configs that fit, once per tuning key (the sweep's mode);
    "first" (0): the first config that fits, for every call;
    "spread": one config per compiled specialization (the tuning key without the lengths), chosen
    by a stable hash among the configs that fit, so a property run compiles each specialization
    once and its examples still cover every config (what `attnbench verify` uses: the tuner's
    per-length retuning compiled every config again for each drawn length)."""
    value = os.environ.get("ATTNBENCH_TRITON_AUTOTUNE", "1").strip().lower()
    if value in ("0", "false", "no", "off", "first"):
        return "first"
    return "spread" if value == "spread" else "tune"


def autotune_enabled() -> bool:
    return tune_mode() == "tune"


MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension


def _launch_heads(kind: str, length: int, block: str, batch: int, heads: int, interpret: bool, **kwargs) -> None:
    """_launch over batch * heads programs in the grid's y. A packed batch whose sequences *
    heads pass MAX_GRID_Y launches in groups of sequences that fit: CuQ / CuK slices, whose
    offsets still index the whole packed tensors."""
    if not kwargs["IS_VARLEN"] or batch * heads <= MAX_GRID_Y:
        _launch(kind, length, block, batch * heads, interpret, **kwargs)
        return
    step = MAX_GRID_Y // heads
    cu_q, cu_k = kwargs["CuQ"], kwargs["CuK"]
    for first in range(0, batch, step):
        last = min(first + step, batch)
        kwargs.update(CuQ=cu_q[first:last + 1], CuK=cu_k[first:last + 1])
        _launch(kind, length, block, (last - first) * heads, interpret, **kwargs)


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
    mode = tune_mode()
    if mode != "tune":
        _launch_first_that_fits(ker, kind, length, block, heads, kwargs, spread=mode == "spread")
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


def _launch_first_that_fits(ker: ModuleType, kind: str, length: int, block: str, heads: int, kwargs: dict,
                            spread: bool = False) -> None:
    """Without the autotuner (which skips configs that run out of shared memory), try the
    pruner's choices in order, then every other config, smallest estimate first: the estimate
    is rough (measured: D=256 + bias in float16 needed 234 KB where 200 KB was estimated).
    spread: start at the pruner's choice that `spread_index` names instead of its first."""
    from triton.runtime.errors import OutOfResources

    first = ker.PRUNE[kind](ker.CONFIGS[kind], {}, **kwargs)
    if spread and len(first) > 1:
        i = spread_index(ker, kind, kwargs, len(first))
        first = first[i:] + first[:i]

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


LENGTH_ARGS = ("Sq", "Sk", "left", "right")  # tuning-key arguments that are not compile-time


def spread_index(ker: ModuleType, kind: str, kwargs: dict, count: int) -> int:
    """A stable index in range(count) per compiled specialization: the kernel, q's dtype and the
    tuning key without its lengths and window sizes; the same in every process and run."""
    key = (kind, str(kwargs["Q"].dtype), kwargs.get("STORE_DBIAS"),
           *(kwargs[name] for name in ker.TUNE_KEY if name not in LENGTH_ARGS))
    return zlib.crc32(repr(key).encode()) % count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Packed(NamedTuple):
    """A packed batch's sequences: cu_seqlens (int32, on q's device) and the longest lengths,
    which size the grid."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def _sequences(t: torch.Tensor, n: int) -> torch.Tensor:
    """A packed (total, H, D) tensor as the (n, H, total, D) view the kernels take with
    IS_VARLEN: batch stride 0, each program shifting to its own sequence's rows."""
    return t.transpose(0, 1)[None].expand(n, -1, -1, -1)


def _common(q, k, v, cfg, kpm, bias_full, slopes, sinks, packed: _Packed | None = None) -> dict:
    """The arguments every kernel takes. Slopes / Sinks / CuQ / CuK stand in as q when absent
    (Slopes read, unused; CuQ / CuK never read)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    masks, has_block = _mask_args(cfg, Sq, Sk)
    sbb, sbh, sbm, sbn = _strides(bias_full, 4)
    ssb, ssh = (0, 0) if slopes is None else (0, slopes.stride(0)) if slopes.dim() == 1 else slopes.stride()
    args = dict(
        Q=q, K=k, V=v, Bias=bias_full if bias_full is not None else q, KPM=kpm if kpm is not None else q,
        Slopes=slopes if slopes is not None else q, Sinks=sinks if sinks is not None else q, ssb=ssb, ssh=ssh,
        CuQ=packed.cu_q if packed else q, CuK=packed.cu_k if packed else q, IS_VARLEN=packed is not None,
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


def _forward(q, k, v, cfg, kpm, bias_full, slopes=None, sinks=None, packed: _Packed | None = None, descales=None):
    """out (B, Hq, Sq, Dv), lse (B, Hq, Sq) and the backward's stats; with `packed` (q, k, v as
    _sequences views) out (total_q, Hq, Dv) and lse (Hq, total_q). descales: fp8's (q, k, v)
    descales, each float32 (B, Hkv) contiguous; out is then bfloat16."""
    B, Hq, Sq, _ = q.shape
    Sk, Dv = k.shape[2], v.shape[3]
    out_dtype = torch.bfloat16 if descales else q.dtype
    if packed is None:
        out = torch.empty(B, Hq, Sq, Dv, dtype=out_dtype, device=q.device)
        lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    else:
        out = torch.empty(Sq, Hq, Dv, dtype=out_dtype, device=q.device)
        lse = torch.empty(Hq, Sq, dtype=torch.float32, device=q.device)
    # what the backward reads: row max (base 2) and 1 / row sum; +inf and 0 on empty rows
    m2, inv_l = torch.empty_like(lse), torch.empty_like(lse)
    if out.numel() == 0 or Sk == 0:
        return out.zero_(), lse.fill_(-math.inf), (m2.fill_(math.inf), inv_l.zero_())
    interpret = interpret_requested()
    args = _common(q, k, v, cfg, kpm, bias_full, slopes, sinks, packed)
    o = out if packed is None else _sequences(out, B)
    args.update(Out=o, LSE=lse, M2=m2, INVL=inv_l, sob=o.stride(0), soh=o.stride(1), som=o.stride(2), Hq=Hq)
    qds, kds, vds = descales or (q, q, q)  # stand-ins without fp8 (unread)
    args.update(QDS=qds, KDS=kds, VDS=vds, IS_FP8=bool(descales))
    if descales:  # an 8-bit tl.dot needs K >= 32 on NVIDIA: q . k runs over a head dim padded to 32 at least
        args.update(BLOCK_D=max(FP8_MIN_K, args["BLOCK_D"]), EVEN_D=q.shape[3] == max(FP8_MIN_K, args["BLOCK_D"]))
    with _device_ctx(q):
        _launch_heads("fwd", Sq if packed is None else packed.max_q, "BLOCK_M", B, Hq, interpret, **args)
    return out, lse, (m2, inv_l)


def _backward(q, k, v, out, stats, dout, dlse, cfg, kpm, bias_full, want_dbias, slopes=None, sinks=None,
              packed: _Packed | None = None):
    """dq, dk, dv, dbias, dsinks; with `packed`, out, dout, dq, dk, dv are packed (total, H, D) and
    dlse and the stats (Hq, total_q), q, k, v _sequences views (as _forward)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if packed is None:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    else:
        dq, dk, dv = (torch.empty(t.shape[2], t.shape[1], t.shape[3], dtype=t.dtype, device=t.device) for t in (q, k, v))
    dbias = torch.zeros(B, Hq, Sq, Sk, dtype=torch.float32, device=q.device) if want_dbias else None
    if q.numel() == 0 or Sk == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias, None
    interpret = interpret_requested()
    ker = kernels(interpret)
    delta = torch.empty_like(stats[0])
    common = _common(q, k, v, cfg, kpm, bias_full, slopes, sinks, packed)
    # the preprocess is row-wise: a packed batch is one sequence of total_q rows to it
    o_rows, do_rows, batch = (out, dout, B) if packed is None else (out.transpose(0, 1)[None], dout.transpose(0, 1)[None], 1)
    if packed is not None:
        dout, dq, dk, dv = (_sequences(t, B) for t in (dout, dq, dk, dv))
    grads = dict(DO=dout, M2=stats[0], INVL=stats[1], Delta=delta, sdb=dout.stride(0), sdh=dout.stride(1), sdm=dout.stride(2))
    rows_q, rows_k = (Sq, Sk) if packed is None else (packed.max_q, packed.max_k)
    with _device_ctx(q):
        block_m = 64 if not interpret else 16
        ker.bwd_preprocess[(_cdiv(Sq, block_m), batch * Hq)](
            o_rows, do_rows, dlse if dlse is not None else delta, delta,
            o_rows.stride(0), o_rows.stride(1), o_rows.stride(2), do_rows.stride(0), do_rows.stride(1), do_rows.stride(2),
            Hq, Sq, Dv, HAS_DLSE=dlse is not None, BLOCK_M=block_m, BLOCK_DV=_pow2(Dv),
        )
        _launch_heads(
            "dkdv", rows_k, "BLOCK_N", B, Hkv, interpret, **common, **grads, DK=dk, DVal=dv,
            sdkb=dk.stride(0), sdkh=dk.stride(1), sdkn=dk.stride(2),
            sdvb=dv.stride(0), sdvh=dv.stride(1), sdvn=dv.stride(2), Hq=Hq, Hkv=Hkv, sm_scale=cfg.scale,
        )
        _launch_heads(
            "dq", rows_q, "BLOCK_M", B, Hq, interpret, **common, **grads, DQ=dq, DBias=dbias if want_dbias else q,
            sdqb=dq.stride(0), sdqh=dq.stride(1), sdqm=dq.stride(2), Hq=Hq, sm_scale=cfg.scale,
            STORE_DBIAS=want_dbias,
        )
    if packed is not None:
        dq, dk, dv = (t[0].transpose(0, 1) for t in (dq, dk, dv))
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
# Split-KV. A paged_fwd program holds small tiles (16 x 64), so several run on one SM at once:
# the heuristic aims at SPLIT_PROGRAMS_PER_SM programs per SM, each split walking at least
# SPLIT_MIN_BLOCKS key blocks (256 keys compiled), at most MAX_SPLITS splits.
SPLIT_PROGRAMS_PER_SM = 4
SPLIT_MIN_BLOCKS = 4
MAX_SPLITS = 64
SPLITS_ENV = "ATTNBENCH_TRITON_SPLITS"


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (the interpreter runs programs one
    after another, so splitting only adds work there)."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


_SMS: dict[int, int] = {}


def split_heuristic(programs: int, key_blocks: int, sms: int) -> int:
    """Splits per row block so that about SPLIT_PROGRAMS_PER_SM * sms programs run: 1 when
    `programs` (batch * kv heads * row blocks) already fill the device or when the longest visible
    key range, `key_blocks` blocks, is too short to give each split SPLIT_MIN_BLOCKS."""
    want = _cdiv(SPLIT_PROGRAMS_PER_SM * sms, max(programs, 1))
    return max(1, min(want, key_blocks // SPLIT_MIN_BLOCKS, MAX_SPLITS))


def forced_splits(num_splits: int | None) -> int | None:
    """The caller's split count: the num_splits keyword, else ATTNBENCH_TRITON_SPLITS, else None
    (the heuristic decides)."""
    if num_splits is None:
        raw = os.environ.get(SPLITS_ENV, "").strip()
        if not raw:
            return None
        if not raw.isdigit():
            raise ValueError(f"triton: {SPLITS_ENV}={raw!r} is not a positive integer")
        num_splits = int(raw)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"triton: num_splits must be an integer in [1, {MAX_SPLITS}], got {num_splits!r}")
    return num_splits


def paged(q, k_cache, v_cache, block_table, cache_seqlens, cfg: Config, return_lse: bool = True, *,
          num_splits: int | None = None):
    """The paged-cache forward (attnbench.packing's convention), forward only. paged_fwd walks
    each sequence's block table, one program per kv head with its group's query heads packed
    into the rows (each K / V block read once per group); with split-KV (flash-decoding) each
    row block's visible keys
    are cut into up to `num_splits` runs of whole key blocks, one program each writing a float32
    partial output and lse, and paged_combine merges them by the log-sum-exp rule. num_splits
    defaults to ATTNBENCH_TRITON_SPLITS, else to split_heuristic (1 on the CPU interpreter and
    for short caches); a forced count splits down to single key blocks. Inside a CUDA graph
    capture (no host read of cache_seqlens: check_paged) the heuristic takes the table's room,
    max_blocks * block_size, for the longest cache. out (B, Hq, Sq, Dv) in q's dtype, lse
    (B, Hq, Sq) float32."""
    lengths = check_paged(q, k_cache, v_cache, block_table, cache_seqlens, cfg, who="triton", capturable=True)
    if q.dtype not in DTYPES:
        raise TypeError(f"triton: q, k, v dtype must be float16, bfloat16 or float32, got {q.dtype}")
    B, Hq, Sq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"triton: head dims up to {MAX_HEAD_DIM}, got D={D}, Dv={Dv}")
    if q.device.type == "cpu" and not interpret_requested():
        raise ValueError("triton: cpu tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
    forced = forced_splits(num_splits)
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
    group = Hq // Hkv
    num_m = _cdiv(Sq, block_m)  # paged_combine's query blocks
    num_r = _cdiv(Sq * group, block_m)  # paged_fwd's row blocks: a kv head's group packed with its queries
    if forced is not None:
        splits, min_blocks = forced, 1
    else:  # the widest key range a row block can see: its window, within the longest cache
        longest = max(lengths, default=0) if lengths is not None else block_table.shape[1] * k_cache.shape[1]
        span = min(longest, left + max(right, 0) + min(Sq, block_m) + block_n - 1)
        splits = split_heuristic(B * Hkv * num_r, _cdiv(span, block_n), _sm_count(q.device))
        min_blocks = SPLIT_MIN_BLOCKS
    if splits > 1:
        part_out = torch.empty(splits, B, Hq, Sq, Dv, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(splits, B, Hq, Sq, dtype=torch.float32, device=q.device)
    else:
        part_out, part_lse = out, lse
    ker = kernels(interpret)
    with _device_ctx(q):
        ker.paged_fwd[(B * Hkv, splits, num_r)](
            q, k_cache, v_cache, block_table, cache_seqlens.contiguous(), part_out, part_lse,
            q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0), block_table.stride(1),
            *_split_strides(part_out, splits > 1, 4), *_split_strides(part_lse, splits > 1, 3),
            Hkv, Sq, D, Dv, group, k_cache.shape[1], cfg.scale * 1.4426950408889634, left, right,
            (cfg.softcap if cfg.softcap is not None else 1.0) * 1.4426950408889634, splits, min_blocks,
            HAS_SOFTCAP=cfg.softcap is not None, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
        )
        if splits > 1:
            ker.paged_combine[(B * Hq, num_m)](
                part_out, part_lse, out, lse, *part_out.stride()[:4], *part_lse.stride()[:3],
                out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
                Hq, Sq, Dv, splits, BLOCK_M=block_m, BLOCK_DV=_pow2(Dv),
            )
    return out, lse


def _split_strides(t: torch.Tensor, split: bool, n: int) -> list[int]:
    """The split stride and the first n - 1 other strides of a partial buffer (split, ...) or,
    unsplit, of the result itself (split stride 0)."""
    return list(t.stride()[:n]) if split else [0, *t.stride()[: n - 1]]


# -- packed (varlen) batches ----------------------------------------------------------------
class _Varlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, cfg):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        packed = _Packed(cu_q, cu_k, max_q, max_k)
        n = len(cu_q) - 1
        out, lse, (m2, inv_l) = _forward(*(_sequences(t, n) for t in (q, k, v)), cfg, None, None, packed=packed)
        ctx.save_for_backward(q, k, v, out, m2, inv_l, cu_q, cu_k)
        ctx.cfg, ctx.longest = cfg, (max_q, max_k)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, m2, inv_l, cu_q, cu_k = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.to(out.dtype).contiguous()
        dlse = None if dlse is None else dlse.float().contiguous()
        n = len(cu_q) - 1
        dq, dk, dv, _, _ = _backward(*(_sequences(t, n) for t in (q, k, v)), out, (m2, inv_l), dout, dlse, ctx.cfg,
                                     None, None, False, packed=_Packed(cu_q, cu_k, *ctx.longest))
        return dq, dk, dv, None, None, None, None, None


def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg: Config, return_lse: bool = True):
    """The varlen convention (attnbench.packing): one launch of the forward kernel over
    (cdiv(max_seqlen_q, BLOCK_M), B * Hq) programs, each reading its sequence's rows and lengths
    from cu_seqlens (IS_VARLEN in impls/_triton_kernels.py), and one launch per backward kernel
    (preprocess, dkdv, dq); no copies of the packed tensors. Past MAX_GRID_Y sequences * heads,
    one launch per group of sequences that fits. out (total_q, Hq, Dv), lse (Hq, total_q) float32."""
    check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg, who="triton")
    _check_limits(q, q.shape[2], v.shape[2], cfg)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.device != q.device:
            raise ValueError(f"triton: {name} is on {cu.device}, q on {q.device}")
    return _Varlen.apply(q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k, cfg)


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
