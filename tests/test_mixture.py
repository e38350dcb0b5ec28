"""MixtureOfAttention / MixtureOfAutoregressiveAttention against the float64 routed oracles."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnbench.impls._moa import DenseKernels, KernelUnavailable
from attnbench.impls.moa_loop import loop_experts
from attnbench.modules.mixture import (
    MixtureOfAttention,
    MixtureOfAutoregressiveAttention,
    Routing,
    rms_norm,
    soft_top_k,
)
from attnbench.oracles.routed import (
    autoregressive_mixture_reference,
    autoregressive_sets,
    mixture_reference,
    route_is_valid,
    route_problem,
)
from attnbench.registry import registry

F64 = torch.float64
SMALL = dict(dim=16, dim_head=8, heads=2)


def mixture(variant: str, strategy: str = "batched", **kw):
    """The module of the implementation named after its strategy (impls/moa_<strategy>.py)."""
    return registry().get(f"{variant}/{strategy}").fn(**kw)


def moa(seed: int = 0, dtype=F64, **kw) -> MixtureOfAttention:
    torch.manual_seed(seed)
    args = dict(SMALL, num_routed_queries=4, num_routed_key_values=5, num_experts=3)
    return mixture("MixtureOfAttention", **{**args, **kw}).to(dtype)


def moar(seed: int = 0, dtype=F64, **kw) -> MixtureOfAutoregressiveAttention:
    torch.manual_seed(seed)
    args = dict(SMALL, num_routed_queries=2, num_routed_key_values=3, local_attn_window_size=4, num_experts=2)
    return mixture("MixtureOfAutoregressiveAttention", **{**args, **kw}).to(dtype)


def data(B=2, N=11, dim=16, seed=1, dtype=F64, drop=0.25):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, dim, generator=g, dtype=F64).to(dtype)
    mask = torch.rand(B, N, generator=g) >= drop
    return x, mask


def out_and_grad(fn, x, seed=7):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(out)
    (out * g).sum().backward()
    return out.detach(), x.grad


def rel_error(a, b) -> float:
    """max |a - b| relative to max(1, max |b|); inf when a is not finite."""
    a, b = a.to(F64), b.to(F64)
    if not torch.isfinite(a).all():
        return math.inf
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def close(a, b, tol):
    assert torch.isfinite(a).all()
    err = rel_error(a, b)
    assert err <= tol, f"max error {err:.3g} (relative to max(1, max |b|)) > {tol}"


# -- routing ------------------------------------------------------------------------------------


def test_route_is_valid_accepts_top_k_and_rejects_others():
    s = torch.tensor([0.5, 2.0, -1.0, 1.0, 3.0])
    keep = torch.tensor([True, True, True, True, False])
    assert route_is_valid(s, torch.tensor([1, 3]), 2, keep)
    assert not route_is_valid(s, torch.tensor([1, 4]), 2, keep)  # masked token
    assert not route_is_valid(s, torch.tensor([1, 0]), 2, keep)  # 3 outranks 0
    assert not route_is_valid(s, torch.tensor([1]), 2, keep)  # too few
    assert not route_is_valid(s, torch.tensor([1, 1]), 2, keep)  # duplicate
    assert route_is_valid(s, torch.tensor([0, 1, 2, 3]), 9, keep)  # k > unmasked: all unmasked
    tie = torch.tensor([1.0, 1.0 + 1e-9, 0.0], dtype=F64)
    assert route_is_valid(tie, torch.tensor([0]), 1, atol=1e-6) and route_is_valid(tie, torch.tensor([1]), 1)
    assert not route_is_valid(tie, torch.tensor([0]), 1, atol=0.0)
    assert "left out" in route_problem(s, torch.tensor([1, 0]), 2, keep)


@pytest.mark.parametrize("router", ["straight_through", "coor_descent"])
@pytest.mark.parametrize("cross", [False, True])
def test_route_selects_valid_top_k(router, cross):
    m = moa(router=router, dtype=torch.float32)
    x, mask = data(N=12, dtype=torch.float32)
    ctx, cmask = data(N=9, seed=3, dtype=torch.float32) if cross else (None, None)
    r = m.route(x, ctx, mask, cmask)
    kv_mask = cmask if cross else mask
    for b in range(2):
        for g in range(3):
            q_sel = r.q_index[b, g][r.q_valid[b, g]]
            kv_sel = r.kv_index[b, g][r.kv_valid[b, g]]
            assert route_problem(r.q_scores[b, g], q_sel, 4, mask[b], atol=1e-5) is None
            assert route_problem(r.kv_scores[b, g], kv_sel, 5, kv_mask[b], atol=1e-5) is None
            assert (r.q_weight[b, g][~r.q_valid[b, g]] == 0).all()
            assert ((r.q_weight[b, g] >= 0) & (r.q_weight[b, g] <= 1)).all()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 14), k=st.integers(1, 8), drop=st.floats(0, 0.9), seed=st.integers(0, 10**6))
def test_route_validity_property(n, k, drop, seed):
    m = moa(num_routed_queries=k, num_routed_key_values=k, dtype=torch.float32)
    x, mask = data(B=1, N=n, seed=seed, dtype=torch.float32, drop=drop)
    r = m.route(x, mask=mask)
    for g in range(3):
        sel = r.q_index[0, g][r.q_valid[0, g]]
        assert route_is_valid(r.q_scores[0, g], sel, k, mask[0], atol=1e-5)


def test_short_sequence_routes_every_token_with_weight_one():
    m = moa(num_routed_queries=8, num_routed_key_values=8)
    x, mask = data(N=6)
    r = m.route(x, mask=mask)
    assert torch.equal(r.q_index[0, 0], torch.arange(6))
    assert torch.equal(r.q_valid, mask[:, None].expand(2, 3, 6))
    assert torch.equal(r.q_weight, mask[:, None].expand(2, 3, 6).to(F64))
    assert torch.equal(r.kv_weight, r.q_weight)


def test_soft_top_k_sums_to_k_and_keeps_order():
    s = torch.randn(3, 40, generator=torch.Generator().manual_seed(0), dtype=F64)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[2, 30:] = False
    w = soft_top_k(s, 6, mask)
    # 20 eps-scaled iterations approach sum(w) = k from below (CoLT5's schedule; not fully converged)
    assert ((w.sum(-1) > 4.0) & (w.sum(-1) <= 6.0 + 1e-6)).all()
    assert torch.allclose(soft_top_k(s, 6, mask, n_iters=300).sum(-1), torch.full((3,), 6.0, dtype=F64), atol=0.2)
    assert (w[2, 30:] == 0).all() and ((w >= 0) & (w <= 1)).all()
    order = s[0].argsort()
    assert (w[0][order].diff() >= -1e-12).all()  # monotone in the score


# -- routed attention vs the oracle --------------------------------------------------------------

CONFIGS = [
    dict(),
    dict(router="coor_descent"),
    dict(local_attn=True, local_attn_window_size=3),
    dict(local_attn=True, local_attn_window_size=3, average_routed=True),
    dict(average_routed=True, router="coor_descent"),
    dict(prenorm=False),
]


@pytest.mark.parametrize("strategy", ["loop", "batched"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_forward_and_grad_match_oracle(strategy, cfg):
    m = moa(strategy=strategy, **cfg)
    x, mask = data(N=12)
    out, gx = out_and_grad(lambda t: m(t, mask=mask), x)
    ref, gref = out_and_grad(lambda t: mixture_reference(m, t, mask=mask), x)
    close(out, ref, 1e-10)
    close(gx, gref, 1e-10)


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_cross_attention_matches_oracle(strategy):
    m = moa(strategy=strategy, dim_context=12)
    x, mask = data(N=10)
    ctx, cmask = data(N=13, dim=12, seed=5)
    out, gx = out_and_grad(lambda t: m(t, ctx, mask, cmask), x)
    ref, gref = out_and_grad(lambda t: mixture_reference(m, t, ctx, mask, cmask), x)
    close(out, ref, 1e-10)
    close(gx, gref, 1e-10)


def test_float32_route_then_attend_matches_oracle_given_routing():
    m = moa(dtype=torch.float32, local_attn=True, local_attn_window_size=4)
    x, mask = data(N=12, dtype=torch.float32)
    r = m.route(x, mask=mask)
    out = m.attend(x, None, r, mask)
    close(out, mixture_reference(m, x, mask=mask, routing=r), 2e-5)


def test_low_precision_forward_close_to_oracle():
    m = moa(dtype=torch.bfloat16)
    x, mask = data(N=12, dtype=torch.bfloat16)
    r = m.route(x, mask=mask)
    out = m(x, mask=mask)
    close(out, mixture_reference(m, x, mask=mask, routing=r), 5e-2)


def test_oracle_rejects_foreign_modules():
    with pytest.raises(TypeError, match="MixtureOfAttention"):
        mixture_reference(torch.nn.Linear(2, 2), torch.randn(1, 3, 2))


# -- every registered implementation -------------------------------------------------------------


def _available(variant):
    impls = registry().select(variant=variant)  # those in the seed layout (a weights map), on the CPU
    return [i for i in impls if i.device_ok("cpu") and i.weights is not None]


@pytest.mark.parametrize("variant", ["MixtureOfAttention", "MixtureOfAutoregressiveAttention"])
def test_every_cpu_impl_matches_oracle_and_each_other(variant):
    impls = _available(variant)
    names = {i.name for i in impls}
    assert {"naive", "loop", "batched"} <= names
    ar = variant.startswith("MixtureOfAuto")
    kw = dict(SMALL, num_routed_queries=2 if ar else 4, num_routed_key_values=3 if ar else 5, num_experts=2)
    if ar:
        kw["local_attn_window_size"] = 4
    x, mask = data(N=13)
    ref_fn = autoregressive_mixture_reference if ar else mixture_reference
    outs = {}
    for impl in impls:
        torch.manual_seed(0)
        m = impl.fn(**kw).double()
        out, gx = out_and_grad(lambda t, m=m: m(t, mask=mask), x)
        ref, gref = out_and_grad(lambda t, m=m: ref_fn(m, t, mask=mask), x)
        close(out, ref, 1e-10)
        close(gx, gref, 1e-10)
        outs[impl.name] = out
    for out in outs.values():
        close(out, outs["naive"], 1e-10)


def test_impl_factory_refuses_conflicting_strategy():
    impl = registry().get("MixtureOfAttention/loop")
    with pytest.raises(ValueError, match="strategy"):
        impl.fn(**SMALL, num_routed_queries=2, num_routed_key_values=2, strategy="batched")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ar", [False, True])
def test_flex_strategy_forward_on_cpu(ar):
    m = moar(strategy="flex") if ar else moa(strategy="flex")
    m = m.float()
    x, mask = data(N=12, dtype=torch.float32)
    with torch.no_grad():
        r = m.route(x, mask=mask)
        out = m.attend(x, r, mask) if ar else m.attend(x, None, r, mask)
    ref = autoregressive_mixture_reference(m, x, mask, routing=r) if ar else mixture_reference(m, x, mask=mask,
                                                                                                routing=r)
    close(out, ref, 2e-5)
    assert m.last_kernel == "flex_attention" or ar  # the AR local branch runs through the dense kernel


@pytest.mark.parametrize("kernel", ["sdpa_math", "blockwise"])
def test_kernel_through_registry(kernel):
    if f"dense/{kernel}" not in registry().impls:
        pytest.skip(f"dense/{kernel} not registered")
    m = moa(kernel=kernel, local_attn=True, local_attn_window_size=3)
    x, mask = data(N=12)
    close(m(x, mask=mask), mixture_reference(m, x, mask=mask), 1e-9)
    assert m.last_kernel == f"dense/{kernel}"


# -- contract details ----------------------------------------------------------------------------


@pytest.mark.parametrize("local", [False, True])
def test_masked_tokens_output_zero(local):
    m = moa(local_attn=local, local_attn_window_size=3)
    x, mask = data(N=12, drop=0.5)
    out = m(x, mask=mask)
    assert (out[~mask] == 0).all() and (out[mask] != 0).any()


def test_unrouted_tokens_get_the_null_token():
    m = moa(num_routed_queries=2, num_experts=2)
    x, mask = data(N=12, drop=0.0)
    r = m.route(x, mask=mask)
    routed = torch.zeros(2, 12, dtype=torch.bool)
    for b in range(2):
        routed[b, r.q_index[b][r.q_valid[b]]] = True
    assert (~routed).any()
    out = m.attend(x, None, r, mask)
    assert torch.equal(out[~routed], m.null_routed_token.detach().expand(int((~routed).sum()), 16))
    assert not torch.equal(out[routed][0], m.null_routed_token.detach())


def test_routing_is_a_plain_input_to_attend():
    m = moa(num_routed_queries=3, num_routed_key_values=4, num_experts=2)
    x, mask = data(N=9, drop=0.0)
    r = m.route(x, mask=mask)
    # a hand-made routing: expert 0 takes tokens {0, 1, 2}, expert 1 only token 2 (two invalid slots)
    q_index = torch.tensor([[0, 1, 2], [2, 0, 0]]).expand(2, 2, 3)
    q_valid = torch.tensor([[True, True, True], [True, False, False]]).expand(2, 2, 3)
    q_weight = torch.sigmoid(r.q_scores).gather(-1, q_index) * q_valid
    r2 = Routing(
        q_index=q_index, q_weight=q_weight, q_valid=q_valid,
        kv_index=r.kv_index, kv_weight=r.kv_weight, kv_valid=r.kv_valid, q_scores=r.q_scores, kv_scores=r.kv_scores,
    )
    out = m.attend(x, None, r2, mask)
    ref = mixture_reference(m, x, mask=mask, routing=r2)
    close(out, ref, 1e-10)
    assert torch.equal(out[:, 3:], m.null_routed_token.detach().expand(2, 6, 16))


def test_batch_independence():
    m = moa(local_attn=True, local_attn_window_size=3)
    x, mask = data(B=3, N=12)
    out = m(x, mask=mask)
    y = x.clone()
    y[1:] = torch.randn_like(y[1:]) * 5
    close(m(y, mask=mask)[0], out[0], 1e-12)
    close(m(x[:1], mask=mask[:1])[0], out[0], 1e-12)


def test_average_routed_divides_by_routing_count():
    x, mask = data(N=6, drop=0.0)
    summed = moa(num_routed_queries=8, num_routed_key_values=8)(x, mask=mask)
    averaged = moa(num_routed_queries=8, num_routed_key_values=8, average_routed=True)(x, mask=mask)
    close(averaged * 3, summed, 1e-12)  # every token routed by all 3 experts
    kw = dict(num_routed_queries=8, num_routed_key_values=8, local_attn=True, local_attn_window_size=2)
    close(moa(average_routed=True, **kw)(x, mask=mask) * 4, moa(**kw)(x, mask=mask), 1e-12)


def test_local_branch_is_added_to_every_token():
    m = moa(num_routed_queries=1, local_attn=True, local_attn_window_size=3)
    x, mask = data(N=12, drop=0.0)
    with_local = m(x, mask=mask)
    r = m.route(x, mask=mask)
    torch.nn.init.zeros_(m.local.to_out)
    without = m.attend(x, None, r, mask)
    unrouted = torch.ones(2, 12, dtype=torch.bool)
    for b in range(2):
        unrouted[b, r.q_index[b][r.q_valid[b]]] = False
    assert (without[unrouted] == 0).all()  # no null token with a local branch
    assert (with_local[unrouted] != 0).all()


def test_router_learns_through_the_weights():
    for router in ("straight_through", "coor_descent"):
        m = moa(router=router)
        x, mask = data(N=12)
        m(x, mask=mask).square().sum().backward()
        assert m.q_router.grad.abs().sum() > 0 and m.kv_router.grad.abs().sum() > 0


def test_dropout_train_vs_eval():
    m = moa(dropout=0.5)
    x, mask = data(N=12, drop=0.0)
    m.eval()
    ev = m(x, mask=mask)
    close(ev, mixture_reference(m, x, mask=mask), 1e-10)
    m.train()
    assert not torch.allclose(m(x, mask=mask), ev)


def test_bad_arguments_raise_clear_errors():
    given = dict(experts=loop_experts, kernels=DenseKernels())
    with pytest.raises(ValueError, match="num_routed_queries"):
        MixtureOfAttention(16, num_routed_queries=0, num_routed_key_values=2, **given)
    with pytest.raises(ValueError, match="local_attn_window_size"):
        MixtureOfAttention(16, num_routed_queries=2, num_routed_key_values=2, local_attn=True, **given)
    with pytest.raises(ValueError, match="router"):
        MixtureOfAttention(16, num_routed_queries=2, num_routed_key_values=2, router="softmax", **given)
    with pytest.raises(TypeError, match="experts"):
        MixtureOfAttention(16, num_routed_queries=2, num_routed_key_values=2, experts="fast", kernels=DenseKernels())
    with pytest.raises(ValueError, match="use_triton=True and flash_attn=True"):
        moa(use_triton=True, flash_attn=True)
    with pytest.raises(ValueError, match="takes no kernel"):
        moa(strategy="flex", kernel="naive")
    with pytest.raises(ValueError, match="not causal"):
        MixtureOfAutoregressiveAttention(16, num_routed_queries=2, num_routed_key_values=2, local_attn_window_size=4,
                                         router="coor_descent", **given)
    m = moa()
    x, mask = data()
    with pytest.raises(ValueError, match="x: expected"):
        m(x[..., :8])
    with pytest.raises(TypeError, match="mask"):
        m(x, mask=mask.float())
    with pytest.raises(ValueError, match="context_mask"):
        m(x, context_mask=mask)
    with pytest.raises(ValueError, match="self-attention only"):
        moa(local_attn=True, local_attn_window_size=2)(x, context=x)


def test_requested_kernels_never_fall_back_silently():
    x, _ = data()
    if registry().get("dense/flash_attn").unavailable() or not torch.cuda.is_available():
        with pytest.raises(KernelUnavailable, match="flash-attn"):
            moa(flash_attn=True)(x)
    with pytest.raises(KernelUnavailable, match="no dense implementation named 'nope'"):
        moa(kernel="nope")(x)
    m = moa()
    m(x)
    assert m.last_kernel == ("dense/naive" if x.device.type == "cpu" else m.last_kernel)


# -- the autoregressive mixture -------------------------------------------------------------------

AR_CONFIGS = [
    dict(),  # R = 4 > kq = 2: causal threshold routing
    dict(routed_window_size=2),  # R <= kq: every token of a window routed
    dict(routed_window_size=3, num_routed_key_values=20),  # every past token routed, weight 1
    dict(average_routed=True, num_experts=3),
]


@pytest.mark.parametrize("strategy", ["loop", "batched"])
@pytest.mark.parametrize("cfg", AR_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_autoregressive_matches_oracle(strategy, cfg):
    m = moar(strategy=strategy, **cfg)
    x, mask = data(N=15, drop=0.15)
    out, gx = out_and_grad(lambda t: m(t, mask=mask), x)
    ref, gref = out_and_grad(lambda t: autoregressive_mixture_reference(m, t, mask=mask), x)
    close(out, ref, 1e-10)
    close(gx, gref, 1e-10)
    assert (out[~mask] == 0).all()


def test_autoregressive_routing_equals_oracle_routing():
    m = moar(num_routed_queries=2, num_routed_key_values=3, routed_window_size=4)
    x, mask = data(N=18, drop=0.2)
    r = m.route(x, mask)
    q_sets, kv_sets = autoregressive_sets(m, x, mask)
    for b in range(2):
        for g in range(2):
            for i in range(r.q_index.shape[2]):
                start = 4 * (i + 1)
                q = r.q_index[b, g, i][r.q_valid[b, g, i]]
                kv = r.kv_index[b, g, i][r.kv_valid[b, g, i]]
                assert torch.equal(q, q_sets[b][g][i]) and torch.equal(kv, kv_sets[b][g][i])
                assert len(q) <= 2 and ((q >= start) & (q < start + 4)).all() and (kv < start).all()
                past = mask[b, :start]
                assert route_is_valid(r.kv_scores[b, g, :start], kv, 3, past)


@pytest.mark.parametrize("strategy", ["loop", "batched"])
@pytest.mark.parametrize("cfg", AR_CONFIGS[:3], ids=["threshold", "all-queries", "all-keys"])
def test_autoregressive_is_strictly_causal(strategy, cfg):
    m = moar(strategy=strategy, **cfg)
    x, mask = data(B=1, N=14, drop=0.1)
    out = m(x, mask=mask)
    for t in (3, 4, 6, 11):
        y = x.clone()
        y[:, t + 1:] = torch.randn_like(y[:, t + 1:]) * 10  # large: flips every future routing decision
        assert torch.equal(m(y, mask=mask)[:, : t + 1], out[:, : t + 1]), t
        xg = x.clone().requires_grad_(True)
        m(xg, mask=mask)[:, t].sum().backward()
        assert (xg.grad[:, t + 1:] == 0).all(), t
        assert xg.grad[:, : t + 1].abs().sum() > 0


def test_autoregressive_short_sequence_is_local_only():
    m = moar()
    x, mask = data(N=4)
    r = m.route(x, mask)
    assert r.q_index.shape[2] == 0
    torch.nn.init.zeros_(m.to_out)
    close(m(x, mask=mask), autoregressive_mixture_reference(m, x, mask), 1e-12)


def test_autoregressive_decisions_do_not_depend_on_length():
    m = moar(routed_window_size=4)
    x, mask = data(B=1, N=16, drop=0.0)
    close(m(x[:, :10])[:, :10], m(x)[:, :10], 1e-12)



# Smallest configs the property suite found (float16): the last routed window is padded with zero
# rows, and an empty query slot (N=3) / key slot (N=5) points at one. rms_norm's eps underflowed in
# float16, so that row gave 0/0 = NaN: in the output (key slot) and in dx (query slot).
TINY_AR = dict(dim=16, dim_head=8, heads=1, local_attn_window_size=1, routed_window_size=2, num_experts=1)


@pytest.mark.parametrize("strategy", ["loop", "batched"])
@pytest.mark.parametrize("N, kq, kk", [(3, 2, 1), (5, 1, 3)], ids=["empty-query-slot", "empty-key-slot"])
def test_autoregressive_float16_padding_gives_no_nan(strategy, N, kq, kk):
    m = mixture("MixtureOfAutoregressiveAttention", strategy, **TINY_AR, num_routed_queries=kq,
                num_routed_key_values=kk)
    m = m.to(torch.float16)
    for seed in range(4):
        x, _ = data(B=1, N=N, seed=seed, dtype=torch.float16)
        r = m.route(x)
        assert not r.q_valid.all() or not r.kv_valid.all()  # some slot is empty: the case under test
        xg = x.clone().requires_grad_(True)
        out = m(xg)
        out.sum().backward()
        assert torch.isfinite(xg.grad).all(), seed
        close(out, autoregressive_mixture_reference(m, x, routing=r), 2e-2)


def test_rms_norm_of_a_zero_row_is_zero_in_float16():
    x = torch.zeros(2, 16, dtype=torch.float16, requires_grad=True)
    y = rms_norm(x, torch.ones(16, dtype=torch.float16))
    assert (y == 0).all()
    (y * torch.tensor([[0.0], [1.0]], dtype=torch.float16)).sum().backward()
    assert (x.grad[0] == 0).all()  # a padding row gets no upstream gradient: exactly 0, was NaN
    assert not x.grad[1].isnan().any()  # d(x/|x|) at 0 is 1/eps: inf in float16, never NaN


# -- the third-party adapter (optional: skipped when mixture-of-attention is absent) ----------------


def _upstream(variant, **kw):
    pytest.importorskip("mixture_of_attention")
    torch.manual_seed(0)
    return registry().get(f"{variant}/lucidrains").fn(**SMALL, num_experts=2, **kw)


def test_upstream_adapter_runs_and_masks():
    m = _upstream("MixtureOfAttention", num_routed_queries=4, num_routed_key_values=4)
    x, mask = data(N=12, dtype=torch.float32)
    out = m(x, mask=mask)
    assert out.shape == x.shape and (out[~mask] == 0).all()


def test_upstream_drops_local_branch_on_short_sequences():
    """Counterexample (NOTES.md): seq <= num_routed -> the upstream local branch has no effect."""
    m = _upstream("MixtureOfAttention", num_routed_queries=8, num_routed_key_values=8, local_attn=True,
                  local_attn_window_size=2)
    x, _ = data(B=1, N=4, dtype=torch.float32)
    before = m(x)
    torch.nn.init.zeros_(m.inner.local_attn.to_out.weight)
    assert torch.equal(m(x), before)  # the contract adds the local branch to every token


def test_upstream_autoregressive_is_not_causal():
    """Counterexample (NOTES.md): a later token of the same window changes an earlier output."""
    m = _upstream("MixtureOfAutoregressiveAttention", num_routed_queries=2, num_routed_key_values=3,
                  local_attn_window_size=4)
    x, _ = data(B=1, N=12, dtype=torch.float32)
    y = x.clone()
    y[:, 5:8] = 20 * m.inner.query_router.routing_token.detach().sum(0)  # later tokens take every query slot
    assert not torch.allclose(m(y)[:, :5], m(x)[:, :5])  # ... and position 4's output changes


# -- CUDA ------------------------------------------------------------------------------------------

def _attend(m, mask, ar, x):
    # routed inside the differentiated function: the router weights scale the outputs, so the
    # input gradient flows through them too (as in the oracle, which recomputes them from x)
    r = m.route(x, mask=mask)
    return m.attend(x, r, mask) if ar else m.attend(x, None, r, mask)


def _reference(m, mask, ar, x):
    r = m.route(x.detach(), mask=mask)  # the same selection; only the sets are taken from it
    if ar:
        return autoregressive_mixture_reference(m, x, mask, routing=r)
    return mixture_reference(m, x, mask=mask, routing=r)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dim_head", [16, 8])  # 8: compiled flex needs >= 16 and pads (GPU property run)
@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
@pytest.mark.parametrize("variant", ["MixtureOfAttention", "MixtureOfAutoregressiveAttention"])
def test_impls_match_oracle_on_device(variant, dev, dim_head):
    """Every registered implementation on the device, output and input gradient (through the
    router weights too) against the float64 oracle."""
    ar = variant.startswith("MixtureOfAuto")
    kw = dict(dim=32, dim_head=dim_head, heads=2, num_experts=2, num_routed_queries=3 if ar else 6,
              num_routed_key_values=5 if ar else 7)
    if ar:
        kw["local_attn_window_size"] = 4
    x, mask = data(N=21, dim=32, dtype=torch.float32)
    x, mask = x.to(dev), mask.to(dev)
    tested, errors = [], []
    for impl in registry().select(variant=variant):
        if not impl.device_ok(dev) or "float32" not in impl.dtypes or impl.name == "lucidrains":
            continue
        torch.manual_seed(0)
        m = impl.fn(**kw).to(dev)
        out, gx = out_and_grad(partial(_attend, m, mask, ar), x)
        ref, gref = out_and_grad(partial(_reference, m, mask, ar), x)
        tested.append(f"{impl.name}:{m.last_kernel}")
        errors.append((tested[-1], rel_error(out, ref), rel_error(gx, gref)))
    bad = [e for e in errors if not (e[1] <= 1e-4 and e[2] <= 1e-4)]
    assert not bad, f"(impl:kernel, out error, input-gradient error) over 1e-4: {bad}"
    assert len(tested) >= 3 and (dev == "cpu" or any(t.startswith("flex") for t in tested)), tested
