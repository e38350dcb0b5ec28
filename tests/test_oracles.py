"""The dense oracle's own tests: small cases worked by hand, then invariants of the contract."""

from __future__ import annotations

import math

import pytest
import torch

from attnbench.oracles.dense import attention, reference, visible
from attnbench.spec import Block, Config, Spec

F64 = torch.float64


def t(rows) -> torch.Tensor:
    """A (1, 1, n, d) float64 tensor from nested lists."""
    return torch.tensor(rows, dtype=F64)[None, None]


def randn(*shape, seed=0, grad=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=F64, generator=g).requires_grad_(grad)


def qkv(B=1, Hq=1, Hkv=1, Sq=4, Sk=4, D=3, seed=0, grad=False):
    return (
        randn(B, Hq, Sq, D, seed=seed, grad=grad),
        randn(B, Hkv, Sk, D, seed=seed + 1, grad=grad),
        randn(B, Hkv, Sk, D, seed=seed + 2, grad=grad),
    )


# -- worked by hand --------------------------------------------------------------------
def test_one_query_two_keys_known_weights():
    # logits [1, 0] -> weights [e / (1 + e), 1 / (1 + e)]; identity values return the weights
    q, k, v = t([[1.0, 0.0]]), t([[1.0, 0.0], [0.0, 0.0]]), t([[1.0, 0.0], [0.0, 1.0]])
    out, lse = attention(q, k, v, Config(scale=1.0))
    e = math.e
    assert torch.allclose(out[0, 0, 0], torch.tensor([e / (1 + e), 1 / (1 + e)], dtype=F64), rtol=0, atol=1e-15)
    assert lse.item() == pytest.approx(math.log(1 + e), abs=1e-15)


def test_scale_multiplies_logits_and_zero_scale_is_uniform():
    q, k, v = t([[2.0]]), t([[1.0], [3.0]]), t([[10.0], [20.0]])
    out, lse = attention(q, k, v, Config(scale=0.5))  # logits [1, 3]
    w = torch.softmax(torch.tensor([1.0, 3.0], dtype=F64), 0)
    assert out.item() == pytest.approx(10 * w[0].item() + 20 * w[1].item(), abs=1e-13)
    assert lse.item() == pytest.approx(math.log(math.e + math.e**3), abs=1e-13)
    out0, lse0 = attention(q, k, v, Config(scale=0.0))  # 0 is a real scale, not "default"
    assert out0.item() == pytest.approx(15.0, abs=1e-13)
    assert lse0.item() == pytest.approx(math.log(2), abs=1e-15)


def test_causal_2x2_by_hand():
    q = torch.zeros(1, 1, 2, 1, dtype=F64)  # zero logits: uniform over what is visible
    k = torch.zeros(1, 1, 2, 1, dtype=F64)
    v = t([[1.0], [3.0]])
    out, lse = attention(q, k, v, Config(scale=1.0, causal=True))
    assert out.flatten().tolist() == pytest.approx([1.0, 2.0], abs=1e-15)
    assert lse.flatten().tolist() == pytest.approx([0.0, math.log(2)], abs=1e-15)


def test_window_zero_zero_sees_only_itself():
    q, k, v = qkv(Sq=5, Sk=5)
    out, lse = attention(q, k, v, Config(scale=0.7, window=(0, 0)))
    assert torch.allclose(out, v, atol=1e-15)
    assert torch.allclose(lse, 0.7 * (q * k).sum(-1), atol=1e-13)


def test_window_w_0_sees_w_plus_one_keys():
    vis = visible(1, 6, 6, window=(2, 0))[0]
    assert vis.sum(-1).tolist() == [1, 2, 3, 3, 3, 3]
    assert vis[4].tolist() == [False, False, True, True, True, False]


def test_bottom_right_single_query_sees_all_keys():
    q, k, v = qkv(Sq=1, Sk=5)
    causal, _ = attention(q, k, v, Config(scale=0.5, causal=True))
    full, _ = attention(q, k, v, Config(scale=0.5))
    assert torch.equal(causal, full)
    assert visible(1, 1, 5, causal=True).all()


