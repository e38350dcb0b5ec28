"""flash_attn4: adapter for FlashAttention-4 (flash-attn-4, the CuTe DSL kernels of Dao-AILab).

FA4 installs `flash_attn.cute` (a `flash_attn` namespace package with no flash_attn_func of its
own) and needs nvidia-cutlass-dsl; scripts/fa4_wheels.sh installs the wheel set on a GPU host.
Written against flash-attn-4 4.0.0b36 (flash_attn/cute/interface.py).

Convention map (contract -> FA4):
- layout: contract tensors are (B, H, S, D); FA4 takes (B, S, H, D). transpose(1, 2) is a view
  with a contiguous last dim; FA4 makes what it needs contiguous itself.
- causal and windows are bottom-right aligned, like the contract: with p(i) = i + Sk - Sq, key
  j is visible iff p(i) - left <= j <= p(i) + right. window_size=(left, right) takes None for
  an unbounded side, as the contract does; causal with a window is the window with right = 0,
  which is what FA4 makes of causal=True plus a window. top_left is not offered.
- grouped heads: native (query head h reads kv head h // G), the contract's order.
- scale: softmax_scale passes through (FA4 only defaults it when None, so 0 stays 0).
- lse: return_lse=True gives (B, H, Sq) float32 in natural log (FA4 computes in base 2 and
  multiplies by ln 2); a row with no visible key gets -inf and a zero output, as the contract
  says. Varlen returns (H, total_q).
- key padding: any mask pattern, through flash_attn_varlen_func on the kept keys only
  (cu_seqlens). Gathering keys renumbers their positions and varlen aligns causal to each
  sequence's own length, so padding with causal or a window is declined.
- not offered: dropout (FA4 has none), bias, blocked windows, softcap (not in the contract;
  passed as 0, FA4's "off"), float32 / float64.
Every keyword is passed by name: FA4's fourth positional parameter is `qv` (MLA), not a mask.

Limits (supports()), from interface.py's checks and what its tests verify:
- Hopper (compute capability 9.x): head dims 8..256, multiples of 8 (16 bytes / element).
  Forward with D != Dv: (192, 128) and (128, 64) only, the pairs upstream's FA4 tests run
  besides D == Dv (their dv_vals; HOPPER_DV_PAIRS). The H200 property run (`attnbench verify --device cuda --impl
  dense/flash_attn4`, 2026-12-03, evidence/h200/verify_times-fa4-palette-2026-12-03.txt) drew
  three forwards that fault with "CUDA error: an illegal memory access was encountered", all
  with D=16 and Dv > D: (16, 128) causal with a window, (16, 64) with key padding (varlen), and
  (16, 64) packed. FA4 picks the SM90 forward tile from D alone (`_tile_size_fwd_sm90`: D <= 64
  gives a 192x128 tile with P in registers), consistent with a V wider than D overflowing that
  tile. Inferred, not measured: the fault for Dv > D at larger D (e.g. D=64, Dv=128)
  and for D > Dv other than (128, 64): none was drawn; they are declined because upstream does
  not test them. The named check's (16, 32) at Sq=6 (scripts/checks/fa4_findings.py
  "dv-window-grad", 2026-12-03) passed forward and backward: the declaration is wider than the faults seen.
  Canary: "hopper-dv-fault" (tests/test_flash_attn4.py, scripts/checks/fa4_findings.py).
  Backward: the tested shapes only, D == Dv <= 128, or (D, Dv) = (192, 128) without grouped
  heads (upstream: "hdim > 192 backward: SM90 not supported yet", "SM90 GQA bwd currently
  requires headdim == headdim_v").
- Blackwell (10.x, 11.x): 8..128, or (192, 128), (256, 256), or Dv = 512 with D = 64 or Dv
  (MLA); multiples of 8. Backward: D == Dv <= 128, (192, 128) or (256, 256).
- Other GPUs: FA4 also runs SM80 / SM120 through an SM80 path without these checks; the
  adapter declares the datacenter Hopper and Blackwell parts only.
- fp8 (the contract's `fp8`: float8_e4m3fn q, k, v with float32 descales, bfloat16 out): FA4 takes
  q_descale / k_descale / v_descale of shape (B, Hkv) only, so a per-tensor descale () is expanded
  to (B, Hkv); forward only (FA4 raises for fp8 with gradients) and SM100 only (FA4 asserts
  `arch // 10 == 10`): supports() declines every other compute capability, and key padding with
  fp8 (the varlen path is not verified with descales).

Upstream bugs (upstream_bug(), found by the H200 property run of 2026-12-03; canaries in
tests/test_flash_attn4.py, scripts/checks/fa4_findings.py re-checks them):
- softmax_scale=0: out and lse are NaN (the contract: uniform attention, the mean of v).
- key padding that leaves a batch element no key (varlen with an empty key sequence): dq is wrong
  (error 0.242 against an allowance of 0.0084 at Spec(B=2, Sq=2, key_lengths=(0, 2)), float16).
The local variant declares no key_padding: it always has a window, and padding with a window is
declined above.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util

import torch
import torch.nn.functional as F

from attnbench.checks import check_call
from attnbench.registry import Impl
from attnbench.spec import Config, Spec

MODULE = "flash_attn.cute"
ARCHES = (9, 10, 11)  # compute capability majors declared: Hopper, Blackwell (SM100 / SM110)
# Hopper's forward with D != Dv: the pairs upstream's tests run (the others are declined, see the docstring)
HOPPER_DV_PAIRS = ((192, 128), (128, 64))
FP8_ARCH = 10  # FA4 asserts arch // 10 == 10 for fp8 inputs: SM100 only


def _fa4():
    # imported lazily: the registry loads this file on machines without the package
    return importlib.import_module(MODULE)


@functools.cache
def unavailable() -> str | None:
    """Why FA4 cannot run here: `flash_attn.cute` must be found, import, and have
    flash_attn_func, on a Hopper or Blackwell GPU. Cached: the import takes seconds."""
    try:
        found = importlib.util.find_spec(MODULE) is not None
    except (ImportError, ValueError):  # no flash_attn at all, or a module without a spec
        found = False
    if not found:
        return f"{MODULE} not installed (flash-attn-4; scripts/fa4_wheels.sh)"
    if not torch.cuda.is_available():
        return "needs CUDA"
    major, minor = torch.cuda.get_device_capability()
    if major not in ARCHES:
        return f"needs a Hopper or Blackwell GPU (compute capability 9.x-11.x), this one is {major}.{minor}"
    try:
        module = _fa4()
    except Exception as exc:  # a broken install: say what failed, never take the registry down
        return f"{MODULE} does not import: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    if not callable(getattr(module, "flash_attn_func", None)):
        return f"{MODULE} has no flash_attn_func (an unknown flash-attn-4 version)"
    return None


def _window(cfg: Config) -> tuple[int | None, int | None]:
    return (None, None) if cfg.window is None else (cfg.window[0], cfg.window[1])


def _check(q, k, cfg: Config, key_padding_mask, bias) -> None:
    if bias is not None:
        raise ValueError("bias: FlashAttention-4 takes no additive bias")
    if cfg.block is not None:
        raise ValueError("cfg.block: FlashAttention-4 has no blocked windows")
    if cfg.align != "bottom_right":
        raise ValueError(f"cfg.align: FlashAttention-4 is bottom-right aligned only, got {cfg.align!r}")
    if cfg.dropout_p:
        raise ValueError(f"cfg.dropout_p: FlashAttention-4 has no dropout, got {cfg.dropout_p}")
    if key_padding_mask is not None and (cfg.causal or cfg.window is not None):
        raise ValueError("key_padding_mask: with causal/window the varlen path would renumber key positions")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: Config,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    descales = dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    check_call(q, k, v, cfg, key_padding_mask, bias, who="flash_attn4", **descales)  # the shared call convention
    _check(q, k, cfg, key_padding_mask, bias)
    fp8 = q.dtype == torch.float8_e4m3fn
    if key_padding_mask is not None:
        if fp8:
            raise ValueError("key_padding_mask: the adapter's varlen path takes no fp8 descales")
        return _varlen(q, k, v, cfg, key_padding_mask)
    extra = {n: per_kv_head(d, k.shape[0], k.shape[1]) for n, d in descales.items()} if fp8 else {}
    out, lse = _fa4().flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        softmax_scale=cfg.scale, causal=cfg.causal, window_size=_window(cfg), softcap=0.0, return_lse=True, **extra,
    )
    return out.transpose(1, 2), lse


def per_kv_head(descale: torch.Tensor | None, B: int, Hkv: int) -> torch.Tensor | None:
    """A contract descale (() or (B, Hkv), float32) in FA4's shape (B, Hkv), contiguous."""
    return None if descale is None else descale.expand(B, Hkv).contiguous()


