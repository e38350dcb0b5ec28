"""Dense-core implementations (sdpa per backend, blockwise, flex, flash_attn adapter) against
the float64 oracle, on a handful of pinned specs.

Errors are judged by the suite's one tolerance rule (attnbench.properties.tolerance): at most
K times the naive reference's own error plus a floor of a few eps. Pinned specs cover Sq != Sk
both ways (Sq > Sk has empty rows under bottom-right causal), grouped heads, windows, blocked
windows, key padding with a batch element that has no key, bias with -inf entries, scale 0,
Dv != D. Each impl runs only the specs its declaration covers; CUDA cases are marked gpu.
blockwise also gets bucket-size independence, torch.autograd.gradcheck (with and without
dropout) and a count of the largest tensor it creates (linear in S, never Sq x Sk). The
flash_attn adapter is exercised against a stand-in module written from flash-attn's documented
semantics (the real package cannot be installed here).
"""

from __future__ import annotations

import functools
import math
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnbench.impls import blockwise as blockwise_mod
from attnbench.impls import flash_attn as flash_attn_mod
from attnbench.impls import flex as flex_mod
from attnbench.impls import naive
from attnbench.impls import sdpa as sdpa_mod
from attnbench.oracles.dense import attention as oracle
from attnbench.properties.tolerance import compare
from attnbench.spec import Block, Config, Spec

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA")]

# (impl declaration, function to call): blockwise runs with small buckets so every spec spans
# several tiles in both directions.
SMALL_BUCKETS = functools.partial(blockwise_mod.attention, q_bucket_size=8, k_bucket_size=16)
IMPLS = {
    "sdpa_math": (sdpa_mod.sdpa_math, sdpa_mod.sdpa_math.fn),
    "sdpa_flash": (sdpa_mod.sdpa_flash, sdpa_mod.sdpa_flash.fn),
    "sdpa_efficient": (sdpa_mod.sdpa_efficient, sdpa_mod.sdpa_efficient.fn),
    "sdpa_cudnn": (sdpa_mod.sdpa_cudnn, sdpa_mod.sdpa_cudnn.fn),
    "blockwise": (blockwise_mod.blockwise, SMALL_BUCKETS),
    "flex": (flex_mod.flex, flex_mod.flex.fn),
    "flex_eager": (flex_mod.flex_eager, flex_mod.flex_eager.fn),
}

SPECS = {
    "cross_gqa_causal": Spec(B=2, Hq=4, Hkv=2, Sq=37, Sk=53, D=16, causal=True),
    "sq_gt_sk_causal_mqa": Spec(Hq=4, Hkv=1, Sq=53, Sk=37, D=16, causal=True),
    "window": Spec(Hq=2, Sq=40, D=16, window=(5, 3)),
    "padding_empty_batch": Spec(B=2, Sq=24, Sk=40, D=16, key_lengths=(0, 29), key_drop=0.2),
    "bias_neginf_causal": Spec(Hq=2, Sq=33, D=16, causal=True, bias="full", bias_neginf=0.5),
    "scale0_top_left": Spec(Sq=20, Sk=30, D=16, scale=0.0, causal=True, align="top_left"),
    "top_left_sq_gt_sk": Spec(Hq=2, Sq=30, Sk=12, D=16, causal=True, align="top_left"),
    "blocked_per_key_bias": Spec(Sq=30, Sk=45, D=16, block=Block(8, 1, 1), bias="per_key"),
    "alibi_dv": Spec(Hq=2, Sq=17, D=16, Dv=8, bias="alibi"),
    "gqa_window_short_q": Spec(Hq=4, Hkv=1, Sq=33, D=16, window=(0, None)),
}

# Compiled flex costs a compile (forward and backward) per shape and dtype, so on CUDA it runs
# every spec in bfloat16 but only two specs in the other dtypes.
FLEX_ALL_DTYPES = ("cross_gqa_causal", "bias_neginf_causal", "gqa_window_short_q")


# Upstream failures measured on the H100 (torch 2.11.0+cu130, cuDNN 9.19, 2026-11-22); see
# docs/DESIGN.md "Known broken". Not strict where the exact case was not itself run there.
HALF = ("float16", "bfloat16")
KNOWN_BROKEN: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    # empty: the flex adapter avoids the flex-decoding kernel that fails to lower grouped heads with a
    # mask (test_flex_decoding_with_gqa_and_a_mask_still_fails_upstream watches it upstream)
}