def test_bottom_right_and_top_left_visibility_by_hand():
    br = visible(1, 2, 4, causal=True, align="bottom_right")[0].int().tolist()
    tl = visible(1, 2, 4, causal=True, align="top_left")[0].int().tolist()
    assert br == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert tl == [[1, 0, 0, 0], [1, 1, 0, 0]]


def test_top_left_single_query_sees_first_key_only():
    q, k, v = qkv(Sq=1, Sk=5)
    out, lse = attention(q, k, v, Config(scale=0.5, causal=True, align="top_left"))
    assert torch.allclose(out[0, 0, 0], v[0, 0, 0], atol=1e-15)
    assert lse.item() == pytest.approx(0.5 * (q[0, 0, 0] @ k[0, 0, 0]).item(), abs=1e-14)


def test_more_queries_than_keys_bottom_right_leaves_early_rows_empty():
    # Sq=4, Sk=2: p(i) = i - 2, so queries 0 and 1 see no key under causal
    vis = visible(1, 4, 2, causal=True)[0].int().tolist()
    assert vis == [[0, 0], [0, 0], [1, 0], [1, 1]]
    q, k, v = qkv(Sq=4, Sk=2)
    out, lse = attention(q, k, v, Config(scale=1.0, causal=True))
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 3, dtype=F64))
    assert torch.isinf(lse[0, 0, :2]).all() and (lse[0, 0, :2] < 0).all()


def test_blocked_window_bucket_edges_by_hand():
    # W=2: buckets {0,1} {2,3} {4,5}; causal-style block looks one bucket back, none forward
    back = visible(1, 6, 6, block=Block(2, 1, 0))[0].int().tolist()
    assert back == [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],
    ]
    both = visible(1, 5, 5, block=Block(2, 1, 1))[0].int().tolist()
    assert both == [
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1],
    ]
    # blocked + causal: the look-back bucket plus the causal part of the own bucket
    bc = visible(1, 4, 4, block=Block(2, 1, 0), causal=True)[0].int().tolist()
    assert bc == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_blocked_window_uniform_average_over_bucket_pair():
    q = torch.zeros(1, 1, 6, 1, dtype=F64)
    k = torch.zeros(1, 1, 6, 1, dtype=F64)
    v = t([[float(j)] for j in range(6)])
    out, _ = attention(q, k, v, Config(scale=1.0, block=Block(2, 1, 0)))
    assert out.flatten().tolist() == pytest.approx([0.5, 0.5, 1.5, 1.5, 3.5, 3.5], abs=1e-15)


