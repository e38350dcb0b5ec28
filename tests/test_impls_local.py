"""Local attention implementations (bucketed, the local-attention adapter) against the float64 oracle.

Pinned specs cover window sizes 1, 2, S-1, S and > S, lengths that are not multiples of the
window, causal and not, blocked windows with look_backward / look_forward 0, 1, 2, key padding
with a zero-length batch element, grouped heads, cross attention (bucketed), forward and
gradients. A memory test counts the elements of every tensor the bucketed kernel creates and
checks that the largest grows like S * w, not S^2.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnbench.impls import bucketed as bucketed_mod
from attnbench.impls import naive
from attnbench.impls import third_party_local as tpl
from attnbench.oracles.dense import reference, visible
from attnbench.registry import registry
from attnbench.spec import Block, Spec

HAS_LOCAL_ATTENTION = importlib.util.find_spec("local_attention") is not None
needs_local_attention = pytest.mark.skipif(not HAS_LOCAL_ATTENTION, reason="local_attention not installed")

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
]
TOL = {"float64": 1e-9, "float32": 2e-5, "float16": 2e-2}


# -- pinned specs ----------------------------------------------------------------------
def _sliding_specs() -> list[Spec]:
    specs = []
    for S in (7, 8):
        for W in (1, 2, S - 1, S, S + 3):
            specs.append(Spec(Sq=S, D=8, causal=True, window=(W, 0)))
            specs.append(Spec(Sq=S, D=8, window=(W, W)))
            specs.append(Spec(Sq=S, D=8, window=(W, 1)))
    specs.append(Spec(Sq=5, D=8, window=(0, 0)))
    specs.append(Spec(Sq=9, D=8, window=(0, 3)))
    return specs


def _blocked_specs() -> list[Spec]:
    specs = []
    for S, w in ((7, 1), (7, 2), (7, 3), (8, 4), (5, 8)):
        for lb in (0, 1, 2):
            for lf in (0, 1, 2):
                specs.append(Spec(Sq=S, D=8, block=Block(w, lb, lf)))
            specs.append(Spec(Sq=S, D=8, causal=True, block=Block(w, lb, 0)))
    return specs


def _feature_specs() -> list[Spec]:
    return [
        Spec(B=2, Sq=9, D=8, window=(3, 3), key_lengths=(0, 6)),
        Spec(B=2, Sq=9, D=8, causal=True, window=(3, 0), key_lengths=(0, 9)),
        Spec(B=2, Sq=9, D=8, block=Block(3, 1, 1), key_lengths=(0, 5)),
        Spec(B=2, Sq=9, D=8, causal=True, block=Block(2, 2, 0), key_lengths=(9, 4), key_drop=0.3),
        Spec(Hq=4, Hkv=2, Sq=10, D=8, causal=True, window=(4, 0)),
        Spec(Hq=4, Hkv=1, Sq=10, D=8, block=Block(3, 1, 1)),
        Spec(Hq=6, Hkv=3, Sq=11, D=8, Dv=5, window=(2, 5), key_lengths=(7,)),
    ]


def _cross_specs() -> list[Spec]:
    return [
        Spec(Sq=3, Sk=10, D=8, causal=True, window=(4, 0)),
        Spec(Sq=1, Sk=13, D=8, causal=True, window=(5, 0)),  # one decoding step with a KV cache
        Spec(Sq=10, Sk=4, D=8, causal=True, window=(2, 0)),  # early queries see nothing
        Spec(Sq=10, Sk=4, D=8, window=(2, 2)),
        Spec(Sq=5, Sk=12, D=8, block=Block(3, 1, 0)),
        Spec(Sq=12, Sk=5, D=8, block=Block(4, 0, 1), align="top_left"),
        Spec(Sq=4, Sk=9, D=8, causal=True, window=(3, 1), align="top_left", key_lengths=(6,)),
        Spec(B=2, Hq=4, Hkv=2, Sq=6, Sk=11, D=8, Dv=4, block=Block(2, 2, 1), key_lengths=(0, 8)),
    ]


SELF_SPECS = _sliding_specs() + _blocked_specs() + _feature_specs()
ALL_SPECS = SELF_SPECS + _cross_specs()


# -- helpers ---------------------------------------------------------------------------
def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert not torch.isnan(got).any(), "NaN in the result"
    got, want = got.double().cpu(), want.double().cpu()
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= tol * max(1.0, want.abs().max().item() if want.numel() else 0.0), f"max error {err:.3g}"


def _check_forward(fn, spec: Spec, with_lse: bool) -> None:
    inp = spec.make_inputs()
    out, lse = fn(inp.q, inp.k, inp.v, spec.config(), key_padding_mask=inp.key_padding_mask)
    want_out, want_lse = reference(spec, inp)
    assert out.shape == want_out.shape and out.dtype == inp.q.dtype
    _close(out, want_out, TOL[spec.dtype])
    if with_lse:
        assert lse.shape == want_lse.shape
        empty = torch.isneginf(want_lse)
        assert torch.equal(torch.isneginf(lse).cpu(), empty.cpu()), "lse must be -inf exactly on empty rows"
        _close(lse[~empty], want_lse[~empty], TOL[spec.dtype])


def _check_gradients(fn, spec: Spec) -> None:
    inp = spec.make_inputs(requires_grad=True)
    out, _ = fn(inp.q, inp.k, inp.v, spec.config(), key_padding_mask=inp.key_padding_mask)
    got = torch.autograd.grad(out, (inp.q, inp.k, inp.v), inp.grad_out)
    want_out, _ = reference(spec, inp)
    want = torch.autograd.grad(want_out, (inp.q, inp.k, inp.v), inp.grad_out)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape, name
        _close(g, w, TOL[spec.dtype])


def _has_empty_row(spec: Spec) -> bool:
    kpm = spec.make_inputs().key_padding_mask
    vis = visible(spec.B, spec.Sq, spec.Sk, causal=spec.causal, window=spec.window, block=spec.block,
                  align=spec.align, key_padding_mask=kpm)
    return not bool(vis.any(-1).all())


def _padding_visible_in_local_attention(spec: Spec) -> bool:
    """Does local-attention's autopad add keys a query can see (non-causal, no mask, S % w != 0)?"""
    w = tpl._arguments(spec.config())["window_size"]
    return not spec.causal and not spec.has_padding and spec.Sq % w != 0