def _marks(impl: str, spec: str, dtype: str, dev: str) -> list:
    if dev != "cuda":
        return []
    dtypes, why = KNOWN_BROKEN.get((impl, spec), ((), ""))
    return gpu + ([pytest.mark.xfail(reason=why, strict=False)] if dtype in dtypes else [])


def _wanted(impl: str, spec: str, dtype: str, dev: str) -> bool:
    if not IMPLS[impl][0].device_ok(dev):
        return False
    return not (impl == "flex" and dtype != "bfloat16" and spec not in FLEX_ALL_DTYPES)


CASES = [
    pytest.param(impl, spec, dtype, dev, id=f"{impl}-{spec}-{dtype}-{dev}", marks=_marks(impl, spec, dtype, dev))
    for impl in IMPLS
    for spec in SPECS
    for dev, dtypes in (("cpu", ("float64", "float32")), ("cuda", ("float32", "float16", "bfloat16")))
    for dtype in dtypes
    if _wanted(impl, spec, dtype, dev)
]


# -- helpers ---------------------------------------------------------------------------
def run(fn, spec: Spec, grads: tuple[str, ...], inp=None) -> dict[str, torch.Tensor | None]:
    """out, lse and the requested gradients ("q", "k", "v", "bias") of one call."""
    inp = inp or spec.make_inputs(requires_grad=bool(grads))
    out, lse = fn(inp.q, inp.k, inp.v, spec.config(), inp.key_padding_mask, inp.bias)
    res = {"out": out, "lse": lse}
    if grads:
        got = torch.autograd.grad(out, [getattr(inp, n) for n in grads], inp.grad_out)
        res.update({"d" + n: g for n, g in zip(grads, got)})
    return res