def test_blocked_window_uses_absolute_query_position():
    # bottom-right: with Sq=2, Sk=6 the queries sit at positions 4 and 5 (bucket 2 for W=2)
    vis = visible(1, 2, 6, block=Block(2, 1, 0))[0].int().tolist()
    assert vis == [[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]


def test_key_padding_true_means_keep():
    q, k, v = qkv(Sq=1, Sk=3)
    keep = torch.tensor([[True, False, False]])
    out, _ = attention(q, k, v, Config(scale=1.0), key_padding_mask=keep)
    assert torch.allclose(out[0, 0, 0], v[0, 0, 0], atol=1e-15)


def test_empty_row_gives_zero_output_neg_inf_lse_zero_grads():
    q, k, v = qkv(B=2, Sq=3, Sk=4, grad=True)
    keep = torch.tensor([[False] * 4, [True, True, False, True]])
    out, lse = attention(q, k, v, Config(scale=1.0), key_padding_mask=keep)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(lse[0], torch.full_like(lse[0], -math.inf))
    (out * randn(*out.shape, seed=9)).sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
        assert torch.equal(g[0], torch.zeros_like(g[0]))
    assert torch.equal(k.grad[1, :, 2], torch.zeros_like(k.grad[1, :, 2]))  # a padded key
    assert torch.equal(v.grad[1, :, 2], torch.zeros_like(v.grad[1, :, 2]))
    assert q.grad[1].abs().sum() > 0


def test_neg_inf_bias_equals_masking_that_key():
    q, k, v = qkv(Sq=3, Sk=4)
    bias = torch.zeros(1, 1, 3, 4, dtype=F64)
    bias[..., 1] = -math.inf
    keep = torch.tensor([[True, False, True, True]])
    a, la = attention(q, k, v, Config(scale=1.0), bias=bias)
    b, lb = attention(q, k, v, Config(scale=1.0), key_padding_mask=keep)
    assert torch.allclose(a, b, atol=1e-15) and torch.allclose(la, lb, atol=1e-15)


def test_all_neg_inf_bias_row_is_empty_with_zero_grads():
    q, k, v = qkv(Sq=2, Sk=3, grad=True)
    bias = torch.zeros(1, 1, 2, 3, dtype=F64, requires_grad=False)
    bias[0, 0, 0] = -math.inf
    bias.requires_grad_(True)
    out, lse = attention(q, k, v, Config(scale=1.0), bias=bias)
    assert torch.equal(out[0, 0, 0], torch.zeros(3, dtype=F64)) and lse[0, 0, 0] == -math.inf
    out.sum().backward()
    assert torch.equal(q.grad[0, 0, 0], torch.zeros(3, dtype=F64))
    assert torch.equal(bias.grad[0, 0, 0], torch.zeros(3, dtype=F64))
    assert all(torch.isfinite(g).all() for g in (q.grad, k.grad, v.grad, bias.grad))


def test_bias_adds_to_logits():
    q, k, v = t([[0.0]]), t([[0.0], [0.0]]), t([[1.0], [0.0]])
    bias = torch.tensor([math.log(3.0), 0.0], dtype=F64).view(1, 1, 1, 2)
    out, _ = attention(q, k, v, Config(scale=1.0), bias=bias)  # weights 3/4, 1/4
    assert out.item() == pytest.approx(0.75, abs=1e-15)


def test_gqa_maps_query_head_h_to_kv_head_h_div_group():
    q, k, v = qkv(Hq=4, Hkv=2, Sq=3, Sk=5)
    out, lse = attention(q, k, v, Config(scale=0.6))
    explicit, else_ = attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), Config(scale=0.6))
    assert torch.equal(out, explicit) and torch.equal(lse, else_)
    tiled, _ = attention(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), Config(scale=0.6))
    assert not torch.allclose(out, tiled)  # the order matters, so the check above has teeth
    for h in range(4):
        one, _ = attention(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1], Config(scale=0.6))
        assert torch.equal(out[:, h : h + 1], one)


def test_gqa_bad_head_count_is_rejected():
    q, k, v = qkv(Hq=3, Hkv=2)
    with pytest.raises(ValueError, match="Hq=3"):
        attention(q, k, v, Config(scale=1.0))


def test_value_dim_may_differ():
    q, k, _ = qkv(Sq=2, Sk=3, D=4)
    v = randn(1, 1, 3, 7, seed=5)
    out, _ = attention(q, k, v, Config(scale=0.5))
    assert out.shape == (1, 1, 2, 7)


def test_lower_precision_inputs_are_computed_in_float64():
    q, k, v = qkv(Sq=3, Sk=3)
    out, lse = attention(q.float(), k.float(), v.float(), Config(scale=0.5))
    assert out.dtype == F64 and lse.dtype == F64
    ref, _ = attention(q.float().double(), k.float().double(), v.float().double(), Config(scale=0.5))
    assert torch.equal(out, ref)