# -- bucketed ----------------------------------------------------------------------------
@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.short())
def test_bucketed_forward_and_lse(spec: Spec, dev: str) -> None:
    spec = spec.replace(dtype="float64", device=dev)
    assert bucketed_mod.bucketed.covers(spec), bucketed_mod.bucketed.why_not(spec)
    _check_forward(bucketed_mod.attention, spec, with_lse=True)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("spec", ALL_SPECS[::3] + _cross_specs(), ids=lambda s: s.short())
def test_bucketed_gradients(spec: Spec, dev: str) -> None:
    _check_gradients(bucketed_mod.attention, spec.replace(dtype="float64", device=dev))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("spec", _feature_specs() + _cross_specs()[:3], ids=lambda s: s.short())
def test_bucketed_low_precision(spec: Spec, dtype: str) -> None:
    _check_forward(bucketed_mod.attention, spec.replace(dtype=dtype), with_lse=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("spec", _feature_specs(), ids=lambda s: s.short())
def test_bucketed_bfloat16_cuda(spec: Spec) -> None:
    spec = spec.replace(dtype="bfloat16", device="cuda", D=64)
    inp = spec.make_inputs()
    out, _ = bucketed_mod.attention(inp.q, inp.k, inp.v, spec.config(), key_padding_mask=inp.key_padding_mask)
    want, _ = reference(spec, inp)
    _close(out, want, 3e-2)


def test_bucketed_empty_rows_are_zero_with_zero_gradients() -> None:
    spec = Spec(B=2, Sq=6, D=8, dtype="float64", causal=True, window=(1, 0), key_lengths=(0, 6))
    inp = spec.make_inputs(requires_grad=True)
    out, lse = bucketed_mod.attention(inp.q, inp.k, inp.v, spec.config(), key_padding_mask=inp.key_padding_mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
    gq, gk, gv = torch.autograd.grad(out, (inp.q, inp.k, inp.v), inp.grad_out)
    for g in (gq, gk, gv):
        assert torch.isfinite(g).all()
        assert torch.equal(g[0], torch.zeros_like(g[0]))


def test_bucketed_geometry_is_native_for_blocks_and_window_sized_for_slides() -> None:
    geometry = bucketed_mod.geometry
    cfg = Spec(Sq=64, block=Block(8, 2, 1)).config()
    assert geometry(cfg, 64, 64) == bucketed_mod.Geometry(8, 2, 1)
    cfg = Spec(Sq=64, causal=True, block=Block(8, 2, 1)).config()
    assert geometry(cfg, 64, 64) == bucketed_mod.Geometry(8, 2, 0)
    assert geometry(Spec(Sq=64, causal=True, window=(16, 0)).config(), 64, 64) == bucketed_mod.Geometry(16, 1, 0)
    assert geometry(Spec(Sq=64, window=(16, 4)).config(), 64, 64) == bucketed_mod.Geometry(16, 1, 1)
    # a window wider than the sequence is capped by it (no O(window^2) buffer)
    assert geometry(Spec(Sq=8, window=(1000, 1000)).config(), 8, 8) == bucketed_mod.Geometry(7, 1, 1)


def test_bucketed_rejects_what_it_cannot_do() -> None:
    impl = bucketed_mod.bucketed
    assert "needs a sliding or blocked window" in impl.why_not(Spec(Sq=8))
    assert "left edge is unbounded" in impl.why_not(Spec(Sq=8, window=(None, 2)))
    assert "right edge is unbounded" in impl.why_not(Spec(Sq=8, window=(2, None)))
    assert impl.why_not(Spec(Sq=8, causal=True, window=(2, None))) is None
    assert "bias" in impl.why_not(Spec(Sq=8, window=(2, 2), bias="full"))
    spec = Spec(Sq=8, window=(2, 2), bias="full")
    inp = spec.make_inputs()
    with pytest.raises(ValueError, match="bias"):
        bucketed_mod.attention(inp.q, inp.k, inp.v, spec.config(), bias=inp.bias)
    with pytest.raises(ValueError, match="cfg.window"):
        bucketed_mod.attention(inp.q, inp.k, inp.v, Spec(Sq=8).config())


def test_bucketed_is_registered_as_a_local_impl() -> None:
    impl = registry().get("local/bucketed")
    assert impl.fn is bucketed_mod.attention and impl.unavailable() is None


# -- memory: the largest tensor is O(S * w) ------------------------------------------------
class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest(fn, spec: Spec) -> int:
    inp = spec.make_inputs(requires_grad=True)
    with _LargestTensor() as mode:
        out, _ = fn(inp.q, inp.k, inp.v, spec.config(), key_padding_mask=inp.key_padding_mask)
        torch.autograd.grad(out, (inp.q, inp.k, inp.v), inp.grad_out)
    return mode.largest


@pytest.mark.parametrize("window", [dict(causal=True, window=(8, 0)), dict(block=Block(8, 1, 1))], ids=["slide", "block"])
def test_bucketed_memory_is_linear_in_sequence_length(window: dict) -> None:
    B, H, w = 1, 2, 8
    sizes = {}
    for S in (128, 256, 512):
        spec = Spec(B=B, Hq=H, Sq=S, D=4, key_lengths=(S - 3,), **window)
        sizes[S] = _largest(bucketed_mod.attention, spec)
        # scores: B * H * S * (nb + 1 + nf) * w, with nb + 1 + nf <= 3
        assert sizes[S] <= 3 * B * H * S * w, f"S={S}: largest tensor has {sizes[S]} elements"
    assert sizes[512] / sizes[128] <= 4.5  # linear: 4x; quadratic would be 16x
    # The same count catches a quadratic kernel: naive materializes S x S scores.
    dense = {S: _largest(naive.attention, Spec(B=B, Hq=H, Sq=S, D=4, **window)) for S in (128, 512)}
    assert dense[512] / dense[128] >= 15


# -- the local-attention adapter ---------------------------------------------------------
ADAPTER_SPECS = [s for s in SELF_SPECS if tpl.local_attention.covers(s)]


def test_adapter_covers_the_self_attention_specs_and_refuses_cross() -> None:
    assert len(ADAPTER_SPECS) == len(SELF_SPECS)
    impl = tpl.local_attention
    assert "cross" in impl.why_not(Spec(Sq=3, Sk=8, causal=True, window=(2, 0)))
    assert "lse" in impl.why_not(Spec(Sq=8, window=(2, 2)), needs={"lse"})
    assert "not both" in impl.why_not(Spec(Sq=8, window=(2, 2), block=Block(2, 1, 1)))
    assert "left edge" in impl.why_not(Spec(Sq=8, window=(None, 2)))


def test_adapter_maps_windows_onto_local_attention_arguments() -> None:
    args = tpl._arguments
    assert args(Spec(Sq=8, window=(6, 4)).config()) == dict(
        window_size=2, causal=False, look_backward=3, look_forward=2, exact_windowsize=True)
    assert args(Spec(Sq=8, causal=True, window=(5, 0)).config()) == dict(
        window_size=5, causal=True, look_backward=1, look_forward=0, exact_windowsize=True)
    assert args(Spec(Sq=8, causal=True, block=Block(4, 2, 1)).config()) == dict(
        window_size=4, causal=True, look_backward=2, look_forward=0, exact_windowsize=False)


@needs_local_attention
@pytest.mark.parametrize("spec", ADAPTER_SPECS, ids=lambda s: s.short())
def test_adapter_forward_and_gradients(spec: Spec) -> None:
    if _has_empty_row(spec):
        pytest.skip("empty rows: local-attention disagrees (test_local_attention_empty_row_is_not_zero)")
    if _padding_visible_in_local_attention(spec):
        # Its autopad keys would be visible (test_local_attention_autopad_keys_are_visible);
        # with an all-keep mask they are not, and everything else must then agree.
        spec = spec.replace(key_lengths=(spec.Sk,) * spec.B)
    spec = spec.replace(dtype="float64")
    _check_forward(tpl.attention, spec, with_lse=False)
    _check_gradients(tpl.attention, spec)


# The disagreements below are the smallest counterexamples written in NOTES.md ("Local
# attention"). They pin the library's behaviour: if a release fixes it, these fail and the
# notes need updating.
@needs_local_attention
@pytest.mark.parametrize("spec", [Spec(Sq=1, D=1, window=(2, 2)), Spec(Sq=1, D=1, block=Block(2, 0, 0))],
                         ids=lambda s: s.short())
def test_local_attention_autopad_keys_are_visible(spec: Spec) -> None:
    spec = spec.replace(dtype="float64")
    inp = spec.make_inputs()
    got, _ = tpl.attention(inp.q, inp.k, inp.v, spec.config())
    want, _ = reference(spec, inp)
    # autopad appends one zero key (logit 0, value 0) that query 0 can see:
    s = spec.softmax_scale * (inp.q * inp.k).sum()
    assert torch.allclose(got.flatten(), want.flatten() * torch.sigmoid(s))
    assert not torch.allclose(got, want)
    # ... and an all-True mask (which autopad pads with False) hides it.
    fixed, _ = tpl.attention(inp.q, inp.k, inp.v, spec.config(), key_padding_mask=torch.ones(1, 1, dtype=torch.bool))
    _close(fixed, want, 1e-12)


@needs_local_attention
def test_local_attention_empty_row_is_not_zero() -> None:
    spec = Spec(Sq=1, D=1, dtype="float64", window=(0, 0), key_lengths=(0,))
    inp = spec.make_inputs()
    got, _ = tpl.attention(inp.q, inp.k, inp.v, spec.config(), key_padding_mask=inp.key_padding_mask)
    want, _ = reference(spec, inp)
    assert torch.equal(want, torch.zeros_like(want))
    # every logit is filled with the same -finfo.max, so the softmax is uniform over masked keys
    assert torch.allclose(got, inp.v)


@needs_local_attention
def test_local_attention_rotary_when_given_dim() -> None:
    """LocalAttention(dim=...) (and LocalMHA, which always passes dim) rotates q and k: not plain attention."""
    from local_attention import LocalAttention

    spec = Spec(Sq=8, D=8, dtype="float64", causal=True, window=(4, 0))
    inp = spec.make_inputs()
    want, _ = reference(spec, inp)
    plain = LocalAttention(window_size=4, causal=True, look_backward=1, exact_windowsize=True, autopad=True)
    rotary = LocalAttention(window_size=4, causal=True, look_backward=1, exact_windowsize=True, autopad=True, dim=8)
    _close(plain(inp.q, inp.k, inp.v), want, 1e-12)
    assert not torch.allclose(rotary(inp.q, inp.k, inp.v), want)


def test_adapter_unavailable_reason_names_the_package(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "local_attention" else real(name, *a))
    assert tpl.local_attention.unavailable() == "local_attention not installed"


def test_the_work_model_counts_a_sliding_windows_visible_pairs() -> None:
    from attnbench.perf.work import visible_pairs

    def pairs(S: int, W: int) -> int:
        return visible_pairs(Spec(B=1, Hq=1, Sq=S, D=4, causal=True, window=(W, 0)))

    S, W = 10, 3
    assert pairs(S, W) == sum(min(i, W) + 1 for i in range(S))  # causal window (W, 0): itself and W before
    assert pairs(4, 100) == 10  # W >= S: plain causal
    assert math.isclose(pairs(8192, 512), 8192 * 513 - 512 * 513 / 2)


# -- the LocalMHA adapter against the module oracle ----------------------------------------
def _lucidrains(**kw):
    """The adapter's module plus the seed settings local_mha_reference reads off a module (the
    property suite reads them off the reference layout instead, through the weights map)."""
    module = tpl.local_mha(**kw)
    module.dim, module.dim_head, module.qk_scale = kw["dim"], kw.get("dim_head", 64), kw.get("qk_scale", 8)
    module.use_xpos, module.xpos_scale_base = kw.get("use_xpos", False), math.sqrt(kw["dim"])
    return module


def _module_case(seed: int, S: int, **kw):
    torch.manual_seed(seed)
    module = _lucidrains(dim=16, window_size=4, dim_head=8, heads=2, **kw).double().eval()
    x = torch.randn(2, S, 16, dtype=torch.float64)
    return module, x


@needs_local_attention
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "blocked"])
@pytest.mark.parametrize("extra", [{}, {"prenorm": True}, {"qk_rmsnorm": True}, {"use_xpos": True}], ids=str)
@pytest.mark.parametrize("S", [8, 11])
def test_local_mha_adapter_matches_the_module_oracle_when_causal(S: int, extra: dict, exact: bool) -> None:
    from attnbench.oracles.modules import local_mha_reference

    module, x = _module_case(0, S, causal=True, exact_windowsize=exact, **extra)
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[1, S - 3 :] = False  # causal: every query still sees itself or an earlier key
    mask[1, 0] = True
    for m in (None, mask):
        got = module(x, mask=m)
        want = local_mha_reference(module, x, mask=m)
        _close(got, want, 1e-6)  # the library computes its rotary tables in float32
    grads = torch.autograd.grad(module(x).sum(), list(module.parameters()))
    want = torch.autograd.grad(local_mha_reference(module, x).sum(), list(module.parameters()))
    for g, w in zip(grads, want):
        _close(g, w, 1e-6)


