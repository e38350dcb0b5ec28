"""The module property tiers on modules written from scratch, with their own parameter names,
as a user with a third-party module would bring them: the black-box and decoding tiers need no
weights map, the white-box tier a map of a few lines, and without the map it is `unsupported`
(a skip), never a failure. Deliberately broken copies show that each tier can fail."""

from __future__ import annotations

import math

import pytest
import torch
from _pytest.outcomes import Skipped
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from attnbench.properties import test_modules as props
from attnbench.registry import Decoder, Impl


# -- a routed mixture from scratch (SEMANTICS.md "Routed attention", straight-through router) ---
class ScratchExpert(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, prenorm: bool) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.gain_q = nn.Parameter(torch.ones(dim)) if prenorm else None
        self.gain_kv = nn.Parameter(torch.ones(dim)) if prenorm else None
        self.wq, self.wk, self.wv = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.wo = nn.Linear(inner, dim, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, heads, dim_head))

    def forward(self, xq, xkv, wq, wkv, keep, scale_power=-0.5):
        """xq (n, dim), xkv (m, dim), router weights wq (n,), wkv (m,), keep (m,) -> (n, dim)."""
        def rms(t, gain):
            return t if gain is None else t * math.sqrt(t.shape[-1]) / t.norm(dim=-1, keepdim=True).clamp_min(1e-12) * gain

        h, d = self.heads, self.dim_head
        q = self.wq(rms(xq, self.gain_q)).view(-1, h, d).transpose(0, 1)
        hk = rms(xkv, self.gain_kv)
        k = self.wk(hk).view(-1, h, d).transpose(0, 1)
        v = (self.wv(hk) * wkv[:, None]).view(-1, h, d).transpose(0, 1)
        k = torch.cat((self.null_kv[0][:, None], k), dim=1)
        v = torch.cat((self.null_kv[1][:, None], v), dim=1)
        s = q @ k.transpose(-1, -2) * d**scale_power
        s = s.masked_fill(~torch.cat((keep.new_ones(1), keep))[None, None], float("-inf"))
        out = (s.softmax(-1) @ v).transpose(0, 1).reshape(len(xq), h * d)
        return self.wo(out) * wq[:, None]


class ScratchMixture(nn.Module):
    def __init__(self, *, dim, num_routed_queries, num_routed_key_values, num_experts=2, dim_head=64, heads=8,
                 prenorm=True, average_routed=False, router="straight_through", dropout=0.0, bug=""):
        super().__init__()
        self.kq, self.kk, self.average, self.bug = num_routed_queries, num_routed_key_values, average_routed, bug
        self.route_q = nn.Linear(dim, num_experts, bias=False)
        self.route_kv = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(ScratchExpert(dim, heads, dim_head, prenorm) for _ in range(num_experts))
        self.unrouted = nn.Parameter(torch.randn(dim))

    def _pick(self, s, k, keep):
        """Top-k of the unmasked scores (all unmasked, weight 1, when the row is <= k long)."""
        if self.bug != "masked_keys_routed":
            s = s.masked_fill(~keep, float("-inf"))
        n = int(keep.sum()) if self.bug != "masked_keys_routed" else len(s)
        idx = torch.topk(s, min(k, n)).indices
        weight = torch.ones(len(idx), dtype=s.dtype) if len(s) <= k else torch.sigmoid(s[idx])
        return idx, weight

    def forward(self, x, context=None, mask=None, context_mask=None):
        if context is not None:
            raise ValueError("context: self-attention only")
        B, N, dim = x.shape
        keep = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
        sq = self.route_q(x).transpose(1, 2) / math.sqrt(dim)
        skv = self.route_kv(x).transpose(1, 2) / math.sqrt(dim)
        power = -0.25 if self.bug == "scale" else -0.5
        rows = []
        for b in range(B):
            total, count = torch.zeros(N, dim, dtype=x.dtype), torch.zeros(N, dtype=x.dtype)
            for g, expert in enumerate(self.experts):
                qi, wq = self._pick(sq[b, g], self.kq, keep[b])
                ki, wkv = self._pick(skv[b, g], self.kk, keep[b])
                if len(qi):
                    total = total.index_add(0, qi, expert(x[b, qi], x[b, ki], wq, wkv, keep[b, ki], power))
                    count = count.index_add(0, qi, torch.ones(len(qi), dtype=x.dtype))
            if self.average:
                total = total / count.clamp(min=1)[:, None]
            total = torch.where(count[:, None] == 0, self.unrouted.to(x.dtype), total)
            rows.append(torch.where(keep[b][:, None], total, torch.zeros((), dtype=x.dtype)))
        return torch.stack(rows)