# -- invariants ------------------------------------------------------------------------
CASES = [
    dict(),
    dict(causal=True),
    dict(window=(2, 1)),
    dict(window=(0, 3), causal=True),
    dict(block=Block(3, 1, 0)),
    dict(block=Block(2, 0, 2), align="top_left"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("Sq,Sk", [(5, 5), (3, 7), (6, 4)])
def test_probability_rows_sum_to_one_or_zero(case, Sq, Sk):
    q, k, _ = qkv(B=2, Hq=2, Hkv=1, Sq=Sq, Sk=Sk)
    keep = torch.tensor([[True] * Sk, [j % 3 != 1 for j in range(Sk)]])
    eye = torch.eye(Sk, dtype=F64).expand(2, 1, Sk, Sk)  # out = the probabilities themselves
    p, lse = attention(q, k, eye, Config(scale=0.9, **case), key_padding_mask=keep)
    vis = visible(2, Sq, Sk, key_padding_mask=keep, **case)[:, None]
    assert (p >= 0).all() and torch.equal(p[~vis.expand_as(p)], torch.zeros_like(p[~vis.expand_as(p)]))
    rows = p.sum(-1)
    nonempty = vis.any(-1).expand_as(rows)
    assert torch.allclose(rows[nonempty], torch.ones_like(rows[nonempty]), atol=1e-14)
    assert torch.equal(rows[~nonempty], torch.zeros_like(rows[~nonempty]))
    assert torch.isneginf(lse[~nonempty]).all() and torch.isfinite(lse[nonempty]).all()


@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
@pytest.mark.parametrize("Sq,Sk", [(4, 4), (2, 6), (6, 3)])
def test_window_none_zero_equals_causal(align, Sq, Sk):
    q, k, v = qkv(Sq=Sq, Sk=Sk)
    a = attention(q, k, v, Config(scale=1.0, causal=True, align=align))
    b = attention(q, k, v, Config(scale=1.0, window=(None, 0), align=align))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("Sq,Sk", [(5, 5), (3, 8), (8, 3)])
def test_window_wider_than_sequence_equals_full(Sq, Sk):
    q, k, v = qkv(Sq=Sq, Sk=Sk)
    wide = attention(q, k, v, Config(scale=1.0, window=(Sq + Sk, Sq + Sk)))
    full = attention(q, k, v, Config(scale=1.0))
    assert torch.equal(wide[0], full[0]) and torch.equal(wide[1], full[1])
    wide_causal = attention(q, k, v, Config(scale=1.0, causal=True, window=(Sq + Sk, 0)))
    causal = attention(q, k, v, Config(scale=1.0, causal=True))
    assert torch.equal(wide_causal[0], causal[0])


@pytest.mark.parametrize("W", [1, 2, 5])
def test_blocked_window_with_huge_look_equals_full(W):
    q, k, v = qkv(Sq=7, Sk=7)
    blocked = attention(q, k, v, Config(scale=1.0, block=Block(W, 100, 100)))
    full = attention(q, k, v, Config(scale=1.0))
    assert torch.equal(blocked[0], full[0])


def test_blocked_window_single_bucket_equals_full():
    q, k, v = qkv(Sq=5, Sk=5)
    blocked = attention(q, k, v, Config(scale=1.0, block=Block(8, 0, 0)))
    assert torch.equal(blocked[0], attention(q, k, v, Config(scale=1.0))[0])


def test_softmax_shift_invariance_of_a_per_row_bias():
    q, k, v = qkv(Sq=4, Sk=5)
    row = randn(1, 1, 4, 1, seed=7)
    a, la = attention(q, k, v, Config(scale=1.0))
    b, lb = attention(q, k, v, Config(scale=1.0), bias=row)
    assert torch.allclose(a, b, atol=1e-14) and torch.allclose(lb, la + row[..., 0], atol=1e-14)


def test_matches_plain_softmax_formula():
    q, k, v = qkv(B=2, Hq=2, Hkv=2, Sq=4, Sk=6)
    out, lse = attention(q, k, v, Config(scale=0.3))
    s = 0.3 * q @ k.transpose(-1, -2)
    assert torch.allclose(out, torch.softmax(s, -1) @ v, atol=1e-14)
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-14)


@pytest.mark.parametrize(
    "cfg",
    [
        Config(scale=0.7),
        Config(scale=0.7, causal=True),
        Config(scale=0.7, window=(1, 1)),
        Config(scale=0.7, block=Block(2, 1, 0)),
    ],
    ids=["full", "causal", "window", "block"],
)
def test_gradcheck_float64(cfg):
    q, k, v = qkv(Hq=2, Hkv=1, Sq=3, Sk=4, D=2, grad=True)
    bias = randn(1, 2, 3, 4, seed=4, grad=True)
    keep = torch.tensor([[True, True, False, True]])
    fn = lambda q, k, v, b: attention(q, k, v, cfg, key_padding_mask=keep, bias=b)
    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-8)