@needs_local_attention
def test_local_mha_adapter_non_causal_matches_without_xpos_and_padding() -> None:
    from attnbench.oracles.modules import local_mha_reference

    for exact in (True, False):
        module, x = _module_case(1, 12, exact_windowsize=exact)
        _close(module(x), local_mha_reference(module, x), 1e-9)


@needs_local_attention
def test_local_mha_non_causal_xpos_shifts_query_positions_by_window_size() -> None:
    """Smallest case: 2 tokens, window 1. The library's look-around frame puts the queries
    look_forward * window_size positions after their own keys, so the xpos/rotary relative
    position is off by window_size in non-causal LocalMHA."""
    from attnbench.oracles import modules as oracle

    torch.manual_seed(0)
    module = _lucidrains(dim=2, window_size=1, dim_head=2, heads=1, use_xpos=True).double()
    x = torch.randn(1, 2, 2, dtype=torch.float64)
    got = module(x)
    assert not torch.allclose(got, oracle.local_mha_reference(module, x), atol=1e-6)

    def shifted(q, k, base, shift=1):  # the oracle's rotary with queries at t + shift
        pad = lambda t: torch.cat([t.new_zeros(*t.shape[:-2], shift, t.shape[-1]), t], -2)
        q_rot, _ = real(pad(q), pad(k), base)
        return q_rot[..., shift:, :], real(q, k, base)[1]

    real = oracle._xpos_rotary
    try:
        oracle._xpos_rotary = shifted
        _close(got, oracle.local_mha_reference(module, x), 1e-6)
    finally:
        oracle._xpos_rotary = real


@needs_local_attention
def test_local_mha_padding_and_empty_rows_disagree() -> None:
    from attnbench.oracles.modules import local_mha_reference

    torch.manual_seed(0)
    module = _lucidrains(dim=1, window_size=2, dim_head=1, heads=1).double()
    x = torch.randn(1, 1, 1, dtype=torch.float64)
    assert not torch.allclose(module(x), local_mha_reference(module, x))  # autopad key visible
    keep_none = torch.zeros(1, 1, dtype=torch.bool)
    assert local_mha_reference(module, x, mask=keep_none).abs().max() == 0
    assert module(x, mask=keep_none).abs().max() > 0  # empty row not zero


@needs_local_attention
def test_local_mha_adapter_refuses_a_dense_bias() -> None:
    module, x = _module_case(0, 8, causal=True)
    with pytest.raises(ValueError, match="attn_bias"):
        module(x, attn_bias=torch.zeros(2, 2, 8, 8, dtype=torch.float64))
