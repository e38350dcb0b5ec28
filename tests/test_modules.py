"""The seed modules against their float64 module oracles: forward, gradients with respect to the
input and every parameter, the options that matter, KV-cache decoding, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from attnbench.impls._seed import multi_query, triton_interpreted
from attnbench.impls.naive import attention as naive
from attnbench.modules.common import LowPrecisionLayerNorm, LowPrecisionRMSNorm, RMSNorm, RotaryXPos
from attnbench.modules.flash_attention_two import FlashAttentionTwo
from attnbench.modules.local_mha import LocalMHA
from attnbench.modules.multi_query import MultiQueryAttention, build_alibi_bias
from attnbench.oracles.dense import visible
from attnbench.oracles.modules import (
    MODULE_ORACLES,
    flash_attention_two_reference,
    local_mha_reference,
    multi_query_decode_reference,
    multi_query_reference,
)
from attnbench.registry import registry
from attnbench.spec import Block, Spec

F64 = torch.float64
DIM = 16


# -- helpers ---------------------------------------------------------------------------
def randn(*shape, seed=0, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def build(cls, dtype=F64, seed=0, **kw):
    """A module with every parameter moved off its initial value (norm weights of 1, zero biases
    and unit scales would hide mix-ups), in `dtype`."""
    torch.manual_seed(seed)
    m = cls(**kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m.to(dtype).eval()


def keep(B: int, S: int, seed: int = 0) -> torch.Tensor:
    """A keep-mask: batch 0 keeps all, the others drop a few keys (and the last)."""
    m = torch.ones(B, S, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    for b in range(1, B):
        m[b] = torch.rand(S, generator=g) > 0.3
        m[b, -1] = False
        m[b, 0] = True
    return m


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """||a - b|| / max(||b||, floor)"""
    a, b = a.detach().to(F64), b.detach().to(F64)
    assert torch.isfinite(a).all(), "non-finite values"
    return (a - b).norm().item() / max(b.norm().item(), floor)


def check(module, oracle, x, *args, select=None, tol=1e-10, **kwargs):
    """module(x, ...) against oracle(module, x, ...): the output, and the gradients with respect
    to x and to every parameter, under one random output gradient. Errors are relative, with a
    floor of 1 on the reference's norm: some true gradients are 0 (a key bias shifts every logit
    of a row equally), and there only rounding remains."""
    pick = select or (lambda o: o)
    x = x.detach().requires_grad_(True)
    out = pick(module(x, *args, **kwargs))
    ref = pick(oracle(module, x, *args, **kwargs))
    assert out.dtype == x.dtype and ref.dtype == F64 and out.shape == ref.shape
    assert rel_err(out, ref, 1.0) <= tol, f"forward: {rel_err(out, ref, 1.0):.3g}"
    wrt = [x] + [p for p in module.parameters() if p.requires_grad]
    names = ["x"] + [n for n, p in module.named_parameters() if p.requires_grad]
    g = randn(*ref.shape, seed=77).to(ref.device)
    got = torch.autograd.grad(out, wrt, g.to(out.dtype), allow_unused=True)
    want = torch.autograd.grad(ref, wrt, g, allow_unused=True)
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None or not a.any(), name
            continue
        assert a is not None, f"no gradient for {name}"
        assert rel_err(a, b, 1.0) <= tol, f"grad {name}: {rel_err(a, b, 1.0):.3g}"
    return out, ref


# -- FlashAttentionTwo -----------------------------------------------------------------
def fa2(dtype=F64, **kw):
    kw = {"dim": DIM, "heads": 2, "dim_head": 8, "kernel": naive, **kw}
    return build(FlashAttentionTwo, dtype, **kw)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(5, None), (5, 7), (6, 3)], ids=["self", "cross", "cross-short"])
@pytest.mark.parametrize("masked", [False, True])
def test_flash_attention_two_matches_oracle(causal, Sq, Sk, masked):
    m = fa2(causal=causal)
    x = randn(2, Sq, DIM)
    context = None if Sk is None else randn(2, Sk, DIM, seed=1)
    mask = keep(2, Sk or Sq) if masked else None
    check(m, flash_attention_two_reference, x, context, mask)


def test_flash_attention_two_causal_cross_is_bottom_right():
    # 6 queries, 3 keys: queries 0..2 sit before every key, see nothing and output exactly 0
    m = fa2(causal=True)
    out = m(randn(1, 6, DIM), context=randn(1, 3, DIM, seed=1))
    assert torch.equal(out[0, :3], torch.zeros(3, DIM, dtype=F64))
    assert out[0, 3:].abs().sum() > 0


def test_flash_attention_two_float32_matches_oracle():
    m = fa2(torch.float32, causal=True)
    check(m, flash_attention_two_reference, randn(2, 7, DIM, dtype=torch.float32), None, keep(2, 7), tol=2e-5)


def bucket_spy(seen: list):
    def kernel(q, k, v, cfg, key_padding_mask=None, bias=None, q_bucket_size=None, k_bucket_size=None):
        seen.append((q_bucket_size, k_bucket_size, q.dtype))
        return naive(q, k, v, cfg, key_padding_mask=key_padding_mask, bias=bias)

    return kernel


def test_flash_attention_two_passes_bucket_sizes_to_kernels_that_take_them():
    seen = []
    m = fa2(kernel=bucket_spy(seen), q_bucket_size=4, k_bucket_size=8)
    x = randn(1, 5, DIM)
    m(x)
    m(x, q_bucket_size=2)
    m(x, q_bucket_size=3, k_bucket_size=1)
    assert [s[:2] for s in seen] == [(4, 8), (2, 8), (3, 1)]
    fa2(kernel=naive)(x, q_bucket_size=2)  # a kernel without bucket arguments is called without them


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_two_on_blockwise_buckets_do_not_matter(causal):
    from attnbench.impls import blockwise

    m = build(registry().get("FlashAttentionTwo/blockwise").fn, F64, dim=DIM, heads=2, dim_head=8, causal=causal)
    assert m.kernel is blockwise.attention
    x, context, mask = randn(2, 7, DIM), randn(2, 9, DIM, seed=1), keep(2, 9)
    outs = []
    for qb, kb in [(1, 1), (2, 3), (4, 16), (512, 1024)]:
        out, _ = check(m, flash_attention_two_reference, x, context, mask, q_bucket_size=qb, k_bucket_size=kb)
        outs.append(out)
    for out in outs[1:]:
        assert torch.allclose(out, outs[0], rtol=0, atol=1e-12)
    seen = []
    m.kernel = bucket_spy(seen)
    m(x, q_bucket_size=2, k_bucket_size=3)
    assert seen[0][:2] == (2, 3) and blockwise.attention is not None


def test_flash_attention_two_mixed_precision_runs_the_kernel_in_bf16():
    seen = []
    m = fa2(torch.float32, kernel=bucket_spy(seen), mixed_precision=True, causal=True)
    x = randn(2, 6, DIM, dtype=torch.float32)
    out = m(x)
    assert seen[0][2] == torch.bfloat16 and out.dtype == torch.float32
    ref = flash_attention_two_reference(m, x)
    assert 1e-6 < rel_err(out, ref) < 3e-2  # bf16-level, so the low-precision path really ran
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_flash_attention_two_parallel_splits_the_batch():
    seen = []
    m = fa2(kernel=bucket_spy(seen), parallel=True, causal=True)
    x, mask = randn(5, 4, DIM), keep(5, 4)
    whole = m(x, mask=mask)  # no CUDA devices (or one): a no-op, one kernel call
    assert len(seen) == (1 if torch.cuda.device_count() < 2 else min(5, torch.cuda.device_count()))
    m.parallel_devices = ["cpu", "cpu", "cpu"]
    seen.clear()
    check(m, flash_attention_two_reference, x, None, mask)
    assert len(seen) == 3
    seen.clear()
    split = m(x, mask=mask)
    assert len(seen) == 3 and torch.allclose(split, whole, rtol=0, atol=1e-13)
    seen.clear()
    m(x[:2], mask=mask[:2])  # batch 2 over 3 devices: the empty chunk is skipped
    assert len(seen) == 2


def test_flash_attention_two_accepts_a_0_1_float_mask():
    m = fa2()
    x, mask = randn(2, 5, DIM), keep(2, 5)
    assert torch.equal(m(x, mask=mask.float()), m(x, mask=mask))
    assert torch.equal(m(x, mask=torch.ones(2, 5)), m(x))  # the seed document's example


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m: m(randn(2, DIM)), ValueError, "x must have shape"),
        (lambda m: m(randn(2, 5, DIM + 1)), ValueError, "x must have shape"),
        (lambda m: m([[0.0]]), TypeError, "x must be a tensor"),
        (lambda m: m(randn(2, 5, DIM), context=randn(2, 5, 3)), ValueError, "context"),
        (lambda m: m(randn(2, 5, DIM), context=randn(3, 5, DIM)), ValueError, "context batch"),
        (lambda m: m(randn(2, 5, DIM), mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
        (lambda m: m(randn(2, 5, DIM), mask=torch.full((2, 5), 0.5)), ValueError, "mask"),
        (lambda m: m(randn(2, 5, DIM), mask=[[1] * 5] * 2), TypeError, "mask"),
        (lambda m: m(randn(2, 5, DIM), q_bucket_size=0), ValueError, "q_bucket_size"),
        (lambda m: m(randn(2, 5, DIM), k_bucket_size=2.5), ValueError, "k_bucket_size"),
    ],
)
def test_flash_attention_two_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(fa2())


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(dim=0), ValueError, "dim"),
        (dict(heads=0), ValueError, "heads"),
        (dict(dim_head=-1), ValueError, "dim_head"),
        (dict(q_bucket_size=0), ValueError, "q_bucket_size"),
        (dict(k_bucket_size=None), ValueError, "k_bucket_size"),
        (dict(kernel="naive"), TypeError, "kernel"),
        (dict(kernel=None), TypeError, "kernel"),
    ],
)
def test_flash_attention_two_bad_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        FlashAttentionTwo(**{"dim": DIM, "kernel": naive, **kw})


# -- MultiQueryAttention ---------------------------------------------------------------
def mqa(dtype=F64, **kw):
    kw = {"dim": DIM, "heads": 4, "attn_impl": "torch", "kernel": naive, **kw}
    return build(MultiQueryAttention, dtype, **kw)


def first(o):
    return o[0]


MQA_OPTIONS = [
    dict(),
    dict(qk_ln=True),
    dict(clip_qkv=0.3),
    dict(softmax_scale=0.0),
    dict(softmax_scale=0.9, qk_ln=True, norm_type="rmsnorm", clip_qkv=0.5),
]


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("options", MQA_OPTIONS, ids=str)
def test_multi_query_matches_oracle(kv_heads, causal, options):
    m = mqa(kv_heads=kv_heads, **options)
    x = randn(2, 6, DIM)
    bias = build_alibi_bias(4, 6, 6, dtype=F64) + 0.3 * randn(2, 1, 6, 6, seed=3)
    check(m, multi_query_reference, x, None, bias, keep(2, 6), causal, select=first)


@pytest.mark.parametrize("norm_type", ["low_precision_layernorm", "layernorm", "rmsnorm", "low_precision_rmsnorm"])
def test_multi_query_every_norm_type_matches_oracle(norm_type):
    m = mqa(kv_heads=2, qk_ln=True, norm_type=norm_type)
    kind = RMSNorm if "rms" in norm_type else torch.nn.LayerNorm
    assert isinstance(m.q_ln, kind) and isinstance(m.k_ln, kind)
    assert m.q_ln.weight.shape == (DIM,) and m.k_ln.weight.shape == (2 * 4,)  # k norm over kv_heads * head_dim
    check(m, multi_query_reference, randn(2, 5, DIM), select=first)


def test_multi_query_float32_matches_oracle():
    m = mqa(torch.float32, kv_heads=2, qk_ln=True, clip_qkv=0.8)
    x = randn(2, 7, DIM, dtype=torch.float32)
    check(m, multi_query_reference, x, None, build_alibi_bias(4, 7, 7), keep(2, 7), select=first, tol=2e-5)


def test_multi_query_bias_gradient_matches_oracle():
    m = mqa(kv_heads=2)
    x = randn(2, 5, DIM)
    bias = randn(2, 4, 5, 5, seed=5).requires_grad_(True)
    g = randn(2, 5, DIM, seed=6)
    got = torch.autograd.grad(m(x, bias=bias)[0], bias, g)[0]
    want = torch.autograd.grad(multi_query_reference(m, x, bias=bias)[0], bias, g)[0]
    assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_multi_query_needs_weights(kv_heads):
    m = mqa(kv_heads=kv_heads)
    x, mask = randn(3, 5, DIM), keep(3, 5)
    mask[2] = False  # every key of batch 2 masked: empty rows, weights 0
    out, w, _ = m(x, mask=mask, needs_weights=True)
    _, w_ref, _ = multi_query_reference(m, x, mask=mask, needs_weights=True)
    assert w.shape == (3, 4, 5, 5) and rel_err(w, w_ref) < 1e-12
    assert torch.allclose(w[:2].sum(-1), torch.ones(2, 4, 5, dtype=F64)) and not w[2].any()
    assert torch.triu(w[0, 0], diagonal=1).abs().max() == 0  # causal by default
    assert m(x, mask=mask)[1] is None


def test_multi_query_low_precision_norms_under_autocast():
    x = randn(3, DIM, dtype=torch.float32)
    for low_cls, plain_cls in ((LowPrecisionLayerNorm, torch.nn.LayerNorm), (LowPrecisionRMSNorm, RMSNorm)):
        low, plain = low_cls(DIM), plain_cls(DIM)
        assert torch.equal(low(x), plain(x))  # outside autocast: the plain norm
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = low(x)
        assert y.dtype == torch.bfloat16 and rel_err(y, plain(x)) < 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.LayerNorm(DIM)(x).dtype == torch.float32  # what the low-precision one avoids
    m = mqa(torch.float32, qk_ln=True, norm_type="low_precision_layernorm")
    xs = randn(2, 5, DIM, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(xs)[0]
    assert rel_err(out, multi_query_reference(m, xs)[0]) < 5e-2


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("prefix", [0, 1, 4])
def test_multi_query_kv_cache_decoding_equals_full_causal(kv_heads, prefix):
    S = 7
    m = mqa(kv_heads=kv_heads, qk_ln=True, clip_qkv=1.0)
    x, mask = randn(2, S, DIM), keep(2, S)
    bias = build_alibi_bias(4, S, S, dtype=F64)  # built once for the longest length, cropped per step
    ref, (rk, rv) = multi_query_decode_reference(m, x, bias=bias, mask=mask)
    full, _, (fk, fv) = m(x, bias=bias, mask=mask)
    assert rel_err(full, ref) < 1e-10
    outs, past = [], None
    if prefix:
        out, _, past = m(x[:, :prefix], bias=bias, mask=mask[:, :prefix])
        outs.append(out)
    for t in range(prefix, S):
        out, w, past = m(x[:, t : t + 1], past_key_value=past, bias=bias, mask=mask[:, : t + 1], needs_weights=True)
        assert w.shape == (2, 4, 1, t + 1)
        outs.append(out)
    decoded = torch.cat(outs, dim=1)
    assert rel_err(decoded, ref) < 1e-10
    assert past[0].shape == (2, kv_heads, S, DIM // 4)
    assert rel_err(past[0], rk) < 1e-12 and rel_err(past[1], rv) < 1e-12
    assert torch.allclose(decoded, full, rtol=0, atol=1e-12)


def test_multi_query_cache_from_oracle_past_matches():
    m = mqa(kv_heads=2)
    x = randn(1, 6, DIM)
    _, _, past = m(x[:, :4])
    out, _, _ = m(x[:, 4:], past_key_value=past)
    ref, _, _ = multi_query_reference(m, x[:, 4:], past_key_value=past)
    assert rel_err(out, ref) < 1e-10


def test_multi_query_alibi_bias():
    b = build_alibi_bias(4, 3, 5, dtype=F64)
    assert b.shape == (1, 4, 3, 5)
    assert torch.equal(b, Spec(Hq=4, Sq=3, Sk=5, bias="alibi", dtype="float64").make_inputs().bias)
    m = mqa(kv_heads=2)
    x = randn(2, 6, DIM)
    full = m(x, bias=build_alibi_bias(4, 6, 6, dtype=F64))[0]
    short = m(x, bias=build_alibi_bias(4, 6, 6, full=False, dtype=F64))[0]
    assert torch.allclose(full, short, rtol=0, atol=1e-12)  # same softmax under causal
    assert not torch.allclose(full, m(x)[0])
    with pytest.raises(ValueError, match="heads"):
        build_alibi_bias(0, 3, 3)


def test_multi_query_dropout_only_in_training():
    m = mqa(kv_heads=2, attn_pdrop=0.5)
    x = randn(2, 6, DIM)
    eval_out = check(m, multi_query_reference, x, select=first)[0]
    m.train()
    torch.manual_seed(0)
    a = m(x)[0]
    assert torch.isfinite(a).all() and not torch.allclose(a, eval_out)
    m.attn_pdrop = 0.0
    assert torch.equal(m(x)[0], eval_out)  # p = 0 in training is the no-dropout path


def test_multi_query_attn_impl_torch_resolves_through_the_registry():
    m = multi_query(DIM, 4, attn_impl="torch")
    assert m.kernel is registry().get("dense/naive").fn


@pytest.mark.skipif(
    registry().get("dense/flash_attn").unavailable() is None if "dense/flash_attn" in registry().impls else False,
    reason="flash-attn is installed",
)
def test_multi_query_flash_unavailable_names_the_install():
    with pytest.raises(ImportError, match="attn_impl='flash' needs flash-attn: pip install flash-attn"):
        multi_query(DIM, 4, attn_impl="flash")


def test_multi_query_triton_needs_triton_and_a_device(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available() and "dense/triton" in registry().impls:
        assert multi_query(DIM, 4, attn_impl="triton").kernel is registry().get("dense/triton").fn
        return
    with pytest.raises(ImportError, match=r"needs triton and a CUDA device \(or TRITON_INTERPRET=1\)"):
        multi_query(DIM, 4)  # 'triton' is the default


def triton_ready() -> bool:
    return "dense/triton" in registry().impls and registry().get("dense/triton").unavailable() is None


@pytest.mark.skipif(
    not (triton_ready() and triton_interpreted() and not torch.cuda.is_available()),
    reason="needs dense/triton and TRITON_INTERPRET=1 set before triton is imported (CPU only)",
)
def test_multi_query_attn_impl_triton_interpreted_matches_oracle():
    torch.manual_seed(0)
    m = build(multi_query, torch.float32, dim=DIM, heads=4, kv_heads=2, qk_ln=True)  # attn_impl='triton'
    assert m.kernel is registry().get("dense/triton").fn
    x = randn(2, 6, DIM, dtype=torch.float32)
    check(m, multi_query_reference, x, None, build_alibi_bias(4, 6, 6), keep(2, 6), select=first, tol=1e-4)


def test_multi_query_verbose_reports_the_kernel():
    with pytest.warns(UserWarning, match="attn_impl='torch'"):
        MultiQueryAttention(DIM, 4, attn_impl="torch", verbose=1, kernel=naive)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(heads=3), ValueError, "dim=16 is not divisible by heads=3"),
        (dict(kv_heads=3), ValueError, "kv_heads=3"),
        (dict(kv_heads=0), ValueError, "kv_heads"),
        (dict(fc_type="te"), ValueError, r"fc_type must be one of \['torch'\]"),
        (dict(norm_type="batchnorm"), ValueError, "norm_type must be one of"),
        (dict(attn_impl="jax"), ValueError, "attn_impl must be one of"),
        (dict(clip_qkv=-1.0), ValueError, "clip_qkv"),
        (dict(softmax_scale=math.nan), ValueError, "softmax_scale"),
        (dict(attn_pdrop=1.0), ValueError, "attn_pdrop"),
        (dict(kernel=3), TypeError, "kernel"),
        (dict(kernel=None), TypeError, "kernel"),
    ],
)
def test_multi_query_bad_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        MultiQueryAttention(**{"dim": DIM, "heads": 4, "attn_impl": "torch", "kernel": naive, **kw})


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m, x: m(x, past_key_value=(randn(2, 1, 3, 4),)), TypeError, "past_key_value"),
        (lambda m, x: m(x, past_key_value=(randn(2, 2, 3, 4), randn(2, 2, 3, 4))), ValueError, "past_key_value"),
        (lambda m, x: m(x, past_key_value=(randn(2, 1, 3, 4), randn(2, 1, 2, 4))), ValueError, "past_key_value"),
        (lambda m, x: m(x, past_key_value=(randn(2, 1, 3, 4), randn(2, 1, 3, 4)), mask=keep(2, 5)), ValueError,
         r"mask must have shape \(2, 8\)"),
        (lambda m, x: m(x, bias=randn(2, 3, 5, 5)), ValueError, "bias"),
        (lambda m, x: m(x[0]), ValueError, "x must have shape"),
    ],
)
def test_multi_query_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(mqa(), randn(2, 5, DIM))


# -- LocalMHA --------------------------------------------------------------------------
def local(dtype=F64, **kw):
    kw = {"dim": DIM, "window_size": 3, "dim_head": 8, "heads": 2, "kernel": naive, **kw}
    return build(LocalMHA, dtype, **kw)


LOCAL_OPTIONS = [
    dict(),
    dict(prenorm=True),
    dict(qk_rmsnorm=True),
    dict(use_xpos=True),
    dict(prenorm=True, qk_rmsnorm=True, qk_scale=5, use_xpos=True, xpos_scale_base=3.0),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("S", [7, 9])  # 7 is not a multiple of the window size 3
@pytest.mark.parametrize("options", LOCAL_OPTIONS, ids=str)
def test_local_mha_matches_oracle(causal, exact, S, options):
    m = local(causal=causal, exact_windowsize=exact, **options)
    check(m, local_mha_reference, randn(2, S, DIM), keep(2, S))


@pytest.mark.parametrize("causal", [False, True])
def test_local_mha_attn_bias_matches_oracle(causal):
    m = local(causal=causal, use_xpos=True)
    bias = randn(2, 2, 8, 8, seed=4)
    bias[1, 0, 3] = -math.inf  # an empty row in one head
    check(m, local_mha_reference, randn(2, 8, DIM), None, bias)


def test_local_mha_float32_matches_oracle():
    m = local(torch.float32, causal=True, prenorm=True, qk_rmsnorm=True, use_xpos=True)
    check(m, local_mha_reference, randn(2, 10, DIM, dtype=torch.float32), keep(2, 10), tol=2e-5)


def test_local_mha_qk_rmsnorm_zero_rows_stay_finite_in_float16():
    """Pinned: l2norm of a zero query/key (a zero input row, no projection bias) gave NaN in
    float16, where F.normalize's eps underflows. (Its gradient there is 1/eps = 1e12 even in
    float64, so only the forward is pinned.)"""
    x = randn(1, 6, DIM)
    x[0, 2] = 0.0
    want = local(causal=True, qk_rmsnorm=True)(x)
    got = local(torch.float16, causal=True, qk_rmsnorm=True)(x.half())
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max() < 2e-2


def dependence(m, x, mask=None) -> torch.Tensor:
    """(S, S) bool: does output position i depend on input position j (batch 0)?"""
    jac = torch.autograd.functional.jacobian(lambda x: m(x, mask=mask)[0], x)  # (S, dim, 1, S, dim)
    return jac.abs().sum(dim=(1, 2, 4)) > 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("exact", [True, False])
def test_local_mha_window_and_keep_mask_semantics(causal, exact):
    # Output i depends on input j exactly when key j is visible to query i (plus j = i, the
    # query itself). A mask entry False removes key j, so True means keep.
    S, W = 8, 2
    m = local(window_size=W, causal=causal, exact_windowsize=exact, use_xpos=True)
    x = randn(1, S, DIM)
    if exact:
        vis = visible(1, S, S, causal=causal, window=(W, 0 if causal else W))[0]
    else:
        vis = visible(1, S, S, causal=causal, block=Block(W, 1, 0 if causal else 1))[0]
    assert torch.equal(dependence(m, x), vis)
    mask = torch.ones(1, S, dtype=torch.bool)
    mask[0, 3] = False
    dep = dependence(m, x, mask)
    want = vis.clone()
    want[:, 3] = False
    want[3, 3] = True
    assert torch.equal(dep, want)


def test_local_mha_exact_window_sizes_by_hand():
    m = local(window_size=2, causal=True)
    dep = dependence(m, randn(1, 6, DIM))
    assert dep[5].tolist() == [False, False, False, True, True, True]  # itself and 2 before
    m = local(window_size=2, causal=False)
    dep = dependence(m, randn(1, 6, DIM))
    assert dep[2].tolist() == [True, True, True, True, True, False]


def test_local_mha_xpos_is_relative():
    # with the same q and k at every position, the logits depend only on i - j
    rot = RotaryXPos(8, scale_base=4.0)
    q = randn(1, 1, 1, 8).expand(1, 1, 6, 8)
    k = randn(1, 1, 1, 8, seed=1).expand(1, 1, 6, 8)
    qr, kr = rot(q, k)
    s = (qr @ kr.transpose(-1, -2))[0, 0]
    for d in range(-5, 6):
        diag = torch.diagonal(s, offset=d)
        assert torch.allclose(diag, diag[0].expand_as(diag), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(torch.diagonal(s, 1)[0], torch.diagonal(s, -1)[0])


def test_local_mha_xpos_defaults_and_errors():
    assert local(use_xpos=True).xpos_scale_base == pytest.approx(math.sqrt(DIM))
    with pytest.raises(ValueError, match="even dim_head"):
        LocalMHA(dim=DIM, window_size=2, dim_head=7, use_xpos=True, kernel=naive)
    with pytest.raises(ValueError, match="xpos_scale_base"):
        LocalMHA(dim=DIM, window_size=2, use_xpos=True, xpos_scale_base=0.0, kernel=naive)


def test_local_mha_window_config():
    assert local(causal=True).cfg.window == (3, 0) and local(causal=True).cfg.causal
    assert local().cfg.window == (3, 3) and not local().cfg.causal
    blocked = local(causal=True, exact_windowsize=False).cfg
    assert blocked.block.window_size == 3 and (blocked.block.look_backward, blocked.block.look_forward) == (1, 0)
    assert local(exact_windowsize=False).cfg.block.look_forward == 1
    assert local(qk_rmsnorm=True, qk_scale=5).cfg.scale == 5.0
    assert local().cfg.scale == pytest.approx(8**-0.5)


def test_local_mha_dropout_only_in_training():
    m = local(dropout=0.5, causal=True)
    x = randn(2, 6, DIM)
    eval_out = check(m, local_mha_reference, x)[0]
    m.train()
    torch.manual_seed(0)
    a = m(x)
    assert torch.isfinite(a).all() and not torch.allclose(a, eval_out)
    m.dropout = 0.0
    assert torch.equal(m(x), eval_out)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(window_size=0), "window_size"),
        (dict(heads=0), "heads"),
        (dict(dropout=1.0), "dropout"),
        (dict(qk_scale=math.inf), "qk_scale"),
    ],
)
def test_local_mha_bad_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        LocalMHA(**{"dim": DIM, "window_size": 2, "kernel": naive, **kw})


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m: m(randn(2, 5, DIM), mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "mask"),
        (lambda m: m(randn(2, 5, DIM), mask=torch.full((2, 5), 2)), ValueError, "mask"),
        (lambda m: m(randn(2, 5, DIM), attn_bias=randn(2, 2, 5, 4)), ValueError, "attn_bias"),
        (lambda m: m(randn(2, 5, 3)), ValueError, "x must have shape"),
    ],
)
def test_local_mha_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(local())


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("options", [{}, {"qk_rmsnorm": True}, {"use_xpos": True, "prenorm": True}], ids=str)
def test_local_mha_cache_decoding_equals_the_full_causal_pass(exact, options):
    """A prefix of 3, then one token at a time, through the cache: the full causal pass's
    outputs (sliding and blocked windows, qk-norm, xpos), with a keep-mask over all tokens."""
    m = build(LocalMHA, dim=DIM, window_size=2, dim_head=8, heads=2, causal=True, exact_windowsize=exact, kernel=naive,
              **options)
    x, mask = randn(2, 7, DIM, seed=1), keep(2, 7)
    full = m(x, mask=mask)
    out, cache = m(x[:, :3], mask=mask[:, :3], return_cache=True)
    outs = [out]
    for t in range(3, 7):
        out, cache = m(x[:, t : t + 1], mask=mask[:, : t + 1], cache=cache, return_cache=True)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)
    assert cache[0].shape == (2, 2, 7, 8)


def test_local_mha_cache_needs_causal_and_a_pair_of_tensors():
    with pytest.raises(ValueError, match="causal=True"):
        local()(randn(1, 1, DIM), cache=(randn(1, 2, 3, 8), randn(1, 2, 3, 8)))
    m = local(causal=True)
    with pytest.raises(TypeError, match="pair"):
        m(randn(1, 1, DIM), cache=randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="cache k"):
        m(randn(1, 1, DIM), cache=(randn(1, 3, 3, 8), randn(1, 3, 3, 8)))


# -- the module Impls and the oracle table ----------------------------------------------
@pytest.mark.parametrize(
    "variant,kw,oracle,select",
    [
        ("FlashAttentionTwo", dict(dim=DIM, heads=2, dim_head=8, causal=True), flash_attention_two_reference, None),
        ("MultiQueryAttention", dict(dim=DIM, heads=4, kv_heads=2), multi_query_reference, first),
        ("LocalMHA", dict(dim=DIM, window_size=2, dim_head=8, heads=2, use_xpos=True), local_mha_reference, None),
    ],
)
def test_naive_module_impls_build_the_modules_on_the_naive_kernel(variant, kw, oracle, select):
    impl = registry().get(f"{variant}/naive")
    assert impl.reference and impl.variant == variant
    torch.manual_seed(0)
    m = impl.fn(**kw).double()
    assert m.kernel is naive
    if variant == "MultiQueryAttention":
        assert m.attn_impl == "torch"
    assert MODULE_ORACLES[variant] is oracle
    check(m, MODULE_ORACLES[variant], randn(2, 5, DIM), select=select)


def test_module_oracle_table_covers_every_module_variant():
    from attnbench.registry import MODULE_VARIANTS

    assert set(MODULE_ORACLES) == set(MODULE_VARIANTS)
    for variant in ("MixtureOfAttention", "MixtureOfAutoregressiveAttention"):
        try:
            fn = MODULE_ORACLES[variant]
        except KeyError as exc:  # the routed oracles' file is written by another helper
            assert "attnbench.oracles.routed" in str(exc)
        else:
            assert callable(fn)
    with pytest.raises(KeyError):
        MODULE_ORACLES["dense"]


# -- the modules on every available CPU kernel -----------------------------------------
def kernels(variant: str, spec: Spec) -> list:
    impls = registry().select(variant)
    return [pytest.param(i, id=i.name) for i in impls if i.covers(spec, needs={"backward"})]


LOCAL_SPEC = Spec(B=2, Hq=2, Sq=7, D=8, causal=True, window=(3, 0), key_lengths=(7, 5), dtype="float32")
DENSE_SPEC = Spec(B=2, Hq=2, Sq=5, Sk=7, D=8, causal=True, key_lengths=(7, 5), dtype="float32")


@pytest.mark.parametrize("kernel_impl", kernels("local", LOCAL_SPEC))
def test_local_mha_on_every_local_kernel(kernel_impl):
    m = local(torch.float32, causal=True, use_xpos=True, kernel=kernel_impl.fn)
    check(m, local_mha_reference, randn(2, 7, DIM, dtype=torch.float32), keep(2, 7), tol=1e-4)


@pytest.mark.parametrize("kernel_impl", kernels("dense", DENSE_SPEC))
def test_flash_attention_two_on_every_dense_kernel(kernel_impl):
    m = fa2(torch.float32, causal=True, kernel=kernel_impl.fn)
    x, context = randn(2, 5, DIM, dtype=torch.float32), randn(2, 7, DIM, seed=1, dtype=torch.float32)
    check(m, flash_attention_two_reference, x, context, keep(2, 7), tol=1e-4)


def modules_vs_oracles(device: str, dtype: torch.dtype, tol: float) -> None:
    x = randn(2, 9, DIM).to(device, dtype)
    for m, oracle, select in (
        (fa2(dtype, causal=True), flash_attention_two_reference, None),
        (mqa(dtype, kv_heads=2, qk_ln=True), multi_query_reference, first),
        (local(dtype, causal=True, use_xpos=True, qk_rmsnorm=True), local_mha_reference, None),
    ):
        check(m.to(device), oracle, x, select=select, tol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_modules_in_low_precision_match_oracle(dtype, tol):
    modules_vs_oracles("cpu", dtype, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_modules_on_cuda(dtype, tol):
    modules_vs_oracles("cuda", dtype, tol)
    x = randn(2, 9, DIM).to("cuda", dtype)
    m = fa2(torch.float32, mixed_precision=True).cuda()
    out = m(x.float())
    assert out.dtype == torch.float32 and rel_err(out, flash_attention_two_reference(m, x.float())) < 3e-2
    if triton_ready():
        torch.manual_seed(0)
        m = build(multi_query, dtype, dim=DIM, heads=4, kv_heads=2, attn_impl="triton").cuda()
        assert m.kernel is registry().get("dense/triton").fn
        check(m, multi_query_reference, x, select=first, tol=tol)