def test_gradcheck_with_an_empty_row():
    q, k, v = qkv(Sq=3, Sk=3, D=2, grad=True)
    cfg = Config(scale=1.0, causal=True, window=(0, 0))
    keep = torch.tensor([[False, True, True]])  # query 0 sees only key 0, which is masked
    fn = lambda q, k, v: attention(q, k, v, cfg, key_padding_mask=keep)[0]  # lse is -inf there
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8)


def test_masked_keys_holding_huge_values_leak_nothing():
    q, k, v = qkv(Sq=3, Sk=4, grad=False)
    keep = torch.tensor([[True, True, False, True]])
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 2] = 1e200
    v2[:, :, 2] = -1e300
    q_, k2, v2 = (x.detach().requires_grad_(True) for x in (q, k2, v2))
    out, lse = attention(q_, k2, v2, Config(scale=1.0), key_padding_mask=keep)
    ref, lref = attention(q, k, v, Config(scale=1.0), key_padding_mask=keep)
    assert torch.equal(out, ref) and torch.equal(lse, lref)
    out.sum().backward()
    assert all(torch.isfinite(g).all() for g in (q_.grad, k2.grad, v2.grad))


def test_nan_in_masked_keys_and_values_stays_out():
    # oracles/CONTRACT.md: invisible keys are excluded entirely, so NaN stored there changes nothing,
    # in the output or in any gradient.
    q, k, v = qkv(Sq=2, Sk=3, grad=False)
    keep = torch.tensor([[True, False, True]])
    out_ref, _ = attention(q, k, v, Config(scale=1.0), key_padding_mask=keep)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 1] = math.nan
    v2[:, :, 1] = math.nan
    q_, k2, v2 = (x.detach().requires_grad_(True) for x in (q, k2, v2))
    out, _ = attention(q_, k2, v2, Config(scale=1.0), key_padding_mask=keep)
    assert torch.equal(out, out_ref)
    out.sum().backward()
    assert all(torch.isfinite(g).all() for g in (q_.grad, k2.grad, v2.grad))


def test_nan_in_a_visible_key_or_value_poisons_only_the_rows_that_see_it():
    q, k, v = qkv(Sq=2, Sk=3, grad=False)
    for which in ("k", "v"):
        k2, v2 = k.clone(), v.clone()
        (k2 if which == "k" else v2)[:, :, 2] = math.nan
        out, _ = attention(q, k2, v2, Config(scale=1.0, causal=True))  # bottom-right: query 0 sees keys 0, 1
        assert torch.isfinite(out[:, :, 0]).all(), which
        assert torch.isnan(out[:, :, 1]).all(), which


def test_reference_runs_a_spec():
    spec = Spec(B=2, Hq=4, Hkv=2, Sq=5, Sk=7, D=4, causal=True, key_lengths=(7, 3), bias="per_head")
    inputs = spec.make_inputs()
    out, lse = reference(spec, inputs)
    direct, _ = attention(
        inputs.q, inputs.k, inputs.v, spec.config(), key_padding_mask=inputs.key_padding_mask, bias=inputs.bias
    )
    assert out.shape == (2, 4, 5, 4) and lse.shape == (2, 4, 5) and torch.equal(out, direct)
    assert torch.isfinite(out).all()


# -- score features (CONTRACT.md, "Score features") -------------------------------------------
def test_softcap_applies_to_the_scaled_score_before_the_bias():
    q, k, v = qkv(Sq=3, Sk=4)
    bias = randn(1, 1, 3, 4, seed=9)
    cap = 0.7
    out, lse = attention(q, k, v, Config(scale=0.5, softcap=cap), bias=bias)
    s = cap * torch.tanh(0.5 * (q @ k.transpose(-1, -2)) / cap) + bias
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-12)
    assert torch.allclose(out, torch.softmax(s, -1) @ v, atol=1e-12)