def scratch_mixture_weights(m: ScratchMixture) -> dict:
    """The white-box map onto MixtureOfAttention's reference layout: a few stacks and transposes."""
    ex = m.experts
    stack = lambda f: torch.stack([f(e) for e in ex])  # noqa: E731
    out = {"q_router": m.route_q.weight, "kv_router": m.route_kv.weight, "null_routed_token": m.unrouted,
           "to_q": stack(lambda e: e.wq.weight.T), "to_k": stack(lambda e: e.wk.weight.T),
           "to_v": stack(lambda e: e.wv.weight.T), "to_out": stack(lambda e: e.wo.weight.T),
           "null_k": stack(lambda e: e.null_kv[0]), "null_v": stack(lambda e: e.null_kv[1])}
    if ex[0].gain_q is not None:
        out.update(norm=stack(lambda e: e.gain_q), context_norm=stack(lambda e: e.gain_kv))
    return out


MIXTURE_OPTIONS = {"router": ("straight_through",), "local_attn": (False,)}


def mixture_impl(weights=None, bug: str = "") -> Impl:
    return Impl(name="scratch" + (f"_{bug}" if bug else ""), variant="MixtureOfAttention",
                fn=lambda **kw: ScratchMixture(**kw, bug=bug), features={"key_padding", "backward"},
                options=MIXTURE_OPTIONS, weights=weights)


# -- a causal sliding-window attention with a KV cache, from scratch (LocalMHA's exact window) --
class ScratchWindow(nn.Module):
    def __init__(self, *, dim, window_size, dim_head=64, heads=8, causal=True, bug="", **_fixed):
        super().__init__()
        inner = heads * dim_head
        self.w, self.h, self.d, self.bug = window_size, heads, dim_head, bug
        self.wq, self.wk, self.wv = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.wo = nn.Linear(inner, dim, bias=False)

    def forward(self, x, mask=None, attn_bias=None, cache=None):
        B, n, _ = x.shape
        split = lambda t: t.view(B, n, self.h, self.d).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        if cache is not None:
            k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
        m = k.shape[2]
        qpos = torch.arange(m - n, m)[:, None]
        kpos = torch.arange(m)[None]
        width = self.w - 1 if (self.bug == "cache_window" and cache is not None) else self.w
        visible = (kpos <= qpos) & (kpos >= qpos - width)
        if mask is not None:
            visible = visible & mask[:, None, None, :]
        s = (q @ k.transpose(-1, -2) * self.d**-0.5).masked_fill(~visible, float("-inf"))
        out = torch.nan_to_num(s.softmax(-1)) @ v
        return self.wo(out.transpose(1, 2).reshape(B, n, -1)), (k, v)


def window_step(module, x, cache, mask=None):
    return module(x, mask=mask, cache=cache)


WINDOW_OPTIONS = {"causal": (True,), "exact_windowsize": (True,), "prenorm": (False,), "qk_rmsnorm": (False,),
                  "use_xpos": (False,)}


def window_impl(weights=None, bug: str = "") -> Impl:
    return Impl(name="scratch" + (f"_{bug}" if bug else ""), variant="LocalMHA",
                fn=lambda **kw: _Forward(ScratchWindow(**kw, bug=bug)),
                features={"causal", "sliding_window", "key_padding", "backward"}, options=WINDOW_OPTIONS,
                weights=weights, decode=Decoder(lambda m, x, c, mask=None: m.inner(x, mask=mask, cache=c), mask=True))