def run_oracle(spec: Spec, inp, grads: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The float64 oracle on float64 leaf copies of the (rounded) inputs."""
    leaf = {n: getattr(inp, n).detach().double().requires_grad_() for n in ("q", "k", "v")}
    leaf["bias"] = None if inp.bias is None else inp.bias.detach().double().requires_grad_()
    out, lse = oracle(leaf["q"], leaf["k"], leaf["v"], spec.config(), inp.key_padding_mask, leaf["bias"])
    res = {"out": out, "lse": lse}
    if grads:
        got = torch.autograd.grad(out, [leaf[n] for n in grads], inp.grad_out.double())
        res.update({"d" + n: g for n, g in zip(grads, got)})
    return res


def wanted_grads(impl, spec: Spec) -> tuple[str, ...]:
    if "backward" not in impl.features:
        return ()
    return ("q", "k", "v") + (("bias",) if spec.bias and "bias_grad" in impl.features else ())


def check_against_oracle(impl, fn, spec: Spec) -> None:
    grads = wanted_grads(impl, spec)
    inp = spec.make_inputs(requires_grad=bool(grads))
    got = run(fn, spec, grads, inp)
    want = run_oracle(spec, inp, grads)
    ref = run(naive.attention, spec, grads, spec.make_inputs(requires_grad=bool(grads)))
    assert got["out"].shape == want["out"].shape and got["out"].dtype == inp.q.dtype
    names = ["out"] + ["d" + n for n in grads]
    if "lse" in impl.features:
        assert got["lse"] is not None, "declares lse but returned None"
        names.append("lse")
    for name in names:
        compare(name, got[name], want[name], ref[name], spec.dtype).require()


# -- every impl against the oracle ------------------------------------------------------
@pytest.mark.parametrize("impl_name, spec_name, dtype, dev", CASES)
def test_matches_oracle(impl_name: str, spec_name: str, dtype: str, dev: str) -> None:
    impl, fn = IMPLS[impl_name]
    spec = SPECS[spec_name].replace(dtype=dtype, device=dev)
    why = impl.unavailable() or impl.why_not(spec)
    if why:
        pytest.skip(why)
    check_against_oracle(impl, fn, spec)


def test_declarations_cover_the_pinned_specs_on_cpu() -> None:
    """Guard against a test that silently skips everything: the CPU impls run most specs."""
    for name in ("sdpa_math", "blockwise", "flex_eager"):
        impl = IMPLS[name][0]
        covered = [s for s in SPECS.values() if impl.covers(s.replace(dtype="float64"))]
        assert len(covered) == len(SPECS), (name, [s.short() for s in SPECS.values() if not impl.covers(s)])


# -- sdpa ------------------------------------------------------------------------------
# Canaries for upstream bugs the suite found on the H100 (torch 2.11, cuDNN 9.19): each runs the
# backend on the bug's counterexample and fails once torch fixes it. "declared": the adapter
# declares the case unsupported (drop the limit in impls/sdpa.py then); the others are not
# declared (the condition is not pinned down), so the properties report them as failures.
UPSTREAM = {
    "flash scale=0": ("flash", True, Spec(Sq=20, Sk=30, D=16, scale=0.0, causal=True, dtype="float16")),
    "cudnn scale=0": ("cudnn", True, Spec(Sq=20, Sk=30, D=16, scale=0.0, causal=True, dtype="float16")),
    "flash dropout at scale=0": ("flash", True, Spec(Hq=2, Sq=32, D=32, scale=0.0, dropout_p=0.5, dtype="float16")),
    "cudnn single key": ("cudnn", True, Spec(Sq=1, Sk=1, D=16, dtype="float16")),
    "cudnn one padded key": ("cudnn", True, Spec(Sq=2, Sk=64, D=64, scale=1.0, key_lengths=(1,), dtype="float16")),
    "cudnn one key in a window": ("cudnn", True, Spec(Sq=1, Sk=64, dtype="float16", window=(0, None), magnitude=3.0)),
    "cudnn one key in the last row": ("cudnn", True, Spec(Hq=2, Hkv=1, Sq=23, Sk=64, dtype="float16", window=(0, None),
                                                            magnitude=3.0)),
    "cudnn top-left causal, one query": ("cudnn", True, Spec(Sq=1, Sk=2, D=16, dtype="float16", causal=True,
                                                               align="top_left")),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=gpu) for c in UPSTREAM])
def test_upstream_bug_is_still_there(case: str) -> None:
    backend, declared, spec = UPSTREAM[case]
    spec = spec.replace(device="cuda")
    impl, fn = IMPLS[f"sdpa_{backend}"]
    assert (impl.why_not(spec) is not None) == declared, f"sdpa_{backend}: declaration of {spec.short()} changed"
    try:
        if spec.dropout_p:
            inp = spec.make_inputs()
            out, _ = fn(inp.q, inp.k, inp.v, spec.config())
            kept = (out != 0).float().mean().item()  # tells nothing unless dropout zeroes entries
            assert kept < 1.0, f"kept fraction {kept}: dropout not applied"
        else:
            check_against_oracle(impl, fn, spec)
    except (AssertionError, RuntimeError):
        return  # still broken upstream
    pytest.fail(f"torch fixed '{case}' ({torch.__version__}): update impls/sdpa.py and docs/DESIGN.md")


@pytest.mark.parametrize("spec", [
    pytest.param(Spec(Hq=4, Hkv=1, Sq=33, window=(0, None)), id="gqa-window-sq33", marks=gpu),
    pytest.param(Spec(Hq=4, Hkv=1, Sq=53, Sk=37, causal=True, dtype="bfloat16"), id="mqa-causal-sq53", marks=gpu),
])
def test_flex_decoding_with_gqa_and_a_mask_still_fails_upstream(spec: Spec) -> None:
    """torch 2.11 on the H100: compiled flex with grouped heads, a block mask and Sq < 128 picks
    the flex-decoding kernel, which fails to lower (NoValidChoicesError; found by the window-edge
    and empty-row properties). impls/flex.py forces the main kernel there
    (FORCE_USE_FLEX_ATTENTION); this canary fails once torch lowers the decoding kernel, and the
    adapter's workaround can go."""
    spec = spec.replace(device="cuda")
    inp = spec.make_inputs()
    block_mask = flex_mod._block_mask(spec.config(), spec.B, spec.Sq, spec.Sk, None, inp.q.device, True)
    try:
        flex_mod._compiled_flex()(inp.q, inp.k, inp.v, block_mask=block_mask, scale=spec.config().scale,
                                  enable_gqa=True)
    except Exception as exc:  # torch._inductor.exc.InductorError wrapping NoValidChoicesError
        assert "NoValidChoices" in f"{type(exc).__name__} {exc}", exc
        return
    pytest.fail(f"torch {torch.__version__} lowers flex decoding with GQA and a mask now: the DECODE_BELOW "
                "workaround in impls/flex.py can go (MoA's FLEX_MAIN_KERNEL is for another decoding bug); "
                "update docs/DESIGN.md")



@pytest.mark.parametrize("spec, phase", [
    pytest.param(Spec(Hq=4, Hkv=2, Sq=130, D=64, Dv=192), "forward", marks=gpu),
    pytest.param(Spec(Hq=4, Hkv=2, Sq=130, D=128, Dv=256), "backward", marks=gpu),
    pytest.param(Spec(Hq=2, Sq=130, D=160, bias="alibi"), "forward with a bias", marks=gpu),
    pytest.param(Spec(B=2, Sq=1, bias="full"), "backward, bias, Sq = Sk = 1", marks=gpu),
])
def test_flex_declared_shapes_still_fail_upstream(spec: Spec, phase: str) -> None:
    """Canaries for the 16-bit declarations in impls/flex.py (_flex_limits): each fails once torch
    runs its shape, and that declaration can go."""
    spec = spec.replace(dtype="float16", device="cuda")
    assert flex_mod._flex_limits(spec) is not None
    inp = spec.make_inputs(requires_grad=True)
    try:
        out, _ = flex_mod.attention(inp.q, inp.k, inp.v, spec.config(), inp.key_padding_mask, inp.bias)
        out.sum().backward()
        torch.cuda.synchronize()
    except Exception as exc:  # torch._inductor.exc.InductorError
        text = str(exc)
        assert "No valid triton configs" in text or "out of resource" in text or "CompilationError" in text, exc
        return
    pytest.fail(f"torch {torch.__version__} runs flex {phase} ({spec.short()}) now: narrow _flex_limits in "
                "impls/flex.py and update docs/DESIGN.md")


@pytest.mark.parametrize("dtype, big", [pytest.param("bfloat16", 1e4, marks=gpu), pytest.param("float16", 256.0, marks=gpu)])
@pytest.mark.parametrize("S", [2, 200])
def test_sdpa_cudnn_masked_keys_with_large_logits_do_not_leak(dtype: str, big: float, S: int) -> None:
    """cuDNN took the bool mask as a finite bias: a key outside a (0, 0) window holding 1e4
    (logits ~1e4-1e5) reached the row (out off by 1e4; window-edge and causality properties,
    H100, torch 2.11). The adapter passes cuDNN a -inf float mask instead."""
    spec = Spec(Hq=2, Sq=S, D=32, scale=1.0, window=(0, 0), dtype=dtype, device="cuda")
    inp = spec.make_inputs()
    fn = sdpa_mod.sdpa_cudnn.fn
    base, _ = fn(inp.q, inp.k, inp.v, spec.config())
    k, v = inp.k.clone(), inp.v.clone()
    k[:, :, 1:], v[:, :, 1:] = big, -big  # row 0 sees key 0 only
    moved, _ = fn(inp.q, k, v, spec.config())
    assert torch.equal(moved[:, :, 0], base[:, :, 0]), (moved[:, :, 0] - base[:, :, 0]).abs().max().item()


def test_sdpa_flash_rejects_masks_with_a_clear_error() -> None:
    spec = Spec(Sq=8, D=16, window=(2, 0))
    inp = spec.make_inputs()
    with pytest.raises(ValueError, match="takes no attention mask"):
        sdpa_mod.sdpa_flash.fn(inp.q, inp.k, inp.v, spec.config())
    with pytest.raises(ValueError, match="backend"):
        sdpa_mod.attention(inp.q, inp.k, inp.v, spec.config(), backend="fast")


def test_sdpa_empty_rows_are_zero_with_finite_zero_gradients() -> None:
    spec = Spec(B=2, Hq=2, Sq=12, Sk=7, D=16, dtype="float64", causal=True, key_lengths=(0, 7))
    inp = spec.make_inputs(requires_grad=True)
    res = run(sdpa_mod.sdpa_math.fn, spec, ("q", "k", "v"), inp)
    assert torch.equal(res["out"][0], torch.zeros_like(res["out"][0]))
    assert torch.equal(res["out"][1, :, :5], torch.zeros_like(res["out"][1, :, :5]))  # Sq - Sk rows
    for g in (res["dq"], res["dk"], res["dv"]):
        assert torch.isfinite(g).all()
        assert torch.equal(g[0], torch.zeros_like(g[0]))


# -- blockwise ---------------------------------------------------------------------------
@pytest.mark.parametrize("spec_name", ["cross_gqa_causal", "sq_gt_sk_causal_mqa", "bias_neginf_causal",
                                       "blocked_per_key_bias", "padding_empty_batch"])
def test_blockwise_does_not_depend_on_bucket_sizes(spec_name: str) -> None:
    spec = SPECS[spec_name].replace(dtype="float64")
    grads = ("q", "k", "v") + (("bias",) if spec.bias else ())
    runs = []
    for qbs, kbs in ((512, 1024), (7, 11), (3, 64), (64, 3), (13, 13)):
        fn = functools.partial(blockwise_mod.attention, q_bucket_size=qbs, k_bucket_size=kbs)
        runs.append(run(fn, spec, grads))
    for other in runs[1:]:
        for name, t in runs[0].items():
            assert torch.equal(torch.isneginf(t), torch.isneginf(other[name])), name
            a, b = torch.nan_to_num(t, neginf=0.0), torch.nan_to_num(other[name], neginf=0.0)
            assert torch.allclose(a, b, rtol=0, atol=1e-12), (name, (a - b).abs().max().item())


def test_blockwise_gradcheck() -> None:
    spec = Spec(B=2, Hq=2, Hkv=1, Sq=6, Sk=8, D=3, Dv=2, dtype="float64", causal=True, window=(4, 0),
                bias="full", bias_neginf=0.2, key_lengths=(8, 3))
    inp = spec.make_inputs(requires_grad=True)

    def f(q, k, v, bias):
        return blockwise_mod.attention(q, k, v, spec.config(), inp.key_padding_mask, bias, 4, 3)[0]

    assert torch.autograd.gradcheck(f, (inp.q, inp.k, inp.v, inp.bias))


def test_blockwise_gradcheck_with_dropout() -> None:
    """The backward pass rebuilds the forward's dropout mask exactly (counter-based hash)."""
    spec = Spec(Hq=2, Hkv=1, Sq=5, Sk=7, D=3, dtype="float64", causal=True, bias="per_head", dropout_p=0.3)
    inp = spec.make_inputs(requires_grad=True)

    def f(q, k, v, bias):
        return blockwise_mod.attention(q, k, v, spec.config(), None, bias, 3, 4)[0]

    assert torch.autograd.gradcheck(f, (inp.q, inp.k, inp.v, inp.bias))


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor(S: int) -> int:
    spec = Spec(Hq=2, Sq=S, D=16, causal=True, dtype="float32")
    inp = spec.make_inputs(requires_grad=True)
    with LargestTensor() as mode:
        out, _ = blockwise_mod.attention(inp.q, inp.k, inp.v, spec.config(), q_bucket_size=16, k_bucket_size=16)
        torch.autograd.grad(out, (inp.q, inp.k, inp.v), inp.grad_out)
    return mode.largest


def test_blockwise_memory_is_linear_in_sequence_length() -> None:
    small, big = largest_tensor(64), largest_tensor(128)
    assert big <= 2 * small, (small, big)  # linear: doubling S at most doubles the largest tensor
    assert big < 2 * 128 * 128 // 4, f"largest tensor {big} is not far below Hq*S*S"
    # naive materializes Hq x S x S for contrast: the counter does see such tensors
    spec = Spec(Hq=2, Sq=256, D=16)
    inp = spec.make_inputs()
    with LargestTensor() as mode:
        naive.attention(inp.q, inp.k, inp.v, spec.config())
    assert mode.largest >= 2 * 256 * 256


def test_blockwise_skips_key_buckets_outside_the_window() -> None:
    cfg = Config(scale=1.0, causal=True, window=(15, 0))
    tiles = blockwise_mod._Tiles(torch.zeros(1, 1, 256, 4), torch.zeros(1, 1, 256, 4), torch.zeros(1, 1, 256, 4),
                                 None, None, cfg, 32, 32)
    visited = sum(len(kb) for _, _, kb in tiles.buckets())
    assert visited == 8 + 7  # the diagonal bucket and, after the first, the one before it


@pytest.mark.parametrize("impl_name", ["blockwise", "sdpa_math"])
def test_dropout_keeps_the_right_fraction_and_is_seeded(impl_name: str) -> None:
    """scale 0 and v = identity make out[i, j] = keep[i, j] / ((1 - p) Sk): the kept mask."""
    p, S = 0.3, 64
    fn = IMPLS[impl_name][1]
    q = torch.randn(2, 2, S, 8)
    k = torch.randn(2, 2, S, 8)
    v = torch.eye(S).expand(2, 2, S, S).contiguous()
    cfg = Config(scale=0.0, dropout_p=p, dropout_seed=3)
    out, _ = fn(q, k, v, cfg)
    kept = out > 0
    assert torch.allclose(out[kept], torch.tensor(1 / ((1 - p) * S)), rtol=1e-5)
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    again, _ = fn(q, k, v, cfg)
    assert torch.equal(out, again), "same seed, same mask"
    other, _ = fn(q, k, v, Config(scale=0.0, dropout_p=p, dropout_seed=4))
    assert not torch.equal(out, other), "another seed, another mask"
    plain, _ = fn(q, k, v, Config(scale=0.0))
    zero, _ = fn(q, k, v, Config(scale=0.0, dropout_p=0.0, dropout_seed=9))
    assert torch.equal(plain, zero)


def test_blockwise_rejects_bad_input() -> None:
    spec = Spec(Hq=3, Hkv=1, Sq=8, D=8)
    inp = spec.make_inputs()
    cfg = spec.config()
    with pytest.raises(ValueError, match="q_bucket_size"):
        blockwise_mod.attention(inp.q, inp.k, inp.v, cfg, q_bucket_size=0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        blockwise_mod.attention(inp.q, inp.k, inp.v, cfg, key_padding_mask=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="bias"):
        blockwise_mod.attention(inp.q, inp.k, inp.v, cfg, bias=torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="Hkv"):
        blockwise_mod.attention(inp.q, inp.k[:, :1].expand(1, 2, 8, 8), inp.v[:, :1].expand(1, 2, 8, 8), cfg)


# -- flex ------------------------------------------------------------------------------
def test_flex_eager_declares_no_backward_because_torch_has_none_on_cpu() -> None:
    spec = Spec(Sq=8, D=16)
    inp = spec.make_inputs(requires_grad=True)
    assert "backward" not in flex_mod.flex_eager.features
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_mod.flex_eager.fn(inp.q, inp.k, inp.v, spec.config())


# -- flash_attn adapter, against a stand-in for the package -----------------------------
def _fake_core(q, k, v, scale, causal, window, alibi=None):
    """flash-attn's documented semantics in (B, S, H, D) layout, float64: bottom-right causal and
    window, grouped heads h -> h // G, empty rows give out 0 and lse +inf."""
    B, Sq, Hq, _ = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(Hq // Hkv, dim=2).double()
    vv = v.repeat_interleave(Hq // Hkv, dim=2).double()
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * scale
    i = torch.arange(Sq).view(-1, 1) + Sk - Sq
    j = torch.arange(Sk).view(1, -1)
    ok = torch.ones(Sq, Sk, dtype=torch.bool)
    left, right = window
    right = 0 if causal else right
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    s = s.masked_fill(~ok, float("-inf"))
    empty = ~ok.any(-1).view(1, 1, Sq, 1)
    p = torch.softmax(torch.where(empty, 0.0, s), -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.where(empty, 0.0, p), vv).to(q.dtype)
    lse = torch.where(empty.squeeze(-1), float("inf"), torch.logsumexp(torch.where(empty, 0.0, s), -1))
    return out, lse.float()


def _fake_flash_attn() -> types.ModuleType:
    fake = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        return_attn_probs=False, **_):
        assert q.stride(-1) == 1 and dropout_p == 0
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        out, lse = _fake_core(q, k, v, scale, causal, window_size)
        return (out, lse, None) if return_attn_probs else out

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1), return_attn_probs=False, **_):
        outs, lses = [], []
        for b in range(len(cu_q) - 1):
            qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            o, l = _fake_core(q[None, qs], k[None, ks], v[None, ks], softmax_scale, causal, window_size)
            outs.append(o[0])
            lses.append(l[0])
        out, lse = torch.cat(outs), torch.cat(lses, dim=1)  # lse: (H, total_q)
        return (out, lse, None) if return_attn_probs else out

    def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, softmax_scale=None, causal=False,
                                window_size=(-1, -1), return_softmax_lse=False, **_):
        outs, lses = [], []
        for b in range(q.shape[0]):
            n = int(cache_seqlens[b])
            o, l = _fake_core(q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n], softmax_scale, causal,
                              window_size)
            outs.append(o)
            lses.append(l)
        return torch.cat(outs), torch.cat(lses)

    fake.flash_attn_func = flash_attn_func
    fake.flash_attn_varlen_func = flash_attn_varlen_func
    fake.flash_attn_with_kvcache = flash_attn_with_kvcache
    return fake