def test_softcap_keeps_masked_keys_out():
    q, k, v = qkv(Sq=3, Sk=3)
    cfg = Config(scale=1.0, causal=True, softcap=1.0)
    out, lse = attention(q, k, v, cfg)
    assert torch.allclose(out[..., 0, :], v[..., 0, :], atol=1e-12)  # row 0 sees key 0 only, never -cap logits
    assert torch.allclose(lse[..., 0], torch.tanh((q[..., 0, :] * k[..., 0, :]).sum(-1)), atol=1e-12)


def test_alibi_slopes_follow_flash_attn():
    """bias -slope[b, h] * |i + Sk - Sq - j| (bottom-right), |i - j| (top-left); per batch slopes."""
    q, k, v = qkv(B=2, Hq=2, Hkv=2, Sq=3, Sk=5)
    slopes = torch.tensor([[0.5, 0.25], [1.0, 2.0]], dtype=torch.float32)
    i, j = torch.arange(3.0).view(3, 1), torch.arange(5.0).view(1, 5)
    for align, dist in (("bottom_right", (i + 2 - j).abs()), ("top_left", (i - j).abs())):
        cfg = Config(scale=0.3, align=align)
        bias = -slopes.double()[:, :, None, None] * dist
        want = attention(q, k, v, cfg, bias=bias)
        got = attention(q, k, v, cfg, alibi_slopes=slopes)
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(got, want)), align
    per_head = attention(q, k, v, Config(scale=0.3), alibi_slopes=slopes[0])
    assert torch.allclose(per_head[0][0], attention(q, k, v, Config(scale=0.3), alibi_slopes=slopes)[0][0])


def test_sink_joins_the_denominator_only():
    q, k, v = qkv(Hq=2, Hkv=2, Sq=3, Sk=4)
    sinks = torch.tensor([0.3, -1.2], dtype=F64)
    out, lse = attention(q, k, v, Config(scale=0.5), sinks=sinks)
    s = 0.5 * (q @ k.transpose(-1, -2))
    e = torch.exp(s)
    denom = e.sum(-1, keepdim=True) + torch.exp(sinks).view(1, 2, 1, 1)
    assert torch.allclose(out, (e / denom) @ v, atol=1e-12)
    assert torch.allclose(lse, torch.log(denom).squeeze(-1), atol=1e-12)


def test_empty_row_with_a_sink_gives_zero_and_lse_sink():
    q, k, v = qkv(Sq=2, Sk=3)
    sinks = torch.tensor([1.5], dtype=F64)
    out, lse = attention(q, k, v, Config(scale=1.0), key_padding_mask=torch.zeros(1, 3, dtype=torch.bool), sinks=sinks)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, 1.5))


def test_sink_gradient_formula():
    """d sink_h = -sum over (b, i) of exp(sink_h - lse) * (dO . O)."""
    q, k, v = qkv(B=2, Hq=2, Hkv=1, Sq=3, Sk=4)
    sinks = torch.tensor([0.4, -0.8], dtype=F64, requires_grad=True)
    cfg = Config(scale=0.7, causal=True)
    out, lse = attention(q, k, v, cfg, sinks=sinks)
    do = randn(*out.shape, seed=5)
    out.backward(do)
    want = -(torch.exp(sinks.detach().view(1, 2, 1) - lse.detach()) * (do * out.detach()).sum(-1)).sum((0, 2))
    assert torch.allclose(sinks.grad, want, atol=1e-12)


def test_gradcheck_with_score_features():
    q, k, v = qkv(Hq=2, Hkv=1, Sq=3, Sk=4, grad=True)
    sinks = torch.tensor([0.2, -0.5], dtype=F64, requires_grad=True)
    slopes = torch.tensor([0.5, 0.125], dtype=torch.float32)
    cfg = Config(scale=0.6, causal=True, softcap=1.5)

    def f(q, k, v, sinks):
        return attention(q, k, v, cfg, alibi_slopes=slopes, sinks=sinks)[0]

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))