class _Forward(nn.Module):
    """The seed forward (out only) around the scratch module, which returns (out, cache)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, mask=None, attn_bias=None):
        if attn_bias is not None:
            raise ValueError("attn_bias: not supported")
        return self.inner(x, mask=mask)[0]


def window_weights(m: _Forward) -> dict:
    s = m.inner
    return {"to_qkv.weight": torch.cat((s.wq.weight, s.wk.weight, s.wv.weight)), "to_out.weight": s.wo.weight}


# -- running the properties directly ---------------------------------------------------------------
BLACK_BOX = ("test_module_batch_elements_are_independent", "test_module_masked_tokens_have_no_influence",
             "test_module_padding_does_not_change_kept_outputs", "test_module_is_deterministic")
WHITE_BOX = ("test_module_forward_matches_oracle", "test_module_gradients_match_oracle")


def run(name: str, impl: Impl, examples: int = 6) -> str:
    """'pass', 'skip: reason' or 'fail: message' for one property on one implementation (a
    fresh @given around the property's body, so its own settings stay untouched)."""
    body = getattr(props, name).hypothesis.inner_test
    test = settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    phases=[Phase.explicit, Phase.generate])(given(data=st.data())(body))  # no shrinking
    try:
        test(impl=impl, device="cpu", measure=lambda ratio: None)
    except Skipped as exc:
        return f"skip: {exc}"
    except AssertionError as exc:
        return f"fail: {exc}"
    return "pass"


@pytest.mark.parametrize("name", [*BLACK_BOX, "test_moa_unrouted_tokens_share_one_output"])
def test_scratch_mixture_black_box_needs_no_weights_map(name):
    assert run(name, mixture_impl()) == "pass"


@pytest.mark.parametrize("name", WHITE_BOX)
def test_white_box_without_a_map_is_unsupported_not_failed(name):
    verdict = run(name, mixture_impl())
    assert verdict.startswith("skip: unsupported") and "weights" in verdict, verdict


@pytest.mark.parametrize("name", WHITE_BOX)
def test_scratch_mixture_white_box_through_a_few_line_map(name):
    assert run(name, mixture_impl(weights=scratch_mixture_weights)) == "pass"


def test_routing_properties_without_a_hook_are_unsupported():
    verdict = run("test_moa_routing_is_a_valid_top_k", mixture_impl())
    assert verdict.startswith("skip: unsupported") and "route" in verdict, verdict


@pytest.mark.parametrize("name", ["test_module_masked_tokens_have_no_influence", "test_module_forward_matches_oracle"])
def test_a_mixture_that_routes_masked_keys_fails(name):
    verdict = run(name, mixture_impl(weights=scratch_mixture_weights, bug="masked_keys_routed"))
    assert verdict.startswith("fail"), verdict


def test_a_wrong_attention_scale_fails_only_the_white_box_tier():
    broken = mixture_impl(weights=scratch_mixture_weights, bug="scale")
    assert run("test_module_batch_elements_are_independent", broken) == "pass"
    assert run("test_module_forward_matches_oracle", broken).startswith("fail")


@pytest.mark.parametrize("name", [*BLACK_BOX, "test_module_causal_future_has_no_influence",
                                  "test_module_decoding_equals_the_full_causal_pass"])
def test_scratch_window_black_box_and_decoding_need_no_weights_map(name):
    assert run(name, window_impl()) == "pass"


@pytest.mark.parametrize("name", WHITE_BOX)
def test_scratch_window_white_box_through_a_few_line_map(name):
    assert run(name, window_impl(weights=window_weights)) == "pass"


def test_a_cache_that_drops_a_key_fails_decoding():
    assert run("test_module_decoding_equals_the_full_causal_pass", window_impl(bug="cache_window")).startswith("fail")


def test_undeclared_options_are_never_drawn():
    """Only the declared values of an option reach the module (an unsupported one is never a fail)."""
    seen = []

    def fn(**kw):
        seen.append(kw)
        return ScratchMixture(**kw)

    impl = Impl(name="scratch", variant="MixtureOfAttention", fn=fn, features={"key_padding"}, options=MIXTURE_OPTIONS)
    assert run("test_module_is_deterministic", impl) == "pass"
    assert seen and all(kw["router"] == "straight_through" and not kw.get("local_attn") for kw in seen)


def test_a_module_impl_defaults_to_float32_only():
    assert mixture_impl().dtypes == ("float32",)
    assert Impl(name="k", variant="dense", fn=lambda *a, **k: None).dtypes == ("float64", "float32", "float16", "bfloat16")


def test_module_hooks_on_a_kernel_variant_are_refused():
    with pytest.raises(ValueError, match="module variants only"):
        Impl(name="k", variant="dense", fn=lambda *a, **k: None, weights={})