FLASH_SPECS = [
    Spec(B=2, Hq=4, Hkv=2, Sq=9, Sk=14, D=8, causal=True),
    Spec(Hq=2, Hkv=1, Sq=14, Sk=9, D=8, causal=True),
    Spec(Sq=12, D=8, window=(3, 2)),
    Spec(Sq=6, Sk=12, D=8, causal=True, window=(4, None), scale=0.0),
    Spec(B=3, Hq=2, Sq=5, Sk=11, D=8, key_lengths=(11, 0, 4), key_drop=0.3),
]


@pytest.mark.parametrize("spec", FLASH_SPECS, ids=lambda s: s.short())
def test_flash_attn_adapter_maps_conventions(spec: Spec, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    impl = flash_attn_mod.flash_attn
    half = spec.replace(dtype="float16", device="cuda")
    assert impl.covers(half), impl.why_not(half)
    spec = spec.replace(dtype="float64")
    inp = spec.make_inputs(requires_grad=True)
    got = run(impl.fn, spec, ("q", "k", "v"), inp)
    want = run_oracle(spec, inp, ("q", "k", "v"))
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert got[name].shape == want[name].shape, name
        a, b = torch.nan_to_num(got[name].double(), neginf=-1e300), torch.nan_to_num(want[name], neginf=-1e300)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (name, (a - b).abs().max().item())


def test_flash_attn_decode_is_the_contract_per_cache_length(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    B, Hq, Hkv, S, D = 2, 4, 2, 16, 8
    q = torch.randn(B, Hq, 2, D, dtype=torch.float64)
    k_cache, v_cache = torch.randn(B, Hkv, S, D, dtype=torch.float64), torch.randn(B, Hkv, S, D, dtype=torch.float64)
    lens = torch.tensor([11, 16], dtype=torch.int32)
    out, lse = flash_attn_mod.decode(q, k_cache, v_cache, lens, scale=0.3, window=(4, 0))
    for b in range(B):
        n = int(lens[b])
        cfg = Config(scale=0.3, causal=True, window=(4, 0))
        want_out, want_lse = oracle(q[b : b + 1], k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n], cfg)
        assert torch.allclose(out[b : b + 1], want_out, atol=1e-10)
        assert torch.allclose(lse[b : b + 1].double(), want_lse, atol=1e-5)


def test_flash_attn_declines_what_it_cannot_do() -> None:
    impl = flash_attn_mod.flash_attn
    assert impl.why_not(Spec(Sq=8, dtype="float16", device="cuda", bias="full")) is not None
    assert impl.why_not(Spec(Sq=8, dtype="float16", device="cuda", causal=True, align="top_left")) is not None
    assert impl.why_not(Spec(Sq=8, dtype="float32", device="cuda")) is not None
    assert "varlen" in impl.why_not(Spec(Sq=8, dtype="float16", device="cuda", causal=True, key_lengths=(4,)))
    spec = Spec(Sq=8, causal=True, key_lengths=(4,))
    inp = spec.make_inputs()
    with pytest.raises(ValueError, match="key_padding_mask"):
        flash_attn_mod.attention(inp.q, inp.k, inp.v, spec.config(), inp.key_padding_mask)


def test_flex_declares_the_float32_head_dims_that_do_not_fit() -> None:
    """Found by the GPU property rows (H100, torch 2.11): float32 with padded head dims adding up
    past 256 has no flex kernel config that fits in shared memory. Declared, so the properties
    skip those draws instead of failing on them."""
    limit = flex_mod._flex_limits
    assert limit(Spec(D=160, dtype="float32")) is not None
    assert limit(Spec(D=96, Dv=192, dtype="float32")) is not None
    assert limit(Spec(D=128, dtype="float32")) is None
    assert limit(Spec(D=160, dtype="bfloat16")) is None and limit(Spec(D=256, dtype="float16")) is None
    assert "head dims >= 16" in limit(Spec(D=8, dtype="bfloat16"))


def test_flex_declares_the_16bit_wide_values_that_do_not_fit() -> None:
    """Found by the padding property on the H100 (torch 2.11; fp16, GQA, D=64, Dv=192), then
    mapped by a grid of head dims: Inductor sizes flex's tiles by D alone, so D=64 (forward) and
    64 < D <= 128 (backward) with V padded past 128 columns need more shared memory than the GPU has."""
    limit = flex_mod._flex_limits
    for D, Dv in ((64, 192), (64, 256), (128, 192), (128, 256), (96, 160)):
        for dtype in ("float16", "bfloat16"):
            assert "shared memory" in limit(Spec(D=D, Dv=Dv, dtype=dtype)), (D, Dv, dtype)
    for D, Dv in ((64, 128), (128, 128), (32, 256), (16, 256), (256, 256), (256, 64), (128, 32), (160, 160)):
        assert limit(Spec(D=D, Dv=Dv, dtype="float16")) is None, (D, Dv)
    # the two forward failures seen, to the byte Triton asked for
    assert flex_mod._forward_smem_16bit(64, 192, bias=False) == 262144
    assert flex_mod._forward_smem_16bit(160, 160, bias=True) == 245760
    assert "245760" in limit(Spec(Sq=4, D=160, dtype="float16", bias="alibi"))
    assert limit(Spec(Sq=4, D=128, dtype="float16", bias="alibi")) is None


def test_flex_declares_a_bias_with_one_query_and_one_key() -> None:
    """H100, torch 2.11: compiled flex's backward with a captured bias fails to compile at
    Sq = Sk = 1 (Inductor: "Cannot broadcast, rank mismatch"; padding property, B=2, full bias)."""
    limit = flex_mod._flex_limits
    assert "Sq = Sk = 1" in limit(Spec(B=2, Sq=1, bias="full"))
    assert limit(Spec(B=2, Sq=1)) is None and limit(Spec(B=2, Sq=2, bias="full")) is None


def test_sdpa_cudnn_declares_masks_that_leave_a_row_one_key() -> None:
    """The NaN-gradient cases seen on the H100 are refused (an attn_mask that leaves a row one key,
    padding included); causal windows without padding (row 0 sees one key) and rows that all see
    two or more keys are not."""
    why = sdpa_mod.sdpa_cudnn.supports
    assert "key padding leaves" in why(Spec(Sq=1, Sk=64, dtype="float16", device="cuda", causal=True, key_lengths=(1,)))
    assert "key padding leaves" in why(Spec(Sq=4, Sk=4, dtype="float16", device="cuda", causal=True, key_lengths=(4,)))
    assert why(Spec(Sq=4, Sk=6, dtype="float16", device="cuda", causal=True, key_lengths=(6,))) is None
    # random padding counts through the very mask make_inputs draws (seed 0: rows 0 and 3 see one key)
    drop = Spec(Sq=4, Sk=8, dtype="float16", device="cuda", window=(1, 0), key_drop=0.25)
    assert "one key" in why(drop) and why(drop.replace(seed=4)) is None
    assert "one key" in why(Spec(Sq=1, Sk=64, dtype="float16", device="cuda", window=(0, None)))
    assert "one key" in why(Spec(Sq=2, Sk=64, dtype="float16", device="cuda", key_lengths=(1,)))
    assert "one key" in why(Spec(Hq=2, Hkv=1, Sq=23, Sk=64, dtype="float16", device="cuda", window=(0, None)))
    assert why(Spec(Sq=8, dtype="float16", device="cuda", causal=True, window=(3, 0))) is None  # row 0: one key
    assert why(Spec(Sq=8, dtype="float16", device="cuda", window=(1, 1))) is None
    assert why(Spec(Sq=1, Sk=64, dtype="float16", device="cuda", window=(1, None))) is None
    assert why(Spec(Sq=4, Sk=64, dtype="float16", device="cuda", causal=True)) is None


def test_sdpa_cudnn_declares_top_left_causal_with_one_query() -> None:
    """Top-left causal with Sq=1 < Sk hands cuDNN the first key alone: "No available kernel" (H100,
    padding property, sixth session). With a mask the adapter passes every key, so it runs."""
    why = sdpa_mod.sdpa_cudnn.supports
    assert "single key" in why(Spec(Sq=1, Sk=2, dtype="float16", device="cuda", causal=True, align="top_left"))
    assert why(Spec(Sq=2, Sk=5, dtype="float16", device="cuda", causal=True, align="top_left")) is None
    assert why(Spec(Sq=1, Sk=5, dtype="float16", device="cuda", causal=True)) is None  # bottom-right: 5 keys


def test_flex_declares_slow_float32_compiles_with_window_or_padding() -> None:
    """H100, torch 2.11 (sixth session): float32 flex at D=96 compiled for 292 s with a window and
    over 330 s with key padding (110 s unmasked; 16 bits: 21 s), so the padding row never finished."""
    limit = flex_mod._flex_limits
    assert "ptxas takes minutes" in limit(Spec(Hq=3, Sq=108, D=96, window=(1, 27)))
    assert "ptxas takes minutes" in limit(Spec(Hq=3, Sq=108, D=96, key_lengths=(100,)))
    assert "ptxas takes minutes" in limit(Spec(Sq=8, D=64, Dv=96, block=Block(4, 1, 0)))
    assert limit(Spec(Hq=3, Sq=108, D=96)) is None and limit(Spec(Sq=8, D=96, causal=True)) is None
    assert limit(Spec(Sq=8, D=64, window=(1, 2))) is None
    assert limit(Spec(Hq=3, Sq=108, D=96, window=(1, 27), dtype="float16")) is None