def _varlen(q, k, v, cfg: Config, kpm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    out, lse = _fa4().flash_attn_varlen_func(
        q_flat, k_flat, v_flat, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=Sq,
        max_seqlen_k=max(1, int(lens.max())), softmax_scale=cfg.scale, causal=False, softcap=0.0,
        return_lse=True,
    )
    out = out.reshape(B, Sq, Hq, -1).transpose(1, 2)
    return out, lse.reshape(Hq, B, Sq).transpose(0, 1)


@functools.cache
def absent() -> dict[str, str]:
    """Declared features this GPU lacks: fp8 off SM100 (FA4 asserts arch // 10 == 10 for fp8)."""
    if not torch.cuda.is_available():
        return {}  # FA4 does not run here at all (unavailable says why)
    major, minor = torch.cuda.get_device_capability()
    if major == FP8_ARCH:
        return {}
    return {"fp8": f"FA4 runs fp8 on SM100 only (compute capability {FP8_ARCH}.x), this GPU is {major}.{minor}"}


def _arch(spec: Spec) -> int:
    return torch.cuda.get_device_capability(spec.device)[0]


def head_dims(arch: int, D: int, Dv: int, backward: bool, gqa: bool) -> str | None:
    """FA4's head-dim limits on a compute-capability major (see the module docstring)."""
    if D % 8 or Dv % 8:
        return f"head dims (D={D}, Dv={Dv}) must be multiples of 8"
    if arch == 9:
        if not (8 <= D <= 256 and 8 <= Dv <= 256):
            return f"head dims (D={D}, Dv={Dv}): Hopper runs 8..256"
        if D != Dv and (D, Dv) not in HOPPER_DV_PAIRS:
            return (f"head dims (D={D}, Dv={Dv}) on Hopper: FA4's SM90 forward faults with an illegal memory "
                    "access at D=16 with Dv=64 and 128 (evidence/h200/verify_times-fa4-palette-2026-12-03.txt); "
                    "declared: D == Dv, (192, 128), (128, 64)")
        if backward and not ((D == Dv and D <= 128) or ((D, Dv) == (192, 128) and not gqa)):
            return (f"backward with (D={D}, Dv={Dv}){' and grouped heads' if gqa else ''}: Hopper's backward "
                    "runs D == Dv <= 128, or (192, 128) without grouped heads")
        return None
    forward_ok = (8 <= D <= 128 and 8 <= Dv <= 128) or (D, Dv) in ((192, 128), (256, 256)) or (
        Dv == 512 and D in (64, Dv))
    if not forward_ok:
        return f"head dims (D={D}, Dv={Dv}): Blackwell runs 8..128, (192, 128), (256, 256) or Dv=512 (MLA)"
    if backward and not ((D == Dv and D <= 128) or (D, Dv) in ((192, 128), (256, 256))):
        return f"backward with (D={D}, Dv={Dv}): Blackwell's backward runs D == Dv <= 128, (192, 128), (256, 256)"
    return None


def upstream_bug(spec: Spec, needs: frozenset[str] = frozenset()) -> str | None:
    """Inputs where FA4 4.0.0b36 answers wrongly (minimal counterexamples in NOTES.md, canaries in
    tests/test_flash_attn4.py): declined until upstream fixes them."""
    if spec.scale == 0:
        return "softmax_scale=0: FA4 returns NaN out and lse (the oracle gives the mean of v)"
    if _empty_batch_element(spec):
        return "a batch element with no kept key: FA4's varlen backward gives a wrong dq there"
    if spec.has_padding and "backward" in needs:
        # H200, scripts/checks/fa4_findings.py: dq ratio 5.3 at Spec(B=2, Sq=5, key_lengths=(5, 2))
        # float16 and 7.7 with key_drop 0.25; the property run hit illegal memory accesses in
        # this backward (_bwd_preprocess)
        return "key padding with gradients: FA4's varlen backward gives a wrong dq (and faults)"
    return None


def _empty_batch_element(spec: Spec) -> bool:
    """Whether padding leaves some batch element no key. key_drop is checked on the mask itself
    when a batch element has few keys; with 64 or more the chance that all drop is below
    key_drop**64 (1e-19 at 0.5), and replaying the mask of a large spec costs seconds."""
    lengths = spec.key_lengths or (spec.Sk,) * spec.B
    if min(lengths) == 0:
        return True
    if spec.key_drop == 0 or min(lengths) >= 64:
        return False
    return not bool(spec.padding_keep().any(1).all())


def _supports(spec: Spec, needs: frozenset[str] = frozenset()) -> str | None:
    if spec.has_padding and (spec.causal or spec.window is not None):
        return "key padding with causal/window: varlen renumbers key positions"
    if bug := upstream_bug(spec, needs):
        return bug
    if not torch.cuda.is_available():
        return "needs CUDA"
    arch = _arch(spec)
    if arch not in ARCHES:
        return f"compute capability {arch}.x: the adapter declares Hopper (9.x) and Blackwell (10.x, 11.x)"
    if spec.fp8 and spec.has_padding:
        return "fp8 with key padding: the adapter's varlen path takes no descales"
    return head_dims(arch, spec.D, spec.Dv, "backward" in needs, spec.Hkv != spec.Hq)


FEATURES = {"causal", "sliding_window", "gqa", "cross", "key_padding", "dv", "backward", "lse", "fp8"}

flash_attn4 = Impl(
    name="flash_attn4",
    variant="dense",
    fn=attention,
    features=FEATURES,
    devices=("cuda",),
    dtypes=("float16", "bfloat16"),
    available=unavailable,
    absent=absent,
    supports=_supports,
    memory="linear",
    compiles=True,  # CuTe DSL: a kernel per (dtype, head dims, group, mask kind, ...), seconds each
    description="FlashAttention-4 (flash_attn.cute, CuTe DSL) adapter: flash_attn_func / varlen for key padding",
)
# local attention always has a window, and padding with a window is declined: no key_padding
flash_attn4_local = dataclasses.replace(
    flash_attn4.for_variant("local", "FlashAttention-4 sliding-window (window_size) adapter"),
    features=frozenset(FEATURES - {"key_padding"}),
)
